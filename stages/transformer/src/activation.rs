//! GELU (the erf form) on both cores, with burn's numerics.
//!
//! burn's CPU GELU and its backward evaluate libm's scalar `erff` element by element on one
//! core: 47 ms for one layer's forward and backward at 16 × 64 tokens, a fifth of a training
//! step over MiniLM's six layers. Here the values and the slope are computed in one parallel
//! pass over the input, with the same f32 expressions burn uses (so both are bit-identical to
//! burn's; see the tests), and handed to autodiff as constants:
//! `y = gelu(x) + (x - x.detach()) * gelu'(x)`. `x - x.detach()` is exactly zero, so `y` is
//! exactly `gelu(x)`, and its gradient is exactly `gelu'(x)` times the incoming one.

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::PARALLEL_CHUNK;

/// `x · Φ(x)` elementwise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    let shape = x.shape();
    if !device.is_autodiff() {
        let mut data = x.into_data();
        let values = data
            .as_mut_slice::<f32>()
            .expect("GELU works on f32 tensors");
        values.par_chunks_mut(PARALLEL_CHUNK).for_each(|chunk| {
            chunk
                .iter_mut()
                .for_each(|v| *v = value_from(*v, erf_scaled(*v)))
        });
        return Tensor::from_data(data, &device);
    }
    let input = x.clone().into_data();
    let input = input.as_slice::<f32>().expect("GELU works on f32 tensors");
    let mut values = vec![0f32; input.len()];
    let mut slopes = vec![0f32; input.len()];
    values
        .par_chunks_mut(PARALLEL_CHUNK)
        .zip(slopes.par_chunks_mut(PARALLEL_CHUNK))
        .zip(input.par_chunks(PARALLEL_CHUNK))
        .for_each(|((values, slopes), input)| {
            for ((value_out, slope_out), &x) in values.iter_mut().zip(slopes).zip(input) {
                let erf = erf_scaled(x);
                *value_out = value_from(x, erf);
                *slope_out = slope_from(x, erf);
            }
        });
    let constant = |v: Vec<f32>| Tensor::<D>::from_data(TensorData::new(v, shape.clone()), &device);
    let zero = x.clone() - x.detach();
    constant(values) + zero * constant(slopes)
}

/// `erf(x / √2)`, shared by the value and the slope (burn-flex evaluates it twice).
fn erf_scaled(x: f32) -> f32 {
    libm::erff(x / core::f32::consts::SQRT_2)
}

/// burn-flex's GELU expression.
fn value_from(x: f32, erf: f32) -> f32 {
    0.5 * x * (1.0 + erf)
}

/// burn-flex's GELU derivative expression: `Φ(x) + x·φ(x)`.
fn slope_from(x: f32, erf: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf);
    let inv_sqrt_2pi = 1.0 / (2.0 * core::f32::consts::PI).sqrt();
    let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
    cdf + x * pdf
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn bits(t: Tensor<2>) -> Vec<u32> {
        t.into_data().iter::<f32>().map(f32::to_bits).collect()
    }

    #[test]
    fn values_and_gradients_are_burns_bit_for_bit() {
        // The CPU backend's RNG is the process's: no other test may draw between seed and use.
        let _device = crate::exclusive_device();
        let device = Device::flex().autodiff();
        device.seed(11);
        let x = Tensor::<2>::random([300, 700], Distribution::Normal(0.0, 3.0), &device);
        let upstream = Tensor::<2>::random([300, 700], Distribution::Normal(0.0, 1.0), &device);
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
        // Evaluation (no autodiff) takes the in-place path.
        let plain = x.inner();
        assert_eq!(
            bits(gelu(plain.clone())),
            bits(burn::tensor::activation::gelu(plain))
        );
    }
}
