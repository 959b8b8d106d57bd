//! The trainer's settings: the role of Hugging Face's `TrainingArguments`, with its names and
//! meanings, checked before anything runs.

use finetune_core::ConfigError;
use finetune_core::schemars::{self, JsonSchema};
use serde::{Deserialize, Serialize};
use serde_json::json;

use finetune_model::ProblemType;
use finetune_optim::ScheduleKind;

/// TrainingArguments' names for the settings `training:` calls more briefly (the rest share
/// their names), so that a block pasted from a Python script runs as it is.
pub const TRAINER_NAMES: &[(&str, &str)] = &[
    ("num_train_epochs", "epochs"),
    ("per_device_train_batch_size", "batch_size"),
    ("per_device_eval_batch_size", "eval_batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("learning_rate", "lr"),
    ("lr_scheduler_type", "schedule"),
    // transformers' name before 4.41.
    ("evaluation_strategy", "eval_strategy"),
];

/// Rewrites TrainingArguments' names in a `training:` mapping to ours, in place, so that both
/// spellings of a pipeline train, record and key the same. A setting given by both names is an
/// error that names both.
pub fn accept_trainer_names(
    training: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<(), ConfigError> {
    for (theirs, ours) in TRAINER_NAMES {
        let Some(value) = training.remove(*theirs) else {
            continue;
        };
        if training.contains_key(*ours) {
            return Err(ConfigError::at(
                format!("training.{theirs}"),
                format!(
                    "`{theirs}` (TrainingArguments' name) and `{ours}` are one setting; give one"
                ),
            ));
        }
        training.insert(ours.to_string(), value);
    }
    Ok(())
}

/// `with: training:` of a `train` stage. Each setting also answers to its TrainingArguments
/// name ([`TRAINER_NAMES`]).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingArgs {
    /// num_train_epochs.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// max_steps: optimizer updates in all; overrides `epochs` when set.
    pub max_steps: Option<usize>,
    /// per_device_train_batch_size: samples per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// gradient_accumulation_steps: micro-batches per optimizer update.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// learning_rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// weight_decay (none on biases and LayerNorm weights).
    #[serde(default)]
    pub weight_decay: f64,
    /// adam_epsilon.
    #[serde(default = "default_epsilon")]
    pub adam_epsilon: f64,
    /// warmup_ratio of all updates (rounded up).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// warmup_steps; wins over warmup_ratio.
    pub warmup_steps: Option<usize>,
    /// lr_scheduler_type.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// max_grad_norm (global L2 norm); null for none.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// seed: shuffling, dropout, new weights.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `dynamic` (pad to the longest in the batch) or `max_length` (pad to tokenize's max_length).
    #[serde(default)]
    pub padding: Padding,
    /// group_by_length: batches of similar lengths (less padding), shuffled order of groups.
    #[serde(default)]
    pub group_by_length: bool,
    /// per_device_eval_batch_size.
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// The split evaluated during training: `validation`, or `test` to reproduce a
    /// train/test-only protocol (such as Hugging Face's reference benchmark).
    #[serde(default)]
    pub eval_split: EvalSplit,
    /// eval_strategy: `epoch`, `steps` (every `eval_steps` updates) or `no`.
    #[serde(default = "epoch")]
    pub eval_strategy: Strategy,
    pub eval_steps: Option<usize>,
    /// save_strategy: checkpoints by `epoch`, `steps` (every `save_steps`) or `no`.
    #[serde(default = "epoch")]
    pub save_strategy: Strategy,
    pub save_steps: Option<usize>,
    /// save_total_limit: keep at most this many checkpoints (the best one is always kept).
    pub save_total_limit: Option<usize>,
    /// logging_steps: one log record (mean loss since the last one) every N updates.
    #[serde(default = "default_logging_steps")]
    pub logging_steps: usize,
    /// load_best_model_at_end: the output model is the best checkpoint's.
    #[serde(default)]
    pub load_best_model_at_end: bool,
    /// metric_for_best_model: `loss`, `accuracy`, `f1_macro`, … (an `eval_` prefix is allowed).
    pub metric_for_best_model: Option<String>,
    /// greater_is_better; by default false for a loss, true for anything else.
    pub greater_is_better: Option<bool>,
    /// Stop when the best-model metric has not improved for `patience` evaluations.
    pub early_stopping: Option<EarlyStoppingArgs>,
    /// Continue an interrupted run from its last checkpoint (kept under the stage's cache key).
    #[serde(default = "yes")]
    pub resume: bool,
    /// A memory budget for training (`4GiB`, `512MiB`): a micro-batch whose estimated peak
    /// exceeds it is split in halves, with accumulation raised so that every optimizer update
    /// still sees the same samples. No budget: only a real out-of-memory failure splits.
    pub max_memory: Option<String>,
    /// Write TensorBoard event files under logs/tensorboard.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// label_smoothing_factor: ε in [0, 1); the target spreads ε evenly over all labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing_factor: Option<f64>,
    /// Weights of the labels in the loss: `balanced` (n / (labels · n_label), from the train
    /// split, as scikit-learn's) or one positive weight per label, in label-id order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<ClassWeights>,
    /// Regression only: train with the Huber loss of this δ > 0 (PyTorch's `HuberLoss`:
    /// squared error within δ, linear beyond, so outliers pull less) instead of the squared
    /// error. Evaluations still report the squared error as `loss`, as Python's heads do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huber_delta: Option<f64>,
}

/// `class_weights:` `balanced`, or a list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "`balanced` or a list of one positive weight per label"
)]
pub enum ClassWeights {
    Named(NamedWeights),
    Given(Vec<f64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NamedWeights {
    Balanced,
}

impl ClassWeights {
    /// One weight per label for a train split whose labels (ids) are `labels`, out of
    /// `classes`. A list of the wrong length, or `balanced` with a label absent from the
    /// split, is an error naming the key.
    pub fn resolve(
        &self,
        labels: impl Iterator<Item = i64>,
        names: &[String],
    ) -> Result<Vec<f32>, ConfigError> {
        let classes = names.len();
        match self {
            ClassWeights::Given(weights) if weights.len() == classes => {
                Ok(weights.iter().map(|&w| w as f32).collect())
            }
            ClassWeights::Given(weights) => Err(ConfigError::at(
                "training.class_weights",
                format!(
                    "{} weights for {classes} labels ({}); give one per label, in this order",
                    weights.len(),
                    names.join(", ")
                ),
            )),
            ClassWeights::Named(NamedWeights::Balanced) => {
                let mut counts = vec![0u64; classes];
                let mut n = 0u64;
                for label in labels {
                    if let Some(count) = usize::try_from(label).ok().and_then(|l| counts.get_mut(l))
                    {
                        *count += 1;
                        n += 1;
                    }
                }
                if let Some(absent) = counts.iter().position(|&c| c == 0) {
                    return Err(ConfigError::at(
                        "training.class_weights",
                        format!(
                            "`balanced` weighs labels by their train rows, and label `{}` has none",
                            names[absent]
                        ),
                    ));
                }
                let per_label = n as f64 / classes as f64;
                Ok(counts
                    .iter()
                    .map(|&c| (per_label / c as f64) as f32)
                    .collect())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    #[default]
    Dynamic,
    MaxLength,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    #[default]
    Validation,
    Test,
}

impl EvalSplit {
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Validation => "validation",
            EvalSplit::Test => "test",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    No,
    Steps,
    Epoch,
}

/// HF's EarlyStoppingCallback: `patience` evaluations without an improvement larger than
/// `threshold` over the best so far stop training.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingArgs {
    pub patience: usize,
    #[serde(default)]
    pub threshold: f64,
}

/// The metrics an evaluation of a single-label head reports, for `metric_for_best_model`.
pub const METRICS: &[&str] = &[
    "loss",
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
];

/// The metrics of a multi-label head.
const MULTI_LABEL_METRICS: &[&str] = &[
    "loss",
    "subset_accuracy",
    "hamming_loss",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
];

/// The metrics of a regression head.
const REGRESSION_METRICS: &[&str] = &["loss", "mse", "rmse", "mae", "r2", "pearson", "spearman"];

/// The metrics an evaluation of a `problem` head reports, for `metric_for_best_model`.
pub fn task_metrics(problem: ProblemType) -> &'static [&'static str] {
    match problem {
        ProblemType::SingleLabelClassification => METRICS,
        ProblemType::MultiLabelClassification => MULTI_LABEL_METRICS,
        ProblemType::Regression => REGRESSION_METRICS,
    }
}

/// Metrics where lower is better: losses and errors.
fn lower_is_better(metric: &str) -> bool {
    metric.ends_with("loss") || matches!(metric, "mse" | "rmse" | "mae")
}

/// The largest `epochs`: with at most [`LARGEST_STEPS`] updates an epoch, their product still
/// fits in 64 bits.
const LARGEST_EPOCHS: usize = 1_000_000;
/// The largest samples per micro-batch, per update and per evaluation batch.
const LARGEST_BATCH: usize = 1 << 20;
/// The largest step counts (`max_steps`, the strategies' intervals, warmup).
const LARGEST_STEPS: usize = 1_000_000_000;

/// A `max_memory` that is not a budget.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryBudgetError {
    #[error("`{text}` is not a size such as 4GiB or 512MiB: {reason}")]
    NotASize { text: String, reason: String },
    #[error("a budget of 0 bytes leaves nothing to train with")]
    Zero,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

impl TrainingArgs {
    /// The metric that picks the best model, without `eval_` (HF's default: the loss).
    pub fn best_metric(&self) -> &str {
        let name = self.metric_for_best_model.as_deref().unwrap_or("loss");
        name.strip_prefix("eval_").unwrap_or(name)
    }

    /// Whether a larger best-model metric is better.
    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better
            .unwrap_or_else(|| !lower_is_better(self.best_metric()))
    }

    /// Whether the best metric has to be tracked at all.
    pub fn tracks_best(&self) -> bool {
        self.load_best_model_at_end
            || self.early_stopping.is_some()
            || self.metric_for_best_model.is_some()
    }

    /// `max_memory` in bytes.
    pub fn max_memory_bytes(&self) -> Result<Option<u64>, MemoryBudgetError> {
        let Some(text) = &self.max_memory else {
            return Ok(None);
        };
        let size: bytesize::ByteSize =
            text.parse()
                .map_err(|reason: String| MemoryBudgetError::NotASize {
                    text: text.clone(),
                    reason,
                })?;
        match size.as_u64() {
            0 => Err(MemoryBudgetError::Zero),
            bytes => Ok(Some(bytes)),
        }
    }

    /// The checks Trainer makes when TrainingArguments are built, with the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at =
            |key: &str, message: String| Err(ConfigError::at(format!("training.{key}"), message));
        if let Some(delta) = self.huber_delta
            && !(delta > 0.0 && delta.is_finite())
        {
            return at("huber_delta", format!("{delta} is not a positive number"));
        }
        if let Some(eps) = self.label_smoothing_factor
            && !(0.0..1.0).contains(&eps)
        {
            return at("label_smoothing_factor", format!("{eps} is not in [0, 1)"));
        }
        if let Some(ClassWeights::Given(weights)) = &self.class_weights
            && let Some(bad) = weights.iter().find(|w| !(w.is_finite() && **w > 0.0))
        {
            return at("class_weights", format!("{bad} is not a positive weight"));
        }
        for (key, value) in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_batch_size", self.eval_batch_size),
            ("logging_steps", self.logging_steps),
        ] {
            if value == 0 {
                return at(key, "must be at least 1".into());
            }
        }
        for (key, value) in [
            ("max_steps", self.max_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("save_total_limit", self.save_total_limit),
        ] {
            if value == Some(0) {
                return at(key, "must be at least 1".into());
            }
        }
        // Counts far beyond any run are refused here, where the key can be named: multiplied
        // later (samples per update, updates in all) they overflowed: a batch of 2^62 × 4
        // wrapped to 0 and divided by it, an epoch count of 8·10^17 wrapped to 6 updates.
        for (key, value, largest) in [
            ("epochs", Some(self.epochs), LARGEST_EPOCHS),
            ("batch_size", Some(self.batch_size), LARGEST_BATCH),
            ("grad_accum", Some(self.grad_accum), LARGEST_BATCH),
            ("eval_batch_size", Some(self.eval_batch_size), LARGEST_BATCH),
            ("max_steps", self.max_steps, LARGEST_STEPS),
            ("eval_steps", self.eval_steps, LARGEST_STEPS),
            ("save_steps", self.save_steps, LARGEST_STEPS),
            ("logging_steps", Some(self.logging_steps), LARGEST_STEPS),
            ("warmup_steps", self.warmup_steps, LARGEST_STEPS),
        ] {
            if let Some(value) = value.filter(|&v| v > largest) {
                return at(
                    key,
                    format!("{value} is above the largest this trainer takes, {largest}"),
                );
            }
        }
        let per_update = self.batch_size.saturating_mul(self.grad_accum);
        if per_update > LARGEST_BATCH {
            return at(
                "grad_accum",
                format!(
                    "batch_size × grad_accum is {per_update} samples per update, above the largest this trainer takes, {LARGEST_BATCH}"
                ),
            );
        }
        if let Err(message) = self.max_memory_bytes() {
            return at("max_memory", message.to_string());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return at("lr", format!("{} is not a positive learning rate", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return at(
                "warmup_ratio",
                format!("{} is not in [0, 1)", self.warmup_ratio),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return at("weight_decay", format!("{} is not ≥ 0", self.weight_decay));
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return at("adam_epsilon", format!("{} is not > 0", self.adam_epsilon));
        }
        if let Some(norm) = self.max_grad_norm.filter(|n| n.is_nan() || *n <= 0.0) {
            return at(
                "max_grad_norm",
                format!("{norm} is not > 0 (use null for no clipping)"),
            );
        }
        if self.eval_strategy == Strategy::Steps && self.eval_steps.is_none() {
            return at(
                "eval_steps",
                "is required when eval_strategy is `steps`".into(),
            );
        }
        if self.save_strategy == Strategy::Steps && self.save_steps.is_none() {
            return at(
                "save_steps",
                "is required when save_strategy is `steps`".into(),
            );
        }
        let any_task = ProblemType::ALL.map(task_metrics);
        if !any_task.iter().any(|m| m.contains(&self.best_metric())) {
            return at(
                "metric_for_best_model",
                format!(
                    "`{}` is not a metric; one of: {}",
                    self.best_metric(),
                    METRICS.join(", ")
                ),
            );
        }
        if self.load_best_model_at_end {
            if self.eval_strategy == Strategy::No {
                return at(
                    "load_best_model_at_end",
                    "needs an eval_strategy other than `no`".into(),
                );
            }
            if self.save_strategy != self.eval_strategy {
                return at(
                    "save_strategy",
                    format!(
                        "must equal eval_strategy ({:?}) with load_best_model_at_end, so that every evaluated model is saved",
                        self.eval_strategy
                    ),
                );
            }
            if let (Some(save), Some(eval)) = (self.save_steps, self.eval_steps)
                && self.save_strategy == Strategy::Steps
                && save % eval != 0
            {
                return at(
                    "save_steps",
                    format!(
                        "{save} must be a multiple of eval_steps ({eval}) with load_best_model_at_end"
                    ),
                );
            }
        }
        if let Some(early) = &self.early_stopping {
            if self.eval_strategy == Strategy::No {
                return at(
                    "early_stopping",
                    "needs an eval_strategy other than `no`".into(),
                );
            }
            if early.patience == 0 {
                return at("early_stopping.patience", "must be at least 1".into());
            }
            if early.threshold.is_nan() || early.threshold < 0.0 {
                return at(
                    "early_stopping.threshold",
                    format!("{} is not ≥ 0", early.threshold),
                );
            }
        }
        Ok(())
    }
}

fn default_epochs() -> usize {
    3
}
fn default_batch_size() -> usize {
    16
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_epsilon() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_seed() -> u64 {
    42
}
fn default_eval_batch_size() -> usize {
    64
}
fn default_logging_steps() -> usize {
    10
}
fn epoch() -> Strategy {
    Strategy::Epoch
}
fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    #[test]
    fn balanced_weights_are_scikit_learns() {
        // n / (classes · n_label): 4 rows, 3 of label 0 and 1 of label 1.
        let weights = ClassWeights::Named(NamedWeights::Balanced)
            .resolve([0, 0, 1, 0].into_iter(), &names(2))
            .unwrap();
        assert_eq!(weights, vec![4.0 / 6.0, 2.0]);
    }

    #[test]
    fn class_weights_that_do_not_fit_the_labels_name_the_key_and_the_labels() {
        let given = ClassWeights::Given(vec![1.0, 2.0, 3.0]);
        let error = given.resolve([0, 1].into_iter(), &names(2)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "`training.class_weights`: 3 weights for 2 labels (0, 1); give one per label, in this order"
        );
        let balanced = ClassWeights::Named(NamedWeights::Balanced);
        let error = balanced.resolve([0, 0].into_iter(), &names(2)).unwrap_err();
        assert!(error.to_string().contains("label `1` has none"), "{error}");
        let fitting = ClassWeights::Given(vec![1.0, 2.5]);
        assert_eq!(
            fitting.resolve([0].into_iter(), &names(2)).unwrap(),
            vec![1.0, 2.5]
        );
    }
}
