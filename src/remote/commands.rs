//! The remote's commands as the user sees them: `push`, `pull` and `gc --remote`, each
//! choosing its remote, taking the workspace lock, and printing what it did.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use finetune_remote::Access;

use super::{RemoteGcOptions, config, count, gc_remote, human_bytes, open, pull, push};
use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::{LockFile, References};
use crate::cache::store::Store;
use crate::report::short;
use crate::workspace::Workspace;

/// Which remote, and how many transfers at once.
pub struct Target<'a> {
    pub remote: Option<&'a str>,
    pub jobs: Option<usize>,
}

fn wait_notice() {
    eprintln!("waiting for another finetune to finish in this workspace...");
}

/// The entries the lock files of `pipelines` reference, or of every lock file in
/// `pipelines/` when none are given.
fn references(workspace: &Workspace, pipelines: &[PathBuf]) -> Result<References> {
    let paths = if pipelines.is_empty() {
        LockFile::discover(&workspace.root, &[])?
    } else {
        pipelines
            .iter()
            .map(|p| workspace.root.join(LockFile::path_for(p)))
            .collect()
    };
    let paths = paths.into_iter().filter(|p| p.exists()).collect();
    References::of(paths, |path| workspace.display(path))
}

/// `finetune push [PIPELINE...] [--all]`.
pub fn push_command(
    workspace: &Workspace,
    pipelines: &[PathBuf],
    all: bool,
    target: Target,
) -> Result<ExitCode> {
    let chosen = config::require(workspace, target.remote)?;
    let remote = open(workspace, &chosen, Access::Write)?
        .with_jobs(target.jobs.unwrap_or(finetune_remote::DEFAULT_JOBS));
    let _lock = workspace.lock(wait_notice)?;
    let store = Store::new(&workspace.artifacts());
    let keys: Vec<String> = if all {
        store.keys()?
    } else {
        references(workspace, pipelines)?
            .entries
            .into_keys()
            .collect()
    };
    let mut memo = DigestMemo::load(&workspace.memo_file());
    let report = push(&store, &mut memo, &remote, &keys)?;
    memo.save()?;
    for key in &report.missing {
        println!(
            "not here  {}: not in the local cache; run its pipeline first",
            short(key)
        );
    }
    for (key, why) in &report.damaged {
        println!(
            "damaged   {}: {why}; not pushed (`finetune verify --cache` sets it aside)",
            short(key)
        );
    }
    for key in &report.differs {
        println!(
            "kept      {}: the remote holds other content under this key (a stage whose output \
             varies between runs); the first one pushed stays",
            short(key)
        );
    }
    println!(
        "pushed {} to {} ({}, {} uploaded; {} there already); {} there already",
        count(report.uploaded.len(), "entry"),
        remote.url(),
        count(report.files_uploaded, "file"),
        human_bytes(report.bytes),
        count(report.files_present, "file"),
        count(report.present, "entry")
    );
    Ok(if report.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `finetune pull [PIPELINE...]`.
pub fn pull_command(
    workspace: &Workspace,
    pipelines: &[PathBuf],
    target: Target,
) -> Result<ExitCode> {
    let chosen = config::require(workspace, target.remote)?;
    let remote = open(workspace, &chosen, Access::Read)?
        .with_jobs(target.jobs.unwrap_or(finetune_remote::DEFAULT_JOBS));
    let _lock = workspace.lock(wait_notice)?;
    let references = references(workspace, pipelines)?;
    if references.entries.is_empty() {
        println!(
            "nothing to pull: no lock file names an entry (run the pipeline once, or commit its \
             lock file); `finetune run --pull` fetches stage by stage as it computes the keys"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::new(&workspace.artifacts());
    let mut memo = DigestMemo::load(&workspace.memo_file());
    let report = pull(workspace, &store, &mut memo, &remote, &references)?;
    memo.save()?;
    for (key, why) in &report.refused {
        println!("refused   {}: {why}", short(key));
    }
    for (key, caveat) in &report.caveats {
        println!("note      {}: {caveat}", short(key));
    }
    for key in &report.absent {
        println!("absent    {}: the remote does not have it", short(key));
    }
    println!(
        "pulled {} from {}; {} here already, {} not on the remote, {} refused \
         (`finetune run` links the outputs)",
        count(report.pulled.len(), "entry"),
        remote.url(),
        report.present,
        report.absent.len(),
        report.refused.len()
    );
    Ok(if report.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `finetune gc --remote`.
pub fn gc_remote_command(
    workspace: &Workspace,
    remote: Option<&str>,
    options: &RemoteGcOptions,
) -> Result<ExitCode> {
    let chosen = config::require(workspace, remote)?;
    let remote = open(workspace, &chosen, Access::Read)?;
    let report = gc_remote(workspace, &remote, options)?;
    let verb = if options.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for key in &report.removed_entries {
        println!("{verb} entry {key}");
    }
    println!(
        "{verb} {} entries and {} files ({}) from {}; kept {} entries referenced by {} lock files{}",
        report.removed_entries.len(),
        report.removed_blobs,
        human_bytes(report.bytes_freed),
        remote.url(),
        report.kept,
        report.lock_files,
        if report.young_blobs > 0 {
            format!(
                "; kept {} unreferenced files younger than {} s (a push may be in flight)",
                report.young_blobs, options.min_age_s
            )
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
