//! `finetune gc --remote`: deletes the remote entries no lock file references (in the work
//! tree, and at the git revisions given or at every commit), then the blobs no remaining
//! entry lists. A blob younger than `min_age_s` is kept even so: a push in flight uploads its
//! blobs before its manifest, and must not find them gone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use finetune_remote::Remote;

use crate::cache::lockfile::{LockFile, References};
use crate::cache::store::parse_foreign_manifest;
use crate::workspace::Workspace;

#[derive(Debug, Clone, Default)]
pub struct RemoteGcOptions {
    /// More pipelines whose lock files (in the work tree) keep their entries.
    pub pipelines: Vec<PathBuf>,
    /// Git revisions whose committed lock files keep their entries too.
    pub revisions: Vec<String>,
    /// Every commit's lock files keep their entries (`git rev-list --all`).
    pub all_commits: bool,
    pub dry_run: bool,
    pub min_age_s: i64,
}

#[derive(Debug, Default)]
pub struct RemoteGcReport {
    pub kept: usize,
    pub removed_entries: Vec<String>,
    pub removed_blobs: usize,
    /// Unreferenced blobs kept for being younger than `min_age_s`.
    pub young_blobs: usize,
    pub bytes_freed: u64,
    /// Lock files read: work tree ones, and `REV:path` ones.
    pub lock_files: usize,
}

pub fn gc_remote(
    workspace: &Workspace,
    remote: &Remote,
    options: &RemoteGcOptions,
) -> Result<RemoteGcReport> {
    let references = referenced(workspace, options)?;
    let mut report = RemoteGcReport {
        lock_files: references.lock_files.len(),
        ..RemoteGcReport::default()
    };
    let mut kept_blobs = BTreeSet::new();
    for entry in remote.entries()? {
        if references.entries.contains_key(&entry.name) {
            report.kept += 1;
            let manifest = remote.entry(&entry.name)?.unwrap_or_default();
            // An unreadable manifest keeps nothing: its entry can never be pulled anyway.
            if let Ok(manifest) = parse_foreign_manifest(&manifest) {
                kept_blobs.extend(manifest.files.into_iter().map(|f| f.sha256));
            }
        } else {
            report.bytes_freed += entry.size;
            if !options.dry_run {
                remote.delete_entry(&entry.name)?;
            }
            report.removed_entries.push(entry.name);
        }
    }
    let now = unix_now();
    for blob in remote.blobs()? {
        if kept_blobs.contains(&blob.name) {
            continue;
        }
        if now - blob.modified_unix_s < options.min_age_s {
            report.young_blobs += 1;
            continue;
        }
        report.bytes_freed += blob.size;
        report.removed_blobs += 1;
        if !options.dry_run {
            remote.delete_blob(&blob.name)?;
        }
    }
    Ok(report)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every entry the work tree's lock files and those at the chosen revisions reference.
fn referenced(workspace: &Workspace, options: &RemoteGcOptions) -> Result<References> {
    let local = LockFile::discover(&workspace.root, &options.pipelines)?;
    let mut references = References::of(local, |path| workspace.display(path))?;
    let mut revisions = options.revisions.clone();
    if options.all_commits {
        revisions.extend(git_lines(&workspace.root, &["rev-list", "--all"])?);
    }
    for rev in &revisions {
        let tree = git_lines(&workspace.root, &["ls-tree", "-r", "--name-only", rev])?;
        for path in tree.iter().filter(|p| p.ends_with(".lock")) {
            let spec = format!("{rev}:{path}");
            let text = git_output(&workspace.root, &["show", &spec])?;
            let lock: LockFile = serde_json::from_slice(&text)
                .with_context(|| format!("{spec} is not a valid lock file"))?;
            references.add(&spec, lock);
            references.lock_files.push(PathBuf::from(spec));
        }
    }
    Ok(references)
}

fn git_lines(root: &Path, args: &[&str]) -> Result<Vec<String>> {
    let output = git_output(root, args)?;
    Ok(String::from_utf8_lossy(&output)
        .lines()
        .map(str::to_string)
        .collect())
}

fn git_output(root: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .context("cannot run git (needed for --rev and --all-commits)")?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
