//! BERT-family text classifiers in burn, and the stages that train and evaluate them.
//!
//! - [`config`]: the model configuration, from a Hugging Face `config.json` or from scratch.
//! - [`model`]: the encoder (BERT, MiniLM, DistilBERT, RoBERTa) and its classification heads.
//! - [`hf`]: loading `model.safetensors` exactly and saving back in Hugging Face's layout.
//! - [`init`]: seeded initialisation for models trained from scratch.
//! - [`schedule`]: linear, cosine and constant learning-rate schedules with warmup (HF semantics).
//! - [`trainer`]: the Trainer-style loop: callbacks, checkpoints, resume, logs.
//! - [`regularizers`]: AWP and Mixout, written here, and the audit that shows it.
//! - [`train`]: the `train` stage.
//! - [`evaluate`]: the `evaluate` stage, with [`report`] for its pictures and pages.
//! - [`predict`]: probabilities, loss and metrics without autodiff.
//! - [`metrics`]: accuracy, precision/recall/F1 (macro, weighted, per class), confusion matrix.
//!
//! Nothing here assumes the CPU: every tensor is made on the device the caller passes, and
//! [`device`] turns a pipeline's `device:` string into one.

pub mod adamw;
pub mod config;
pub mod data;
pub mod dropout;
pub mod evaluate;
pub mod hf;
pub mod init;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod predict;
pub mod regularizers;
pub mod report;
pub mod schedule;
pub mod sparse;
pub mod train;
pub mod trainer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

pub use config::{Family, ModelConfig};
pub use model::{Batch, Classifier, Output};

/// Everything that can go wrong reading or writing a model, naming the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: key `{key}`: {message}", file.display())]
    Config {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}: tensor `{key}`: {message}", file.display())]
    Weights {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("device `{0}` is not available in this build (available: cpu)")]
    Device(String),
}

impl ModelError {
    pub fn io(file: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            file: file.to_path_buf(),
            source,
        }
    }
}

/// The device a pipeline's `device:` names. `cpu` is burn's flex backend; GPU backends are
/// added here, and only here, when they can be built.
pub fn device(name: &str) -> Result<Device, ModelError> {
    match name {
        "cpu" | "flex" => {
            keep_freed_tensor_buffers();
            Ok(Device::flex())
        }
        other => Err(ModelError::Device(other.to_string())),
    }
}

/// burn's CPU backend allocates a fresh buffer for every tensor, many of them megabytes. glibc
/// serves allocations above its mmap threshold (at most 32 MiB) with fresh pages and returns
/// freed heap tops to the OS, so every step paid page faults and zeroing for the same buffers
/// again (a tenth of a training step's CPU time). Keeping freed memory in the heap for reuse
/// costs some peak memory (fragmentation): the Amazon MiniLM run peaks at 650-750 MiB instead of
/// about 550 MiB, still under half of PyTorch's.
fn keep_freed_tensor_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes glibc's allocation thresholds, which is sound at any
            // time; later allocations follow the new ones.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

/// Runs `work` on a thread pool of its own (as many threads as rayon's global pool), and
/// returns what it returns.
///
/// The kernels split each operation over the current pool. From a thread outside any pool,
/// each split is queued for the pool while the caller sleeps until the pool is done with it;
/// from a thread of the pool, the caller works on its own share of each split: 7% off a forward
/// pass at batch 16 × 17 tokens on two cores. The pool is `work`'s own rather than the global
/// one because a pool thread that waits for a split runs whatever else its pool has queued:
/// another stage's training queued there would start inside this one's wait and block on the
/// training slot ([`exclusive_device`]) that this one holds.
pub fn on_own_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("finetune-compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(|| with_partner_awake(work)),
        // Without threads to spare, the work still runs, as it did before pools: from here.
        Err(_) => work(),
    }
}

/// Runs `work` on this pool thread while another thread of the pool polls for work, so that
/// each split of an operation starts on both cores at once. Left alone, the other thread
/// sleeps whenever it finds nothing for a few dozen microseconds (the autodiff bookkeeping
/// between two kernels is often longer), and waking it (a futex wake, and on a virtual machine
/// the hypervisor's interrupt to a halted core) delayed its half of hundreds of splits a step.
/// The polling thread runs each split it finds, as a sleeping one would once woken.
fn with_partner_awake<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let owner = rayon::current_thread_index();
    let done = AtomicBool::new(false);
    let (result, ()) = rayon::join(
        || {
            let result = work();
            done.store(true, Ordering::Release);
            result
        },
        || {
            // Taken back by `work`'s own thread (while it waited on a split, or after), the
            // poll would wait on itself: it ends there at once.
            if rayon::current_thread_index() == owner {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Idle) {
                    std::hint::spin_loop();
                }
            }
        },
    );
    result
}

/// About this many elements per rayon task in this crate's hand-written CPU passes (the fused
/// kernels, AdamW, dropout, the gradient norm): large enough that scheduling is noise next to
/// the work, small enough that both cores share a 384-wide layer's tensors.
pub(crate) const PARALLEL_CHUNK: usize = 1 << 15;

/// A pass split into tasks makes a multiple of this many, so that two or four cores finish
/// together: cut into whole [`PARALLEL_CHUNK`]s, a batch of 16 × 17 tokens (104,448 values at
/// width 384) made three full tasks and a fifth of one, and one core waited on the other for
/// two fifths of every elementwise pass. The count depends on the length alone, not on the machine,
/// so the passes that sum by task (norms, bias gradients) give the same bits everywhere.
const TASKS_IN_STEPS_OF: usize = 4;

/// Elementwise tasks are whole 16-lane vectors (AVX-512's f32 width, a 64-byte cache line).
pub(crate) const LANE: usize = 16;

/// The length of each task when a pass over `len` values splits into tasks: a multiple of
/// `unit` (a row's width, or a vector's), about [`PARALLEL_CHUNK`] values, and all of `len` (one
/// task) up to one [`PARALLEL_CHUNK`]. Never zero, as `par_chunks` requires.
pub(crate) fn task_len(len: usize, unit: usize) -> usize {
    let unit = unit.max(1);
    let tasks = match len.div_ceil(PARALLEL_CHUNK) {
        0 | 1 => 1,
        tasks => tasks.next_multiple_of(TASKS_IN_STEPS_OF),
    };
    len.div_ceil(tasks).next_multiple_of(unit).max(unit)
}

/// A model with fresh weights from `seed`.
pub fn scratch(config: &ModelConfig, seed: u64, device: &Device) -> Classifier {
    let mut source = init::InitSource::new(config, seed);
    hf::build(config, &mut source, device).expect("fresh initialisation cannot fail")
}

/// Holds the process's one training slot. burn's CPU backend keeps one RNG for the process, so
/// two trainings at once would draw each other's dropout masks; `--jobs` parallelism still
/// applies to every other stage.
pub fn exclusive_device() -> std::sync::MutexGuard<'static, ()> {
    static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::{PARALLEL_CHUNK, task_len, with_partner_awake};
    use rayon::prelude::*;

    #[test]
    fn work_with_a_partner_awake_returns_its_result_on_any_pool() {
        // One thread (the poll never starts), two and four; nested splits that the partner
        // steals, and a result that needs every split.
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for _ in 0..20 {
                let sum: u64 = pool.install(|| {
                    with_partner_awake(|| {
                        (0..100_000u64)
                            .into_par_iter()
                            .map(|x| (0..x % 7).into_par_iter().sum::<u64>())
                            .sum()
                    })
                });
                let expected: u64 = (0..100_000u64).map(|x| (0..x % 7).sum::<u64>()).sum();
                assert_eq!(sum, expected, "{threads} threads");
            }
        }
    }

    #[test]
    fn tasks_come_in_fours_of_whole_units_and_cover_the_pass() {
        // Up to one chunk: one task. Above: a multiple of four tasks, each a whole number of
        // units, that cover every value, the last one no longer than the others.
        assert_eq!(task_len(0, 16), 16);
        assert_eq!(task_len(100, 16), 112);
        assert_eq!(
            task_len(PARALLEL_CHUNK, 384),
            PARALLEL_CHUNK.next_multiple_of(384)
        );
        for (len, unit) in [
            (104_448, 16),
            (104_448, 384),
            (589_824, 16),
            (40_000, 8),
            (65_537, 1),
        ] {
            let task = task_len(len, unit);
            let tasks = len.div_ceil(task);
            assert_eq!(task % unit, 0, "{len} by {unit}");
            assert_eq!(tasks % 4, 0, "{len} by {unit}: {tasks} tasks of {task}");
            assert!(task <= PARALLEL_CHUNK, "{len} by {unit}: {task}");
        }
    }
}
