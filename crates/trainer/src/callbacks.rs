//! Callbacks: the events Trainer users know, and the built-in ones (early stopping, the JSONL
//! and TensorBoard loggers, run_history.json).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::args::EarlyStoppingArgs;
use crate::state::{Control, Record, TrainerState};
use crate::tensorboard::EventWriter;

/// Hooks into the training loop. Every method has a no-op default; set flags on `control` to
/// stop training or to ask for an evaluation, a checkpoint or a log record now.
#[allow(unused_variables)]
pub trait Callback {
    /// A stable name, under which `save_state` is kept in checkpoints.
    fn name(&self) -> &'static str;
    fn on_train_begin(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_train_end(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_epoch_begin(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_epoch_end(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_step_begin(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    fn on_step_end(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        Ok(())
    }
    /// After an evaluation; `metrics` holds `eval_*` values. `state.best_metric` is still the
    /// best before this evaluation.
    fn on_evaluate(
        &mut self,
        state: &TrainerState,
        metrics: &Record,
        control: &mut Control,
    ) -> Result<()> {
        Ok(())
    }
    /// After a record joined the log history (training or evaluation).
    fn on_log(
        &mut self,
        state: &TrainerState,
        record: &Record,
        control: &mut Control,
    ) -> Result<()> {
        Ok(())
    }
    /// After a checkpoint was written.
    fn on_save(
        &mut self,
        state: &TrainerState,
        checkpoint: &Path,
        control: &mut Control,
    ) -> Result<()> {
        Ok(())
    }
    /// State to keep in checkpoints, so that a resumed run continues where it was.
    fn save_state(&self) -> Option<Value> {
        None
    }
    fn load_state(&mut self, state: &Value) -> Result<()> {
        Ok(())
    }
}

/// HF's EarlyStoppingCallback: an evaluation that does not beat the best so far by more than
/// `threshold` counts against `patience`; an improvement resets the count.
pub struct EarlyStopping {
    pub metric: String,
    pub greater_is_better: bool,
    pub patience: usize,
    pub threshold: f64,
    pub bad_evaluations: usize,
}

impl EarlyStopping {
    pub fn new(args: &EarlyStoppingArgs, metric: &str, greater_is_better: bool) -> Self {
        EarlyStopping {
            metric: format!("eval_{metric}"),
            greater_is_better,
            patience: args.patience,
            threshold: args.threshold,
            bad_evaluations: 0,
        }
    }
}

impl Callback for EarlyStopping {
    fn name(&self) -> &'static str {
        "early_stopping"
    }

    fn on_evaluate(
        &mut self,
        state: &TrainerState,
        metrics: &Record,
        control: &mut Control,
    ) -> Result<()> {
        let value = metrics
            .get(&self.metric)
            .and_then(Value::as_f64)
            .with_context(|| {
                format!(
                    "early stopping: the evaluation reported no `{}`",
                    self.metric
                )
            })?;
        let improved = match state.best_metric {
            None => true,
            Some(best) => {
                let better = if self.greater_is_better {
                    value > best
                } else {
                    value < best
                };
                better && (value - best).abs() > self.threshold
            }
        };
        if improved {
            self.bad_evaluations = 0;
        } else {
            self.bad_evaluations += 1;
        }
        if self.bad_evaluations >= self.patience {
            control.should_training_stop = true;
        }
        Ok(())
    }

    fn save_state(&self) -> Option<Value> {
        Some(json!({ "bad_evaluations": self.bad_evaluations }))
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        self.bad_evaluations = state["bad_evaluations"]
            .as_u64()
            .context("early stopping state has no `bad_evaluations`")?
            as usize;
        Ok(())
    }
}

/// Where a [`Logger`] writes each log record.
pub trait RecordSink {
    fn write(&mut self, record: &Record) -> Result<()>;
}

/// Writes every log record to its sink; a resumed run first writes the history it carries, so
/// the file holds the whole run.
pub struct Logger<S> {
    name: &'static str,
    sink: S,
}

impl<S: RecordSink> Callback for Logger<S> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn on_train_begin(&mut self, state: &TrainerState, _: &mut Control) -> Result<()> {
        state
            .log_history
            .iter()
            .try_for_each(|r| self.sink.write(r))
    }
    fn on_log(&mut self, _: &TrainerState, record: &Record, _: &mut Control) -> Result<()> {
        self.sink.write(record)
    }
}

/// A JSON Lines log in two files: `train.jsonl` holds what the run computed (losses, rates,
/// metrics), the same bytes whenever the same run is repeated, and `timings.jsonl` beside it
/// the wall-clock figures of each record (`samples_per_second`, `eval_runtime`, …) by step.
/// Kept apart so that what reads the log (evaluate's report) is not made stale by a clock.
pub struct JsonlFile {
    log: (PathBuf, BufWriter<File>),
    timings: (PathBuf, BufWriter<File>),
}

/// The name of the wall-clock half of the JSONL log, beside the log itself.
pub const TIMINGS_FILE: &str = "timings.jsonl";

/// The JSONL logger: every record into `path`, its timings into `timings.jsonl` beside it.
pub fn jsonl_logger(path: &Path) -> Result<Logger<JsonlFile>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let create = |path: PathBuf| -> Result<(PathBuf, BufWriter<File>)> {
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok((path, BufWriter::new(file)))
    };
    let sink = JsonlFile {
        log: create(path.to_path_buf())?,
        timings: create(dir.join(TIMINGS_FILE))?,
    };
    Ok(Logger {
        name: "jsonl",
        sink,
    })
}

/// A figure that measures the machine, not the run: it differs on every repeat.
fn is_timing(key: &str) -> bool {
    key.ends_with("runtime") || key.ends_with("per_second") || key.ends_with("seconds")
}

impl RecordSink for JsonlFile {
    fn write(&mut self, record: &Record) -> Result<()> {
        let (timings, computed): (Record, Record) = record
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(key, _)| is_timing(key));
        write_line(&mut self.log, &computed)?;
        if !timings.is_empty() {
            let mut line = Record::new();
            line.extend(record.get("step").map(|s| ("step".to_string(), s.clone())));
            line.extend(timings);
            write_line(&mut self.timings, &line)?;
        }
        Ok(())
    }
}

fn write_line((path, out): &mut (PathBuf, BufWriter<File>), record: &Record) -> Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The TensorBoard logger: the scalars of every record into an event file in `dir`, tagged as
/// HF's TensorBoardCallback tags them (`train/loss`, `train/learning_rate`, `train/grad_norm`,
/// `train/samples_per_second`, `eval/accuracy`, …).
pub fn tensorboard_logger(dir: &Path) -> Result<Logger<EventWriter>> {
    Ok(Logger {
        name: "tensorboard",
        sink: EventWriter::create(dir)?,
    })
}

impl RecordSink for EventWriter {
    fn write(&mut self, record: &Record) -> Result<()> {
        let step = record.get("step").and_then(Value::as_u64).unwrap_or(0);
        let scalars: Vec<(String, f64)> = record
            .iter()
            .filter(|(key, _)| key.as_str() != "step")
            .filter_map(|(key, value)| Some((tensorboard_tag(key), value.as_f64()?)))
            .collect();
        self.scalars(step, &scalars)
    }
}

/// `eval_x` → `eval/x`, anything else → `train/x`.
fn tensorboard_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(metric) => format!("eval/{metric}"),
        None => format!("train/{key}"),
    }
}

/// Writes run_history.json when training ends: the stage's params, the device it ran on, one
/// entry per epoch (train loss, the evaluation that ended it, duration, throughput), the last
/// evaluation, totals.
pub struct RunHistory {
    path: PathBuf,
    params: Value,
    device: Value,
}

impl RunHistory {
    pub fn new(path: &Path, params: Value, device: Value) -> Self {
        RunHistory {
            path: path.to_path_buf(),
            params,
            device,
        }
    }
}

impl Callback for RunHistory {
    fn name(&self) -> &'static str {
        "run_history"
    }
    fn on_train_end(&mut self, state: &TrainerState, _: &mut Control) -> Result<()> {
        let evaluations: Vec<&Record> = state
            .log_history
            .iter()
            .filter(|r| r.contains_key("eval_loss"))
            .collect();
        let epochs: Vec<Value> = state
            .epochs
            .iter()
            .map(|summary| {
                let mut entry = serde_json::to_value(summary).unwrap_or_default();
                if let Some(eval) = evaluations
                    .iter()
                    .find(|r| r.get("step").and_then(Value::as_u64) == Some(summary.step as u64))
                {
                    for (key, value) in eval.iter().filter(|(k, _)| k.starts_with("eval_")) {
                        entry[key] = value.clone();
                    }
                }
                entry
            })
            .collect();
        let history = json!({
            "params": self.params,
            "device": self.device,
            "epochs": epochs,
            "final": evaluations.last(),
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "stopped_early": state.global_step < state.max_steps,
            "best_metric": state.best_metric,
            "best_model_checkpoint": state.best_model_checkpoint,
            "train_seconds": state.train_seconds,
            // Trainer's figure: samples over the whole loop's time, evaluations included.
            "train_samples_per_second": state.samples_seen as f64 / state.train_seconds.max(1e-9),
        });
        finetune_core::output::write_json(&self.path, &history)
    }
}
