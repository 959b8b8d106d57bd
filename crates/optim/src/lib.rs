//! Optimizers for burn models, as Hugging Face Trainer uses them.
//!
//! - [`FusedAdamW`]: AdamW with decoupled weight decay in one pass per tensor, its gradients
//!   scaled on the way in by a [`GradientScale`] (the clipping coefficient);
//! - [`RowAdamW`]: the same update, bit for bit, for an embedding table trained by the rows a
//!   batch looked up ([`finetune_kernels::RowGradient`]);
//! - [`global_norm`]: torch's `clip_grad_norm_` norm over all of a module's gradients;
//! - [`Schedule`]: linear, cosine and constant learning rates with warmup (HF semantics).
//!
//! Which parameters get which optimizer, and when they step, belongs to the trainer.

mod adamw;
mod clip;
mod rows;
mod schedule;

use std::path::PathBuf;

pub use adamw::{FusedAdamW, GradientScale};
pub use clip::global_norm;
pub use rows::{RowAdamW, STATE_FILE};
pub use schedule::{Schedule, ScheduleKind};

/// A saved optimizer state that cannot be written or read back, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise {}", path.display())]
    Serialise {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}
