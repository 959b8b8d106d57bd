//! The training loop, shaped like Hugging Face Trainer: epochs or `max_steps` of optimizer
//! updates, logging, evaluation and checkpoints by epoch or every N steps, the best model
//! tracked by a metric, callbacks with Trainer's events, and exact resumption. It trains a
//! `finetune-model` classifier and knows nothing of pipelines: the caller hands it examples,
//! settings, callbacks and a stop flag.
//!
//! Exactness on resume comes from deriving every random draw from (seed, position): the sample
//! order of epoch `e` from `mix(seed, e)`, the dropout masks of update `k` from `mix(seed, k)`.
//! A checkpoint then only has to hold the weights, the optimizer state and the step.
//!
//! - [`TrainingArgs`]: the settings (TrainingArguments), checked with their key at fault.
//! - [`Trainer`]: one run; [`TrainerState`] and [`Control`] as Trainer has them.
//! - [`Callback`] and the built-in ones: [`EarlyStopping`], [`jsonl_logger`],
//!   [`tensorboard_logger`], [`RunHistory`].
//! - [`Checkpoints`]: writing, listing, rotating and [`restore`]-ing checkpoints.
//! - [`update`] and [`AdamW`]: one optimizer update (accumulation, AWP, Mixout masks,
//!   clipping) and the optimizer that steps it.
//! - [`Regularizers`]: how a run configures AWP and Mixout on a classifier.
//! - [`Evaluator`], [`evaluate`] and [`Metrics`]: scoring during training.
//! - [`output_priors`]: a new head's bias at the training labels' base rates.

mod args;
mod callbacks;
mod checkpoint;
mod evaluation;
mod metrics;
mod priors;
mod regularize;
mod run;
mod state;
pub mod tensorboard;
mod update;

use anyhow::Result;
use burn::tensor::Device;
use finetune_model::{Classifier, Example, ProblemType};
use finetune_optim::Schedule;
use finetune_regularizers::Attack;
use finetune_rng::SplitMix64;

pub use args::{
    ClassWeights, EarlyStoppingArgs, EvalSplit, METRICS, MemoryBudgetError, Padding, Strategy,
    TRAINER_NAMES, TrainingArgs, accept_trainer_names, task_metrics,
};
pub use callbacks::{
    Callback, EarlyStopping, JsonlFile, Logger, RecordSink, RunHistory, jsonl_logger,
    tensorboard_logger,
};
pub use checkpoint::{Checkpoints, Restored, restore};
pub use evaluation::{
    DEFAULT_THRESHOLD, DatasetEvaluator, Evaluator, TaskMetrics, evaluate, metrics_json,
    predict_fitting, scores_json, tune_threshold,
};
pub use metrics::{ClassScores, Metrics, MultiLabelMetrics, RegressionMetrics, TargetScores};
pub use priors::output_priors;
pub use regularize::{AwpConfig, MixoutConfig, RegularizerError, Regularizers, with_mixout_masks};
pub use state::{Control, EpochSummary, Record, TrainerState};
pub use update::{
    AdamW, Gradients, Loss, MicroBatch, OPTIMIZER_FILE, Optimizer, UpdatePlan, UpdateStats,
    WordGradient, clip_to_global_norm, gradients, gradients_taking, update, update_gradients,
};

/// Where a run starts: a fresh model, or a checkpoint. Made once per run, so its size is moot.
#[allow(clippy::large_enum_variant)]
pub enum Start {
    Fresh(Classifier),
    Resume(Restored),
}

/// What a run produced.
pub struct Outcome {
    /// The final model, or the best checkpoint's with `load_best_model_at_end`.
    pub model: Classifier,
    pub state: TrainerState,
    /// The step whose model `model` is (the best checkpoint's step, or the last).
    pub model_step: usize,
    /// The last evaluation, with the step it was made at.
    pub last_evaluation: Option<(usize, serde_json::Value)>,
}

/// One training run.
pub struct Trainer<'a> {
    pub args: &'a TrainingArgs,
    pub callbacks: Vec<Box<dyn Callback + 'a>>,
    pub evaluator: Option<Box<dyn Evaluator + 'a>>,
    /// Where checkpoints go; `None` saves none.
    pub checkpoints: Option<Checkpoints>,
    /// Fixed padding length (`padding: max_length`), or `None` for dynamic padding.
    pub pad_to: Option<usize>,
    /// The labels (restoring a checkpoint needs them).
    pub labels: &'a [String],
    /// The device, without autodiff (seeded before every update).
    pub device: Device,
    /// Fault injection for tests: fail update N (1-based) once as if out of memory.
    pub inject_oom_at: Option<usize>,
    /// Adversarial Weight Perturbation, from its start epoch or step on.
    pub awp: Option<&'a AwpConfig>,
    /// Polled after every update: when it says so, the run saves a checkpoint of that update
    /// (with a checkpoint directory) and ends with an error that says how to resume.
    pub stop_requested: fn() -> bool,
}

impl Trainer<'_> {
    /// Updates per epoch, and in all, for `n_train` training examples.
    pub fn plan(&self, n_train: usize) -> (usize, usize) {
        let per_update = self.args.batch_size * self.args.grad_accum;
        let per_epoch = n_train.div_ceil(per_update);
        let total = (self.args.max_steps).unwrap_or(per_epoch.saturating_mul(self.args.epochs));
        (per_epoch, total)
    }

    pub fn schedule(&self, total_steps: usize) -> Schedule {
        let a = self.args;
        Schedule::new(
            a.schedule,
            a.lr,
            total_steps,
            a.warmup_ratio,
            a.warmup_steps,
        )
    }

    /// The optimizer a run uses for `model`.
    pub fn optimizer(&self, model: &Classifier) -> Result<Optimizer> {
        optimizer(self.args, self.awp, model)
    }

    /// The AWP attack on `model`'s parameters, when the run has one.
    fn attack(&self, model: &Classifier) -> Result<Option<Attack>> {
        attack_on(self.awp, model)
    }

    /// The loss the run trains with for a head that predicts `problem`; `balanced` weights
    /// come from `train`'s labels. Weights and smoothing are for single-label classification.
    pub fn loss(&self, train: &[Example], problem: ProblemType) -> Result<Loss> {
        let single = problem == ProblemType::SingleLabelClassification;
        let misplaced = [
            (
                "class_weights",
                self.args.class_weights.is_some() && !single,
            ),
            (
                "label_smoothing_factor",
                self.args.label_smoothing_factor.is_some() && !single,
            ),
            (
                "huber_delta",
                self.args.huber_delta.is_some() && problem != ProblemType::Regression,
            ),
        ];
        if let Some((key, _)) = misplaced.iter().find(|(_, misplaced)| *misplaced) {
            let meant = match *key {
                "huber_delta" => "regression",
                _ => "single-label classification",
            };
            anyhow::bail!("`training.{key}` is for {meant}; this model's task is {problem}");
        }
        let class_weights = match &self.args.class_weights {
            Some(weights) => Some(weights.resolve(train.iter().map(|e| e.label), self.labels)?),
            None => None,
        };
        Ok(Loss {
            problem_type: problem,
            huber_delta: self.args.huber_delta.map(|d| d as f32),
            class_weights,
            label_smoothing: self.args.label_smoothing_factor.unwrap_or(0.0) as f32,
        })
    }
}

/// The attack `awp` describes on `model`'s parameters, when there is one.
fn attack_on(awp: Option<&AwpConfig>, model: &Classifier) -> Result<Option<Attack>> {
    Ok(awp.map(|config| config.attack(model)).transpose()?)
}

/// The optimizer `args` describe, for `model` (also what a checkpoint's state is loaded into).
pub fn optimizer(
    args: &TrainingArgs,
    awp: Option<&AwpConfig>,
    model: &Classifier,
) -> Result<Optimizer> {
    let attack = attack_on(awp, model)?;
    Ok(optimizer_for(args, attack.as_ref(), model))
}

/// The optimizer for `model` under `attack`. The word embeddings train by rows unless the
/// attack perturbs them, which takes their dense gradient.
fn optimizer_for(args: &TrainingArgs, attack: Option<&Attack>, model: &Classifier) -> Optimizer {
    let word_table = model.embeddings.word.weight.id;
    let attacks_words = attack.is_some_and(|attack| attack.targets.contains(&word_table));
    AdamW {
        weight_decay: args.weight_decay,
        epsilon: args.adam_epsilon,
        word_rows: !attacks_words,
        ..AdamW::default()
    }
    .build(model)
}

/// A seed for draw `index` of a run seeded with `seed` (SplitMix64's finaliser over both).
pub fn mix(seed: u64, index: u64) -> u64 {
    SplitMix64::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// The sample order of epoch `epoch`: a seeded shuffle, or HF's length grouping (mega-batches
/// of 50 batches, each sorted longest first).
pub fn epoch_order(train: &[Example], args: &TrainingArgs, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    SplitMix64::new(mix(args.seed, epoch)).shuffle(&mut order);
    if args.group_by_length {
        for mega in order.chunks_mut(50 * args.batch_size) {
            mega.sort_by_key(|&i| std::cmp::Reverse(train[i].ids.len()));
        }
    }
    order
}
