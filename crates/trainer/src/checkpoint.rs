//! Checkpoints, laid out as Trainer lays them out: `checkpoint-<step>/` with the model
//! (config.json + model.safetensors), the optimizer state (optimizer.bpk, burn's format, and
//! word_embeddings_adamw.safetensors when the word embeddings train by rows), the schedule
//! (scheduler.json), the RNG state (rng_state.json) and trainer_state.json. A checkpoint is
//! written under a temporary name and renamed when complete, so a crash never leaves one that
//! a resume would trust. With a signing key, each checkpoint also holds a `fingerprint.json`
//! (HMAC-SHA256 over its files), checked before a resume trusts it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use burn::module::Module;
use burn::tensor::Device;
use finetune_core::integrity::{self, SigningKey};
use finetune_core::output::{sync_dir, sync_tree, write_json};
use serde_json::json;

use crate::state::TrainerState;
use finetune_model::{Classifier, hf};
use finetune_optim::Schedule;

use crate::update::Optimizer;

const PREFIX: &str = "checkpoint-";
const SCHEDULER: &str = "scheduler.json";
const RNG_STATE: &str = "rng_state.json";
const TRAINER_STATE: &str = "trainer_state.json";

/// The directory that holds a run's checkpoints.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
    signing: Option<Arc<SigningKey>>,
}

/// A checkpoint read back: the model on the training device, the optimizer with its state,
/// the trainer's state.
pub struct Restored {
    pub name: String,
    pub model: Classifier,
    pub optimizer: Optimizer,
    pub state: TrainerState,
}

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Checkpoints {
            dir: dir.into(),
            signing: None,
        }
    }

    /// Signs every checkpoint saved from now on, and checks a checkpoint before a resume.
    pub fn signed_with(mut self, key: Option<Arc<SigningKey>>) -> Self {
        self.signing = key;
        self
    }

    /// Refuses a checkpoint whose files differ from its fingerprint (when signing is on).
    pub fn check(&self, dir: &Path) -> Result<()> {
        let Some(key) = &self.signing else {
            return Ok(());
        };
        let result = integrity::verify(dir, &self.dir, Some(key))
            .with_context(|| format!("cannot check {} against its fingerprint", dir.display()))?;
        if result.passed() {
            return Ok(());
        }
        let problems: Vec<String> = result.problems.iter().map(ToString::to_string).collect();
        Err(anyhow!(
            "{} does not match its fingerprint, so it is not resumed from: {}; delete it to \
             resume from an earlier one, or set `resume: false`",
            dir.display(),
            problems.join("; ")
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name of the checkpoint made after update `step`.
    pub fn name(step: usize) -> String {
        format!("{PREFIX}{step}")
    }

    /// Writes `checkpoint-<step>`; returns its directory. The files are flushed before the
    /// rename that publishes them; a failed save (a full disk, say) removes what it wrote and
    /// leaves every earlier checkpoint as it was.
    pub fn save(
        &self,
        model: &Classifier,
        optimizer: &Optimizer,
        schedule: &Schedule,
        seed: u64,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let name = Self::name(state.global_step);
        let target = self.dir.join(&name);
        let partial = self.dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        let written =
            write_checkpoint(&partial, model, optimizer, schedule, seed, state).and_then(|()| {
                if let Some(key) = &self.signing {
                    let context = json!({ "checkpoint": name, "step": state.global_step });
                    integrity::sign_dir(&partial, context, key)?;
                }
                let _ = std::fs::remove_dir_all(&target);
                std::fs::rename(&partial, &target)
                    .with_context(|| format!("cannot rename it to {}", target.display()))?;
                sync_dir(&self.dir)
            });
        if let Err(err) = written {
            let _ = std::fs::remove_dir_all(&partial);
            let kept = match self.latest() {
                Ok(Some(path)) => {
                    format!("the last good checkpoint, {}, is intact", path.display())
                }
                _ => "there is no earlier checkpoint".to_string(),
            };
            return Err(err.context(format!(
                "cannot save {name} in {} ({kept})",
                self.dir.display()
            )));
        }
        Ok(target)
    }

    /// Complete checkpoints, oldest first, as (step, directory).
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let step = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(step) = step
                && path.join(TRAINER_STATE).is_file()
            {
                found.push((step, path));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, path)| path))
    }

    /// Deletes the oldest checkpoints beyond `limit`, never the newest (a resume starts there)
    /// nor `keep` (the best one), as Trainer does with `save_total_limit`.
    pub fn rotate(&self, limit: usize, keep: Option<&str>) -> Result<()> {
        let mut all = self.list()?;
        all.pop(); // the newest
        let mut excess = (all.len() + 1).saturating_sub(limit.max(1));
        for (_, path) in all {
            if excess == 0 {
                break;
            }
            if keep.is_some_and(|k| path.file_name().is_some_and(|n| n == k)) {
                continue;
            }
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            excess -= 1;
        }
        Ok(())
    }

    /// Empties the directory (a run that must not resume).
    pub fn clear(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Reads checkpoint `dir` onto `device`; `optimizer` is a fresh optimizer for the model, built
/// as the run builds it, into which the saved state is loaded.
pub fn restore(
    dir: &Path,
    labels: &[String],
    device: &Device,
    fresh_optimizer: impl FnOnce(&Classifier) -> Result<Optimizer>,
) -> Result<Restored> {
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(dir.join(TRAINER_STATE))
            .with_context(|| format!("cannot read {}", dir.join(TRAINER_STATE).display()))?,
    )
    .with_context(|| {
        format!(
            "{} is not a trainer state",
            dir.join(TRAINER_STATE).display()
        )
    })?;
    let (model, _) = hf::load(dir, Some(labels), 0, device)?;
    let optimizer = fresh_optimizer(&model)?.load(dir, &model)?;
    Ok(Restored {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model,
        optimizer,
        state,
    })
}

fn write_checkpoint(
    dir: &Path,
    model: &Classifier,
    optimizer: &Optimizer,
    schedule: &Schedule,
    seed: u64,
    state: &TrainerState,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    hf::save(&model.valid(), dir)?;
    optimizer.save(dir)?;
    write_json(
        &dir.join(SCHEDULER),
        &json!({ "schedule": schedule, "last_step": state.global_step }),
    )?;
    write_json(
        &dir.join(RNG_STATE),
        &json!({
            "seed": seed,
            "shuffle": "SplitMix64 seeded with mix(seed, epoch), one shuffle per epoch",
            "dropout": "device RNG seeded with mix(seed, step) before every update",
            "next_epoch": state.epoch_index(),
            "next_step": state.global_step,
        }),
    )?;
    write_json(&dir.join(TRAINER_STATE), state)?;
    sync_tree(dir)
}
