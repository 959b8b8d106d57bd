//! Dropout whose masks cost no memory and no random-number draw per element.
//!
//! burn's `Dropout` samples a Bernoulli tensor through the device RNG (ChaCha, one float per
//! element) and multiplies twice; on the CPU that is 15 ms for one layer's attention
//! probabilities at 16 × 64 tokens, a tenth of a training step over the model. This one draws
//! a single 64-bit seed from the device RNG, so `device.seed(..)` still fixes every mask (AWP's
//! second pass sees the clean pass's masks), and derives each element's mask value from it with
//! a counter-based generator (SplitMix64 of the element's index). The forward and the backward
//! are one fused pass each ([`crate::dropout`]) that recompute the mask instead of
//! storing it. Kept elements are scaled by `1 / (1 - p)` in the same single rounding burn's
//! `x * mask * scale` makes.

use burn::module::Module;
use burn::tensor::{Distribution, Int, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::slots::written;
use crate::{LANE, task_len};

/// Zeroes each element with probability `prob` while training (on an autodiff device), and is
/// the identity otherwise, as `model.eval()` makes it in PyTorch.
#[derive(Module, Debug)]
pub struct Dropout {
    pub prob: f64,
}

impl Dropout {
    pub fn new(prob: f64) -> Self {
        assert!(
            prob.is_finite() && (0.0..1.0).contains(&prob),
            "dropout probability {prob} is not in [0, 1)"
        );
        Dropout { prob }
    }

    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        match self.mask(&input.device()) {
            Some(mask) => crate::dropout(input, mask),
            None => input,
        }
    }

    /// The mask [`Dropout::forward`] would apply on `device` now (drawing its seed), for an
    /// operation that applies it itself; `None` where dropout is the identity.
    pub fn mask(&self, device: &burn::tensor::Device) -> Option<Mask> {
        if self.prob == 0.0 || !device.is_autodiff() {
            return None;
        }
        Some(Mask::new(draw_seed(device), 1.0 - self.prob))
    }
}

/// 64 bits from the device RNG, four 16-bit draws.
fn draw_seed(device: &burn::tensor::Device) -> u64 {
    Tensor::<1, Int>::random([4], Distribution::Uniform(0.0, 65536.0), device)
        .into_data()
        .iter::<i64>()
        .fold(0u64, |seed, d| (seed << 16) | (d as u64 & 0xffff))
}

/// A dropout mask: element `i` is `1 / keep` (as f32) with probability `keep`, else 0, the
/// same for the same seed and index.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    seed: u64,
    /// Keep when a uniform 32-bit draw falls below keep · 2³².
    threshold: u64,
    scale: f32,
}

impl Mask {
    pub fn new(seed: u64, keep: f64) -> Self {
        Mask {
            seed,
            threshold: (keep * 4_294_967_296.0) as u64,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The mask's value at element `index`.
    #[inline(always)]
    pub fn value(&self, index: u64) -> f32 {
        let bits = splitmix64(self.seed ^ index.wrapping_mul(0x9e37_79b9));
        if (bits >> 32) < self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// `out[i] = input[i] · value(i)`, split over the rayon pool; returns `out` as written.
    pub fn apply<'a>(&self, input: &[f32], out: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
        assert_eq!(input.len(), out.len());
        let task = task_len(input.len(), LANE);
        out.par_chunks_mut(task)
            .zip(input.par_chunks(task))
            .enumerate()
            .for_each(|(chunk, (out, input))| {
                self.apply_from((chunk * task) as u64, input, out);
            });
        // SAFETY: the chunks cover `out` (as long as `input`), and `apply_from` writes each.
        unsafe { written(out) }
    }

    /// [`Mask::apply`] on one run of elements, whose first is element `first`.
    pub(crate) fn apply_from<'a>(
        &self,
        first: u64,
        input: &[f32],
        out: &'a mut [MaybeUninit<f32>],
    ) -> &'a mut [f32] {
        assert_eq!(input.len(), out.len());
        self.run(first, Some(input), out);
        // SAFETY: `run` writes every value of `out` (as long as `input`).
        unsafe { written(out) }
    }

    /// `out[i] = value(first + i)`: a run of the mask's values alone, for a caller that
    /// multiplies them in more than once (attention's backward).
    pub fn fill_from<'a>(&self, first: u64, out: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
        self.run(first, None, out);
        // SAFETY: without an input, `run` writes every value of `out`.
        unsafe { written(out) }
    }

    /// `out[i] = input[i] · value(first + i)`, or `value(first + i)` without an input, in the
    /// widest integer lanes this CPU has. Writes every value of `out` (with an input, as long
    /// as `out`).
    fn run(&self, first: u64, input: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: AVX-512F and DQ are present (checked above).
            return unsafe { self.run_avx512(first, input, out) };
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            return unsafe { self.run_avx2(first, input, out) };
        }
        self.run_portable(first, input, out);
    }

    // SplitMix64's 64-bit multiplications have no SSE2 form, and lane by lane they were most
    // of a dropout pass: AVX2 emulates them in 256-bit lanes, AVX-512DQ has them (`vpmullq`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn run_avx512(&self, first: u64, input: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        self.run_portable(first, input, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, first: u64, input: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        self.run_portable(first, input, out);
    }

    #[inline(always)]
    fn run_portable(&self, first: u64, input: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        match input {
            Some(input) => {
                for (offset, (out, &x)) in out.iter_mut().zip(input).enumerate() {
                    out.write(x * self.value(first + offset as u64));
                }
            }
            None => {
                for (offset, out) in out.iter_mut().enumerate() {
                    out.write(self.value(first + offset as u64));
                }
            }
        }
    }
}

/// One SplitMix64 output for a given state: a well-mixed 64-bit hash of the counter.
#[inline(always)]
fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn mask(seed: u64, len: usize, keep: f64) -> Vec<f32> {
        let mut values = vec![MaybeUninit::uninit(); len];
        Mask::new(seed, keep)
            .apply(&vec![1f32; len], &mut values)
            .to_vec()
    }

    /// What `run` writes into `len` slots that start as NaN.
    fn written_by(len: usize, run: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
        let mut out = vec![MaybeUninit::new(f32::NAN); len];
        run(&mut out);
        // SAFETY: every slot started initialised (NaN), and `run` writes only values.
        unsafe { written(&mut out) }.to_vec()
    }

    #[test]
    fn keeps_the_expected_share_and_scales_kept_elements() {
        let values = mask(7, 1_000_000, 0.9);
        let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / 1e6;
        assert!((kept - 0.9).abs() < 0.002, "kept {kept}");
        assert!(
            values
                .iter()
                .all(|&v| v == 0.0 || v == (1.0f64 / 0.9) as f32)
        );
        // Neighbouring elements and seeds are independent draws, not copies.
        let other = mask(8, 1_000_000, 0.9);
        let same = values.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / 1e6;
        assert!((same - 0.82).abs() < 0.005, "agreement {same}");
    }

    #[test]
    fn every_vector_path_draws_the_scalar_definition() {
        let mask = Mask::new(0x5eed, 0.9);
        let first = 1_000_003;
        let len = 1_000;
        let expected: Vec<f32> = (0..len).map(|i| mask.value(first + i as u64)).collect();
        let input: Vec<f32> = (0..len).map(|i| 0.25 + i as f32).collect();
        let times_input: Vec<f32> = input.iter().zip(&expected).map(|(x, m)| x * m).collect();

        let filled = written_by(len, |out| {
            mask.fill_from(first, out);
        });
        let applied = written_by(len, |out| {
            mask.apply_from(first, &input, out);
        });
        assert_eq!(filled, expected);
        assert_eq!(applied, times_input);

        let filled = written_by(len, |out| mask.run_portable(first, None, out));
        let applied = written_by(len, |out| mask.run_portable(first, Some(&input), out));
        assert_eq!(filled, expected);
        assert_eq!(applied, times_input);

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            let filled = written_by(len, |out| unsafe { mask.run_avx2(first, None, out) });
            // SAFETY: as above.
            let applied = written_by(len, |out| unsafe {
                mask.run_avx2(first, Some(&input), out)
            });
            assert_eq!(filled, expected);
            assert_eq!(applied, times_input);
        }
    }

    #[test]
    fn the_device_seed_fixes_the_mask_and_eval_is_the_identity() {
        // The CPU backend's RNG is the process's: no other test may draw between seed and use.
        let _device = crate::exclusive_device();
        let device = Device::flex().autodiff();
        let dropout = Dropout::new(0.1);
        let x = Tensor::<2>::ones([64, 384], &device);
        let masked = |seed: u64| {
            device.seed(seed);
            dropout.forward(x.clone()).into_data()
        };
        assert_eq!(masked(3), masked(3));
        assert_ne!(masked(3), masked(4));
        let plain = Tensor::<2>::ones([64, 384], &Device::flex());
        assert_eq!(
            dropout.forward(plain.clone()).into_data(),
            plain.into_data()
        );
    }
}
