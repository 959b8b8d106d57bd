//! ModernBERT's layer (`ModernBertEncoderLayer` in transformers): pre-norm attention with
//! rotary position embeddings, global or within a sliding window, and a GeGLU feed-forward,
//! each added to the residual stream; and the mean pooling its head may read.
//!
//! Each piece is one fused operation of the kernels crate: the rotation of queries and keys
//! ([`rotary`], its tables made once per batch width, [`RotaryTables`]), global or
//! sliding-window attention ([`attention`], [`local_attention`]) and the GeGLU ([`geglu`]).

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::EncoderLayer;
use finetune_kernels::{Dropout, attention, geglu, local_attention, rotary};

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
        rotary_tables: &RotaryTables,
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
        let head_dim = k.dims()[2] / heads;
        let (cos, sin) = rotary_tables.of(settings.rope_theta);
        let q = rotary(
            q,
            cos.clone().narrow(0, 0, rows),
            sin.clone().narrow(0, 0, rows),
            heads,
        );
        let k = rotary(k, cos, sin, heads);
        let divisor = (head_dim as f32).sqrt();
        let dropout_mask = self.attention_dropout.mask(&device);
        let context = match settings.window {
            None => attention(q, k, v, mask_bias, heads, divisor, dropout_mask),
            Some(window) => {
                local_attention(q, k, v, mask_bias, heads, divisor, window, dropout_mask)
            }
        };
        let attended = self.dropout.forward(self.attention_output.forward(context));
        let x = x.narrow(1, 0, rows) + attended;
        let inner = self
            .intermediate
            .forward(self.output_norm.forward(x.clone()));
        let gated = Dropout::new(settings.mlp_dropout).forward(geglu(inner));
        x + self.output.forward(gated)
    }
}

/// The rotary tables of each RoPE base the layers use (ModernBERT's global and local theta),
/// for one batch width.
pub(crate) struct RotaryTables {
    by_theta: Vec<(f32, [Tensor<2>; 2])>,
}

impl RotaryTables {
    pub(crate) fn new(
        thetas: impl Iterator<Item = f32>,
        seq: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let mut by_theta: Vec<(f32, [Tensor<2>; 2])> = Vec::new();
        for theta in thetas {
            if !by_theta.iter().any(|(known, _)| *known == theta) {
                by_theta.push((theta, rotary_tables(seq, head_dim, theta, device)));
            }
        }
        RotaryTables { by_theta }
    }

    /// `(cos, sin)` for `theta`, one of those the tables were made for.
    fn of(&self, theta: f32) -> (Tensor<2>, Tensor<2>) {
        let (_, [cos, sin]) = self
            .by_theta
            .iter()
            .find(|(known, _)| *known == theta)
            .expect("the tables were made for every layer's theta");
        (cos.clone(), sin.clone())
    }
}

/// `[cos, sin]` `[seq, head_dim]` of the rotary angles `position × θ^(-2j / head_dim)`, each
/// frequency twice (the two halves rotate together), in f32 as transformers computes them.
fn rotary_tables(seq: usize, head_dim: usize, theta: f32, device: &Device) -> [Tensor<2>; 2] {
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
    [table(cos), table(sin)]
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
