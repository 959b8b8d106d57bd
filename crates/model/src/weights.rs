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
}

impl HfName {
    fn encoder(key: impl Into<String>) -> Self {
        HfName {
            key: key.into(),
            encoder: true,
        }
    }
    fn head(key: impl Into<String>) -> Self {
        HfName {
            key: key.into(),
            encoder: false,
        }
    }
    pub(crate) fn tensor(&self, leaf: &str) -> HfName {
        HfName {
            key: format!("{}.{leaf}", self.key),
            encoder: self.encoder,
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
        HfName::encoder("embeddings.word_embeddings")
    }
    fn position(&self) -> HfName {
        HfName::encoder("embeddings.position_embeddings")
    }
    fn token_type(&self) -> HfName {
        HfName::encoder("embeddings.token_type_embeddings")
    }
    fn embeddings_norm(&self) -> HfName {
        HfName::encoder("embeddings.LayerNorm")
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
        let n = |suffix: &str| HfName::encoder(suffix);
        match self.0 {
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
        }
    }
    pub(crate) fn head_out(&self) -> HfName {
        match self.0 {
            Family::Bert | Family::DistilBert | Family::DebertaV2 => HfName::head("classifier"),
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
    let (h, e) = (config.hidden_size, config.embedding_size);
    let mut builder = Builder {
        source,
        device,
        eps: config.layer_norm_eps,
        next_id: 0,
    };
    let embeddings = Embeddings {
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
        norm: builder.norm(&names.embeddings_norm(), e)?,
        dropout: dropout(config.hidden_dropout),
        // ELECTRA has the projection exactly when the widths differ, as Hugging Face builds it.
        project: match e == h {
            true => None,
            false => Some(builder.dense(&names.embeddings_project(), e, h)?),
        },
        zero_padding: config.family == Family::DebertaV2,
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let n = names.layer(i);
        layers.push(EncoderLayer {
            query: builder.dense(&n.query, h, h)?,
            key: builder.dense(&n.key, h, h)?,
            value: builder.dense(&n.value, h, h)?,
            attention_output: builder.dense(&n.attention_output, h, h)?,
            attention_norm: builder.norm(&n.attention_norm, h)?,
            intermediate: builder.dense(&n.intermediate, h, config.intermediate_size)?,
            output: builder.dense(&n.output, config.intermediate_size, h)?,
            output_norm: builder.norm(&n.output_norm, h)?,
            attention_dropout: dropout(config.attention_dropout),
            dropout: dropout(config.hidden_dropout),
            num_heads: config.num_heads,
            activation: config.hidden_act,
        });
    }
    let relative = match config.relative_attention {
        Some(attention) => Some(RelativeEmbeddings {
            table: builder.embedding(&names.relative_embeddings(), 2 * attention.span(), h)?,
            norm: match attention.norm_embeddings {
                true => Some(builder.norm(&names.relative_norm(), h)?),
                false => None,
            },
            attention,
        }),
        None => None,
    };
    let head = Head {
        dense: builder.dense(&names.head_dense(), h, h)?,
        out: builder.dense(&names.head_out(), h, config.num_labels())?,
        dropout: dropout(config.classifier_dropout),
        pooler_dropout: config.pooler_dropout.map(dropout),
        family: config.family,
    };
    Ok(Classifier {
        embeddings,
        layers,
        relative,
        head,
        config: config.clone(),
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
        let weight = self
            .source
            .take(&name.tensor("weight"), [d_out, d_in], Init::Normal)?;
        let bias = self
            .source
            .take(&name.tensor("bias"), [d_out, 1], Init::Zeros)?;
        Ok(Dense {
            weight: self.param(transpose(&weight, d_out, d_in), [d_in, d_out]),
            bias: self.param(bias, [d_out]),
            mixout: None,
        })
    }

    fn norm(&mut self, name: &HfName, d: usize) -> Result<LayerNorm, ModelError> {
        let gamma = self
            .source
            .take(&name.tensor("weight"), [d, 1], Init::Ones)?;
        let beta = self
            .source
            .take(&name.tensor("bias"), [d, 1], Init::Zeros)?;
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(self.eps)
            .init(self.device);
        norm.gamma = self.param(gamma, [d]);
        norm.beta = Some(self.param(beta, [d]));
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
            (n.attention_norm, Part::Norm(&layer.attention_norm)),
            (n.intermediate, Part::Dense(&layer.intermediate)),
            (n.output, Part::Dense(&layer.output)),
            (n.output_norm, Part::Norm(&layer.output_norm)),
        ]);
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
    parts.push((names.head_out(), Part::Dense(&model.head.out)));
    parts
}

/// Every parameter's checkpoint key (family prefix included) and id, and whether it is a
/// weight matrix of an encoder layer (AWP's default target).
pub fn param_names(model: &Classifier) -> Vec<(String, ParamId, bool)> {
    let family = model.config.family;
    let mut out = Vec::new();
    for (name, part) in named_parts(model) {
        let in_layer = name.key.contains(".layer.");
        let mut add = |leaf: &str, id: ParamId, layer_matrix: bool| {
            out.push((name.tensor(leaf).full(family), id, layer_matrix));
        };
        match part {
            Part::Dense(d) => {
                add("weight", d.weight.id, in_layer);
                add("bias", d.bias.id, false);
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
