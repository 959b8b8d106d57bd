//! Fused kernels for the encoder's hot spots on the CPU, as a burn backend extension.
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
//! - [`masked_softmax`]: `softmax(scores / divisor + mask)` row by row, the backward
//!   `p ⊙ (g − Σ g⊙p) / divisor` in one pass;
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

pub mod autodiff;
pub mod cpu;
pub mod erf;
pub mod expf;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

use crate::dropout::Mask;

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
    /// `softmax(scores / divisor + mask, last dim)` for `scores: [batch, heads, queries, keys]`
    /// and a constant `mask: [batch, 1, 1, keys]`.
    fn fused_masked_softmax(
        scores: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self>;
    /// `x ⊙ mask`, elementwise in row-major order.
    fn fused_dropout(x: FloatTensor<Self>, mask: Mask) -> FloatTensor<Self>;
    /// `table[ids]`: `[batch, seq, dim]` from `table: [rows, dim]` and `ids: [batch, seq]`.
    fn fused_embedding(table: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self>;
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
pub fn dense(x: Tensor<2>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dense(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// GELU with erf, elementwise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// Attention probabilities: `softmax(scores / divisor + mask)` over the keys. The mask is an
/// additive bias per key (`[batch, 1, 1, keys]`) and gets no gradient.
pub fn masked_softmax(scores: Tensor<4>, mask: Tensor<4>, divisor: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_masked_softmax(
        scores.into_dispatch(),
        mask.into_dispatch(),
        divisor,
    ))
}

/// `x ⊙ mask`: dropout with the mask's seed; the gradient is masked the same way.
pub fn dropout<const D: usize>(x: Tensor<D>, mask: Mask) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dropout(
        x.into_dispatch(),
        mask,
    ))
}

/// The rows of `table` at `ids`.
pub fn embedding(table: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_embedding(
        table.into_dispatch(),
        ids.into_dispatch(),
    ))
}

/// `LayerNorm(x + residual)` over the last dimension: the residual connection and the norm
/// after it in one operation.
pub fn add_norm<const D: usize>(
    x: Tensor<D>,
    residual: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
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
        let (theirs, theirs_grad) = run(burn::tensor::activation::gelu);
        assert_eq!(ours, theirs, "values");
        assert_eq!(ours_grad, theirs_grad, "gradients");
        let plain = x.inner();
        assert_eq!(
            bits(gelu(plain.clone())),
            bits(burn::tensor::activation::gelu(plain))
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
                    false => burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone())),
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
                burn::tensor::module::linear(
                    plain_x,
                    weight.clone().inner(),
                    Some(bias.clone().inner()),
                ),
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
        let masked_upstream = upstream.inner() * Tensor::from_data(y, &Device::flex());
        assert_eq!(bits(grad), bits(masked_upstream));
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
                false => burn::tensor::module::embedding(t.clone(), ids.clone()),
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (bits(y.inner()), bits(t.grad(&grads).expect("a gradient")))
        };
        assert_eq!(run(true), run(false));
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
                false => burn::tensor::module::layer_norm(
                    x.clone() + r.clone(),
                    g.clone(),
                    Some(b.clone()),
                    epsilon,
                ),
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
        let plain_ref = burn::tensor::module::layer_norm(
            x.inner() + residual.inner(),
            gamma.inner(),
            Some(beta.inner()),
            epsilon,
        );
        assert_close(plain, plain_ref, "eval output");
    }

    #[test]
    fn masked_softmax_matches_burns_chain_and_ignores_masked_keys() {
        let device = Device::flex().autodiff();
        let [batch, heads, queries, keys] = [3, 4, 5, 7];
        let scores = values([batch, heads, queries, keys], 7, 8.0, &device);
        // The last two keys of the second item are padding.
        let mut mask = vec![0f32; batch * keys];
        mask[keys + 5] = -1e9;
        mask[keys + 6] = -1e9;
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [batch, 1, 1, keys]), &device);
        let upstream = values([batch, heads, queries, keys], 8, 1.0, &device);
        let divisor = 32f32.sqrt();
        let run = |ours: bool| {
            let s = scores.clone().require_grad();
            let p = match ours {
                true => masked_softmax(s.clone(), mask.clone(), divisor),
                false => burn::tensor::activation::softmax(
                    s.clone().div_scalar(divisor) + mask.clone(),
                    3,
                ),
            };
            let grads = (p.clone() * upstream.clone()).sum().backward();
            (p.inner(), s.grad(&grads).expect("a gradient"))
        };
        let (p, grad) = run(true);
        let (p_ref, grad_ref) = run(false);
        let padded = p.clone().narrow(0, 1, 1).narrow(3, 5, 2);
        assert!(padded.into_data().iter::<f32>().all(|v| v == 0.0));
        assert_close(p, p_ref, "probabilities");
        assert_close(grad, grad_ref, "score gradient");
        let plain = masked_softmax(scores.clone().inner(), mask.clone().inner(), divisor);
        let row_sums = plain.sum_dim(3).into_data();
        assert!(row_sums.iter::<f32>().all(|s| (s - 1.0).abs() < 1e-6));
    }
}
