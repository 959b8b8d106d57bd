//! [`Trainer::train`] in its phases: starting (fresh or from a checkpoint), an epoch, one
//! update with its out-of-memory retry, acting on the callbacks' control flags (log, evaluate,
//! save), stopping on request, and finishing (the best model back when asked).

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use finetune_model::{Classifier, Example};
use finetune_optim::Schedule;
use finetune_regularizers::Attack;
use serde_json::{Value, json};

use crate::state::EpochSummary;
use crate::update::{
    Gradients, Loss, MicroBatch, Optimizer, UpdatePlan, UpdateStats, update_gradients,
};
use crate::{
    Callback, Checkpoints, Control, Outcome, Record, Restored, Start, Strategy, Trainer,
    TrainerState, epoch_order, mix, optimizer_for, restore,
};

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

/// Everything a run carries from update to update, but the model (which each update takes
/// and gives back).
struct Run {
    optimizer: Optimizer,
    loss: Loss,
    state: TrainerState,
    schedule: Schedule,
    attack: Option<Attack>,
    updates_per_epoch: usize,
    total_updates: usize,
    /// `max_memory` in bytes.
    budget: Option<u64>,
    control: Control,
    pending: Pending,
    /// An evaluation since the last checkpoint was the best so far.
    pending_best: bool,
    last_evaluation: Option<(usize, Value)>,
    session: Instant,
    train_seconds_before: f64,
}

impl Run {
    /// Training time of the whole run: the checkpoint's sessions and this one.
    fn count_train_seconds(&mut self) {
        self.state.train_seconds = self.train_seconds_before + self.session.elapsed().as_secs_f64();
    }
}

/// One optimizer update's samples: `chunk` of `train`, padded to `length`, at `lr`.
#[derive(Clone, Copy)]
struct Update<'a> {
    train: &'a [Example],
    chunk: &'a [usize],
    epoch: usize,
    lr: f64,
    length: usize,
}

/// How an epoch ended.
enum EpochEnd {
    /// Its last update, `max_steps`, or a callback's `should_training_stop`.
    Done,
    /// The stop flag was raised after an update.
    StopRequested,
}

impl Trainer<'_> {
    /// Trains on `train` from `start` (the model must live on an autodiff device).
    pub fn train(&mut self, start: Start, train: &[Example]) -> Result<Outcome> {
        // The device's RNG is process-wide: one training at a time keeps runs reproducible.
        let _device = finetune_kernels::exclusive_device();
        let (mut model, mut run) = self.begin(start, train)?;
        self.each(&run.state, &mut run.control, |c, s, k| {
            c.on_train_begin(s, k)
        })?;
        while run.state.global_step < run.total_updates && !run.control.should_training_stop {
            let end;
            (model, end) = self.train_epoch(model, &mut run, train)?;
            if let EpochEnd::StopRequested = end {
                return self.stop_on_request(&model, &mut run);
            }
        }
        self.finish(model, run)
    }

    /// The model, optimizer and state a run starts from.
    fn begin(&mut self, start: Start, train: &[Example]) -> Result<(Classifier, Run)> {
        let args = self.args;
        let (per_epoch, total) = self.plan(train.len());
        let problem = match &start {
            Start::Fresh(model) => model.config.problem_type,
            Start::Resume(restored) => restored.model.config.problem_type,
        };
        let loss = self.loss(train, problem)?;
        let schedule = self.schedule(total);
        let budget = args.max_memory_bytes()?;
        let (model, attack, optimizer, state) = match start {
            Start::Fresh(model) => {
                let attack = self.attack(&model)?;
                let optimizer = optimizer_for(args, attack.as_ref(), &model);
                let state = TrainerState {
                    max_steps: total,
                    updates_per_epoch: per_epoch,
                    train_batch_size: args.batch_size * args.grad_accum,
                    micro_batch_size: args.batch_size,
                    ..TrainerState::default()
                };
                (model, attack, optimizer, state)
            }
            Start::Resume(restored) => {
                let (model, optimizer, state) = self.resume(restored, per_epoch, total)?;
                let attack = self.attack(&model)?;
                (model, attack, optimizer, state)
            }
        };
        let run = Run {
            optimizer,
            loss,
            train_seconds_before: state.train_seconds,
            state,
            schedule,
            attack,
            updates_per_epoch: per_epoch,
            total_updates: total,
            budget,
            control: Control::default(),
            pending: Pending::default(),
            pending_best: false,
            last_evaluation: None,
            session: Instant::now(),
        };
        Ok((model, run))
    }

    /// A checkpoint's model, optimizer and state, checked against this run's plan, with the
    /// callbacks' saved state loaded back.
    fn resume(
        &mut self,
        restored: Restored,
        per_epoch: usize,
        total: usize,
    ) -> Result<(Classifier, Optimizer, TrainerState)> {
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
            state.micro_batch_size = self.args.batch_size;
        }
        for callback in &mut self.callbacks {
            if let Some(saved) = state.callbacks.get(callback.name()) {
                callback.load_state(saved)?;
            }
        }
        Ok((model, optimizer, state))
    }

    /// The rest of the current epoch (all of it, or from a resumed step), then its summary,
    /// the epoch-end events and what they ask for.
    fn train_epoch(
        &mut self,
        mut model: Classifier,
        run: &mut Run,
        train: &[Example],
    ) -> Result<(Classifier, EpochEnd)> {
        let args = self.args;
        let epoch = run.state.epoch_index();
        let order = epoch_order(train, args, epoch as u64);
        if run.state.step_in_epoch() == 0 {
            self.each(&run.state, &mut run.control, |c, s, k| {
                c.on_epoch_begin(s, k)
            })?;
        }
        let epoch_started = Instant::now();
        let mut epoch_tally = Tally::default();
        run.pending = Pending::default();
        let skip = run.state.step_in_epoch();
        for (i, chunk) in order
            .chunks(args.batch_size * args.grad_accum)
            .enumerate()
            .skip(skip)
        {
            if run.state.global_step >= run.total_updates {
                break;
            }
            self.each(&run.state, &mut run.control, |c, s, k| {
                c.on_step_begin(s, k)
            })?;
            let lr = run.schedule.lr(run.state.global_step);
            let started = Instant::now();
            let length = self
                .pad_to
                .unwrap_or_else(|| chunk.iter().map(|&j| train[j].ids.len()).max().unwrap_or(1));
            self.fit_budget(&model, run, length)?;
            let update = Update {
                train,
                chunk,
                epoch,
                lr,
                length,
            };
            let stats;
            (model, stats) = self.update(model, run, &update)?;
            anyhow::ensure!(
                stats.loss.is_finite(),
                "the loss became {} at step {} (learning rate {lr:.3e}): training diverged",
                stats.loss,
                run.state.global_step + 1
            );
            let seconds = started.elapsed().as_secs_f64();
            let state = &mut run.state;
            state.global_step += 1;
            state.epoch = epoch as f64 + (i + 1) as f64 / run.updates_per_epoch as f64;
            run.pending.tally.add(stats.loss, chunk.len(), seconds);
            run.pending.tally.add_awp(stats.awp_loss);
            run.pending.last = Some((lr, stats.grad_norm));
            epoch_tally.add(stats.loss, chunk.len(), seconds);
            state.samples_seen += chunk.len();
            self.each(&run.state, &mut run.control, |c, s, k| c.on_step_end(s, k))?;
            self.ask_for_step_events(run);
            self.log_evaluate_save(&model, run)?;
            if (self.stop_requested)() {
                return Ok((model, EpochEnd::StopRequested));
            }
            if run.control.should_training_stop {
                break;
            }
        }
        self.end_epoch(&model, run, epoch, epoch_started, &epoch_tally)?;
        Ok((model, EpochEnd::Done))
    }

    /// The epoch's summary, the epoch-end events, and the log, evaluation and checkpoint the
    /// epoch strategies ask for.
    fn end_epoch(
        &mut self,
        model: &Classifier,
        run: &mut Run,
        epoch: usize,
        started: Instant,
        tally: &Tally,
    ) -> Result<()> {
        // An epoch's throughput counts its whole time, evaluations and saves included.
        let seconds = started.elapsed().as_secs_f64();
        run.state.epochs.push(EpochSummary {
            epoch: epoch + 1,
            step: run.state.global_step,
            train_loss: tally.mean_loss(),
            seconds,
            samples_per_second: tally.samples as f64 / seconds.max(1e-9),
        });
        self.each(&run.state, &mut run.control, |c, s, k| c.on_epoch_end(s, k))?;
        let args = self.args;
        run.control.should_log |= run.pending.tally.updates > 0;
        run.control.should_evaluate |= args.eval_strategy == Strategy::Epoch;
        run.control.should_save |= args.save_strategy == Strategy::Epoch;
        run.count_train_seconds();
        self.log_evaluate_save(model, run)
    }

    /// The flags the step-based strategies raise after an update.
    fn ask_for_step_events(&self, run: &mut Run) {
        let args = self.args;
        let step = run.state.global_step;
        let control = &mut run.control;
        control.should_log |= step.is_multiple_of(args.logging_steps) || step == run.total_updates;
        control.should_evaluate |= args.eval_strategy == Strategy::Steps
            && args.eval_steps.is_some_and(|n| step.is_multiple_of(n));
        control.should_save |= args.save_strategy == Strategy::Steps
            && args.save_steps.is_some_and(|n| step.is_multiple_of(n));
    }

    /// The gradients of one update. An out-of-memory failure halves the micro-batch and
    /// tries again with the same dropout masks.
    fn gradients(
        &mut self,
        model: &Classifier,
        run: &mut Run,
        update: &Update,
    ) -> Result<(Gradients, UpdateStats)> {
        let args = self.args;
        let awp = self.awp;
        let Update {
            train,
            chunk,
            epoch,
            lr,
            length,
        } = *update;
        loop {
            let micro: Vec<MicroBatch> = chunk
                .chunks(run.state.micro_batch_size)
                .map(|ids| MicroBatch {
                    rows: ids.iter().map(|&j| train[j].ids.clone()).collect(),
                    type_ids: ids.iter().map(|&j| train[j].type_ids.clone()).collect(),
                    labels: ids.iter().map(|&j| train[j].label).collect(),
                    targets: ids.iter().map(|&j| train[j].targets.clone()).collect(),
                })
                .collect();
            let step = run.state.global_step;
            // On a device that queues work the fault comes at the step's sync (see `update`).
            let inject_oom = finetune_kernels::runs_fused(&self.device)
                && self.inject_oom_at.take_if(|at| *at == step + 1).is_some();
            // The gradients borrow the model: after an out-of-memory failure it is still the
            // one of the last completed update, and the optimizer only steps (and takes the
            // model, without a copy) once every gradient exists.
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
                    dropout_seed: mix(args.seed, step as u64),
                    attack: run
                        .attack
                        .as_ref()
                        .filter(|_| awp.is_some_and(|a| a.active(epoch, step))),
                    words: run.optimizer.word_gradient(),
                    loss: &run.loss,
                };
                update_gradients(model, &micro, &plan, &model_device(&self.device))
            }));
            match attempt {
                Ok(done) => return Ok(done),
                Err(payload) if is_out_of_memory(payload.as_ref()) => {
                    self.device.memory_cleanup();
                    self.split_micro_batch(run, length, "the device ran out of memory")?;
                }
                Err(payload) => std::panic::resume_unwind(payload),
            }
        }
    }

    /// One update: the gradients, then the optimizer's step.
    ///
    /// A GPU queues work and reports a failed allocation at the next sync, and every tensor
    /// computed after it is unusable: there the step is synced before the update counts, and
    /// on running out of memory the model and optimizer go back to their state before it (kept
    /// as handles: no copy of the weights on the device), the cached memory is freed and the
    /// gradients are taken again in smaller micro-batches. The CPU computes each operation
    /// before returning, so nothing is kept there.
    fn update(
        &mut self,
        model: Classifier,
        run: &mut Run,
        update: &Update,
    ) -> Result<(Classifier, UpdateStats)> {
        let queued = !finetune_kernels::runs_fused(&self.device);
        loop {
            let (grads, stats) = self.gradients(&model, run, update)?;
            if !queued {
                return Ok((run.optimizer.step(update.lr, model, grads), stats));
            }
            let optimizer_before = run.optimizer.clone();
            let step = run.state.global_step;
            let inject_oom = self.inject_oom_at.take_if(|at| *at == step + 1).is_some();
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let stepped = run.optimizer.step(update.lr, model.clone(), grads);
                if inject_oom {
                    // After the step has changed the optimizer's state: what a restart undoes.
                    panic!("injected fault (FINETUNE_FAULT_OOM_AT_STEP): OutOfMemory at sync");
                }
                self.device.sync().map(|()| stepped)
            }));
            let failure = match stepped {
                Ok(Ok(stepped)) => return Ok((stepped, stats)),
                Ok(Err(error)) => error.to_string(),
                Err(payload) if is_out_of_memory(payload.as_ref()) => "out of memory".into(),
                Err(payload) => std::panic::resume_unwind(payload),
            };
            if !failure.to_ascii_lowercase().contains("memory") {
                anyhow::bail!("the device failed during the optimizer's step: {failure}");
            }
            run.optimizer = optimizer_before;
            self.device.memory_cleanup();
            self.split_micro_batch(run, update.length, "the device ran out of memory")?;
        }
    }

    /// The stop flag: saves a checkpoint of the update just made (whatever the save
    /// strategy), so that the next run resumes here, and ends the run with an error that says
    /// so.
    fn stop_on_request(&mut self, model: &Classifier, run: &mut Run) -> Result<Outcome> {
        let Some(checkpoints) = self.checkpoints.clone() else {
            anyhow::bail!(
                "interrupted at step {}; nothing saved (no checkpoint directory)",
                run.state.global_step
            );
        };
        let dir = self.save_checkpoint(&checkpoints, model, run)?;
        anyhow::bail!(
            "interrupted at step {} of {}: saved {}; run again to resume",
            run.state.global_step,
            run.state.max_steps,
            dir.display()
        )
    }

    /// The train-end events, and the best checkpoint's model in place of the last with
    /// `load_best_model_at_end`.
    fn finish(&mut self, mut model: Classifier, mut run: Run) -> Result<Outcome> {
        run.count_train_seconds();
        self.each(&run.state, &mut run.control, |c, s, k| c.on_train_end(s, k))?;
        let state = run.state;
        let mut model_step = state.global_step;
        if self.args.load_best_model_at_end
            && let (Some(best), Some(checkpoints)) =
                (&state.best_model_checkpoint, &self.checkpoints)
        {
            let dir = checkpoints.dir().join(best);
            let restored = restore(&dir, self.labels, &model_device(&self.device), |m| {
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
            last_evaluation: run.last_evaluation,
        })
    }

    /// Writes a checkpoint of the current update, with the callbacks' state.
    fn save_checkpoint(
        &self,
        checkpoints: &Checkpoints,
        model: &Classifier,
        run: &mut Run,
    ) -> Result<std::path::PathBuf> {
        run.state.callbacks = self
            .callbacks
            .iter()
            .filter_map(|c| Some((c.name().to_string(), c.save_state()?)))
            .collect();
        checkpoints.save(
            model,
            &run.optimizer,
            &run.schedule,
            self.args.seed,
            &run.state,
        )
    }

    /// Splits micro-batches until the estimated peak of one fits `max_memory`.
    fn fit_budget(&mut self, model: &Classifier, run: &mut Run, length: usize) -> Result<()> {
        let Some(budget) = run.budget else {
            return Ok(());
        };
        loop {
            let micro_batch = run.state.micro_batch_size;
            let need = model.config.training_bytes(micro_batch, length);
            if need <= budget {
                return Ok(());
            }
            let reason = format!(
                "a micro-batch of {micro_batch} × {length} tokens needs about {} MiB, over max_memory ({} MiB)",
                need >> 20,
                budget >> 20
            );
            self.split_micro_batch(run, length, &reason)?;
        }
    }

    /// Halves the micro-batch; accumulation grows so that an update sees the same samples. The
    /// change is logged, and kept in checkpoints.
    fn split_micro_batch(&mut self, run: &mut Run, length: usize, reason: &str) -> Result<()> {
        let budget = self.args.max_memory.as_deref().unwrap_or("none");
        let state = &mut run.state;
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
        self.push_log(&mut run.state, &mut run.control, entry)
    }

    /// Acts on the control flags: a log record, an evaluation, a checkpoint; then clears them.
    fn log_evaluate_save(&mut self, model: &Classifier, run: &mut Run) -> Result<()> {
        if run.control.should_log && run.pending.tally.updates > 0 {
            self.log(run)?;
        }
        if run.control.should_evaluate {
            self.evaluate(model, run)?;
        }
        if run.control.should_save
            && let Some(checkpoints) = self.checkpoints.clone()
        {
            self.save(&checkpoints, model, run)?;
        }
        run.control.should_log = false;
        run.control.should_evaluate = false;
        run.control.should_save = false;
        Ok(())
    }

    /// A log record of the updates since the last one.
    fn log(&mut self, run: &mut Run) -> Result<()> {
        let (lr, grad_norm) = run.pending.last.unwrap_or_default();
        let tally = &run.pending.tally;
        let mut record = record(json!({
            "step": run.state.global_step,
            "epoch": round4(run.state.epoch),
            "loss": tally.mean_loss(),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "samples_per_second": tally.samples as f64 / tally.seconds.max(1e-9),
        }));
        if let Some(awp_loss) = tally.mean_awp_loss() {
            record.insert("awp_loss".into(), json!(awp_loss));
        }
        run.pending = Pending::default();
        self.push_log(&mut run.state, &mut run.control, record)
    }

    /// An evaluation (when the run has an evaluator): its record, the evaluate events, and
    /// the best metric so far.
    fn evaluate(&mut self, model: &Classifier, run: &mut Run) -> Result<()> {
        let Some(evaluator) = &mut self.evaluator else {
            return Ok(());
        };
        let started = Instant::now();
        let metrics = evaluator.evaluate(&model.valid())?;
        let (seconds, examples) = (started.elapsed().as_secs_f64(), evaluator.examples());
        let (state, control) = (&mut run.state, &mut run.control);
        let mut entry = record(json!({ "step": state.global_step, "epoch": round4(state.epoch) }));
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
            run.pending_best |= state.observe_best(value, self.args.greater_is_better());
        }
        run.last_evaluation = Some((state.global_step, metrics));
        Ok(())
    }

    /// A checkpoint (marked best when an evaluation since the last one was), the rotation,
    /// and the save events.
    fn save(&mut self, checkpoints: &Checkpoints, model: &Classifier, run: &mut Run) -> Result<()> {
        if std::mem::take(&mut run.pending_best) {
            run.state.best_model_checkpoint = Some(Checkpoints::name(run.state.global_step));
        }
        let dir = self.save_checkpoint(checkpoints, model, run)?;
        if let Some(limit) = self.args.save_total_limit {
            checkpoints.rotate(limit, run.state.best_model_checkpoint.as_deref())?;
        }
        self.each(&run.state, &mut run.control, |c, s, k| {
            c.on_save(s, &dir, k)
        })
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

/// Whether a panic is an allocation failure (cubecl reports `OutOfMemory` through a panic from
/// `into_data`/`into_scalar`).
pub(crate) fn is_out_of_memory(payload: &(dyn std::any::Any + Send)) -> bool {
    let lower = finetune_core::panic_text(payload)
        .unwrap_or("")
        .to_ascii_lowercase();
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
