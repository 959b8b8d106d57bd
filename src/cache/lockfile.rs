//! The lock file beside a pipeline (`reviews.yaml` -> `reviews.lock`): per stage, the key, the
//! inputs that made it and the output digest, in a stable order for review in git.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{canonical_json, digest::sha256_bytes, write_atomic};

pub const SCHEMA: u32 = 1;

/// Everything a stage's cache key is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub uses: String,
    pub version: u32,
    pub params: Value,
    /// Upstream stage id -> the digest of its output (its manifest).
    pub needs: BTreeMap<String, String>,
    /// Workspace path as declared by the stage -> content digest.
    pub reads: BTreeMap<String, String>,
    /// What else the job says its output depends on (`Job::key_extra`), e.g. a key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

impl KeyInputs {
    /// SHA-256 over the canonical JSON of the plugin, its version, its params, the upstream
    /// digests (in the order of `needs`, not by name: renaming a stage changes nothing) and
    /// the digests of the files it reads.
    pub fn key(&self, needs_order: &[String]) -> String {
        let upstream: Vec<&String> = needs_order
            .iter()
            .filter_map(|id| self.needs.get(id))
            .collect();
        let mut material = json!({
            "uses": self.uses,
            "version": self.version,
            "params": self.params,
            "needs": upstream,
            "reads": self.reads,
        });
        // Only when present, so that the keys of every other stage stay as they were.
        if let Some(extra) = &self.extra {
            material["extra"] = extra.clone();
        }
        sha256_bytes(canonical_json(&material).as_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub digest: String,
    pub files: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub key: String,
    #[serde(flatten)]
    pub inputs: KeyInputs,
    pub output: OutputRecord,
    /// How long the run that produced this output took.
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub schema: u32,
    pub pipeline: String,
    /// The `--set` overrides of the run that wrote it, as given (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<String>,
    pub stages: BTreeMap<String, LockEntry>,
}

impl LockFile {
    pub fn path_for(pipeline_file: &Path) -> PathBuf {
        pipeline_file.with_extension("lock")
    }

    /// The lock files of a workspace: those beside the pipelines in `pipelines/`, and those of
    /// any other pipeline files named, if they exist; sorted.
    pub fn discover(root: &Path, pipelines: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut found: std::collections::BTreeSet<PathBuf> = pipelines
            .iter()
            .map(|p| root.join(LockFile::path_for(p)))
            .filter(|p| p.exists())
            .collect();
        let dir = root.join("pipelines");
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry
                        .with_context(|| format!("cannot list {}", dir.display()))?
                        .path();
                    if path.extension().is_some_and(|e| e == "lock") && path.is_file() {
                        found.insert(path);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
        }
        Ok(found.into_iter().collect())
    }

    /// The lock file, or an empty one if none exists yet.
    pub fn load(path: &Path, pipeline: &str) -> Result<LockFile> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a valid lock file; delete it to start afresh",
                    path.display()
                )
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(LockFile {
                schema: SCHEMA,
                pipeline: pipeline.to_string(),
                set: Vec::new(),
                stages: BTreeMap::new(),
            }),
            Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the lock file only if its bytes would change (so a no-op run leaves it alone).
    pub fn save(&self, path: &Path) -> Result<bool> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        if std::fs::read(path).ok().as_deref() == Some(text.as_bytes()) {
            return Ok(false);
        }
        write_atomic(path, text.as_bytes())?;
        Ok(true)
    }
}

/// Every cache entry some lock files reference, by key: who references it and the output
/// digests they recorded for it.
#[derive(Debug, Default)]
pub struct References {
    pub lock_files: Vec<PathBuf>,
    pub entries: BTreeMap<String, Reference>,
}

#[derive(Debug, Default)]
pub struct Reference {
    /// `reviews.lock: train`, for each lock file and stage that reference it.
    pub users: Vec<String>,
    /// The output digests recorded for it.
    pub digests: Vec<String>,
}

impl References {
    /// The entries the lock files at `paths` reference; `shown` names a lock file in messages.
    pub fn of(paths: Vec<PathBuf>, shown: impl Fn(&Path) -> String) -> Result<References> {
        let mut references = References::default();
        for path in &paths {
            let lock = LockFile::load(path, "")?;
            references.add(&shown(path), lock);
        }
        references.lock_files = paths;
        Ok(references)
    }

    /// Adds the entries `lock` references, as used by `name`.
    pub fn add(&mut self, name: &str, lock: LockFile) {
        for (stage, entry) in lock.stages {
            let reference = self.entries.entry(entry.key).or_default();
            reference.users.push(format!("{name}: {stage}"));
            reference.digests.push(entry.output.digest);
        }
    }

    /// The one output digest the lock files agree on for `key`, if they record one.
    pub fn digest_of(&self, key: &str) -> Option<&str> {
        let digests = &self.entries.get(key)?.digests;
        let first = digests.first()?;
        digests.iter().all(|d| d == first).then_some(first.as_str())
    }
}
