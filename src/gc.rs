//! `finetune gc`: removes cache entries that no lock file references.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cache::lockfile::LockFile;
use crate::cache::store::Store;
use crate::workspace::Workspace;

#[derive(Debug, Default)]
pub struct GcReport {
    pub kept: usize,
    pub removed: Vec<String>,
    pub bytes_freed: u64,
    pub lock_files: Vec<PathBuf>,
}

/// Lock files are looked for beside the pipelines in `pipelines/` and beside any extra
/// pipeline files given. Call with the workspace lock held.
pub fn gc(workspace: &Workspace, extra_pipelines: &[PathBuf], dry_run: bool) -> Result<GcReport> {
    let mut lock_files: BTreeSet<PathBuf> = extra_pipelines
        .iter()
        .map(|p| workspace.root.join(LockFile::path_for(p)))
        .collect();
    if let Ok(entries) = std::fs::read_dir(workspace.root.join("pipelines")) {
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "lock") {
                lock_files.insert(path);
            }
        }
    }
    let mut referenced = BTreeSet::new();
    let mut report = GcReport::default();
    for path in &lock_files {
        if !path.exists() {
            continue;
        }
        let lock =
            LockFile::load(path, "").with_context(|| format!("gc reads {}", path.display()))?;
        referenced.extend(lock.stages.into_values().map(|e| e.key));
        report.lock_files.push(path.clone());
    }
    let store = Store::new(&workspace.artifacts());
    if !dry_run {
        store.clear_tmp()?;
    }
    for key in store.keys()? {
        if referenced.contains(&key) {
            report.kept += 1;
            continue;
        }
        if dry_run {
            report.bytes_freed += store.lookup(&key)?.map_or(0, |e| e.manifest.bytes());
        } else {
            report.bytes_freed += store.remove(&key)?;
        }
        report.removed.push(key);
    }
    Ok(report)
}
