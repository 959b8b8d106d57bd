//! AdamW as one pass over each parameter, split over the rayon pool.
//!
//! burn's `AdamW` builds the update from about fourteen tensor operations per parameter, each a
//! fresh buffer and a single-threaded sweep over all 22.7M of MiniLM's weights; this one reads
//! the weight, gradient and both moments once and writes them back in place. It computes the
//! same f32 operations in the same order as burn's (so results are bit-identical; see the test)
//! and keeps burn's `AdamWState`, so optimizer checkpoints keep their format.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use finetune_kernels::{LANE, PARALLEL_CHUNK, task_len};

/// AdamW with decoupled weight decay, updated in place.
#[derive(Debug, Clone)]
pub struct FusedAdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// What each gradient is multiplied by before its step: gradient clipping's coefficient,
    /// set for each update by the optimizer that shares it (the trainer's clipping).
    pub gradient_scale: GradientScale,
}

/// A gradient multiplier shared by an optimizer's parameter groups: 1 until set. Clipping
/// multiplies in the update's own pass instead of in one of its own, which read and wrote every
/// gradient once more; the product is the same f32 multiplication.
#[derive(Debug, Clone)]
pub struct GradientScale(Arc<AtomicU32>);

impl Default for GradientScale {
    fn default() -> Self {
        GradientScale(Arc::new(AtomicU32::new(1f32.to_bits())))
    }
}

impl GradientScale {
    pub fn set(&self, scale: f32) {
        self.0.store(scale.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The per-step constants of the update, as burn's AdamW rounds them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    epsilon: f32,
    /// `None` when the weight decay is zero (burn then skips the multiplication).
    decay_factor: Option<f32>,
    lr: f32,
    gradient_scale: f32,
}

impl FusedAdamW {
    pub(crate) fn coefficients(&self, lr: LearningRate, time: usize) -> Coefficients {
        let decay_rate = lr * f64::from(self.weight_decay);
        Coefficients {
            beta1: self.beta1,
            beta2: self.beta2,
            one_minus_beta1: 1.0 - self.beta1,
            one_minus_beta2: 1.0 - self.beta2,
            bias_correction1: 1.0 - self.beta1.powi(time as i32),
            bias_correction2: 1.0 - self.beta2.powi(time as i32),
            epsilon: self.epsilon,
            decay_factor: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
            gradient_scale: self.gradient_scale.get(),
        }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let device = tensor.device();
        if !finetune_kernels::runs_fused(&device) {
            return self.step_on_device(lr, tensor, grad, state);
        }
        let (time, moment_1, moment_2) = match state {
            Some(state) => {
                let momentum = state.momentum;
                (
                    momentum.time + 1,
                    momentum.moment_1.into_data(),
                    momentum.moment_2.into_data(),
                )
            }
            None => {
                let zeros = TensorData::zeros::<f32, _>(tensor.shape());
                (1, zeros.clone(), zeros)
            }
        };
        let mut weights = tensor.into_data();
        let (mut moment_1, mut moment_2) = (moment_1, moment_2);
        let grad = grad.into_data();
        update(
            self.coefficients(lr, time),
            slice_mut(&mut weights),
            slice(&grad),
            slice_mut(&mut moment_1),
            slice_mut(&mut moment_2),
        );
        let tensor = |data: TensorData| Tensor::<D>::from_data(data, &device);
        let momentum = AdaptiveMomentumState::new(time, tensor(moment_1), tensor(moment_2));
        (tensor(weights), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

impl FusedAdamW {
    /// [`update_chunk`]'s operations as tensor operations, where the tensors live (a GPU: the
    /// moments never leave it, and burn's fusion makes the chain one kernel there).
    fn step_on_device<const D: usize>(
        &self,
        lr: LearningRate,
        weights: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, Option<AdamWState<D>>) {
        let (time, m, v) = match state {
            Some(state) => {
                let momentum = state.momentum;
                (momentum.time + 1, momentum.moment_1, momentum.moment_2)
            }
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let c = self.coefficients(lr, time);
        let g = grad.mul_scalar(c.gradient_scale);
        let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(c.one_minus_beta1);
        let v = v.mul_scalar(c.beta2) + (g.clone() * g).mul_scalar(c.one_minus_beta2);
        let m_hat = m.clone().div_scalar(c.bias_correction1);
        let v_hat = v.clone().div_scalar(c.bias_correction2);
        let delta = m_hat / v_hat.sqrt().add_scalar(c.epsilon);
        let decayed = match c.decay_factor {
            Some(factor) => weights.mul_scalar(factor),
            None => weights,
        };
        let weights = decayed - delta.mul_scalar(c.lr);
        let momentum = AdaptiveMomentumState::new(time, m, v);
        (weights, Some(AdamWState::new(momentum)))
    }
}

// Parameters, gradients and moments are f32 tensors this crate created: anything else is a bug.
fn slice(data: &TensorData) -> &[f32] {
    data.as_slice::<f32>().expect("AdamW works on f32 tensors")
}

fn slice_mut(data: &mut TensorData) -> &mut [f32] {
    data.as_mut_slice::<f32>()
        .expect("AdamW works on f32 tensors")
}

fn update(c: Coefficients, weights: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    if weights.len() <= PARALLEL_CHUNK {
        return update_chunk(&c, weights, grad, m, v);
    }
    let task = task_len(weights.len(), LANE);
    weights
        .par_chunks_mut(task)
        .zip(grad.par_chunks(task))
        .zip(m.par_chunks_mut(task))
        .zip(v.par_chunks_mut(task))
        .for_each(|(((w, g), m), v)| update_chunk(&c, w, g, m, v));
}

/// burn's operation order, element by element, on the scaled gradient: the moments, their bias
/// corrections, the decay of the weight, then the step. In AVX-512's lanes where the CPU has
/// them: the same operations (Rust fuses no multiply-add), so the same bits, with a quarter of
/// the instructions of the baseline's SSE.
pub(crate) fn update_chunk(
    c: &Coefficients,
    weights: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { update_chunk_avx512(c, weights, grad, m, v) };
    }
    update_chunk_portable(c, weights, grad, m, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_chunk_avx512(
    c: &Coefficients,
    weights: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    update_chunk_portable(c, weights, grad, m, v)
}

#[inline(always)]
fn update_chunk_portable(
    c: &Coefficients,
    weights: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    for (((w, &g), m), v) in weights.iter_mut().zip(grad).zip(m).zip(v) {
        let g = g * c.gradient_scale;
        *m = *m * c.beta1 + g * c.one_minus_beta1;
        *v = *v * c.beta2 + (g * g) * c.one_minus_beta2;
        let m_hat = *m / c.bias_correction1;
        let v_hat = *v / c.bias_correction2;
        let delta = m_hat / (v_hat.sqrt() + c.epsilon);
        let decayed = match c.decay_factor {
            Some(factor) => *w * factor,
            None => *w,
        };
        *w = decayed - delta * c.lr;
    }
}

/// [`update_chunk`] where the gradient and both moments are zero: the moments stay zero and the
/// step `0 / (√0 + ε) · lr` is zero, so only the decay is left, and `decayed - 0` is `decayed`
/// bit for bit. Reads and writes the weights alone.
pub(crate) fn decay_chunk(c: &Coefficients, weights: &mut [f32]) {
    if let Some(factor) = c.decay_factor {
        weights.iter_mut().for_each(|w| *w *= factor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
    use burn::tensor::Distribution;

    /// The gradients of `‖m(x)‖²` for a random batch `x` drawn from `seed`.
    fn gradients(m: &Linear, seed: u64, device: &Device) -> GradientsParams {
        device.seed(seed);
        let x = Tensor::<2>::random([8, 300], Distribution::Normal(0.0, 1.0), device);
        let loss = m.forward(x).powi_scalar(2).mean();
        GradientsParams::from_grads(loss.backward(), m)
    }

    /// Five steps of burn's AdamW and of this one on the same weights and gradients, with and
    /// without decay: the weights must agree bit for bit, and so must the moments.
    #[test]
    fn matches_burns_adamw_bit_for_bit() {
        // The CPU backend's RNG is the process's: no other test may draw between seed and use.
        let _device = finetune_kernels::exclusive_device();
        let device = Device::flex().autodiff();
        for weight_decay in [0.0f32, 0.01] {
            let mut theirs = AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay)
                .init();
            let fused = FusedAdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay,
                gradient_scale: GradientScale::default(),
            };
            let mut ours = ModuleOptimizer::from(fused.clone());
            let grads_of = |m: &Linear, seed: u64| gradients(m, seed, &device);
            let initial: Linear = LinearConfig::new(300, 250).init(&device);
            let (mut a, mut b) = (initial.clone(), initial.clone());
            for step in 0..5u64 {
                let (ga, gb) = (grads_of(&a, step), grads_of(&b, step));
                let lr = 1e-3 * (step + 1) as f64;
                a = theirs.step(lr, a, ga);
                b = ours.step(lr, b, gb);
            }
            let weights = |m: &Linear| m.weight.val().into_data();
            assert_eq!(weights(&a), weights(&b), "weight decay {weight_decay}");
            assert_ne!(weights(&a), weights(&initial), "the weights moved");
            let bias = |m: &Linear| m.bias.as_ref().map(|b| b.val().into_data());
            assert_eq!(bias(&a), bias(&b));
            // burn's saved moments, loaded into this optimizer, take the same next step as
            // this optimizer's own: the moments agree and the checkpoint format is burn's.
            let bytes = theirs.into_bytes().expect("burn's optimizer record");
            let mut loaded = ModuleOptimizer::from(fused)
                .from_bytes(bytes)
                .expect("load");
            let next_ours = ours.step(1e-3, b.clone(), grads_of(&b, 99));
            let next_loaded = loaded.step(1e-3, b.clone(), grads_of(&b, 99));
            assert_eq!(weights(&next_ours), weights(&next_loaded));
        }
    }

    /// The tensor-operation path that GPUs take (here on the flex device, with the generic
    /// operations asked for) makes the same f32 operations in the same order as the host pass:
    /// the same weights and moments bit for bit over five steps, clipping's scale included.
    #[test]
    fn the_device_path_steps_as_the_host_pass() {
        let _device = finetune_kernels::exclusive_device();
        let device = Device::flex().autodiff();
        let fused = FusedAdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
            gradient_scale: GradientScale::default(),
        };
        let grads_of = |m: &Linear, seed: u64| gradients(m, seed, &device);
        let initial: Linear = LinearConfig::new(300, 250).init(&device);
        let train = |generic: bool| {
            finetune_kernels::with_generic_ops(generic, || {
                let mut optimizer = ModuleOptimizer::from(fused.clone());
                let mut model = initial.clone();
                for step in 0..5u64 {
                    fused.gradient_scale.set(if step == 2 { 0.25 } else { 1.0 });
                    let grads = grads_of(&model, step);
                    model = optimizer.step(1e-3, model, grads);
                }
                (
                    model,
                    optimizer.into_bytes().expect("the optimizer's record"),
                )
            })
        };
        let ((host, host_state), (on_device, device_state)) = (train(false), train(true));
        let weights = |m: &Linear| m.weight.val().into_data();
        assert_eq!(weights(&host), weights(&on_device));
        assert_ne!(weights(&host), weights(&initial), "the weights moved");
        // The records' bytes differ in layout metadata; the moments must not: loaded into the
        // host pass, each state takes the same next step.
        let next = |state| {
            let mut optimizer = ModuleOptimizer::from(fused.clone())
                .from_bytes(state)
                .expect("load");
            weights(&optimizer.step(1e-3, host.clone(), grads_of(&host, 99)))
        };
        assert_eq!(
            next(host_state),
            next(device_state),
            "the moments and step counts"
        );
    }

    /// A scaled step is the step of the gradient multiplied first (as clipping multiplied it,
    /// in a pass of its own), bit for bit.
    #[test]
    fn a_scaled_gradient_steps_as_the_gradient_multiplied_first() {
        let adamw = FusedAdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
            gradient_scale: GradientScale::default(),
        };
        let n = 1000;
        let values = |seed: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5) * scale)
                .collect()
        };
        let grad = values(1, 3e-2);
        let factor = 0.37f32;
        let multiplied: Vec<f32> = grad.iter().map(|g| g * factor).collect();
        let step = |scale: f32, grad: &[f32]| {
            adamw.gradient_scale.set(scale);
            let c = adamw.coefficients(1e-3, 3);
            let (mut w, mut m, mut v) = (values(2, 1.0), values(3, 1e-3), values(4, 1e-6));
            v.iter_mut().for_each(|v| *v = v.abs());
            update_chunk(&c, &mut w, grad, &mut m, &mut v);
            (w, m, v)
        };
        assert_eq!(step(factor, &grad), step(1.0, &multiplied));
        assert_ne!(step(factor, &grad), step(1.0, &grad));
    }
}
