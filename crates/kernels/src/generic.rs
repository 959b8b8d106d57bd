//! The encoder's operations in burn's own tensor operations, for every device the fused
//! kernels do not serve: a GPU (CUDA, Vulkan, wgpu), or the flex device when
//! [`with_generic_ops`] asks for it. burn's autodiff differentiates them, and on a GPU burn's
//! kernel fusion joins their elementwise chains. They are what the fused kernels are tested
//! against, so the two paths agree up to float reassociation.
//!
//! Dropout applies the same [`Mask`] as the fused path, element for element, so that a run
//! draws the same masks on every device.

use std::cell::Cell;
use std::mem::MaybeUninit;

use burn::backend::DispatchDevice;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::Mask;

thread_local! {
    /// Set while [`with_generic_ops`] runs work on this thread.
    static GENERIC_ON_FLEX: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` with the flex device taking the generic operations (`generic: true`) or the
/// fused kernels, on this thread, and restores the previous choice afterwards (also when
/// `work` panics). The model's operations run on the thread that calls them, so a stage that
/// wraps its work in this sets the path of every operation it runs.
pub fn with_generic_ops<R>(generic: bool, work: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_ON_FLEX.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_ON_FLEX.with(|flag| flag.replace(generic)));
    work()
}

/// Whether the fused CPU kernels serve `device` on this thread: the flex device (with or
/// without autodiff), unless [`with_generic_ops`] turned them off.
pub fn runs_fused(device: &Device) -> bool {
    let dispatch = device.as_dispatch();
    let inner = match dispatch {
        DispatchDevice::Autodiff(autodiff) => &**autodiff,
        other => other,
    };
    matches!(inner, DispatchDevice::Flex(_)) && !GENERIC_ON_FLEX.with(Cell::get)
}

pub(crate) fn dense(x: Tensor<2>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    burn::tensor::module::linear(x, weight, Some(bias))
}

pub(crate) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    burn::tensor::activation::gelu(x)
}

/// `x ⊙ mask`, the mask's values made on the host in `x`'s row-major order.
pub(crate) fn dropout<const D: usize>(x: Tensor<D>, mask: Mask) -> Tensor<D> {
    let shape = x.shape();
    let mut values = vec![MaybeUninit::uninit(); shape.num_elements()];
    let values = mask.fill_from(0, &mut values).to_vec();
    let mask = Tensor::<D>::from_data(TensorData::new(values, shape), &x.device());
    x * mask
}

pub(crate) fn embedding(table: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    burn::tensor::module::embedding(table, ids)
}

/// The heads split out, `softmax(q·kᵀ / divisor + mask)` with dropout, `·v`, the heads merged.
pub(crate) fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4>,
    heads: usize,
    divisor: f32,
    dropout_mask: Option<Mask>,
) -> Tensor<3> {
    let [batch, rows, hidden] = q.dims();
    let seq = k.dims()[1];
    let split = |t: Tensor<3>, len: usize| {
        t.reshape([batch, len, heads, hidden / heads])
            .swap_dims(1, 2)
    };
    let (q, k, v) = (split(q, rows), split(k, seq), split(v, seq));
    let scores = q.matmul(k.transpose()).div_scalar(divisor) + mask;
    let mut probs = burn::tensor::activation::softmax(scores, 3);
    if let Some(m) = dropout_mask {
        probs = dropout(probs, m);
    }
    probs
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([batch, rows, hidden])
}

/// `[1, 1, rows, seq]`: 0 where `|query - key| <= window`, `-1e9` elsewhere.
pub(crate) fn band(rows: usize, seq: usize, window: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..rows)
        .flat_map(|i| (0..seq).map(move |j| if i.abs_diff(j) <= window { 0.0 } else { -1e9 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, rows, seq]), device)
}

pub(crate) fn geglu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let width = x.dims()[D - 1] / 2;
    gelu(x.clone().narrow(D - 1, 0, width)) * x.narrow(D - 1, width, width)
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin`, the heads split out of `x`'s last dimension.
pub(crate) fn rotary(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>, heads: usize) -> Tensor<3> {
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

pub(crate) fn add_norm<const D: usize>(
    x: Tensor<D>,
    residual: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    burn::tensor::module::layer_norm(x + residual, gamma, Some(beta), epsilon)
}
