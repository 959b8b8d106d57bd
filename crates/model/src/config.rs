//! Model configuration: read from a Hugging Face `config.json`, or given for a model trained
//! from scratch, and written back in Hugging Face's form.

use std::collections::BTreeMap;
use std::path::Path;

use finetune_task::ProblemType;
use serde_json::{Value, json};

use crate::ModelError;

/// The encoder families whose checkpoints load here. They share one architecture (post-LN
/// transformer encoder) and differ in key names, embeddings and classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT and its distillations (MiniLM): token types, pooler, `pooler → dropout → classifier`.
    Bert,
    /// DistilBERT: no token types, no pooler; `pre_classifier → ReLU → dropout → classifier`.
    DistilBert,
    /// RoBERTa: positions start after the padding index; `dense → tanh → out_proj` on `<s>`.
    Roberta,
    /// ELECTRA discriminators: BERT's layers under embeddings of their own (narrower) width,
    /// projected up by `embeddings_project`; `dropout → dense → GELU → dropout → out_proj`.
    Electra,
    /// DeBERTa-v2 and -v3 (`model_type: deberta-v2`): BERT's layers with disentangled
    /// attention ([`RelativeAttention`]), usually no absolute positions, the masked embedding
    /// output; the ContextPooler head, `dropout → dense → GELU → dropout → classifier`.
    DebertaV2,
    /// ModernBERT: pre-norm layers without biases, rotary positions, GeGLU, alternating global
    /// and sliding-window attention, a final norm ([`ModernBertLayout`]); the head pools (first
    /// token or mean), then `dense → GELU → norm → dropout → classifier`.
    ModernBert,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::DistilBert => "distilbert",
            Family::Roberta => "roberta",
            Family::Electra => "electra",
            Family::DebertaV2 => "deberta-v2",
            Family::ModernBert => "modernbert",
        }
    }

    /// The prefix of encoder keys in a `*ForSequenceClassification` checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::DistilBert => "distilbert",
            Family::Roberta => "roberta",
            Family::Electra => "electra",
            Family::DebertaV2 => "deberta",
            Family::ModernBert => "model",
        }
    }
}

/// How ModernBERT's layers depart from BERT's.
#[derive(Debug, Clone, PartialEq)]
pub struct ModernBertLayout {
    /// Per layer: `None` attends to every key, `Some(w)` only to keys at most `w` positions
    /// away (`local_attention / 2`).
    pub windows: Vec<Option<usize>>,
    /// RoPE base of the global layers (`full_attention`) and of the sliding-window ones.
    pub global_rope_theta: f32,
    pub local_rope_theta: f32,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub norm_bias: bool,
    pub classifier_bias: bool,
    /// `classifier_pooling: mean`: the head reads the mean over unpadded tokens, not the first.
    pub mean_pooling: bool,
    pub embedding_dropout: f64,
    pub mlp_dropout: f64,
}

/// DeBERTa's disentangled attention: besides content-to-content, each query attends to the
/// relative position of each key (c2p) and each key's content to the query's relative
/// position (p2c), through one table of relative position embeddings shared by the layers and
/// projected by each layer's own query and key projections (`share_att_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativeAttention {
    /// Distances are log-bucketed into this many classes each way (DeBERTa-v3); 0 takes
    /// them as they are, clamped at `max_relative_positions` (DeBERTa-v2).
    pub position_buckets: usize,
    /// The farthest distance the buckets reach.
    pub max_relative_positions: usize,
    pub content_to_position: bool,
    pub position_to_content: bool,
    /// LayerNorm on the relative embedding table (`norm_rel_ebd: layer_norm`).
    pub norm_embeddings: bool,
}

impl RelativeAttention {
    /// Distances either way that have their own row: the table holds `2 × span` rows.
    pub fn span(&self) -> usize {
        match self.position_buckets {
            0 => self.max_relative_positions,
            buckets => buckets,
        }
    }

    /// How many score terms the attention sums (content plus each position term); the scores
    /// are divided by `sqrt(head_dim × terms)`.
    pub fn terms(&self) -> usize {
        1 + usize::from(self.content_to_position) + usize::from(self.position_to_content)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with erf, as BERT's `gelu`.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the embedding tables; below `hidden_size` only in ELECTRA, whose
    /// `embeddings_project` maps it up.
    pub embedding_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// 0 when the family has no token type embeddings.
    pub type_vocab_size: usize,
    /// Whether the embeddings add absolute position embeddings (DeBERTa-v3's do not).
    pub absolute_positions: bool,
    /// DeBERTa's relative position terms.
    pub relative_attention: Option<RelativeAttention>,
    /// ModernBERT's layer layout.
    pub modern_bert: Option<ModernBertLayout>,
    /// Dropout before the head's dense layer, where it differs from `classifier_dropout`
    /// (DeBERTa's `pooler_dropout`).
    pub pooler_dropout: Option<f64>,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub classifier_dropout: f64,
    pub pad_token_id: usize,
    pub initializer_range: f64,
    /// Label names in id order (a regression's target names).
    pub labels: Vec<String>,
    /// What the head's outputs mean (config.json's `problem_type`).
    pub problem_type: ProblemType,
    /// A multi-label model's decision threshold, tuned on validation when it was trained
    /// (config.json's `decision_threshold`: a key of ours, which Python keeps as an attribute).
    pub decision_threshold: Option<f64>,
    /// The config.json this came from, kept so that saving preserves keys we do not use.
    pub original: Option<Value>,
}

impl ModelConfig {
    /// Reads a Hugging Face config.json (`file` names it in errors).
    pub fn from_hf_json(file: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(file).map_err(|e| ModelError::io(file, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            file: file.into(),
            key: "-".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_hf_value(file, json)
    }

    pub fn from_hf_value(file: &Path, json: Value) -> Result<ModelConfig, ModelError> {
        let get = Getter { file, json: &json };
        let model_type = get.str("model_type")?;
        let family = match model_type.as_str() {
            "bert" => Family::Bert,
            "distilbert" => Family::DistilBert,
            "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
            "electra" => Family::Electra,
            "deberta-v2" => Family::DebertaV2,
            "modernbert" => Family::ModernBert,
            other => {
                return Err(ModelError::Config {
                    file: file.into(),
                    key: "model_type".into(),
                    message: format!(
                        "`{other}` is not supported; supported: bert (MiniLM too), distilbert, roberta, electra, deberta-v2 (DeBERTa-v3 too), modernbert"
                    ),
                });
            }
        };
        let labels = labels_from(&json);
        let problem_type = problem_type_from(&get, labels.len())?;
        let mut config = match family {
            Family::DistilBert => distilbert_config(&get, labels)?,
            Family::DebertaV2 => deberta_config(&get, labels)?,
            Family::ModernBert => modern_bert_config(&get, labels)?,
            _ => bert_config(&get, family, labels)?,
        };
        config.problem_type = problem_type;
        config.decision_threshold = match json.get("decision_threshold") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_f64() {
                Some(p) if p > 0.0 && p < 1.0 => Some(p),
                _ => {
                    return Err(get.error("decision_threshold", "is not a probability in (0, 1)"));
                }
            },
        };
        if config.num_heads == 0 || !config.hidden_size.is_multiple_of(config.num_heads) {
            return Err(ModelError::Config {
                file: file.into(),
                key: "num_attention_heads".into(),
                message: format!(
                    "{} heads do not divide the hidden size {}",
                    config.num_heads, config.hidden_size
                ),
            });
        }
        Ok(ModelConfig {
            original: Some(json),
            ..config
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// Parameters of the whole classifier.
    pub fn parameter_count(&self) -> u64 {
        let (h, i, l) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_layers as u64,
        );
        let e = self.embedding_size as u64;
        let projection = if e == h { 0 } else { e * h + h };
        let positions = match self.absolute_positions {
            true => self.max_position_embeddings,
            false => 0,
        };
        let relative = self
            .relative_attention
            .map_or(0, |r| 2 * r.span() as u64 * h + 2 * h);
        let embeddings = (self.vocab_size + positions + self.type_vocab_size) as u64 * e
            + 2 * e
            + projection
            + relative;
        let layer = match self.modern_bert {
            // Wqkv and Wo, Wi (twice the width, for the gate) and Wo, two norms; no biases.
            Some(_) => 4 * h * h + 3 * h * i + 2 * h,
            None => 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h,
        };
        let head = h * h + h + (h + 1) * self.labels.len().max(1) as u64;
        embeddings + l * layer + head
    }

    /// Bytes one training step needs at `batch` rows of `length` tokens: weights, gradients and
    /// AdamW's two moments (16 bytes a parameter), plus the activations autodiff keeps for the
    /// backward pass — per layer about 20 hidden-sized and 3 intermediate-sized values per
    /// token, and 5 attention maps (scores, scaled and masked, softmax, dropout mask and output)
    /// per head. Calibrated on all-MiniLM-L6-v2 at 16 × 64: estimate 760 MiB, measured peak RSS
    /// of the whole process 708 MiB. An estimate, deliberately on the high side.
    pub fn training_bytes(&self, batch: usize, length: usize) -> u64 {
        let (b, n) = (batch as u64, length as u64);
        let (h, i, heads) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_heads as u64,
        );
        // DeBERTa keeps two position-score maps, their gathered forms and their sum as well.
        let maps = match self.relative_attention {
            Some(relative) => 5 + 2 * (relative.terms() as u64 - 1) + 1,
            None => 5,
        };
        let per_layer = b * n * (20 * h + 3 * i) + maps * b * heads * n * n;
        16 * self.parameter_count() + 4 * per_layer * self.num_layers as u64
    }

    /// Positions usable by text (RoBERTa's start after the padding index).
    pub fn usable_positions(&self) -> usize {
        match self.family {
            Family::Roberta => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id + 1),
            _ => self.max_position_embeddings,
        }
    }

    /// config.json for `save_pretrained`-compatible output, with this config's labels.
    pub fn to_hf_json(&self) -> Value {
        let mut json = self
            .original
            .clone()
            .unwrap_or_else(|| self.fresh_hf_json());
        let object = json.as_object_mut().expect("a config is a JSON object");
        let architecture = match self.family {
            Family::Bert => "BertForSequenceClassification",
            Family::DistilBert => "DistilBertForSequenceClassification",
            Family::Roberta => "RobertaForSequenceClassification",
            Family::Electra => "ElectraForSequenceClassification",
            Family::DebertaV2 => "DebertaV2ForSequenceClassification",
            Family::ModernBert => "ModernBertForSequenceClassification",
        };
        object.insert("architectures".into(), json!([architecture]));
        let id2label: BTreeMap<String, &String> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l))
            .collect();
        let label2id: BTreeMap<&String, usize> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l, i))
            .collect();
        object.insert("id2label".into(), json!(id2label));
        object.insert("label2id".into(), json!(label2id));
        object.insert("problem_type".into(), json!(self.problem_type.as_str()));
        match self.decision_threshold {
            Some(threshold) => object.insert("decision_threshold".into(), json!(threshold)),
            None => object.remove("decision_threshold"),
        };
        json
    }

    fn fresh_hf_json(&self) -> Value {
        let act = match self.hidden_act {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        };
        let mut json = match self.family {
            Family::DistilBert => json!({
                "model_type": "distilbert", "vocab_size": self.vocab_size, "dim": self.hidden_size,
                "n_layers": self.num_layers, "n_heads": self.num_heads, "hidden_dim": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings, "activation": act,
                "dropout": self.hidden_dropout, "attention_dropout": self.attention_dropout,
                "seq_classif_dropout": self.classifier_dropout, "pad_token_id": self.pad_token_id,
                "initializer_range": self.initializer_range,
            }),
            _ => json!({
                "model_type": self.family.model_type(), "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps, "hidden_act": act,
                "hidden_dropout_prob": self.hidden_dropout, "attention_probs_dropout_prob": self.attention_dropout,
                "classifier_dropout": self.classifier_dropout, "pad_token_id": self.pad_token_id,
                "initializer_range": self.initializer_range, "position_embedding_type": "absolute",
            }),
        };
        if self.family == Family::Electra {
            json["embedding_size"] = json!(self.embedding_size);
        }
        json
    }
}

fn distilbert_config(get: &Getter, labels: Vec<String>) -> Result<ModelConfig, ModelError> {
    Ok(ModelConfig {
        family: Family::DistilBert,
        vocab_size: get.usize("vocab_size")?,
        hidden_size: get.usize("dim")?,
        embedding_size: get.usize("dim")?,
        num_layers: get.usize("n_layers")?,
        num_heads: get.usize("n_heads")?,
        intermediate_size: get.usize("hidden_dim")?,
        max_position_embeddings: get.usize("max_position_embeddings")?,
        type_vocab_size: 0,
        absolute_positions: true,
        relative_attention: None,
        modern_bert: None,
        layer_norm_eps: 1e-12,
        hidden_act: get.activation("activation")?,
        hidden_dropout: get.dropout_or("dropout", 0.1)?,
        attention_dropout: get.dropout_or("attention_dropout", 0.1)?,
        classifier_dropout: get.dropout_or("seq_classif_dropout", 0.2)?,
        pooler_dropout: None,
        pad_token_id: get.usize_or("pad_token_id", 0),
        initializer_range: get.f64_or("initializer_range", 0.02),
        labels,
        problem_type: ProblemType::default(),
        decision_threshold: None,
        original: None,
    })
}

/// BERT, RoBERTa and ELECTRA, which share BERT's key names for the config.
fn bert_config(
    get: &Getter,
    family: Family,
    labels: Vec<String>,
) -> Result<ModelConfig, ModelError> {
    let hidden_dropout = get.dropout_or("hidden_dropout_prob", 0.1)?;
    let hidden_size = get.usize("hidden_size")?;
    Ok(ModelConfig {
        family,
        vocab_size: get.usize("vocab_size")?,
        hidden_size,
        embedding_size: match family {
            // ElectraConfig's own default, for a config.json that leaves it out.
            Family::Electra => get.usize_or("embedding_size", 128),
            _ => hidden_size,
        },
        num_layers: get.usize("num_hidden_layers")?,
        num_heads: get.usize("num_attention_heads")?,
        intermediate_size: get.usize("intermediate_size")?,
        max_position_embeddings: get.usize("max_position_embeddings")?,
        type_vocab_size: get.usize_or("type_vocab_size", 2),
        absolute_positions: true,
        relative_attention: None,
        modern_bert: None,
        layer_norm_eps: get.f64_or("layer_norm_eps", 1e-12),
        hidden_act: get.activation("hidden_act")?,
        hidden_dropout,
        attention_dropout: get.dropout_or("attention_probs_dropout_prob", 0.1)?,
        classifier_dropout: get
            .dropout_of("classifier_dropout")?
            .unwrap_or(hidden_dropout),
        pooler_dropout: None,
        pad_token_id: get.usize_or(
            "pad_token_id",
            if family == Family::Roberta { 1 } else { 0 },
        ),
        initializer_range: get.f64_or("initializer_range", 0.02),
        labels,
        problem_type: ProblemType::default(),
        decision_threshold: None,
        original: None,
    })
}

/// DeBERTa-v2/v3, with `DebertaV2Config`'s defaults for keys a config.json leaves out.
fn deberta_config(get: &Getter, labels: Vec<String>) -> Result<ModelConfig, ModelError> {
    let hidden_dropout = get.dropout_or("hidden_dropout_prob", 0.1)?;
    let hidden_size = get.usize("hidden_size")?;
    let num_heads = get.usize("num_attention_heads")?;
    let max_position_embeddings = get.usize_or("max_position_embeddings", 512);
    // Parts of the architecture that checkpoints in use (DeBERTa-v3, v2 base) do not have.
    for (key, fine) in [
        (
            "embedding_size",
            get.usize_or("embedding_size", hidden_size) == hidden_size,
        ),
        (
            "pooler_hidden_size",
            get.usize_or("pooler_hidden_size", hidden_size) == hidden_size,
        ),
        (
            "attention_head_size",
            num_heads == 0
                || get.usize_or("attention_head_size", hidden_size / num_heads) * num_heads
                    == hidden_size,
        ),
        ("conv_kernel_size", get.usize_or("conv_kernel_size", 0) == 0),
    ] {
        if !fine {
            return Err(get.error(
                key,
                "is not supported here: it must leave the width at hidden_size (and the \
                 convolution off), as in DeBERTa-v3 and deberta-v2 base",
            ));
        }
    }
    if get.activation("pooler_hidden_act")? != Activation::Gelu {
        return Err(get.error(
            "pooler_hidden_act",
            "only gelu is supported for the ContextPooler",
        ));
    }
    let relative_attention = match get.bool_or("relative_attention", false) {
        true => Some(relative_attention(get, max_position_embeddings)?),
        false => None,
    };
    Ok(ModelConfig {
        family: Family::DebertaV2,
        vocab_size: get.usize("vocab_size")?,
        hidden_size,
        embedding_size: hidden_size,
        num_layers: get.usize("num_hidden_layers")?,
        num_heads,
        intermediate_size: get.usize("intermediate_size")?,
        max_position_embeddings,
        type_vocab_size: get.usize_or("type_vocab_size", 0),
        absolute_positions: get.bool_or("position_biased_input", true),
        relative_attention,
        modern_bert: None,
        layer_norm_eps: get.f64_or("layer_norm_eps", 1e-7),
        hidden_act: get.activation("hidden_act")?,
        hidden_dropout,
        attention_dropout: get.dropout_or("attention_probs_dropout_prob", 0.1)?,
        classifier_dropout: get.dropout_of("cls_dropout")?.unwrap_or(hidden_dropout),
        pooler_dropout: Some(get.dropout_or("pooler_dropout", 0.0)?),
        pad_token_id: get.usize_or("pad_token_id", 0),
        initializer_range: get.f64_or("initializer_range", 0.02),
        labels,
        problem_type: ProblemType::default(),
        decision_threshold: None,
        original: None,
    })
}

/// ModernBERT, with `ModernBertConfig`'s defaults; both the Hub's older keys
/// (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) and transformers 5's
/// (`layer_types`, `rope_parameters`) are read.
fn modern_bert_config(get: &Getter, labels: Vec<String>) -> Result<ModelConfig, ModelError> {
    let num_layers = get.usize("num_hidden_layers")?;
    let half_window = get.usize_or("local_attention", 128) / 2;
    let windows = match get.json.get("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != num_layers {
                return Err(get.error(
                    "layer_types",
                    &format!(
                        "lists {} layers, but num_hidden_layers is {num_layers}",
                        types.len()
                    ),
                ));
            }
            types
                .iter()
                .map(|kind| match kind.as_str() {
                    Some("full_attention") => Ok(None),
                    Some("sliding_attention") => Ok(Some(half_window)),
                    _ => Err(get.error(
                        "layer_types",
                        &format!("{kind} is not full_attention or sliding_attention"),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        _ => {
            let every = get.usize_or("global_attn_every_n_layers", 3).max(1);
            (0..num_layers)
                .map(|i| (i % every != 0).then_some(half_window))
                .collect()
        }
    };
    let layout = ModernBertLayout {
        windows,
        global_rope_theta: rope_theta(get, "full_attention", "global_rope_theta", 160_000.0)?,
        local_rope_theta: rope_theta(get, "sliding_attention", "local_rope_theta", 10_000.0)?,
        attention_bias: get.bool_or("attention_bias", false),
        mlp_bias: get.bool_or("mlp_bias", false),
        norm_bias: get.bool_or("norm_bias", false),
        classifier_bias: get.bool_or("classifier_bias", false),
        mean_pooling: match get.json.get("classifier_pooling").and_then(Value::as_str) {
            None | Some("cls") => false,
            Some("mean") => true,
            Some(other) => {
                return Err(get.error(
                    "classifier_pooling",
                    &format!("`{other}` is not cls or mean"),
                ));
            }
        },
        embedding_dropout: get.dropout_or("embedding_dropout", 0.0)?,
        mlp_dropout: get.dropout_or("mlp_dropout", 0.0)?,
    };
    if get.activation("classifier_activation")? != Activation::Gelu {
        return Err(get.error(
            "classifier_activation",
            "only gelu is supported for ModernBERT's head",
        ));
    }
    let attention_dropout = get.dropout_or("attention_dropout", 0.0)?;
    Ok(ModelConfig {
        family: Family::ModernBert,
        vocab_size: get.usize("vocab_size")?,
        hidden_size: get.usize("hidden_size")?,
        embedding_size: get.usize("hidden_size")?,
        num_layers,
        num_heads: get.usize("num_attention_heads")?,
        intermediate_size: get.usize("intermediate_size")?,
        max_position_embeddings: get.usize_or("max_position_embeddings", 8192),
        type_vocab_size: 0,
        absolute_positions: false,
        relative_attention: None,
        modern_bert: Some(layout),
        layer_norm_eps: get.f64_or("norm_eps", 1e-5),
        hidden_act: get.activation("hidden_activation")?,
        // After the attention's output projection, as `out_drop`.
        hidden_dropout: attention_dropout,
        attention_dropout,
        classifier_dropout: get.dropout_or("classifier_dropout", 0.0)?,
        pooler_dropout: None,
        pad_token_id: get.usize_or("pad_token_id", 50283),
        initializer_range: get.f64_or("initializer_range", 0.02),
        labels,
        problem_type: ProblemType::default(),
        decision_threshold: None,
        original: None,
    })
}

/// The RoPE base for layers of `kind`: `rope_parameters.<kind>.rope_theta`, else the older
/// `old_key`, else `default`. Only the default RoPE (no scaling) is supported.
fn rope_theta(get: &Getter, kind: &str, old_key: &str, default: f32) -> Result<f32, ModelError> {
    let parameters = get.json.get("rope_parameters").and_then(|p| p.get(kind));
    if let Some(rope_type) = parameters
        .and_then(|p| p.get("rope_type"))
        .and_then(Value::as_str)
        && rope_type != "default"
    {
        return Err(get.error(
            "rope_parameters",
            &format!("rope_type `{rope_type}` for {kind} is not supported (default)"),
        ));
    }
    Ok(parameters
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| get.json.get(old_key).and_then(Value::as_f64))
        .map_or(default, |theta| theta as f32))
}

/// `relative_attention: true`'s settings, as `DisentangledSelfAttention` reads them.
fn relative_attention(
    get: &Getter,
    max_position_embeddings: usize,
) -> Result<RelativeAttention, ModelError> {
    let max_relative_positions = match get
        .json
        .get("max_relative_positions")
        .and_then(Value::as_i64)
    {
        Some(n) if n >= 1 => n as usize,
        _ => max_position_embeddings,
    };
    let position_buckets = get
        .json
        .get("position_buckets")
        .and_then(Value::as_i64)
        .map_or(0, |n| n.max(0) as usize);
    // A list (`["p2c", "c2p"]`) or, in older configs, one string (`"p2c|c2p"`).
    let kinds: Vec<String> = match get.json.get("pos_att_type") {
        Some(Value::String(text)) => text.split('|').map(|k| k.trim().to_lowercase()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|k| k.as_str().map(|k| k.trim().to_lowercase()))
            .collect::<Option<_>>()
            .ok_or_else(|| get.error("pos_att_type", "must list strings"))?,
        _ => Vec::new(),
    };
    if let Some(other) = kinds
        .iter()
        .find(|k| !matches!(k.as_str(), "c2p" | "p2c" | "none" | ""))
    {
        return Err(get.error(
            "pos_att_type",
            &format!("`{other}` is not supported (c2p, p2c)"),
        ));
    }
    let relative = RelativeAttention {
        position_buckets,
        max_relative_positions,
        content_to_position: kinds.iter().any(|k| k == "c2p"),
        position_to_content: kinds.iter().any(|k| k == "p2c"),
        norm_embeddings: get
            .json
            .get("norm_rel_ebd")
            .and_then(Value::as_str)
            .is_some_and(|n| {
                n.split('|')
                    .any(|n| n.trim().eq_ignore_ascii_case("layer_norm"))
            }),
    };
    let shares_keys = get.bool_or("share_att_key", false);
    if !shares_keys && relative.terms() > 1 {
        return Err(get.error(
            "share_att_key",
            "false (separate pos_key_proj / pos_query_proj) is not supported; DeBERTa-v3 \
             checkpoints share the projections (true)",
        ));
    }
    Ok(relative)
}

/// config.json's `problem_type`; when absent, what Hugging Face's models infer from the label
/// count alone: regression for one output, single-label classification otherwise.
fn problem_type_from(get: &Getter, outputs: usize) -> Result<ProblemType, ModelError> {
    match get.json.get("problem_type") {
        None | Some(Value::Null) if outputs == 1 => Ok(ProblemType::Regression),
        None | Some(Value::Null) => Ok(ProblemType::SingleLabelClassification),
        Some(name) => name
            .as_str()
            .and_then(ProblemType::from_name)
            .ok_or_else(|| {
                get.error(
                "problem_type",
                "is none of single_label_classification, multi_label_classification, regression",
            )
            }),
    }
}

/// Label names from `id2label`, in id order (HF's default `LABEL_i` when absent: 2 labels).
fn labels_from(json: &Value) -> Vec<String> {
    if let Some(map) = json.get("id2label").and_then(Value::as_object) {
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(id, name)| Some((id.parse().ok()?, name.as_str()?.to_string())))
            .collect();
        pairs.sort();
        if !pairs.is_empty() {
            return pairs.into_iter().map(|(_, name)| name).collect();
        }
    }
    let n = json.get("num_labels").and_then(Value::as_u64).unwrap_or(2) as usize;
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

struct Getter<'a> {
    file: &'a Path,
    json: &'a Value,
}

impl Getter<'_> {
    fn error(&self, key: &str, message: &str) -> ModelError {
        ModelError::Config {
            file: self.file.into(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn str(&self, key: &str) -> Result<String, ModelError> {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.error(key, "missing, or not a string"))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.error(key, "missing, or not a non-negative integer"))
    }

    fn usize_or(&self, key: &str, default: usize) -> usize {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .map_or(default, |v| v as usize)
    }

    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.json
            .get(key)
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }

    fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.json
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(default)
    }

    /// A dropout probability: absent or null is `None`; anything but a number in [0, 1) is an
    /// error naming the key (burn's dropout would panic on it mid-run).
    fn dropout_of(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_f64() {
                Some(p) if (0.0..1.0).contains(&p) => Ok(Some(p)),
                _ => Err(self.error(
                    key,
                    &format!("{value} is not a dropout probability in [0, 1)"),
                )),
            },
        }
    }

    fn dropout_or(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        Ok(self.dropout_of(key)?.unwrap_or(default))
    }

    fn activation(&self, key: &str) -> Result<Activation, ModelError> {
        match self.json.get(key).and_then(Value::as_str).unwrap_or("gelu") {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(self.error(
                key,
                &format!("activation `{other}` is not supported (gelu, gelu_new, relu)"),
            )),
        }
    }
}

/// `model: { init: scratch, ... }` in a pipeline: a small encoder trained from nothing.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScratchSpec {
    /// Encoder layers.
    pub layers: usize,
    /// Hidden size; a multiple of `heads`.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward size (default: 4 × hidden).
    pub intermediate: Option<usize>,
    /// Longest sequence the position table holds.
    #[serde(default = "default_positions")]
    pub max_positions: usize,
    /// Dropout on hidden states, attention probabilities and the head.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Standard deviation of the initial weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_positions() -> usize {
    512
}
fn default_dropout() -> f64 {
    0.1
}
fn default_initializer_range() -> f64 {
    0.02
}

/// A [`ScratchSpec`] that describes no model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScratchError {
    #[error("layers, hidden and heads must be at least 1")]
    Empty,
    #[error("hidden ({hidden}) must be a multiple of heads ({heads})")]
    HeadsDoNotDivideHidden { hidden: usize, heads: usize },
    #[error("dropout {0} is not in [0, 1)")]
    Dropout(f64),
    #[error("{key} {value} is above the largest a scratch model takes, {largest}")]
    TooLarge {
        key: &'static str,
        value: usize,
        largest: usize,
    },
}

/// The most encoder layers a scratch model takes.
const LARGEST_LAYERS: usize = 1 << 10;
/// The widest hidden, intermediate or position size a scratch model takes.
const LARGEST_WIDTH: usize = 1 << 20;

impl ScratchSpec {
    /// A BERT-layout config for a vocabulary (from the tokenizer) and a label set (from ingest).
    pub fn to_config(
        &self,
        vocab_size: usize,
        pad_token_id: usize,
        labels: Vec<String>,
    ) -> Result<ModelConfig, ScratchError> {
        if self.layers == 0 || self.hidden == 0 || self.heads == 0 {
            return Err(ScratchError::Empty);
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(ScratchError::HeadsDoNotDivideHidden {
                hidden: self.hidden,
                heads: self.heads,
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ScratchError::Dropout(self.dropout));
        }
        // Sizes past these are no model anyone trains here, and their parameter counts would
        // overflow the memory estimate that guards the allocation.
        for (key, value, largest) in [
            ("layers", self.layers, LARGEST_LAYERS),
            ("hidden", self.hidden, LARGEST_WIDTH),
            (
                "intermediate",
                self.intermediate.unwrap_or(0),
                LARGEST_WIDTH,
            ),
            ("max_positions", self.max_positions, LARGEST_WIDTH),
        ] {
            if value > largest {
                return Err(ScratchError::TooLarge {
                    key,
                    value,
                    largest,
                });
            }
        }
        Ok(ModelConfig {
            family: Family::Bert,
            vocab_size,
            hidden_size: self.hidden,
            embedding_size: self.hidden,
            num_layers: self.layers,
            num_heads: self.heads,
            intermediate_size: self.intermediate.unwrap_or(4 * self.hidden),
            max_position_embeddings: self.max_positions,
            type_vocab_size: 2,
            absolute_positions: true,
            relative_attention: None,
            modern_bert: None,
            layer_norm_eps: 1e-12,
            hidden_act: Activation::Gelu,
            hidden_dropout: self.dropout,
            attention_dropout: self.dropout,
            classifier_dropout: self.dropout,
            pooler_dropout: None,
            pad_token_id,
            initializer_range: self.initializer_range,
            labels,
            problem_type: ProblemType::default(),
            decision_threshold: None,
            original: None,
        })
    }
}
