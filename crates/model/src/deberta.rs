//! DeBERTa's disentangled attention (`DisentangledSelfAttention` in transformers): the
//! relative position table the layers share, the bucketed relative position of every
//! query-key pair, and the attention that adds content-to-position and position-to-content
//! scores to the content scores.
//!
//! The position scores are burn's own operations (matmuls, gathers), under autodiff as on
//! every device, and enter [`finetune_kernels::biased_attention`] (one fused operation on the
//! CPU) as its learned bias.

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::RelativeAttention;
use crate::model::{Dense, EncoderLayer};
use finetune_kernels::{Mask, attention, biased_attention};

/// `encoder.rel_embeddings` (`2 × span` rows) and the LayerNorm over them.
#[derive(Module, Debug)]
pub struct RelativeEmbeddings {
    pub table: Embedding,
    pub norm: Option<LayerNorm>,
    #[module(skip)]
    pub attention: RelativeAttention,
}

/// What every layer's attention reads for one batch width.
pub(crate) struct RelativePositions {
    /// The normalised table `[2 × span, hidden]` (each layer applies its own dropout).
    table: Tensor<2>,
    /// `[seq, seq]`: for query `i` and key `j`, the table row of their distance.
    index: Tensor<2, Int>,
    attention: RelativeAttention,
}

impl RelativeEmbeddings {
    pub(crate) fn for_length(&self, seq: usize, device: &Device) -> RelativePositions {
        let table = self.table.weight.val();
        RelativePositions {
            table: match &self.norm {
                Some(norm) => norm.forward(table),
                None => table,
            },
            index: table_rows(seq, &self.attention, device),
            attention: self.attention,
        }
    }
}

/// DeBERTa-v3's log buckets (`make_log_bucket_position`): distances within half the bucket
/// count stay as they are, farther ones share buckets that widen logarithmically up to
/// `max_position`. In f32, as transformers computes it, so ties round the same way.
fn bucket(distance: i64, buckets: usize, max_position: usize) -> i64 {
    let mid = (buckets / 2) as i64;
    if distance.abs() <= mid {
        return distance;
    }
    let ratio = (distance.abs() as f32 / mid as f32).ln();
    let range = (((max_position - 1) as f64 / mid as f64) as f32).ln();
    let log_position = (ratio / range * (mid - 1) as f32).ceil() + mid as f32;
    log_position as i64 * distance.signum()
}

/// The table row for each query `i` and key `j` of a `seq`-long batch: the (bucketed)
/// distance `i - j` shifted by the span and clamped into the table. p2c needs the row of
/// `j - i` seen from the key, which is the same row, since buckets are symmetric.
fn table_rows(seq: usize, attention: &RelativeAttention, device: &Device) -> Tensor<2, Int> {
    let span = attention.span() as i64;
    let mut rows = Vec::with_capacity(seq * seq);
    for i in 0..seq as i64 {
        for j in 0..seq as i64 {
            let distance = match attention.position_buckets {
                0 => i - j,
                buckets => bucket(i - j, buckets, attention.max_relative_positions),
            };
            rows.push((distance + span).clamp(0, 2 * span - 1));
        }
    }
    Tensor::from_data(TensorData::new(rows, [seq, seq]), device)
}

impl RelativePositions {
    /// Multi-head attention of `q: [batch, rows, hidden]` (the first `rows` positions) over
    /// `k`, `v: [batch, seq, hidden]`, with the position terms projected by `layer`'s own query
    /// and key projections: `softmax((q·kᵀ + c2p + p2c) / sqrt(head_dim × terms) + mask)`.
    pub(crate) fn attend(
        &self,
        layer: &EncoderLayer,
        [q, k, v]: [Tensor<3>; 3],
        mask_bias: Tensor<4>,
        dropout_mask: Option<Mask>,
    ) -> Tensor<3> {
        let [batch, rows, hidden] = q.dims();
        let seq = k.dims()[1];
        let heads = layer.num_heads;
        let head_dim = hidden / heads;
        let split =
            |t: Tensor<3>, len: usize| t.reshape([batch, len, heads, head_dim]).swap_dims(1, 2);
        let table = layer.dropout.forward(self.table.clone());
        let table_len = table.dims()[0];
        // The table through a projection, per head: `[batch, heads, 2 × span, head_dim]`.
        let project = |projection: &Dense| {
            projection
                .forward(table.clone())
                .reshape([1, table_len, heads, head_dim])
                .swap_dims(1, 2)
                .expand([batch, heads, table_len, head_dim])
        };
        let index = self.index.clone().narrow(0, 0, rows);
        let mut position_scores: Option<Tensor<4>> = None;
        let mut add = |term: Tensor<4>| {
            position_scores = Some(match position_scores.take() {
                Some(sum) => sum + term,
                None => term,
            });
        };
        if self.attention.content_to_position {
            let by_row = split(q.clone(), rows).matmul(project(&layer.key).swap_dims(2, 3));
            let at = index.clone().reshape([1, 1, rows, seq]);
            add(by_row.gather(3, at.expand([batch, heads, rows, seq])));
        }
        if self.attention.position_to_content {
            // Per key, its content against every position row, read at the query's distance.
            let by_row = split(k.clone(), seq).matmul(project(&layer.query).swap_dims(2, 3));
            let at = index.transpose().reshape([1, 1, seq, rows]);
            add(by_row
                .gather(3, at.expand([batch, heads, seq, rows]))
                .swap_dims(2, 3));
        }
        let scale = ((head_dim * self.attention.terms()) as f32).sqrt();
        match position_scores {
            Some(scores) => {
                let bias = scores.div_scalar(scale);
                biased_attention(q, k, v, mask_bias, bias, heads, scale, dropout_mask)
            }
            None => attention(q, k, v, mask_bias, heads, scale, dropout_mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_near_distances_and_compress_far_ones_symmetrically() {
        // transformers 5.24's make_log_bucket_position(…, bucket_size=16, max_position=64).
        let expected = [
            (0, 0),
            (7, 7),
            (8, 8),
            (9, 9),
            (11, 10),
            (12, 10),
            (20, 12),
            (40, 14),
            (63, 15),
            (200, 19),
        ];
        for (distance, bucketed) in expected {
            assert_eq!(bucket(distance, 16, 64), bucketed, "distance {distance}");
            assert_eq!(bucket(-distance, 16, 64), -bucketed, "distance -{distance}");
        }
    }
}
