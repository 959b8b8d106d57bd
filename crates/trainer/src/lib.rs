//! The training loop, shaped like Hugging Face Trainer: epochs or `max_steps` of optimizer
//! updates, logging, evaluation and checkpoints by epoch or every N steps, the best model
//! tracked by a metric, callbacks with Trainer's events, and exact resumption.
//!
//! Exactness on resume comes from deriving every random draw from (seed, position): the sample
//! order of epoch `e` from `mix(seed, e)`, the dropout masks of update `k` from `mix(seed, k)`.
//! A checkpoint then only has to hold the weights, the optimizer state and the step.
//!
//! - [`args`]: the settings (TrainingArguments).
//! - [`state`]: TrainerState and the control flags callbacks set.
//! - [`callbacks`]: the Callback trait and the built-in callbacks.
//! - [`checkpoint`]: writing, listing, rotating and restoring checkpoints.
//! - [`tensorboard`]: TensorBoard event files.

pub mod args;
pub mod callbacks;
pub mod checkpoint;
pub mod state;
pub mod tensorboard;

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use finetune_core::rng::SplitMix64;
use serde_json::{Value, json};

pub use args::{EarlyStoppingArgs, EvalSplit, Padding, Strategy, TrainingArgs};
pub use callbacks::Callback;
pub use checkpoint::{Checkpoints, Restored};
pub use state::{Control, Record, TrainerState};

pub use crate::predict::evaluate;

use crate::data::Example;
use crate::model::Classifier;
use crate::optim::{AdamW, MicroBatch, Optimizer, UpdatePlan, update_gradients};
use crate::regularizers::AwpConfig;
use crate::schedule::Schedule;

/// Scores a model; the trainer calls it at every evaluation.
pub trait Evaluator {
    /// Full metrics as JSON (`loss`, `accuracy`, `f1_macro`, …, `per_class`, `confusion`).
    fn evaluate(&mut self, model: &Classifier) -> Result<Value>;
    /// Examples scored per evaluation (for eval samples/s).
    fn examples(&self) -> usize;
}

/// Evaluates on a labelled split.
pub struct DatasetEvaluator<'a> {
    pub examples: &'a [Example],
    pub labels: &'a [String],
    pub batch_size: usize,
    pub device: Device,
}

impl Evaluator for DatasetEvaluator<'_> {
    fn evaluate(&mut self, model: &Classifier) -> Result<Value> {
        evaluate(
            model,
            self.examples,
            self.labels,
            self.batch_size,
            &self.device,
        )
    }
    fn examples(&self) -> usize {
        self.examples.len()
    }
}

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
    pub last_evaluation: Option<(usize, Value)>,
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
}

/// Updates summed over a stretch of the run: since the last log record, or in this epoch.
#[derive(Default)]
struct Tally {
    loss_sum: f64,
    updates: usize,
    /// AWP's loss at the perturbed weights, over the updates that attacked.
    awp_loss_sum: f64,
    awp_updates: usize,
    samples: usize,
    /// Seconds spent in the updates themselves.
    seconds: f64,
}

impl Tally {
    fn add(&mut self, loss: f64, samples: usize, seconds: f64) {
        self.loss_sum += loss;
        self.updates += 1;
        self.samples += samples;
        self.seconds += seconds;
    }

    fn add_awp(&mut self, awp_loss: Option<f64>) {
        if let Some(loss) = awp_loss {
            self.awp_loss_sum += loss;
            self.awp_updates += 1;
        }
    }

    fn mean_awp_loss(&self) -> Option<f64> {
        (self.awp_updates > 0).then(|| self.awp_loss_sum / self.awp_updates as f64)
    }

    fn mean_loss(&self) -> f64 {
        self.loss_sum / self.updates.max(1) as f64
    }
}

/// The loop's bookkeeping between log records.
#[derive(Default)]
struct Pending {
    tally: Tally,
    /// Learning rate and gradient norm of the last update.
    last: Option<(f64, f64)>,
}

impl<'a> Trainer<'a> {
    /// Updates per epoch, and in all, for `n_train` training examples.
    pub fn plan(&self, n_train: usize) -> (usize, usize) {
        let per_update = self.args.batch_size * self.args.grad_accum;
        let per_epoch = n_train.div_ceil(per_update);
        let total = self.args.max_steps.unwrap_or(per_epoch * self.args.epochs);
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
    pub fn optimizer(&self, model: &Classifier) -> Optimizer {
        optimizer(self.args, self.awp, model)
    }

    /// Trains on `train` from `start` (the model must live on an autodiff device).
    pub fn train(&mut self, start: Start, train: &[Example]) -> Result<Outcome> {
        // The device's RNG is process-wide: one training at a time keeps runs reproducible.
        let _device = crate::exclusive_device();
        let args = self.args;
        let (per_epoch, total) = self.plan(train.len());
        let schedule = self.schedule(total);
        let budget = args.max_memory_bytes().map_err(anyhow::Error::msg)?;
        let (mut model, mut optimizer, mut state) = match start {
            Start::Fresh(model) => {
                let optimizer = self.optimizer(&model);
                let state = TrainerState {
                    max_steps: total,
                    updates_per_epoch: per_epoch,
                    train_batch_size: args.batch_size * args.grad_accum,
                    micro_batch_size: args.batch_size,
                    ..TrainerState::default()
                };
                (model, optimizer, state)
            }
            Start::Resume(restored) => {
                let Restored {
                    name,
                    model,
                    optimizer,
                    mut state,
                } = restored;
                anyhow::ensure!(
                    state.max_steps == total && state.updates_per_epoch == per_epoch,
                    "checkpoint {} was made for {} updates ({} per epoch), this run makes {total} ({per_epoch})",
                    name,
                    state.max_steps,
                    state.updates_per_epoch
                );
                if state.micro_batch_size == 0 {
                    state.micro_batch_size = args.batch_size;
                }
                for callback in &mut self.callbacks {
                    if let Some(saved) = state.callbacks.get(callback.name()) {
                        callback.load_state(saved)?;
                    }
                }
                (model, optimizer, state)
            }
        };
        let awp = self.awp;
        let attack = awp
            .map(|config| config.attack(&model))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let mut control = Control::default();
        let session = Instant::now();
        let train_seconds_before = state.train_seconds;
        let mut last_evaluation = None;
        let mut pending_best = false;
        self.each(&state, &mut control, |c, s, k| c.on_train_begin(s, k))?;
        while state.global_step < total && !control.should_training_stop {
            let epoch = state.epoch_index();
            let order = epoch_order(train, args, epoch as u64);
            if state.step_in_epoch() == 0 {
                self.each(&state, &mut control, |c, s, k| c.on_epoch_begin(s, k))?;
            }
            let epoch_started = Instant::now();
            let mut epoch_tally = Tally::default();
            let mut pending = Pending::default();
            let skip = state.step_in_epoch();
            for (i, chunk) in order
                .chunks(args.batch_size * args.grad_accum)
                .enumerate()
                .skip(skip)
            {
                if state.global_step >= total {
                    break;
                }
                self.each(&state, &mut control, |c, s, k| c.on_step_begin(s, k))?;
                let lr = schedule.lr(state.global_step);
                let started = Instant::now();
                let length = self.pad_to.unwrap_or_else(|| {
                    chunk.iter().map(|&j| train[j].ids.len()).max().unwrap_or(1)
                });
                self.fit_budget(&model, &mut state, &mut control, length, budget)?;
                let (grads, stats) = loop {
                    let micro: Vec<MicroBatch> = chunk
                        .chunks(state.micro_batch_size)
                        .map(|ids| MicroBatch {
                            rows: ids.iter().map(|&j| train[j].ids.clone()).collect(),
                            labels: ids.iter().map(|&j| train[j].label).collect(),
                        })
                        .collect();
                    let inject_oom = self
                        .inject_oom_at
                        .take_if(|at| *at == state.global_step + 1)
                        .is_some();
                    // The gradients borrow the model: after an out-of-memory failure it is still
                    // the one of the last completed update, and the optimizer only steps (and
                    // takes the model, without a copy) once every gradient exists.
                    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if inject_oom {
                            // As cubecl reports it: a panic whose payload names OutOfMemory.
                            panic!("injected fault (FINETUNE_FAULT_OOM_AT_STEP): OutOfMemory");
                        }
                        // The same dropout masks on a retry: a split changes shapes, not the seed.
                        let plan = UpdatePlan {
                            lr,
                            max_grad_norm: args.max_grad_norm,
                            pad_to: self.pad_to,
                            dropout_seed: mix(args.seed, state.global_step as u64),
                            attack: attack.as_ref().filter(|_| {
                                awp.is_some_and(|a| a.active(epoch, state.global_step))
                            }),
                            words: optimizer.word_gradient(),
                        };
                        update_gradients(&model, &micro, &plan, &model_device(&self.device))
                    }));
                    match attempt {
                        Ok(done) => break done,
                        Err(payload) if is_out_of_memory(payload.as_ref()) => {
                            let reason = "the device ran out of memory";
                            self.split_micro_batch(&mut state, &mut control, length, reason)?;
                        }
                        Err(payload) => std::panic::resume_unwind(payload),
                    }
                };
                model = optimizer.step(lr, model, grads);
                anyhow::ensure!(
                    stats.loss.is_finite(),
                    "the loss became {} at step {} (learning rate {lr:.3e}): training diverged",
                    stats.loss,
                    state.global_step + 1
                );
                let seconds = started.elapsed().as_secs_f64();
                state.global_step += 1;
                state.epoch = epoch as f64 + (i + 1) as f64 / per_epoch as f64;
                pending.tally.add(stats.loss, chunk.len(), seconds);
                pending.tally.add_awp(stats.awp_loss);
                pending.last = Some((lr, stats.grad_norm));
                epoch_tally.add(stats.loss, chunk.len(), seconds);
                state.samples_seen += chunk.len();
                self.each(&state, &mut control, |c, s, k| c.on_step_end(s, k))?;
                let step = state.global_step;
                control.should_log |= step % args.logging_steps == 0 || step == total;
                control.should_evaluate |= args.eval_strategy == Strategy::Steps
                    && args.eval_steps.is_some_and(|n| step % n == 0);
                control.should_save |= args.save_strategy == Strategy::Steps
                    && args.save_steps.is_some_and(|n| step % n == 0);
                self.log_evaluate_save(
                    &model,
                    &optimizer,
                    &schedule,
                    &mut state,
                    &mut control,
                    &mut pending,
                    &mut pending_best,
                    &mut last_evaluation,
                )?;
                if finetune_core::interrupt::requested() {
                    return self.stop_on_interrupt(&model, &optimizer, &schedule, &mut state);
                }
                if control.should_training_stop {
                    break;
                }
            }
            // An epoch's throughput counts its whole time, evaluations and saves included.
            let seconds = epoch_started.elapsed().as_secs_f64();
            state.epochs.push(state::EpochSummary {
                epoch: epoch + 1,
                step: state.global_step,
                train_loss: epoch_tally.mean_loss(),
                seconds,
                samples_per_second: epoch_tally.samples as f64 / seconds.max(1e-9),
            });
            self.each(&state, &mut control, |c, s, k| c.on_epoch_end(s, k))?;
            control.should_log |= pending.tally.updates > 0;
            control.should_evaluate |= args.eval_strategy == Strategy::Epoch;
            control.should_save |= args.save_strategy == Strategy::Epoch;
            state.train_seconds = train_seconds_before + session.elapsed().as_secs_f64();
            self.log_evaluate_save(
                &model,
                &optimizer,
                &schedule,
                &mut state,
                &mut control,
                &mut pending,
                &mut pending_best,
                &mut last_evaluation,
            )?;
        }
        state.train_seconds = train_seconds_before + session.elapsed().as_secs_f64();
        self.each(&state, &mut control, |c, s, k| c.on_train_end(s, k))?;
        let mut model_step = state.global_step;
        if args.load_best_model_at_end
            && let (Some(best), Some(checkpoints)) =
                (&state.best_model_checkpoint, &self.checkpoints)
        {
            let dir = checkpoints.dir().join(best);
            let restored =
                checkpoint::restore(&dir, self.labels, &model_device(&self.device), |m| {
                    self.optimizer(m)
                })
                .with_context(|| format!("cannot load the best model from {}", dir.display()))?;
            model_step = restored.state.global_step;
            model = restored.model;
        }
        Ok(Outcome {
            model,
            state,
            model_step,
            last_evaluation,
        })
    }

    /// Ctrl-C: saves a checkpoint of the update just made (whatever the save strategy), so
    /// that the next run resumes here, and ends the run with an error that says so.
    fn stop_on_interrupt(
        &mut self,
        model: &Classifier,
        optimizer: &Optimizer,
        schedule: &Schedule,
        state: &mut TrainerState,
    ) -> Result<Outcome> {
        let Some(checkpoints) = self.checkpoints.clone() else {
            anyhow::bail!(
                "interrupted at step {}; nothing saved (no checkpoint directory)",
                state.global_step
            );
        };
        let dir = self.save_checkpoint(&checkpoints, model, optimizer, schedule, state)?;
        anyhow::bail!(
            "interrupted at step {} of {}: saved {}; run again to resume",
            state.global_step,
            state.max_steps,
            dir.display()
        )
    }

    /// Writes a checkpoint of the current update, with the callbacks' state.
    fn save_checkpoint(
        &self,
        checkpoints: &Checkpoints,
        model: &Classifier,
        optimizer: &Optimizer,
        schedule: &Schedule,
        state: &mut TrainerState,
    ) -> Result<std::path::PathBuf> {
        state.callbacks = self
            .callbacks
            .iter()
            .filter_map(|c| Some((c.name().to_string(), c.save_state()?)))
            .collect();
        checkpoints.save(model, optimizer, schedule, self.args.seed, state)
    }

    /// Splits micro-batches until the estimated peak of one fits `max_memory`.
    fn fit_budget(
        &mut self,
        model: &Classifier,
        state: &mut TrainerState,
        control: &mut Control,
        length: usize,
        budget: Option<u64>,
    ) -> Result<()> {
        let Some(budget) = budget else {
            return Ok(());
        };
        loop {
            let need = model.config.training_bytes(state.micro_batch_size, length);
            if need <= budget {
                return Ok(());
            }
            let reason = format!(
                "a micro-batch of {} × {length} tokens needs about {} MiB, over max_memory ({} MiB)",
                state.micro_batch_size,
                need >> 20,
                budget >> 20
            );
            self.split_micro_batch(state, control, length, &reason)?;
        }
    }

    /// Halves the micro-batch; accumulation grows so that an update sees the same samples. The
    /// change is logged, and kept in checkpoints.
    fn split_micro_batch(
        &mut self,
        state: &mut TrainerState,
        control: &mut Control,
        length: usize,
        reason: &str,
    ) -> Result<()> {
        let budget = self.args.max_memory.as_deref().unwrap_or("none");
        anyhow::ensure!(
            state.micro_batch_size > 1,
            "out of memory with a micro-batch of 1 at sequence length {length} (max_memory: {budget}): {reason}; lower tokenize's max_length or raise max_memory"
        );
        state.micro_batch_size = state.micro_batch_size.div_ceil(2);
        let entry = record(json!({
            "step": state.global_step,
            "epoch": round4(state.epoch),
            "event": "micro_batch_split",
            "reason": reason,
            "micro_batch_size": state.micro_batch_size,
            "grad_accum": state.train_batch_size.div_ceil(state.micro_batch_size),
        }));
        self.push_log(state, control, entry)
    }

    /// Acts on the control flags: a log record, an evaluation, a checkpoint; then clears them.
    #[allow(clippy::too_many_arguments)]
    fn log_evaluate_save(
        &mut self,
        model: &Classifier,
        optimizer: &Optimizer,
        schedule: &Schedule,
        state: &mut TrainerState,
        control: &mut Control,
        pending: &mut Pending,
        pending_best: &mut bool,
        last_evaluation: &mut Option<(usize, Value)>,
    ) -> Result<()> {
        if control.should_log && pending.tally.updates > 0 {
            let (lr, grad_norm) = pending.last.unwrap_or_default();
            let tally = &pending.tally;
            let mut record = record(json!({
                "step": state.global_step,
                "epoch": round4(state.epoch),
                "loss": tally.mean_loss(),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "samples_per_second": tally.samples as f64 / tally.seconds.max(1e-9),
            }));
            if let Some(awp_loss) = tally.mean_awp_loss() {
                record.insert("awp_loss".into(), json!(awp_loss));
            }
            *pending = Pending::default();
            self.push_log(state, control, record)?;
        }
        let evaluation = match &mut self.evaluator {
            Some(evaluator) if control.should_evaluate => {
                let started = Instant::now();
                let metrics = evaluator.evaluate(&model.valid())?;
                Some((
                    metrics,
                    started.elapsed().as_secs_f64(),
                    evaluator.examples(),
                ))
            }
            _ => None,
        };
        if let Some((metrics, seconds, examples)) = evaluation {
            let mut entry =
                record(json!({ "step": state.global_step, "epoch": round4(state.epoch) }));
            for (key, value) in metrics.as_object().into_iter().flatten() {
                if value.is_number() {
                    entry.insert(format!("eval_{key}"), value.clone());
                }
            }
            entry.insert("eval_runtime".into(), json!(seconds));
            entry.insert(
                "eval_samples_per_second".into(),
                json!(examples as f64 / seconds.max(1e-9)),
            );
            self.push_log(state, control, entry.clone())?;
            self.each(state, control, |c, s, k| c.on_evaluate(s, &entry, k))?;
            if self.args.tracks_best() {
                let key = format!("eval_{}", self.args.best_metric());
                let value = entry
                    .get(&key)
                    .and_then(Value::as_f64)
                    .with_context(|| format!("the evaluation reported no `{key}`"))?;
                *pending_best |= state.observe_best(value, self.args.greater_is_better());
            }
            *last_evaluation = Some((state.global_step, metrics));
        }
        if control.should_save
            && let Some(checkpoints) = self.checkpoints.clone()
        {
            if std::mem::take(pending_best) {
                state.best_model_checkpoint = Some(Checkpoints::name(state.global_step));
            }
            let dir = self.save_checkpoint(&checkpoints, model, optimizer, schedule, state)?;
            if let Some(limit) = self.args.save_total_limit {
                checkpoints.rotate(limit, state.best_model_checkpoint.as_deref())?;
            }
            self.each(state, control, |c, s, k| c.on_save(s, &dir, k))?;
        }
        control.should_log = false;
        control.should_evaluate = false;
        control.should_save = false;
        Ok(())
    }

    fn push_log(
        &mut self,
        state: &mut TrainerState,
        control: &mut Control,
        entry: Record,
    ) -> Result<()> {
        state.log_history.push(entry.clone());
        self.each(state, control, |c, s, k| c.on_log(s, &entry, k))
    }

    /// Calls `event` on every callback in order; the first error ends the run.
    fn each(
        &mut self,
        state: &TrainerState,
        control: &mut Control,
        mut event: impl FnMut(&mut dyn Callback, &TrainerState, &mut Control) -> Result<()>,
    ) -> Result<()> {
        for callback in &mut self.callbacks {
            let name = callback.name();
            event(callback.as_mut(), state, control)
                .with_context(|| format!("callback `{name}`"))?;
        }
        Ok(())
    }
}

/// The optimizer `args` describe, for `model` (also what a checkpoint's state is loaded into).
/// The word embeddings train by rows unless `awp` perturbs them, which takes their dense
/// gradient.
pub fn optimizer(args: &TrainingArgs, awp: Option<&AwpConfig>, model: &Classifier) -> Optimizer {
    let word_table = model.embeddings.word.weight.id;
    let attacks_words = awp
        .and_then(|config| config.attack(model).ok())
        .is_some_and(|attack| attack.targets.contains(&word_table));
    AdamW {
        weight_decay: args.weight_decay,
        epsilon: args.adam_epsilon,
        word_rows: !attacks_words,
        ..AdamW::default()
    }
    .build(model)
}

/// Whether a panic is an allocation failure (cubecl reports `OutOfMemory` through a panic from
/// `into_data`/`into_scalar`).
fn is_out_of_memory(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    let lower = text.to_ascii_lowercase();
    lower.contains("out of memory") || lower.contains("outofmemory")
}

/// The device the model trains on: `device` with autodiff.
fn model_device(device: &Device) -> Device {
    device.clone().autodiff()
}

fn record(value: Value) -> Record {
    match value {
        Value::Object(map) => map,
        _ => Record::new(),
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
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
