//! `finetune gc`: removes cache entries that no lock file references, whatever else lies in
//! the cache directory, the entries earlier runs set aside as damaged, and the checkpoints
//! interrupted runs left in `artifacts/scratch/` to resume from.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::LockFile;
use crate::cache::store::Store;
use crate::workspace::Workspace;

#[derive(Debug, Default)]
pub struct GcReport {
    pub kept: usize,
    pub removed: Vec<String>,
    /// Files in the cache directory that are no entry.
    pub strays: Vec<String>,
    /// Entries set aside as damaged (`artifacts/damaged/`), removed.
    pub damaged: usize,
    /// Interrupted runs' scratch directories (`artifacts/scratch/`), removed.
    pub scratch: usize,
    pub bytes_freed: u64,
    pub lock_files: Vec<PathBuf>,
}

/// Lock files are looked for beside the pipelines in `pipelines/` and beside any extra
/// pipeline files given. Call with the workspace lock held.
pub fn gc(workspace: &Workspace, extra_pipelines: &[PathBuf], dry_run: bool) -> Result<GcReport> {
    let mut referenced = BTreeSet::new();
    let mut report = GcReport::default();
    for path in LockFile::discover(&workspace.root, extra_pipelines)? {
        let lock =
            LockFile::load(&path, "").with_context(|| format!("gc reads {}", path.display()))?;
        referenced.extend(lock.stages.into_values().map(|e| e.key));
        report.lock_files.push(path);
    }
    let store = Store::new(&workspace.artifacts());
    for key in store.keys()? {
        if referenced.contains(&key) {
            report.kept += 1;
        } else {
            report.bytes_freed += remove(&store, &key, dry_run)?;
            report.removed.push(key);
        }
    }
    for stray in store.strays()? {
        report.bytes_freed += remove(&store, &stray, dry_run)?;
        report.strays.push(stray);
    }
    if !dry_run {
        store.clear_tmp()?;
        report.damaged = store.clear_damaged()?;
        report.scratch = store.clear_scratch()?;
        let mut memo = DigestMemo::load(&workspace.memo_file());
        memo.forget_missing();
        memo.save()?;
    }
    Ok(report)
}

fn remove(store: &Store, name: &str, dry_run: bool) -> Result<u64> {
    if dry_run {
        Ok(store.size_of(name))
    } else {
        store.remove(name)
    }
}
