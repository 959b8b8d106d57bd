//! The train stage's progress through its reporter, as a trainer callback.

use std::time::Instant;

use anyhow::Result;
use finetune_core::Reporter;
use finetune_trainer::{Callback, Control, Record, TrainerState};
use serde_json::Value;

/// Progress through the stage's reporter: a bar on a terminal (step of all steps), a status
/// line per log record (epoch, step, loss, lr, samples/s, ETA) and one per evaluation.
pub struct Progress<'a> {
    reporter: &'a dyn Reporter,
    started: Option<(Instant, usize)>,
}

impl<'a> Progress<'a> {
    pub fn new(reporter: &'a dyn Reporter) -> Self {
        Progress {
            reporter,
            started: None,
        }
    }

    fn eta(&self, state: &TrainerState) -> String {
        let Some((since, first_step)) = self.started else {
            return "?".into();
        };
        let done = state.global_step.saturating_sub(first_step);
        if done == 0 {
            return "?".into();
        }
        let per_step = since.elapsed().as_secs_f64() / done as f64;
        let left = (state.max_steps - state.global_step) as f64 * per_step;
        format!("{}m{:02}s", (left / 60.0) as u64, (left % 60.0) as u64)
    }
}

impl Callback for Progress<'_> {
    fn name(&self) -> &'static str {
        "progress"
    }
    fn on_train_begin(&mut self, state: &TrainerState, _: &mut Control) -> Result<()> {
        self.started = Some((Instant::now(), state.global_step));
        self.reporter
            .progress(state.global_step as u64, state.max_steps as u64);
        Ok(())
    }
    fn on_step_end(&mut self, state: &TrainerState, _: &mut Control) -> Result<()> {
        self.reporter
            .progress(state.global_step as u64, state.max_steps as u64);
        Ok(())
    }
    fn on_log(&mut self, state: &TrainerState, record: &Record, _: &mut Control) -> Result<()> {
        if let Some(event) = record.get("event").and_then(Value::as_str) {
            self.reporter.message(&format!(
                "step {}: {event}: {}; now micro-batches of {} accumulated {} times per update",
                state.global_step + 1,
                record.get("reason").and_then(Value::as_str).unwrap_or(""),
                record["micro_batch_size"],
                record["grad_accum"]
            ));
            return Ok(());
        }
        let Some(loss) = record.get("loss").and_then(Value::as_f64) else {
            return Ok(());
        };
        let number = |key: &str| record.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
        self.reporter.message(&format!(
            "epoch {}/{} step {}/{} loss {loss:.4} lr {:.2e} {:.1} samples/s ETA {}",
            (state.epoch.ceil() as usize).max(1),
            state.num_epochs(),
            state.global_step,
            state.max_steps,
            number("learning_rate"),
            number("samples_per_second"),
            self.eta(state)
        ));
        Ok(())
    }
    fn on_evaluate(
        &mut self,
        state: &TrainerState,
        metrics: &Record,
        _: &mut Control,
    ) -> Result<()> {
        // The headline metrics of whichever task was evaluated: the first two it reports.
        let shown: Vec<String> = [
            ("accuracy", "accuracy"),
            ("f1_macro", "macro F1"),
            ("f1_micro", "micro F1"),
            ("rmse", "RMSE"),
            ("r2", "R²"),
        ]
        .iter()
        .filter_map(|(key, name)| {
            let value = metrics.get(&format!("eval_{key}"))?.as_f64()?;
            Some(format!(", {name} {value:.4}"))
        })
        .take(2)
        .collect();
        let loss = metrics
            .get("eval_loss")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        self.reporter.message(&format!(
            "step {}: eval loss {loss:.4}{}",
            state.global_step,
            shown.concat()
        ));
        Ok(())
    }
}
