//! What the trainer knows about a run (saved as a checkpoint's `trainer_state.json`), and the
//! flags with which callbacks steer it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One log record: `{ "step": …, "epoch": …, "loss": … }` or `{ …, "eval_accuracy": … }`.
pub type Record = Map<String, Value>;

/// Hugging Face's TrainerState, with the fields this trainer uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub global_step: usize,
    /// Fractional epochs done (2.5 = half-way through the third).
    pub epoch: f64,
    /// Updates the run will make in all.
    pub max_steps: usize,
    pub updates_per_epoch: usize,
    /// Samples per optimizer update (batch × accumulation).
    pub train_batch_size: usize,
    /// Rows per forward pass: `batch_size`, or less after an out-of-memory split.
    #[serde(default)]
    pub micro_batch_size: usize,
    /// The best value of the best-model metric so far.
    pub best_metric: Option<f64>,
    /// The checkpoint directory (name) that holds the best model.
    pub best_model_checkpoint: Option<String>,
    pub log_history: Vec<Record>,
    /// One summary per finished (or cut-short) epoch.
    pub epochs: Vec<EpochSummary>,
    /// Training seconds in all, sessions before a resume included.
    pub train_seconds: f64,
    /// Training samples processed (an epoch of N examples adds N).
    #[serde(default)]
    pub samples_seen: usize,
    /// The saved state of stateful callbacks (early stopping's patience), by callback name.
    pub callbacks: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// 1-based.
    pub epoch: usize,
    pub step: usize,
    /// Mean loss of the updates made in this epoch.
    pub train_loss: f64,
    pub seconds: f64,
    pub samples_per_second: f64,
}

impl TrainerState {
    /// 0-based index of the epoch the next update belongs to.
    pub fn epoch_index(&self) -> usize {
        self.global_step / self.updates_per_epoch.max(1)
    }

    /// Updates already made in the current epoch.
    pub fn step_in_epoch(&self) -> usize {
        self.global_step % self.updates_per_epoch.max(1)
    }

    /// Epochs the run spans (the last one may be cut short by `max_steps`).
    pub fn num_epochs(&self) -> usize {
        self.max_steps.div_ceil(self.updates_per_epoch.max(1))
    }

    /// Records `value` of the best-model metric; true when it beats the best so far (strictly,
    /// as Trainer compares).
    pub fn observe_best(&mut self, value: f64, greater_is_better: bool) -> bool {
        let better = match self.best_metric {
            None => true,
            Some(best) if greater_is_better => value > best,
            Some(best) => value < best,
        };
        if better {
            self.best_metric = Some(value);
        }
        better
    }
}

/// What callbacks ask the trainer to do next; reset after the trainer acts on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    pub should_training_stop: bool,
    pub should_evaluate: bool,
    pub should_save: bool,
    pub should_log: bool,
}
