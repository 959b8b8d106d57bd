//! Where a model's parameters come from, and what each is called in a Hugging Face checkpoint.
//!
//! [`build`] makes a classifier from any [`WeightSource`] (a checkpoint file in [`crate::hf`],
//! seeded initialisation in [`crate::init`]), the way candle's `VarBuilder` takes its backend;
//! [`named_parts`] walks a model under the same names for saving and for choosing which weights
//! a regularizer touches.

use burn::module::{Param, ParamId};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor, TensorData};

use crate::ModelError;
use crate::config::{Family, ModelConfig};
use crate::deberta::RelativeEmbeddings;
use crate::model::{Classifier, Dense, Embeddings, EncoderLayer, Head, dropout};
use crate::modernbert::ModernLayer;

/// How a parameter starts when a source makes it fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Normal,
    /// Normal, with the padding row of the word embeddings zeroed.
    Embedding,
    Ones,
    Zeros,
}

/// A parameter group's name in a checkpoint: `key` is the module path (`encoder.layer.0.
/// attention.self.query`); `encoder` ones carry the family prefix in classification checkpoints.
#[derive(Debug, Clone)]
pub struct HfName {
    pub key: String,
    pub encoder: bool,
    /// Part of an encoder layer: what AWP and Mixout select by default.
    pub in_layer: bool,
    /// `Some((part, of))`: the module is the `part`-th of `of` equal blocks of rows of the
    /// checkpoint's tensor (ModernBERT's `Wqkv` holds the query, key and value projections).
    pub stacked: Option<(usize, usize)>,
}

impl HfName {
    fn encoder(key: impl Into<String>) -> Self {
        HfName {
            key: key.into(),
            encoder: true,
            in_layer: false,
            stacked: None,
        }
    }
    fn head(key: impl Into<String>) -> Self {
        HfName {
            encoder: false,
            ..HfName::encoder(key)
        }
    }
    fn layer(key: impl Into<String>) -> Self {
        HfName {
            in_layer: true,
            ..HfName::encoder(key)
        }
    }
    fn stacked(self, part: usize, of: usize) -> Self {
        HfName {
            stacked: Some((part, of)),
            ..self
        }
    }
    pub(crate) fn tensor(&self, leaf: &str) -> HfName {
        HfName {
            key: format!("{}.{leaf}", self.key),
            ..self.clone()
        }
    }
    /// The key as saved in a `*ForSequenceClassification` checkpoint.
    pub fn full(&self, family: Family) -> String {
        if self.encoder {
            format!("{}.{}", family.prefix(), self.key)
        } else {
            self.key.clone()
        }
    }
}

/// Module paths of one encoder layer.
struct LayerNames {
    query: HfName,
    key: HfName,
    value: HfName,
    attention_output: HfName,
    attention_norm: HfName,
    intermediate: HfName,
    output: HfName,
    output_norm: HfName,
}

/// Every module path of a family, in one place for loading and saving alike.
pub(crate) struct Names(pub(crate) Family);

impl Names {
    fn word(&self) -> HfName {
        match self.0 {
            Family::ModernBert => HfName::encoder("embeddings.tok_embeddings"),
            _ => HfName::encoder("embeddings.word_embeddings"),
        }
    }
    fn position(&self) -> HfName {
        HfName::encoder("embeddings.position_embeddings")
    }
    fn token_type(&self) -> HfName {
        HfName::encoder("embeddings.token_type_embeddings")
    }
    fn embeddings_norm(&self) -> HfName {
        match self.0 {
            Family::ModernBert => HfName::encoder("embeddings.norm"),
            _ => HfName::encoder("embeddings.LayerNorm"),
        }
    }
    fn final_norm(&self) -> HfName {
        HfName::encoder("final_norm")
    }
    fn head_norm(&self) -> HfName {
        HfName::head("head.norm")
    }
    fn embeddings_project(&self) -> HfName {
        HfName::encoder("embeddings_project")
    }
    fn relative_embeddings(&self) -> HfName {
        HfName::encoder("encoder.rel_embeddings")
    }
    fn relative_norm(&self) -> HfName {
        HfName::encoder("encoder.LayerNorm")
    }
    fn layer(&self, i: usize) -> LayerNames {
        let n = |suffix: &str| HfName::layer(suffix);
        match self.0 {
            Family::ModernBert => {
                let p = format!("layers.{i}");
                let qkv = |part: usize| n(&format!("{p}.attn.Wqkv")).stacked(part, 3);
                LayerNames {
                    query: qkv(0),
                    key: qkv(1),
                    value: qkv(2),
                    attention_output: n(&format!("{p}.attn.Wo")),
                    attention_norm: n(&format!("{p}.attn_norm")),
                    intermediate: n(&format!("{p}.mlp.Wi")),
                    output: n(&format!("{p}.mlp.Wo")),
                    output_norm: n(&format!("{p}.mlp_norm")),
                }
            }
            Family::DistilBert => {
                let p = format!("transformer.layer.{i}");
                LayerNames {
                    query: n(&format!("{p}.attention.q_lin")),
                    key: n(&format!("{p}.attention.k_lin")),
                    value: n(&format!("{p}.attention.v_lin")),
                    attention_output: n(&format!("{p}.attention.out_lin")),
                    attention_norm: n(&format!("{p}.sa_layer_norm")),
                    intermediate: n(&format!("{p}.ffn.lin1")),
                    output: n(&format!("{p}.ffn.lin2")),
                    output_norm: n(&format!("{p}.output_layer_norm")),
                }
            }
            Family::Bert | Family::Roberta | Family::Electra | Family::DebertaV2 => {
                let p = format!("encoder.layer.{i}");
                // DeBERTa names its projections `query_proj`, `key_proj`, `value_proj`.
                let proj = match self.0 {
                    Family::DebertaV2 => "_proj",
                    _ => "",
                };
                LayerNames {
                    query: n(&format!("{p}.attention.self.query{proj}")),
                    key: n(&format!("{p}.attention.self.key{proj}")),
                    value: n(&format!("{p}.attention.self.value{proj}")),
                    attention_output: n(&format!("{p}.attention.output.dense")),
                    attention_norm: n(&format!("{p}.attention.output.LayerNorm")),
                    intermediate: n(&format!("{p}.intermediate.dense")),
                    output: n(&format!("{p}.output.dense")),
                    output_norm: n(&format!("{p}.output.LayerNorm")),
                }
            }
        }
    }
    fn head_dense(&self) -> HfName {
        match self.0 {
            Family::Bert => HfName::encoder("pooler.dense"),
            Family::DistilBert => HfName::head("pre_classifier"),
            Family::Roberta | Family::Electra => HfName::head("classifier.dense"),
            Family::DebertaV2 => HfName::head("pooler.dense"),
            Family::ModernBert => HfName::head("head.dense"),
        }
    }
    pub(crate) fn head_out(&self) -> HfName {
        match self.0 {
            Family::Bert | Family::DistilBert | Family::DebertaV2 | Family::ModernBert => {
                HfName::head("classifier")
            }
            Family::Roberta | Family::Electra => HfName::head("classifier.out_proj"),
        }
    }
}

/// Supplies parameter values by name, in Hugging Face's layout (Linear weights `[out, in]`).
pub trait WeightSource {
    fn take(
        &mut self,
        name: &HfName,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Vec<f32>, ModelError>;
}

/// Builds a classifier whose every parameter comes from `source`.
pub fn build(
    config: &ModelConfig,
    source: &mut dyn WeightSource,
    device: &Device,
) -> Result<Classifier, ModelError> {
    let names = Names(config.family);
    let h = config.hidden_size;
    let mut builder = Builder {
        source,
        device,
        eps: config.layer_norm_eps,
        next_id: 0,
    };
    let biases = Biases::of(config);
    let embeddings = build_embeddings(&mut builder, &names, config, biases)?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        layers.push(build_layer(&mut builder, &names, config, biases, i)?);
    }
    let final_norm = match config.modern_bert {
        Some(_) => Some(builder.norm(&names.final_norm(), h, biases.norm)?),
        None => None,
    };
    let relative = match config.relative_attention {
        Some(attention) => Some(RelativeEmbeddings {
            table: builder.embedding(&names.relative_embeddings(), 2 * attention.span(), h)?,
            norm: match attention.norm_embeddings {
                true => Some(builder.norm(&names.relative_norm(), h, true)?),
                false => None,
            },
            attention,
        }),
        None => None,
    };
    let head = Head {
        dense: builder.linear(&names.head_dense(), h, h, biases.head)?,
        norm: match config.modern_bert {
            Some(_) => Some(builder.norm(&names.head_norm(), h, biases.norm)?),
            None => None,
        },
        out: builder.dense(&names.head_out(), h, config.num_labels())?,
        dropout: dropout(config.classifier_dropout),
        pooler_dropout: config.pooler_dropout.map(dropout),
        family: config.family,
    };
    Ok(Classifier {
        embeddings,
        layers,
        final_norm,
        relative,
        head,
        config: config.clone(),
    })
}

/// Which modules have biases: all of them, but in ModernBERT only those its config names.
#[derive(Clone, Copy)]
struct Biases {
    attention: bool,
    mlp: bool,
    norm: bool,
    head: bool,
}

impl Biases {
    fn of(config: &ModelConfig) -> Biases {
        match &config.modern_bert {
            Some(layout) => Biases {
                attention: layout.attention_bias,
                mlp: layout.mlp_bias,
                norm: layout.norm_bias,
                head: layout.classifier_bias,
            },
            None => Biases {
                attention: true,
                mlp: true,
                norm: true,
                head: true,
            },
        }
    }
}

fn build_embeddings(
    builder: &mut Builder,
    names: &Names,
    config: &ModelConfig,
    biases: Biases,
) -> Result<Embeddings, ModelError> {
    let (h, e) = (config.hidden_size, config.embedding_size);
    let dropout_p = match &config.modern_bert {
        Some(layout) => layout.embedding_dropout,
        None => config.hidden_dropout,
    };
    Ok(Embeddings {
        word: builder.embedding(&names.word(), config.vocab_size, e)?,
        position: match config.absolute_positions {
            true => {
                Some(builder.embedding(&names.position(), config.max_position_embeddings, e)?)
            }
            false => None,
        },
        token_type: match config.type_vocab_size {
            0 => None,
            n => Some(builder.embedding(&names.token_type(), n, e)?),
        },
        norm: builder.norm(&names.embeddings_norm(), e, biases.norm)?,
        dropout: dropout(dropout_p),
        // ELECTRA has the projection exactly when the widths differ, as Hugging Face builds it.
        project: match e == h {
            true => None,
            false => Some(builder.dense(&names.embeddings_project(), e, h)?),
        },
        zero_padding: config.family == Family::DebertaV2,
    })
}

fn build_layer(
    builder: &mut Builder,
    names: &Names,
    config: &ModelConfig,
    biases: Biases,
    i: usize,
) -> Result<EncoderLayer, ModelError> {
    let n = names.layer(i);
    let (h, inner) = (config.hidden_size, config.intermediate_size);
    let modern = config.modern_bert.as_ref().map(|layout| ModernLayer {
        rope_theta: match layout.windows[i] {
            None => layout.global_rope_theta,
            Some(_) => layout.local_rope_theta,
        },
        window: layout.windows[i],
        mlp_dropout: layout.mlp_dropout,
    });
    // ModernBERT's Wi makes the GeGLU's input and gate side by side.
    let inner_out = if modern.is_some() { 2 * inner } else { inner };
    Ok(EncoderLayer {
        query: builder.linear(&n.query, h, h, biases.attention)?,
        key: builder.linear(&n.key, h, h, biases.attention)?,
        value: builder.linear(&n.value, h, h, biases.attention)?,
        attention_output: builder.linear(&n.attention_output, h, h, biases.attention)?,
        // ModernBERT's first layer reads the embeddings' norm (`attn_norm` is Identity).
        attention_norm: match (&modern, i) {
            (Some(_), 0) => None,
            _ => Some(builder.norm(&n.attention_norm, h, biases.norm)?),
        },
        intermediate: builder.linear(&n.intermediate, h, inner_out, biases.mlp)?,
        output: builder.linear(&n.output, inner, h, biases.mlp)?,
        output_norm: builder.norm(&n.output_norm, h, biases.norm)?,
        attention_dropout: dropout(config.attention_dropout),
        dropout: dropout(config.hidden_dropout),
        num_heads: config.num_heads,
        activation: config.hidden_act,
        modern,
    })
}

struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    eps: f64,
    next_id: u64,
}

impl Builder<'_> {
    /// Parameters are numbered in build order, so two models of one architecture share their
    /// ids: an optimizer state saved in a checkpoint then applies to the reloaded model.
    fn param<const D: usize>(&mut self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        self.next_id += 1;
        let fresh = Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ));
        let (_, tensor, mapper) = fresh.consume();
        Param::from_mapped_value(ParamId::from(self.next_id), tensor, mapper)
    }

    fn dense(&mut self, name: &HfName, d_in: usize, d_out: usize) -> Result<Dense, ModelError> {
        self.linear(name, d_in, d_out, true)
    }

    fn linear(
        &mut self,
        name: &HfName,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Dense, ModelError> {
        let weight = self
            .source
            .take(&name.tensor("weight"), [d_out, d_in], Init::Normal)?;
        let weight = self.param(transpose(&weight, d_out, d_in), [d_in, d_out]);
        let bias = match bias {
            true => {
                let values = self
                    .source
                    .take(&name.tensor("bias"), [d_out, 1], Init::Zeros)?;
                Some(self.param(values, [d_out]))
            }
            false => None,
        };
        Ok(Dense {
            weight,
            bias,
            mixout: None,
        })
    }

    fn norm(&mut self, name: &HfName, d: usize, bias: bool) -> Result<LayerNorm, ModelError> {
        let gamma = self
            .source
            .take(&name.tensor("weight"), [d, 1], Init::Ones)?;
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(self.eps)
            .init(self.device);
        norm.gamma = self.param(gamma, [d]);
        norm.beta = match bias {
            true => {
                let beta = self
                    .source
                    .take(&name.tensor("bias"), [d, 1], Init::Zeros)?;
                Some(self.param(beta, [d]))
            }
            false => None,
        };
        Ok(norm)
    }

    fn embedding(&mut self, name: &HfName, n: usize, d: usize) -> Result<Embedding, ModelError> {
        let weight = self
            .source
            .take(&name.tensor("weight"), [n, d], Init::Embedding)?;
        Ok(Embedding {
            weight: self.param(weight, [n, d]),
        })
    }
}

/// `[rows, cols]` row-major to `[cols, rows]`, in 16 × 16 tiles so that both sides are read
/// and written a cache line at a time (column by column, every write missed the cache).
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out = vec![0.0; values.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

/// A module of the model that holds parameters.
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Dense(&'a Dense),
    Norm(&'a LayerNorm),
    Embedding(&'a Embedding),
}

/// Every parameter-holding module of `model` under its checkpoint name, in checkpoint order.
pub fn named_parts(model: &Classifier) -> Vec<(HfName, Part<'_>)> {
    let names = Names(model.config.family);
    let embeddings = &model.embeddings;
    let mut parts = vec![(names.word(), Part::Embedding(&embeddings.word))];
    if let Some(position) = &embeddings.position {
        parts.push((names.position(), Part::Embedding(position)));
    }
    if let Some(token_type) = &embeddings.token_type {
        parts.push((names.token_type(), Part::Embedding(token_type)));
    }
    parts.push((names.embeddings_norm(), Part::Norm(&embeddings.norm)));
    if let Some(project) = &embeddings.project {
        parts.push((names.embeddings_project(), Part::Dense(project)));
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let n = names.layer(i);
        parts.extend([
            (n.query, Part::Dense(&layer.query)),
            (n.key, Part::Dense(&layer.key)),
            (n.value, Part::Dense(&layer.value)),
            (n.attention_output, Part::Dense(&layer.attention_output)),
        ]);
        if let Some(norm) = &layer.attention_norm {
            parts.push((n.attention_norm, Part::Norm(norm)));
        }
        parts.extend([
            (n.intermediate, Part::Dense(&layer.intermediate)),
            (n.output, Part::Dense(&layer.output)),
            (n.output_norm, Part::Norm(&layer.output_norm)),
        ]);
    }
    if let Some(norm) = &model.final_norm {
        parts.push((names.final_norm(), Part::Norm(norm)));
    }
    if let Some(relative) = &model.relative {
        parts.push((
            names.relative_embeddings(),
            Part::Embedding(&relative.table),
        ));
        if let Some(norm) = &relative.norm {
            parts.push((names.relative_norm(), Part::Norm(norm)));
        }
    }
    parts.push((names.head_dense(), Part::Dense(&model.head.dense)));
    if let Some(norm) = &model.head.norm {
        parts.push((names.head_norm(), Part::Norm(norm)));
    }
    parts.push((names.head_out(), Part::Dense(&model.head.out)));
    parts
}

/// Every parameter's checkpoint key (family prefix included) and id, and whether it is a
/// weight matrix of an encoder layer (AWP's default target).
pub fn param_names(model: &Classifier) -> Vec<(String, ParamId, bool)> {
    let family = model.config.family;
    let mut out = Vec::new();
    for (name, part) in named_parts(model) {
        let in_layer = name.in_layer;
        let mut add = |leaf: &str, id: ParamId, layer_matrix: bool| {
            out.push((name.tensor(leaf).full(family), id, layer_matrix));
        };
        match part {
            Part::Dense(d) => {
                add("weight", d.weight.id, in_layer);
                if let Some(bias) = &d.bias {
                    add("bias", bias.id, false);
                }
            }
            Part::Norm(n) => {
                add("weight", n.gamma.id, false);
                if let Some(beta) = &n.beta {
                    add("bias", beta.id, false);
                }
            }
            Part::Embedding(e) => add("weight", e.weight.id, false),
        }
    }
    out
}
