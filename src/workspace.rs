//! The workspace: the directory a pipeline's relative paths start from, and its `artifacts/`.
//! One `finetune` at a time may change a workspace; a second waits on a file lock.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct Workspace {
    pub root: PathBuf,
}

/// Held while a run or a `gc` changes the workspace; released on drop or when the process dies.
pub struct WorkspaceLock {
    _file: File,
}

impl Workspace {
    pub fn new(root: &Path) -> Result<Workspace> {
        let root = std::path::absolute(root)
            .with_context(|| format!("cannot resolve {}", root.display()))?;
        Ok(Workspace { root })
    }

    /// `path` as messages show it: relative to the workspace when inside it.
    pub fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    pub fn memo_file(&self) -> PathBuf {
        self.artifacts().join("digests.json")
    }

    /// Where `finetune run` links each stage's latest output: `artifacts/runs/<pipeline>/<stage>`.
    pub fn run_dir(&self, pipeline: &str) -> PathBuf {
        self.artifacts().join("runs").join(pipeline)
    }

    /// Takes the workspace lock, telling `wait_notice` once if another process holds it.
    pub fn lock(&self, wait_notice: impl FnOnce()) -> Result<WorkspaceLock> {
        let artifacts = self.artifacts();
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("cannot create {}", artifacts.display()))?;
        let path = artifacts.join(".lock");
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                wait_notice();
                file.lock()
                    .with_context(|| format!("cannot lock {}", path.display()))?;
            }
            Err(TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(WorkspaceLock { _file: file })
    }
}
