//! The global gradient norm that torch's `clip_grad_norm_` clips by, over any burn module.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use finetune_kernels::{LANE, task_len};
use rayon::prelude::*;

/// The L2 norm of every gradient of `module`'s parameters in `grads` and of `extra` values
/// (a gradient held outside `grads`, such as an embedding's rows), accumulated in f64.
///
/// The sum runs over every gradient at once, cut into tasks of about
/// [`finetune_kernels::PARALLEL_CHUNK`] values: a pass per parameter split and joined each of
/// MiniLM's hundred tensors on its own, and the many small ones (biases, norms) left threads
/// waiting. The cut depends on the lengths alone, so the norm is the same bits on any machine.
pub fn global_norm<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    extra: Option<&[f32]>,
) -> f64 {
    let squares = SquaredSums::of(module, grads);
    if !squares.fused {
        return squares.norm_with(extra);
    }
    let taken = TakenGradients::take(module, grads);
    let mut tasks = taken.tasks();
    if let Some(values) = extra {
        tasks.extend(values.chunks(task_len(values.len(), LANE)));
    }
    // Task by task, then added in task order: the same sum whatever the scheduling.
    let sums: Vec<f64> = tasks.par_iter().map(|task| squared_norm(task)).collect();
    let norm = sums.iter().sum::<f64>().sqrt();
    drop(tasks);
    taken.put_back(module, grads);
    norm
}

/// `Σ v²` in f64, in 32 running sums, so that the additions do not wait on each other (one
/// f64 sum is one add latency per element: 15 ms of every step over MiniLM's 22.7M gradients),
/// added in a fixed order. In AVX-512's lanes where the CPU has them (the sums are the same).
fn squared_norm(values: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { squared_norm_avx512(values) };
    }
    squared_norm_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn squared_norm_avx512(values: &[f32]) -> f64 {
    squared_norm_portable(values)
}

#[inline(always)]
fn squared_norm_portable(values: &[f32]) -> f64 {
    const LANES: usize = 32;
    let mut lanes = [0f64; LANES];
    let mut groups = values.chunks_exact(LANES);
    for group in &mut groups {
        for (lane, &v) in lanes.iter_mut().zip(group) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(groups.remainder()) {
        *lane += f64::from(v) * f64::from(v);
    }
    lanes.iter().sum::<f64>()
}

/// Each gradient's `Σ v²` as a tensor on its own device, for a device the fused kernels do not
/// serve (a GPU): there the gradients stay put, and one small read brings the sums back.
struct SquaredSums<'a> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<1>>,
    /// Whether the gradients are on the fused kernels' device (then nothing is summed here).
    fused: bool,
}

impl<'a> SquaredSums<'a> {
    fn of<M: Module>(module: &M, grads: &'a GradientsParams) -> Self {
        let mut sums = SquaredSums {
            grads,
            sums: Vec::new(),
            fused: false,
        };
        module.visit(&mut sums);
        sums
    }

    /// The norm of these sums and `extra`'s, the sums added in f64 in the model's order.
    fn norm_with(self, extra: Option<&[f32]>) -> f64 {
        let host = extra.map_or(0.0, squared_norm);
        if self.sums.is_empty() {
            return host.sqrt();
        }
        let sums = Tensor::cat(self.sums, 0).into_data();
        let sums = sums.as_slice::<f32>().expect("f32 gradients");
        (sums.iter().map(|&s| f64::from(s)).sum::<f64>() + host).sqrt()
    }
}

impl ModuleVisitor for SquaredSums<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.fused {
            return;
        }
        if let Some(grad) = self.grads.get::<D>(param.id) {
            if finetune_kernels::runs_fused(&grad.device()) {
                self.fused = true;
                self.sums.clear();
                return;
            }
            self.sums.push((grad.clone() * grad).sum());
        }
    }
}

/// Every parameter's gradient, taken out of `GradientsParams` (so that each buffer has one
/// owner and reading it copies nothing) for a pass over all of them, and put back.
struct TakenGradients {
    /// In the model's visiting order.
    taken: Vec<(ParamId, Device, TensorData)>,
}

impl TakenGradients {
    fn take<M: Module>(model: &M, grads: &mut GradientsParams) -> Self {
        let mut take = Take {
            grads,
            taken: Vec::new(),
        };
        model.visit(&mut take);
        TakenGradients { taken: take.taken }
    }

    /// The values, cut into tasks for the pool ([`task_len`]).
    fn tasks(&self) -> Vec<&[f32]> {
        self.taken
            .iter()
            .flat_map(|(_, _, data)| {
                let values = data.as_slice::<f32>().expect("f32 gradients");
                values.chunks(task_len(values.len(), LANE))
            })
            .collect()
    }

    fn put_back<M: Module>(self, model: &M, grads: &mut GradientsParams) {
        let mut put_back = PutBack {
            grads,
            taken: self.taken.into_iter().collect(),
        };
        model.visit(&mut put_back);
    }
}

struct Take<'a> {
    grads: &'a mut GradientsParams,
    taken: Vec<(ParamId, Device, TensorData)>,
}

impl ModuleVisitor for Take<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.taken.push((param.id, grad.device(), grad.into_data()));
        }
    }
}

/// Puts each gradient back with its parameter's rank (which only the visit knows).
struct PutBack<'a> {
    grads: &'a mut GradientsParams,
    taken: std::collections::VecDeque<(ParamId, Device, TensorData)>,
}

impl ModuleVisitor for PutBack<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // The same visit as `Take`'s, so the gradients come back in the order they were taken.
        if self.taken.front().is_some_and(|(id, _, _)| *id == param.id) {
            let (id, device, data) = self.taken.pop_front().expect("checked above");
            self.grads
                .register(id, Tensor::<D>::from_data(data, &device));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::squared_norm;

    #[test]
    fn squared_norm_is_the_plain_sum_of_squares() {
        // A length that leaves a remainder in every lane group.
        let values: Vec<f32> = (0..2 * finetune_kernels::PARALLEL_CHUNK + 13)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        let plain: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let ours = squared_norm(&values);
        assert!(
            (ours - plain).abs() <= 1e-12 * plain,
            "{ours} against {plain}"
        );
        assert_eq!(squared_norm(&[3.0, 4.0]), 25.0);
        assert_eq!(squared_norm(&[]), 0.0);
    }
}
