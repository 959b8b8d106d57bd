//! ModernBERT's layer (`ModernBertEncoderLayer` in transformers): pre-norm attention with
//! rotary position embeddings, global or within a sliding window, and a GeGLU feed-forward,
//! each added to the residual stream; and the mean pooling its head may read.
//!
//! Global layers take the fused attention kernel (the padding mask is per key); sliding-window
//! layers mask per query as well, which the kernel does not take, so they take
//! [`finetune_kernels::biased_attention`], burn's own operations.

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::EncoderLayer;
use finetune_kernels::{Dropout, attention, biased_attention};

/// A ModernBERT layer's own settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModernLayer {
    /// RoPE base (the global or the local theta).
    pub rope_theta: f32,
    /// `Some(w)`: attend only to keys at most `w` positions away.
    pub window: Option<usize>,
    /// Dropout between the GeGLU and `Wo`.
    pub mlp_dropout: f64,
}

impl EncoderLayer {
    /// The layer's output at the first `rows` positions of `x`, attending over all of `x`.
    pub(crate) fn forward_pre_norm(
        &self,
        settings: ModernLayer,
        rows: usize,
        x: Tensor<3>,
        mask_bias: Tensor<4>,
    ) -> Tensor<3> {
        let device = x.device();
        let normed = match &self.attention_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let q = self.query.forward(normed.clone().narrow(1, 0, rows));
        let k = self.key.forward(normed.clone());
        let v = self.value.forward(normed);
        let heads = self.num_heads;
        let [_, seq, hidden] = k.dims();
        let head_dim = hidden / heads;
        let (cos, sin) = rotary_tables(seq, head_dim, settings.rope_theta, &device);
        let q = rotate(
            q,
            cos.clone().narrow(0, 0, rows),
            sin.clone().narrow(0, 0, rows),
            heads,
        );
        let k = rotate(k, cos, sin, heads);
        let divisor = (head_dim as f32).sqrt();
        let dropout_mask = self.attention_dropout.mask(&device);
        let context = match settings.window {
            None => attention(q, k, v, mask_bias, heads, divisor, dropout_mask),
            Some(window) => {
                let bias = mask_bias + band(rows, seq, window, &device);
                biased_attention(q, k, v, bias, heads, divisor, dropout_mask)
            }
        };
        let attended = self.dropout.forward(self.attention_output.forward(context));
        let x = x.narrow(1, 0, rows) + attended;
        let inner = self
            .intermediate
            .forward(self.output_norm.forward(x.clone()));
        let width = inner.dims()[2] / 2;
        let gated =
            self.activate(inner.clone().narrow(2, 0, width)) * inner.narrow(2, width, width);
        let gated = Dropout::new(settings.mlp_dropout).forward(gated);
        x + self.output.forward(gated)
    }
}

/// `(cos, sin)` `[seq, head_dim]` of the rotary angles `position × θ^(-2j / head_dim)`, each
/// frequency twice (the two halves rotate together), in f32 as transformers computes them.
fn rotary_tables(
    seq: usize,
    head_dim: usize,
    theta: f32,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let half = head_dim / 2;
    let inverse: Vec<f32> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let (mut cos, mut sin) = (
        Vec::with_capacity(seq * head_dim),
        Vec::with_capacity(seq * head_dim),
    );
    for position in 0..seq {
        for j in 0..head_dim {
            let angle = position as f32 * inverse[j % half];
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let table = |values| Tensor::from_data(TensorData::new(values, [seq, head_dim]), device);
    (table(cos), table(sin))
}

/// `x · cos + rotate_half(x) · sin` per head of `x: [batch, len, heads × head_dim]`, where
/// `rotate_half` maps the halves `(a, b)` of each head to `(-b, a)`.
fn rotate(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>, heads: usize) -> Tensor<3> {
    let [batch, len, hidden] = x.dims();
    let head_dim = hidden / heads;
    let half = head_dim / 2;
    let x = x.reshape([batch, len, heads, head_dim]);
    let rotated = Tensor::cat(
        vec![
            x.clone().narrow(3, half, half).neg(),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    let per_position = |t: Tensor<2>| t.reshape([1, len, 1, head_dim]);
    (x * per_position(cos) + rotated * per_position(sin)).reshape([batch, len, hidden])
}

/// `[1, 1, rows, seq]`: 0 where `|query - key| <= window`, a large negative number elsewhere.
fn band(rows: usize, seq: usize, window: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..rows)
        .flat_map(|i| (0..seq).map(move |j| if i.abs_diff(j) <= window { 0.0 } else { -1e9 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, rows, seq]), device)
}

/// The mean of `x: [batch, seq, hidden]` over the unpadded positions of each row.
pub(crate) fn mean_over_mask(
    x: Tensor<3>,
    attention_mask: Tensor<2, burn::tensor::Int>,
) -> Tensor<2> {
    let [batch, seq, hidden] = x.dims();
    let mask = attention_mask.float().reshape([batch, seq, 1]);
    let counts = mask.clone().sum_dim(1).reshape([batch, 1]);
    (x * mask).sum_dim(1).reshape([batch, hidden]) / counts
}
