//! The encoder and its classification head, written out so that every family's numerics match
//! Hugging Face's: post-LayerNorm layers, multi-head self-attention with the padding mask, GELU
//! with erf, and each family's own head. Nothing here names a backend: tensors live on whatever
//! device they were built on.

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{Activation, Family, ModelConfig};
use crate::deberta::{RelativeEmbeddings, RelativePositions};
use crate::modernbert::{ModernLayer, RotaryTables, mean_over_mask};
use finetune_kernels::{Dropout, add_norm, attention, dense, embedding, gelu};
use finetune_regularizers::Mixout;

/// A linear layer holding its weight as `[in, out]` (Hugging Face stores `[out, in]`).
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Param<Tensor<2>>,
    /// Absent in ModernBERT's layers.
    pub bias: Option<Param<Tensor<1>>>,
    /// Mixout's state when the layer is regularised by it (training only).
    pub mixout: Option<Mixout>,
}

impl Dense {
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        // Folding the leading dimensions into rows makes one [rows, in] × [in, out] matmul.
        let mut dims = input.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product();
        let [_, d_out] = self.weight.dims();
        let folded = input.reshape([rows, d_in]);
        let weight = match &self.mixout {
            Some(mixout) => mixout.mix(self.weight.val()),
            None => self.weight.val(),
        };
        let out = match &self.bias {
            Some(bias) => dense(folded, weight, bias.val()),
            None => folded.matmul(weight),
        };
        dims[D - 1] = d_out;
        out.reshape(dims)
    }
}

#[derive(Module, Debug)]
pub struct Embeddings {
    pub word: Embedding,
    /// Absent in DeBERTa-v3, whose positions are all relative.
    pub position: Option<Embedding>,
    /// Absent in DistilBERT.
    pub token_type: Option<Embedding>,
    pub norm: LayerNorm,
    pub dropout: Dropout,
    /// ELECTRA's `embeddings_project`, from the embedding width up to the hidden size.
    pub project: Option<Dense>,
    /// DeBERTa zeroes the embeddings at padding positions.
    #[module(skip)]
    pub zero_padding: bool,
}

#[derive(Module, Debug)]
pub struct EncoderLayer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attention_output: Dense,
    /// Absent in ModernBERT's first layer, which reads the embeddings' norm.
    pub attention_norm: Option<LayerNorm>,
    pub intermediate: Dense,
    pub output: Dense,
    pub output_norm: LayerNorm,
    pub attention_dropout: Dropout,
    pub dropout: Dropout,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub activation: Activation,
    /// ModernBERT's pre-norm layer with rotary positions and GeGLU ([`crate::modernbert`]).
    #[module(skip)]
    pub modern: Option<ModernLayer>,
}

/// `dense` is BERT's pooler, DistilBERT's pre_classifier, RoBERTa's and ELECTRA's
/// classifier.dense; `out` is the final projection to the labels.
#[derive(Module, Debug)]
pub struct Head {
    pub dense: Dense,
    /// ModernBERT's head norm, after the activation.
    pub norm: Option<LayerNorm>,
    pub out: Dense,
    pub dropout: Dropout,
    /// DeBERTa's `pooler_dropout`, before `dense` (`dropout` comes before `out`).
    pub pooler_dropout: Option<Dropout>,
    #[module(skip)]
    pub family: Family,
}

/// A `*ForSequenceClassification` model.
#[derive(Module, Debug)]
pub struct Classifier {
    pub embeddings: Embeddings,
    pub layers: Vec<EncoderLayer>,
    /// ModernBERT's norm after the last layer.
    pub final_norm: Option<LayerNorm>,
    /// DeBERTa's relative position table, shared by the layers.
    pub relative: Option<RelativeEmbeddings>,
    pub head: Head,
    #[module(skip)]
    pub config: ModelConfig,
}

/// What a forward pass returns.
pub struct Output {
    /// `[batch, seq, hidden]`
    pub last_hidden_state: Tensor<3>,
    /// BERT's pooler output `[batch, hidden]` (other families have none).
    pub pooler_output: Option<Tensor<2>>,
    /// `[batch, labels]`
    pub logits: Tensor<2>,
}

/// A padded batch on the device.
pub struct Batch {
    pub input_ids: Tensor<2, Int>,
    pub attention_mask: Tensor<2, Int>,
    pub position_ids: Tensor<2, Int>,
    pub token_type_ids: Tensor<2, Int>,
}

impl Batch {
    /// Pads `rows` of token ids to the longest (or to `pad_to`) with the model's padding id,
    /// and derives the mask and the family's position ids. Every token is of segment 0.
    pub fn from_rows(
        rows: &[Vec<i32>],
        config: &ModelConfig,
        pad_to: Option<usize>,
        device: &Device,
    ) -> Batch {
        Batch::from_segmented_rows(rows, &[], config, pad_to, device)
    }

    /// [`Batch::from_rows`] with each row's token type ids (`type_ids[i]` for `rows[i]`; an
    /// empty list, or none at all, is segment 0 throughout). Only a model with two or more
    /// token types sees them: RoBERTa's single type and DeBERTa-v3's none take zeros, as
    /// their Python tokenizers give no `token_type_ids`.
    pub fn from_segmented_rows(
        rows: &[Vec<i32>],
        type_ids: &[Vec<i32>],
        config: &ModelConfig,
        pad_to: Option<usize>,
        device: &Device,
    ) -> Batch {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let width = pad_to.unwrap_or(longest).max(longest).max(1);
        let pad = config.pad_token_id as i64;
        let segmented = config.type_vocab_size >= 2;
        let last_type = config.type_vocab_size.saturating_sub(1) as i64;
        let (mut ids, mut mask, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        let mut types = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let row_types = type_ids.get(i).filter(|_| segmented);
            for column in 0..width {
                let real = column < row.len();
                ids.push(if real { i64::from(row[column]) } else { pad });
                mask.push(i64::from(real));
                positions.push(match (config.family, real) {
                    // RoBERTa counts positions from padding_idx + 1 and gives padding padding_idx.
                    (Family::Roberta, true) => pad + 1 + column as i64,
                    (Family::Roberta, false) => pad,
                    _ => column as i64,
                });
                // An id past the model's types would index out of its table; readers refuse
                // such files, and this keeps a caller's mistake from panicking.
                let segment = row_types.and_then(|t| t.get(column)).copied().unwrap_or(0);
                types.push(i64::from(segment).clamp(0, last_type));
            }
        }
        let shape = [rows.len(), width];
        let tensor =
            |values: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(values, shape), device);
        Batch {
            input_ids: tensor(ids),
            attention_mask: tensor(mask),
            position_ids: tensor(positions),
            token_type_ids: tensor(types),
        }
    }
}

impl Classifier {
    /// Every position's hidden state, the pooler output and the logits.
    pub fn forward(&self, batch: &Batch) -> Output {
        let x = self.encode(self.words(batch), batch, Positions::All);
        let pooled = self.pool(x.clone(), batch);
        let (pooler_output, logits) = self.head.forward(pooled);
        Output {
            last_hidden_state: x,
            pooler_output,
            logits,
        }
    }

    /// The logits alone `[batch, labels]`, the same as [`Classifier::forward`]'s. The head reads
    /// only the first token, so the last layer computes only that row: its keys and values still
    /// come from every position, but its query, attention output and feed-forward run on one row
    /// in `seq` (a sixth of the encoder's multiply-adds at 64 tokens). With dropout on, the last
    /// layer draws masks for that row only: the same distribution, another random stream.
    pub fn logits(&self, batch: &Batch) -> Tensor<2> {
        self.logits_from_words(self.words(batch), batch)
    }

    /// The batch's word embeddings `[batch, seq, hidden]`, looked up in the table.
    fn words(&self, batch: &Batch) -> Tensor<3> {
        embedding(self.embeddings.word.weight.val(), batch.input_ids.clone())
    }

    /// The word embeddings as a leaf of the autodiff graph, cut from the table: the backward
    /// pass then leaves the table's gradient as the gradient of this lookup, one row per token
    /// ([`finetune_kernels::RowGradient`]), instead of summing it into a zeroed copy of the table.
    pub fn word_leaf(&self, batch: &Batch) -> Tensor<3> {
        let table = self.embeddings.word.weight.val().set_require_grad(false);
        embedding(table, batch.input_ids.clone()).require_grad()
    }

    /// [`Classifier::logits`] from the batch's word embeddings (see [`Classifier::word_leaf`]).
    pub fn logits_from_words(&self, words: Tensor<3>, batch: &Batch) -> Tensor<2> {
        let positions = match self.mean_pooling() {
            true => Positions::All,
            false => Positions::FirstAtLastLayer,
        };
        let pooled = self.pool(self.encode(words, batch, positions), batch);
        self.head.forward(pooled).1
    }

    /// Whether the head reads the mean over the unpadded tokens (ModernBERT's
    /// `classifier_pooling: mean`) rather than the first token.
    fn mean_pooling(&self) -> bool {
        self.config
            .modern_bert
            .as_ref()
            .is_some_and(|layout| layout.mean_pooling)
    }

    /// What the head reads from the last hidden states `[batch, seq, hidden]`.
    fn pool(&self, x: Tensor<3>, batch: &Batch) -> Tensor<2> {
        match self.mean_pooling() {
            true => mean_over_mask(x, batch.attention_mask.clone()),
            false => first_token(x),
        }
    }

    fn position_tables(&self, seq: usize, device: &Device) -> PositionTables {
        let head_dim = self.config.hidden_size / self.config.num_heads;
        let thetas = self.layers.iter().filter_map(|layer| layer.modern);
        PositionTables {
            relative: self.relative.as_ref().map(|r| r.for_length(seq, device)),
            rotary: RotaryTables::new(thetas.map(|m| m.rope_theta), seq, head_dim, device),
        }
    }

    fn encode(&self, words: Tensor<3>, batch: &Batch, positions: Positions) -> Tensor<3> {
        let [batch_size, seq_len] = batch.input_ids.dims();
        let epsilon = self.config.layer_norm_eps;
        let mut x = self.embeddings.forward(words, batch, epsilon);
        let tables = self.position_tables(seq_len, &x.device());
        // 0 where attended, a large negative number at padding: exp() of it is exactly 0.
        let mask_bias = (batch.attention_mask.clone().float() - 1.0)
            .mul_scalar(1e9)
            .reshape([batch_size, 1, 1, seq_len]);
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            x = match positions {
                Positions::FirstAtLastLayer if index == last => layer.forward_queries(
                    x.clone().narrow(1, 0, 1),
                    x,
                    mask_bias.clone(),
                    epsilon,
                    &tables,
                ),
                _ => layer.forward(x, mask_bias.clone(), epsilon, &tables),
            };
        }
        match &self.final_norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }
}

/// What the layers read of the token positions, made once per batch width rather than per
/// layer: DeBERTa's relative table and distances, ModernBERT's rotary tables.
pub(crate) struct PositionTables {
    relative: Option<RelativePositions>,
    rotary: RotaryTables,
}

/// Which positions the encoder computes the last layer for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positions {
    All,
    FirstAtLastLayer,
}

/// `[batch, seq, hidden]` → the first token's `[batch, hidden]`.
fn first_token(x: Tensor<3>) -> Tensor<2> {
    let [batch_size, _, hidden] = x.dims();
    x.narrow(1, 0, 1).reshape([batch_size, hidden])
}

impl Embeddings {
    /// From the batch's word embeddings: the sum with position and token-type embeddings,
    /// normalised.
    fn forward(&self, words: Tensor<3>, batch: &Batch, epsilon: f64) -> Tensor<3> {
        let lookup =
            |table: &Embedding, ids: &Tensor<2, Int>| embedding(table.weight.val(), ids.clone());
        let positions = self
            .position
            .as_ref()
            .map(|table| lookup(table, &batch.position_ids));
        let token_types = self
            .token_type
            .as_ref()
            .map(|table| lookup(table, &batch.token_type_ids));
        // The last addition is the norm's own.
        let sum = match (positions, token_types) {
            (Some(positions), Some(token_types)) => {
                norm_of_sum(&self.norm, words + positions, token_types, epsilon)
            }
            (Some(other), None) | (None, Some(other)) => {
                norm_of_sum(&self.norm, words, other, epsilon)
            }
            (None, None) => self.norm.forward(words),
        };
        let sum = match self.zero_padding {
            true => sum * batch.attention_mask.clone().float().unsqueeze_dim(2),
            false => sum,
        };
        let embedded = self.dropout.forward(sum);
        match &self.project {
            Some(project) => project.forward(embedded),
            None => embedded,
        }
    }
}

impl EncoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        mask_bias: Tensor<4>,
        epsilon: f64,
        tables: &PositionTables,
    ) -> Tensor<3> {
        self.forward_queries(x.clone(), x, mask_bias, epsilon, tables)
    }

    /// The layer's output at the positions of `queries` (the first rows of `x`), attending
    /// over all of `x`.
    fn forward_queries(
        &self,
        queries: Tensor<3>,
        x: Tensor<3>,
        mask_bias: Tensor<4>,
        epsilon: f64,
        tables: &PositionTables,
    ) -> Tensor<3> {
        if let Some(settings) = self.modern {
            let rows = queries.dims()[1];
            return self.forward_pre_norm(settings, rows, x, mask_bias, &tables.rotary);
        }
        let heads = self.num_heads;
        let head_dim = x.dims()[2] / heads;
        let q = self.query.forward(queries.clone());
        let k = self.key.forward(x.clone());
        let v = self.value.forward(x);
        let divisor = (head_dim as f64).sqrt() as f32;
        let dropout = self.attention_dropout.mask(&q.device());
        let context = match &tables.relative {
            Some(relative) => relative.attend(self, [q, k, v], mask_bias, dropout),
            None => attention(q, k, v, mask_bias, heads, divisor, dropout),
        };
        let attended = self.dropout.forward(self.attention_output.forward(context));
        let x = match &self.attention_norm {
            Some(norm) => norm_of_sum(norm, attended, queries, epsilon),
            None => attended + queries,
        };
        let inner = self.activate(self.intermediate.forward(x.clone()));
        let out = self.dropout.forward(self.output.forward(inner));
        norm_of_sum(&self.output_norm, out, x, epsilon)
    }

    /// The feed-forward's activation.
    pub(crate) fn activate(&self, x: Tensor<3>) -> Tensor<3> {
        match self.activation {
            Activation::Gelu => gelu(x),
            Activation::GeluTanh => burn::tensor::activation::gelu_approximate(x),
            Activation::Relu => relu(x),
        }
    }
}

/// `norm(x + residual)`, fused where the norm has a bias (all but ModernBERT's do). `epsilon` is
/// the config's `layer_norm_eps`, which every norm is built with (burn keeps its own private).
fn norm_of_sum(norm: &LayerNorm, x: Tensor<3>, residual: Tensor<3>, epsilon: f64) -> Tensor<3> {
    match &norm.beta {
        Some(beta) => add_norm(x, residual, norm.gamma.val(), beta.val(), epsilon),
        None => norm.forward(x + residual),
    }
}

impl Head {
    /// From the pooled hidden state (the first token's, or ModernBERT's mean): `(pooler
    /// output, logits)`.
    fn forward(&self, pooled_input: Tensor<2>) -> (Option<Tensor<2>>, Tensor<2>) {
        match self.family {
            Family::Bert => {
                let pooled = self.dense.forward(pooled_input).tanh();
                let logits = self.out.forward(self.dropout.forward(pooled.clone()));
                (Some(pooled), logits)
            }
            Family::DistilBert => {
                let inner = self.dropout.forward(relu(self.dense.forward(pooled_input)));
                (None, self.out.forward(inner))
            }
            Family::Roberta => {
                let inner = self
                    .dense
                    .forward(self.dropout.forward(pooled_input))
                    .tanh();
                (None, self.out.forward(self.dropout.forward(inner)))
            }
            // GELU with erf where BERT's pooler has tanh, as the ELECTRA authors chose.
            Family::Electra => {
                let inner = gelu(self.dense.forward(self.dropout.forward(pooled_input)));
                (None, self.out.forward(self.dropout.forward(inner)))
            }
            // The ContextPooler, then the classifier.
            Family::DebertaV2 => {
                let pooled_input = match &self.pooler_dropout {
                    Some(pooler_dropout) => pooler_dropout.forward(pooled_input),
                    None => pooled_input,
                };
                let pooled = gelu(self.dense.forward(pooled_input));
                (None, self.out.forward(self.dropout.forward(pooled)))
            }
            Family::ModernBert => {
                let pooled = gelu(self.dense.forward(pooled_input));
                let pooled = match &self.norm {
                    Some(norm) => norm.forward(pooled),
                    None => pooled,
                };
                (None, self.out.forward(self.dropout.forward(pooled)))
            }
        }
    }
}

/// Dropout modules for a config (identity in `valid()` mode, as `model.eval()` in PyTorch).
pub fn dropout(p: f64) -> Dropout {
    Dropout::new(p)
}

impl Classifier {
    /// Sets the output layer's bias (one value per output), keeping its parameter id so that
    /// optimizer state still applies; `false` when the layer has no bias or another width.
    pub fn set_output_bias(&mut self, values: &[f32]) -> bool {
        let Some(bias) = &mut self.head.out.bias else {
            return false;
        };
        if bias.dims() != [values.len()] {
            return false;
        }
        let device = bias.device();
        let tensor = Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &device);
        let tensor = match bias.is_require_grad() {
            true => tensor.require_grad(),
            false => tensor,
        };
        *bias = Param::initialized(bias.id, tensor);
        true
    }

    /// The same model with every dropout probability set to 0 (for exact comparisons).
    pub fn without_dropout(mut self) -> Self {
        self.disable_dropout();
        self
    }

    /// Sets every dropout probability to 0.
    pub fn disable_dropout(&mut self) {
        self.embeddings.dropout = dropout(0.0);
        for layer in &mut self.layers {
            layer.dropout = dropout(0.0);
            layer.attention_dropout = dropout(0.0);
            if let Some(settings) = &mut layer.modern {
                settings.mlp_dropout = 0.0;
            }
        }
        self.head.dropout = dropout(0.0);
        if let Some(pooler_dropout) = &mut self.head.pooler_dropout {
            *pooler_dropout = dropout(0.0);
        }
    }

    /// Every Dense layer, in the order of [`crate::weights::named_parts`].
    pub fn dense_layers_mut(&mut self) -> Vec<&mut Dense> {
        let mut all: Vec<&mut Dense> = self.embeddings.project.iter_mut().collect();
        for layer in &mut self.layers {
            let EncoderLayer {
                query,
                key,
                value,
                attention_output,
                intermediate,
                output,
                ..
            } = layer;
            all.extend([query, key, value, attention_output, intermediate, output]);
        }
        all.push(&mut self.head.dense);
        all.push(&mut self.head.out);
        all
    }

    /// The ids of the parameters that get no weight decay: biases and LayerNorm weights.
    pub fn no_decay_ids(&self) -> Vec<burn::module::ParamId> {
        let norms = std::iter::once(&self.embeddings.norm)
            .chain(
                self.layers
                    .iter()
                    .flat_map(|layer| layer.attention_norm.iter().chain([&layer.output_norm])),
            )
            .chain(self.relative.as_ref().and_then(|r| r.norm.as_ref()))
            .chain(&self.final_norm)
            .chain(&self.head.norm);
        let mut ids = Vec::new();
        for norm in norms {
            ids.push(norm.gamma.id);
            ids.extend(norm.beta.as_ref().map(|beta| beta.id));
        }
        let layer_denses = self.layers.iter().flat_map(|layer| {
            [
                &layer.query,
                &layer.key,
                &layer.value,
                &layer.attention_output,
                &layer.intermediate,
                &layer.output,
            ]
        });
        let denses = self
            .embeddings
            .project
            .iter()
            .chain(layer_denses)
            .chain([&self.head.dense, &self.head.out]);
        ids.extend(denses.filter_map(|dense| dense.bias.as_ref().map(|bias| bias.id)));
        ids
    }
}
