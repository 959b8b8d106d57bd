//! Fused CPU kernels for transformer encoders, as a burn backend extension.
//!
//! This crate owns the hot spots of training an encoder on burn's flex (CPU) backend: the
//! [`FusedOps`] extension trait with its CPU implementation and autodiff backward nodes, the
//! vectorised erf and exp they use, dropout masks recomputed from a seed ([`Mask`]), the
//! embedding's gradient kept as rows ([`RowGradient`]), how a pass is cut into rayon tasks
//! ([`task_len`]) and the thread pool and device slot a training runs under ([`on_own_pool`],
//! [`exclusive_device`]). It depends on burn, gemm, rayon and libm and nothing of finetune's.
//!
//! burn's CPU backend runs each tensor operation as its own pass over memory, and its autodiff
//! records one graph node per operation: a linear layer's bias is a second pass after the
//! matmul, GELU is five nodes, the attention's scale-mask-softmax chain is seven passes forward
//! and more backward. Here each of them is one operation with its own backward:
//!
//! - [`dense`]: `x · W + b`, the bias written into the product's output before the matmul
//!   accumulates onto it, and the backward's three products and bias sum in one node;
//! - [`gelu`]: value and slope in one pass over a vectorised erf ([`erf`], bit for bit libm's)
//!   and exp ([`expf`], bit for bit glibc's), the backward one multiplication;
//! - [`attention`]: multi-head attention straight from the projections' `[batch, seq, hidden]`
//!   layout (no split into heads and merge back): per query the scores, the masked softmax,
//!   dropout and the weighted sum of values in one pass, and one pass back (burn's chain is
//!   two copies, two batched matmuls of tiny matrices, the softmax's seven operations and
//!   dropout, each way);
//! - [`dropout`]: the input times a [`Mask`] computed from its seed, forward and backward,
//!   so that no mask is stored;
//! - [`embedding`]: rows of a table by id; the backward adds the output's gradient rows into a
//!   zeroed table (burn's zeroes bytes and copies them once more: 47 MB for MiniLM's words);
//! - [`add_norm`]: a residual connection and the LayerNorm after it, one pass over each row
//!   forward and one backward (under autodiff, burn's LayerNorm is ten operations forward and
//!   more backward: with the addition, 1.1 ms forward and backward for 256 tokens of MiniLM,
//!   0.25 ms here).
//!
//! [`FusedOps`] is the extension trait: implemented by the flex backend ([`cpu`]) and by burn's
//! autodiff decorator over any backend that has the [`cpu::Kernels`] ([`autodiff`]). Results equal
//! burn's own operations up to float reassociation (the tests compare them).
//!
//! On every other device (CUDA, Vulkan, wgpu) the same functions take burn's own tensor
//! operations ([`generic`]), which is also the path the flex device takes inside
//! [`with_generic_ops`]; [`runs_fused`] says which path a device gets. The model calls these
//! functions and never asks which.

mod autodiff;
mod cpu;
mod dropout;
mod erf;
mod expf;
mod generic;
mod pool;
mod rows;
mod slots;
mod tasks;

pub use cpu::Kernels;
pub use dropout::{Dropout, Mask};
pub use generic::{runs_fused, with_generic_ops};
pub use pool::{exclusive_device, keep_freed_tensor_buffers, on_own_pool};
pub use rows::RowGradient;
pub use tasks::{LANE, PARALLEL_CHUNK, task_len};

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `x · weight + bias` for `x: [rows, in]`, `weight: [in, out]`, `bias: [out]`.
    fn fused_dense(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `x · Φ(x)` elementwise, with erf.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x ⊙ mask`, elementwise in row-major order.
    fn fused_dropout(x: FloatTensor<Self>, mask: Mask) -> FloatTensor<Self>;
    /// `table[ids]`: `[batch, seq, dim]` from `table: [rows, dim]` and `ids: [batch, seq]`.
    fn fused_embedding(table: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self>;
    /// Multi-head attention: see [`attention`] and [`local_attention`].
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        heads: usize,
        divisor: f32,
        window: Option<usize>,
        dropout: Option<Mask>,
    ) -> FloatTensor<Self>;
    /// Multi-head attention with a learned score bias: see [`biased_attention`].
    #[allow(clippy::too_many_arguments)]
    fn fused_biased_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
        divisor: f32,
        dropout: Option<Mask>,
    ) -> FloatTensor<Self>;
    /// GeGLU: see [`geglu`].
    fn fused_geglu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Rotary position embedding: see [`rotary`].
    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// `LayerNorm(x + residual)` over the last dimension, with `gamma` and `beta: [dim]`.
    fn fused_add_norm(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f32,
    ) -> FloatTensor<Self>;
}

/// `x · weight + bias`, `x: [rows, in]`, `weight: [in, out]`.
#[inline]
pub fn dense(x: Tensor<2>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    if !runs_fused(&x.device()) {
        return generic::dense(x, weight, bias);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dense(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// GELU with erf, elementwise.
#[inline]
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x.device()) {
        return generic::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// `x ⊙ mask`: dropout with the mask's seed; the gradient is masked the same way.
#[inline]
pub fn dropout<const D: usize>(x: Tensor<D>, mask: Mask) -> Tensor<D> {
    if !runs_fused(&x.device()) {
        return generic::dropout(x, mask);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dropout(
        x.into_dispatch(),
        mask,
    ))
}

/// The rows of `table` at `ids`.
#[inline]
pub fn embedding(table: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    if !runs_fused(&table.device()) {
        return generic::embedding(table, ids);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_embedding(
        table.into_dispatch(),
        ids.into_dispatch(),
    ))
}

/// Multi-head attention from the projected queries `q: [batch, rows, hidden]`, keys and values
/// `k`, `v: [batch, seq, hidden]` (the heads side by side in `hidden`, as the projections make
/// them): per head, `softmax(q·kᵀ / divisor + mask)` with dropout, times `v`, the heads again
/// side by side in the result `[batch, rows, hidden]`. `mask` is the additive bias per key
/// (`batch × seq` values) and gets no gradient.
#[inline]
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4>,
    heads: usize,
    divisor: f32,
    dropout: Option<Mask>,
) -> Tensor<3> {
    windowed_attention(q, k, v, mask, heads, divisor, None, dropout)
}

/// [`attention`] where each query attends only to the keys at most `window` positions away
/// (ModernBERT's sliding-window layers): the keys farther away get `-1e9` more, as the padding
/// mask gives them, so that exp() of their scores is exactly 0.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn local_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4>,
    heads: usize,
    divisor: f32,
    window: usize,
    dropout: Option<Mask>,
) -> Tensor<3> {
    windowed_attention(q, k, v, mask, heads, divisor, Some(window), dropout)
}

/// [`attention`], within `window` where there is one ([`local_attention`]).
#[inline]
#[allow(clippy::too_many_arguments)]
fn windowed_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4>,
    heads: usize,
    divisor: f32,
    window: Option<usize>,
    dropout: Option<Mask>,
) -> Tensor<3> {
    if !runs_fused(&q.device()) {
        let mask = match window {
            Some(window) => {
                let [rows, seq] = [q.dims()[1], k.dims()[1]];
                mask + generic::band(rows, seq, window, &q.device())
            }
            None => mask,
        };
        return generic::attention(q, k, v, mask, heads, divisor, dropout);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        heads,
        divisor,
        window,
        dropout,
    ))
}

/// [`attention`] with a learned `bias: [batch, heads, rows, seq]` added to the scores after the
/// divisor, `softmax(q·kᵀ / divisor + bias + mask)`, that gets its gradient (DeBERTa's relative
/// position scores). `mask` is the per-key padding mask, as for [`attention`].
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn biased_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4>,
    bias: Tensor<4>,
    heads: usize,
    divisor: f32,
    dropout: Option<Mask>,
) -> Tensor<3> {
    if !runs_fused(&q.device()) {
        return generic::attention(q, k, v, bias + mask, heads, divisor, dropout);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_biased_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        bias.into_dispatch(),
        heads,
        divisor,
        dropout,
    ))
}

/// GeGLU over the last dimension: `gelu(a) ⊙ b` for its halves `[a, b]` (ModernBERT's
/// feed-forward), the result half as wide; GELU with erf, as [`gelu`].
#[inline]
pub fn geglu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x.device()) {
        return generic::geglu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_geglu(x.into_dispatch()))
}

/// Rotary position embedding of `x: [batch, len, heads × head_dim]` per head: `x ⊙ cos +
/// rotate_half(x) ⊙ sin` with `cos`, `sin: [len, head_dim]` the angles' tables (constants), where
/// `rotate_half` maps each head's halves `(a, b)` to `(−b, a)`; the gradient is the inverse
/// rotation.
#[inline]
pub fn rotary(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>, heads: usize) -> Tensor<3> {
    if !runs_fused(&x.device()) {
        return generic::rotary(x, cos, sin, heads);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rotary(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        heads,
    ))
}

/// `LayerNorm(x + residual)` over the last dimension: the residual connection and the norm
/// after it in one operation.
#[inline]
pub fn add_norm<const D: usize>(
    x: Tensor<D>,
    residual: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if !runs_fused(&x.device()) {
        return generic::add_norm(x, residual, gamma, beta, epsilon);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_add_norm(
        x.into_dispatch(),
        residual.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon as f32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Deterministic values in about [-scale, scale] (no device RNG: tests run in parallel).
    fn values<const D: usize>(
        shape: [usize; D],
        seed: u64,
        scale: f32,
        device: &Device,
    ) -> Tensor<D> {
        let len = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
        t.into_data().iter::<f32>().map(f32::to_bits).collect()
    }

    fn assert_close<const D: usize>(ours: Tensor<D>, theirs: Tensor<D>, what: &str) {
        let (ours, theirs) = (ours.into_data(), theirs.into_data());
        assert_eq!(ours.shape(), theirs.shape(), "{what}: shape");
        let scale = theirs
            .iter::<f32>()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        for (i, (a, b)) in ours.iter::<f32>().zip(theirs.iter::<f32>()).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * scale.max(1.0) + 1e-6 * b.abs(),
                "{what}: element {i}: {a} against burn's {b}"
            );
        }
    }

    #[test]
    fn gelu_values_and_gradients_are_burns_bit_for_bit() {
        let device = Device::flex().autodiff();
        let x = values([300, 700], 1, 6.0, &device);
        let upstream = values([300, 700], 2, 1.0, &device);
        let run = |f: fn(Tensor<2>) -> Tensor<2>| {
            let input = x.clone().require_grad();
            let y = f(input.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = input.grad(&grads).expect("a gradient");
            (bits(y.inner()), bits(grad))
        };
        let (ours, ours_grad) = run(gelu);
        let (theirs, theirs_grad) = run(|x| with_generic_ops(true, || gelu(x)));
        assert_eq!(ours, theirs, "values");
        assert_eq!(ours_grad, theirs_grad, "gradients");
        let plain = x.inner();
        assert_eq!(
            bits(gelu(plain.clone())),
            bits(with_generic_ops(true, || gelu(plain)))
        );
    }

    /// With both gradients wanted, the backward runs its two products side by side on one core
    /// each; alone, each is split over the cores. The results agree bit for bit.
    #[test]
    fn dense_gradients_are_the_same_on_one_core_or_all() {
        let device = Device::flex().autodiff();
        let (rows, d_in, d_out) = (200, 96, 384);
        let x = values([rows, d_in], 13, 1.0, &device);
        let weight = values([d_in, d_out], 14, 0.1, &device);
        let bias = values([d_out], 15, 0.1, &device);
        let upstream = values([rows, d_out], 16, 1.0, &device);
        let run = |track_x: bool, track_weight: bool| {
            let track = |t: &Tensor<2>, on: bool| match on {
                true => t.clone().require_grad(),
                false => t.clone(),
            };
            let (x, w) = (track(&x, track_x), track(&weight, track_weight));
            let y = dense(x.clone(), w.clone(), bias.clone().require_grad());
            let grads = (y * upstream.clone()).sum().backward();
            (x.grad(&grads).map(bits), w.grad(&grads).map(bits))
        };
        let (both_x, both_weight) = run(true, true);
        let (alone_x, _) = run(true, false);
        let (_, alone_weight) = run(false, true);
        assert!(both_x.is_some() && both_weight.is_some());
        assert_eq!(both_x, alone_x, "input gradient");
        assert_eq!(both_weight, alone_weight, "weight gradient");
    }

    #[test]
    fn dense_matches_burns_linear_with_all_three_gradients() {
        let device = Device::flex().autodiff();
        // Wide enough that the product is split over the cores, and one odd-sized case.
        for (rows, d_in, d_out) in [(200, 96, 384), (37, 50, 3)] {
            let x = values([rows, d_in], 3, 1.0, &device);
            let weight = values([d_in, d_out], 4, 0.1, &device);
            let bias = values([d_out], 5, 0.1, &device);
            let upstream = values([rows, d_out], 6, 1.0, &device);
            let run = |ours: bool| {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    weight.clone().require_grad(),
                    bias.clone().require_grad(),
                );
                let y = match ours {
                    true => dense(x.clone(), w.clone(), b.clone()),
                    false => with_generic_ops(true, || dense(x.clone(), w.clone(), b.clone())),
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<2>| t.grad(&grads).expect("a gradient");
                (
                    y.inner(),
                    grad(&x),
                    grad(&w),
                    b.grad(&grads).expect("bias gradient"),
                )
            };
            let (y, gx, gw, gb) = run(true);
            let (y_ref, gx_ref, gw_ref, gb_ref) = run(false);
            assert_close(y, y_ref, "output");
            assert_close(gx, gx_ref, "input gradient");
            assert_close(gw, gw_ref, "weight gradient");
            assert_close(gb, gb_ref, "bias gradient");
            // Without autodiff, and with a non-contiguous (transposed) input.
            let plain_x = x.clone().inner().transpose().transpose();
            assert_close(
                dense(
                    plain_x.clone(),
                    weight.clone().inner(),
                    bias.clone().inner(),
                ),
                with_generic_ops(true, || {
                    dense(plain_x, weight.clone().inner(), bias.clone().inner())
                }),
                "eval output",
            );
        }
    }

    #[test]
    fn dropout_masks_the_gradient_as_it_masks_the_values() {
        let device = Device::flex().autodiff();
        let mask = Mask::new(99, 0.8);
        let x = Tensor::<2>::ones([70, 900], &device).require_grad();
        let y = dropout(x.clone(), mask);
        let upstream = values([70, 900], 9, 1.0, &device);
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let grad = x.grad(&grads).expect("a gradient");
        // With ones in, the output is the mask itself.
        let expected: Vec<f32> = (0..70 * 900).map(|i| mask.value(i)).collect();
        let y = y.inner().into_data();
        assert_eq!(y.as_slice::<f32>().expect("f32"), expected.as_slice());
        let masked_upstream = upstream.clone().inner() * Tensor::from_data(y, &Device::flex());
        assert_eq!(bits(grad), bits(masked_upstream.clone()));
        // The generic path applies the same mask, forward and backward.
        let x = Tensor::<2>::ones([70, 900], &device).require_grad();
        let y = with_generic_ops(true, || dropout(x.clone(), mask));
        let grads = (y.clone() * upstream.clone()).sum().backward();
        assert_eq!(
            y.inner().into_data().as_slice::<f32>().expect("f32"),
            expected.as_slice()
        );
        assert_eq!(
            bits(x.grad(&grads).expect("a gradient")),
            bits(masked_upstream)
        );
    }

    #[test]
    fn the_generic_switch_holds_for_its_work_alone() {
        let device = Device::flex();
        assert!(runs_fused(&device) && runs_fused(&device.clone().autodiff()));
        with_generic_ops(true, || {
            assert!(!runs_fused(&device));
            with_generic_ops(false, || assert!(runs_fused(&device)));
            assert!(!runs_fused(&device), "restored after the inner work");
        });
        assert!(runs_fused(&device));
        let panicked = std::panic::catch_unwind(|| with_generic_ops(true, || panic!("in work")));
        assert!(panicked.is_err());
        assert!(runs_fused(&device), "restored after a panic");
    }

    #[test]
    fn embedding_is_burns_with_the_same_gradient_for_repeated_ids() {
        let device = Device::flex().autodiff();
        let table = values([50, 24], 10, 1.0, &device);
        // Repeated ids (3, 7) accumulate their rows' gradients.
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, 7, 7, 0, 3, 49, 3, 1], [2, 4]),
            &device,
        );
        let upstream = values([2, 4, 24], 11, 1.0, &device);
        let run = |ours: bool| {
            let t = table.clone().require_grad();
            let y = match ours {
                true => embedding(t.clone(), ids.clone()),
                false => with_generic_ops(true, || embedding(t.clone(), ids.clone())),
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (bits(y.inner()), bits(t.grad(&grads).expect("a gradient")))
        };
        assert_eq!(run(true), run(false));
    }

    /// burn's chain for what [`attention`] computes (the generic path): the heads split out,
    /// `q·kᵀ`, softmax of the scaled and masked scores, dropout, `·v`, the heads merged back.
    fn attention_by_burn(
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        mask: Tensor<4>,
        heads: usize,
        divisor: f32,
        dropout_mask: Option<Mask>,
    ) -> Tensor<3> {
        with_generic_ops(true, || {
            attention(q, k, v, mask, heads, divisor, dropout_mask)
        })
    }

    #[test]
    fn attention_matches_burns_chain_with_all_three_gradients() {
        let device = Device::flex().autodiff();
        let (batch, seq, hidden, heads) = (3, 7, 48, 4);
        let divisor = 12f32.sqrt();
        // The second item's last two keys are padding.
        let mut mask = vec![0f32; batch * seq];
        mask[seq + 5] = -1e9;
        mask[seq + 6] = -1e9;
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [batch, 1, 1, seq]), &device);
        // Every query, and the first alone (the last layer's case); with and without dropout.
        for (rows, dropout_mask) in [(seq, None), (seq, Some(Mask::new(5, 0.8))), (1, None)] {
            let q = values([batch, rows, hidden], 30, 2.0, &device);
            let k = values([batch, seq, hidden], 31, 2.0, &device);
            let v = values([batch, seq, hidden], 32, 1.0, &device);
            let upstream = values([batch, rows, hidden], 33, 1.0, &device);
            let run = |ours: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let attend = if ours { attention } else { attention_by_burn };
                let (mask, qc, kc, vc) = (mask.clone(), q.clone(), k.clone(), v.clone());
                let context = attend(qc, kc, vc, mask, heads, divisor, dropout_mask);
                let grads = (context.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<3>| t.grad(&grads).expect("a gradient");
                (context.inner(), grad(&q), grad(&k), grad(&v))
            };
            let (context, gq, gk, gv) = run(true);
            let (context_ref, gq_ref, gk_ref, gv_ref) = run(false);
            let case = format!("{rows} queries, dropout {}", dropout_mask.is_some());
            assert_close(context, context_ref, &format!("context ({case})"));
            assert_close(gq, gq_ref, &format!("query gradient ({case})"));
            assert_close(gk, gk_ref, &format!("key gradient ({case})"));
            assert_close(gv, gv_ref, &format!("value gradient ({case})"));
        }
        // Padding leaks nothing: other values at the padded keys leave the context as it was.
        let (q, k, v) = (
            values([batch, seq, hidden], 37, 2.0, &device).inner(),
            values([batch, seq, hidden], 38, 2.0, &device).inner(),
            values([batch, seq, hidden], 39, 1.0, &device).inner(),
        );
        let padded_keys = v.clone().narrow(0, 1, 1).narrow(1, 5, 2);
        let other_v = v
            .clone()
            .slice_assign([1..2, 5..7, 0..hidden], padded_keys + 3.0);
        let attend = |v: Tensor<3>| {
            let (q, k, mask) = (q.clone(), k.clone(), mask.clone().inner());
            bits(attention(q, k, v, mask, heads, divisor, None).narrow(0, 1, 1))
        };
        assert_eq!(attend(v), attend(other_v));
        // Without autodiff (evaluation).
        let plain = |t: Tensor<3>| t.inner();
        let (q, k, v) = (
            values([batch, seq, hidden], 34, 2.0, &device),
            values([batch, seq, hidden], 35, 2.0, &device),
            values([batch, seq, hidden], 36, 1.0, &device),
        );
        assert_close(
            attention(
                plain(q.clone()),
                plain(k.clone()),
                plain(v.clone()),
                mask.clone().inner(),
                heads,
                divisor,
                None,
            ),
            attention_by_burn(
                plain(q),
                plain(k),
                plain(v),
                mask.inner(),
                heads,
                divisor,
                None,
            ),
            "eval context",
        );
    }

    #[test]
    fn add_norm_matches_burns_layer_norm_of_the_sum_with_all_gradients() {
        let device = Device::flex().autodiff();
        // Enough rows for several parallel tasks, a width that is no multiple of the lanes,
        // and an offset mean so that the centring matters.
        let (rows, width) = (300, 389);
        let x = values([3, rows / 3, width], 20, 2.0, &device) + 0.5;
        let residual = values([3, rows / 3, width], 21, 1.0, &device);
        let gamma = values([width], 22, 1.0, &device) + 1.0;
        let beta = values([width], 23, 0.5, &device);
        let upstream = values([3, rows / 3, width], 24, 1.0, &device);
        let epsilon = 1e-12;
        let run = |ours: bool| {
            let (x, r, g, b) = (
                x.clone().require_grad(),
                residual.clone().require_grad(),
                gamma.clone().require_grad(),
                beta.clone().require_grad(),
            );
            let y = match ours {
                true => add_norm(x.clone(), r.clone(), g.clone(), b.clone(), epsilon),
                false => with_generic_ops(true, || {
                    add_norm(x.clone(), r.clone(), g.clone(), b.clone(), epsilon)
                }),
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = |t: &Tensor<3>| t.grad(&grads).expect("a gradient");
            let vector_grad = |t: &Tensor<1>| t.grad(&grads).expect("a gradient");
            (
                y.inner(),
                grad(&x),
                grad(&r),
                vector_grad(&g),
                vector_grad(&b),
            )
        };
        let (y, gx, gr, gg, gb) = run(true);
        let (y_ref, gx_ref, gr_ref, gg_ref, gb_ref) = run(false);
        assert_close(y, y_ref, "output");
        assert_close(gx, gx_ref, "input gradient");
        assert_close(gr, gr_ref, "residual gradient");
        assert_close(gg, gg_ref, "gamma gradient");
        assert_close(gb, gb_ref, "beta gradient");
        // Without autodiff, against burn's own (fused) layer norm.
        let plain = add_norm(
            x.clone().inner(),
            residual.clone().inner(),
            gamma.clone().inner(),
            beta.clone().inner(),
            epsilon,
        );
        let plain_ref = with_generic_ops(true, || {
            add_norm(
                x.inner(),
                residual.inner(),
                gamma.inner(),
                beta.inner(),
                epsilon,
            )
        });
        assert_close(plain, plain_ref, "eval output");
    }

    /// The same floats (bit for bit, but for the sign of a zero: burn's gradient of a slice
    /// adds it into zeros, which makes `-0` into `0`), or the first element that differs.
    fn assert_same_bits(ours: &[u32], theirs: &[u32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        let value = |bits: u32| f32::from_bits(bits);
        let same = |i: usize| ours[i] == theirs[i] || value(ours[i]) == value(theirs[i]);
        if let Some(i) = (0..ours.len()).find(|&i| !same(i)) {
            panic!(
                "{what}: element {i} is {} against burn's {}",
                value(ours[i]),
                value(theirs[i])
            );
        }
    }

    /// The second item's last two keys are padding.
    fn padding_mask(batch: usize, seq: usize, device: &Device) -> Tensor<4> {
        let mut mask = vec![0f32; batch * seq];
        mask[seq + seq - 2..2 * seq].fill(-1e9);
        Tensor::from_data(TensorData::new(mask, [batch, 1, 1, seq]), device)
    }

    #[test]
    fn local_attention_matches_burns_chain_with_a_band_mask() {
        let device = Device::flex().autodiff();
        let (batch, seq, hidden, heads) = (3, 9, 48, 4);
        let mask = padding_mask(batch, seq, &device);
        for (rows, window, dropout_mask) in [
            (seq, 2, None),
            (seq, 3, Some(Mask::new(7, 0.9))),
            (1, 2, None),
            (seq, 20, None),
        ] {
            let q = values([batch, rows, hidden], 40, 2.0, &device);
            let k = values([batch, seq, hidden], 41, 2.0, &device);
            let v = values([batch, seq, hidden], 42, 1.0, &device);
            let upstream = values([batch, rows, hidden], 43, 1.0, &device);
            let run = |generic: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let (mask, qc, kc, vc) = (mask.clone(), q.clone(), k.clone(), v.clone());
                let context = with_generic_ops(generic, || {
                    local_attention(qc, kc, vc, mask, heads, 3.0, window, dropout_mask)
                });
                let grads = (context.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<3>| t.grad(&grads).expect("a gradient");
                (context.inner(), grad(&q), grad(&k), grad(&v))
            };
            let (ours, theirs) = (run(false), run(true));
            let case = format!("{rows} queries, window {window}");
            assert_close(ours.0, theirs.0, &format!("context ({case})"));
            assert_close(ours.1, theirs.1, &format!("query gradient ({case})"));
            assert_close(ours.2, theirs.2, &format!("key gradient ({case})"));
            assert_close(ours.3, theirs.3, &format!("value gradient ({case})"));
        }
        // A key beyond the window leaves the context as it was, whatever its value.
        let (q, k, v) = (
            values([1, seq, hidden], 44, 2.0, &device).inner(),
            values([1, seq, hidden], 45, 2.0, &device).inner(),
            values([1, seq, hidden], 46, 1.0, &device).inner(),
        );
        let far = v.clone().slice_assign(
            [0..1, 8..9, 0..hidden],
            Tensor::ones([1, 1, hidden], &device).inner(),
        );
        let first_query = |v: Tensor<3>| {
            let mask = Tensor::zeros([1, 1, 1, seq], &q.device());
            let context = local_attention(q.clone(), k.clone(), v, mask, heads, 3.0, 2, None);
            bits(context.narrow(1, 0, 1))
        };
        assert_eq!(first_query(v), first_query(far));
    }

    #[test]
    fn biased_attention_matches_burns_chain_with_the_bias_gradient() {
        let device = Device::flex().autodiff();
        let (batch, seq, hidden, heads) = (2, 7, 32, 2);
        let mask = padding_mask(batch, seq, &device);
        for (rows, dropout_mask) in [(seq, None), (seq, Some(Mask::new(3, 0.85))), (1, None)] {
            let q = values([batch, rows, hidden], 50, 2.0, &device);
            let k = values([batch, seq, hidden], 51, 2.0, &device);
            let v = values([batch, seq, hidden], 52, 1.0, &device);
            let bias = values([batch, heads, rows, seq], 53, 1.5, &device);
            let upstream = values([batch, rows, hidden], 54, 1.0, &device);
            let run = |generic: bool| {
                let (q, k, v, bias) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                    bias.clone().require_grad(),
                );
                let (qc, kc, vc, bc) = (q.clone(), k.clone(), v.clone(), bias.clone());
                let context = with_generic_ops(generic, || {
                    biased_attention(qc, kc, vc, mask.clone(), bc, heads, 5.0, dropout_mask)
                });
                let grads = (context.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<3>| t.grad(&grads).expect("a gradient");
                let bias_grad = bias.grad(&grads).expect("a bias gradient");
                (context.inner(), grad(&q), grad(&k), grad(&v), bias_grad)
            };
            let (ours, theirs) = (run(false), run(true));
            let case = format!("{rows} queries, dropout {}", dropout_mask.is_some());
            assert_close(ours.0, theirs.0, &format!("context ({case})"));
            assert_close(ours.1, theirs.1, &format!("query gradient ({case})"));
            assert_close(ours.2, theirs.2, &format!("key gradient ({case})"));
            assert_close(ours.3, theirs.3, &format!("value gradient ({case})"));
            assert_close(ours.4, theirs.4, &format!("bias gradient ({case})"));
        }
    }

    #[test]
    fn geglu_and_rotary_are_burns_chains_bit_for_bit() {
        let device = Device::flex().autodiff();
        // Rows enough for several tasks, a width that is no multiple of the lanes.
        let x = values([4, 300, 2 * 70], 60, 5.0, &device);
        let upstream = values([4, 300, 70], 61, 1.0, &device);
        let run = |generic: bool| {
            let input = x.clone().require_grad();
            let y = with_generic_ops(generic, || geglu(input.clone()));
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                bits(y.inner()),
                bits(input.grad(&grads).expect("a gradient")),
            )
        };
        let (ours, theirs) = (run(false), run(true));
        assert_same_bits(&ours.0, &theirs.0, "geglu");
        assert_same_bits(&ours.1, &theirs.1, "geglu's gradient");
        assert_eq!(
            bits(geglu(x.clone().inner())),
            bits(with_generic_ops(true, || geglu(x.inner()))),
            "geglu without autodiff"
        );

        let (batch, len, heads, head_dim) = (3, 11, 4, 16);
        let x = values([batch, len, heads * head_dim], 62, 2.0, &device);
        let upstream = values([batch, len, heads * head_dim], 63, 1.0, &device);
        let angles = values([len, head_dim], 64, 3.0, &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let run = |generic: bool| {
            let input = x.clone().require_grad();
            let (cos, sin) = (cos.clone(), sin.clone());
            let y = with_generic_ops(generic, || rotary(input.clone(), cos, sin, heads));
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                bits(y.inner()),
                bits(input.grad(&grads).expect("a gradient")),
            )
        };
        let (ours, theirs) = (run(false), run(true));
        assert_same_bits(&ours.0, &theirs.0, "rotary");
        assert_same_bits(&ours.1, &theirs.1, "rotary's gradient");
    }
}
