//! `finetune verify`: recomputes the fingerprints (`fingerprint.json`) of a pipeline's latest
//! outputs, or of one directory, and names every changed, missing or extra file. The checks
//! themselves are `finetune_core::integrity`'s; this module finds what to check and reports.
//!
//! `finetune verify --cache` checks the cache itself: every entry a lock file references,
//! every file rehashed (the digest memo is not trusted), and the manifest compared with the
//! output digest the lock file recorded.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use finetune_core::integrity::{self, FINGERPRINT_FILE, KeySource, SigningKey};

use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::{LockFile, Reference, References};
use crate::cache::store::{Lookup, Store};
use crate::pipeline::Pipeline;
use crate::workspace::Workspace;

/// Where `verify` takes the key from when told (`--key-env`, `--key-file`); otherwise from the
/// source each fingerprint names, when that is the verifier's own (an environment variable or
/// the workspace key; see `integrity::verify`).
pub fn key_override(
    workspace: &Workspace,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
) -> Result<Option<SigningKey>> {
    let source = match (key_env, key_file) {
        (Some(_), Some(_)) => bail!("give --key-env or --key-file, not both"),
        (Some(name), None) => KeySource::Env { name },
        (None, Some(path)) => KeySource::File { path },
        (None, None) => return Ok(None),
    };
    Ok(Some(integrity::load(&source, &workspace.root)?))
}

/// The fingerprinted outputs of `pipeline`'s latest run (`artifacts/runs/<name>/<stage>`).
pub fn pipeline_targets(workspace: &Workspace, pipeline: &Pipeline) -> Result<Vec<PathBuf>> {
    let run_dir = workspace.run_dir(&pipeline.name);
    let mut targets = Vec::new();
    let mut never_ran = Vec::new();
    for stage in &pipeline.stages {
        let dir = run_dir.join(&stage.id);
        if !dir.exists() {
            never_ran.push(stage.id.as_str());
        } else if dir.join(FINGERPRINT_FILE).exists() {
            targets.push(dir);
        }
    }
    if targets.is_empty() {
        if !never_ran.is_empty() {
            bail!(
                "nothing to verify: {} has no output of stage {} yet; run `finetune run {}` first",
                pipeline.file.display(),
                never_ran.join(", "),
                pipeline.file.display()
            );
        }
        bail!(
            "nothing to verify: no stage of {} writes a {FINGERPRINT_FILE}; add a stage that \
             uses `fingerprint` and needs the stages to sign",
            pipeline.file.display()
        );
    }
    Ok(targets)
}

/// Checks each target and prints one verdict per target, then each problem under it.
/// Returns whether all passed.
pub fn verify_all(workspace: &Workspace, targets: &[PathBuf], key: Option<&SigningKey>) -> bool {
    let mut all_passed = true;
    for dir in targets {
        let shown = workspace.display(dir);
        match integrity::verify(dir, &workspace.root, key) {
            Ok(result) if result.passed() => {
                println!(
                    "ok      {shown}: {} files, key id {}",
                    result.files, result.key_id
                );
            }
            Ok(result) => {
                all_passed = false;
                println!(
                    "FAILED  {shown}: {} of {} files differ from the fingerprint (key id {})",
                    result.problems.len(),
                    result.files,
                    result.key_id
                );
                for problem in &result.problems {
                    println!("        {problem}");
                }
            }
            Err(err) => {
                all_passed = false;
                println!("FAILED  {shown}: {err:#}");
            }
        }
    }
    all_passed
}

/// `verify --cache`: rehashes every entry the workspace's lock files (and those of
/// `pipelines`) reference and prints one verdict each. A damaged entry is moved aside, so the
/// next run computes it again. Call with the workspace lock held. Returns whether all passed.
pub fn verify_cache(workspace: &Workspace, pipelines: &[PathBuf]) -> Result<bool> {
    let lock_files = LockFile::discover(&workspace.root, pipelines)?;
    if lock_files.is_empty() {
        bail!(
            "nothing to verify: no lock file in pipelines/ or beside the pipelines given; \
             run a pipeline first"
        );
    }
    let references = References::of(lock_files, |path| workspace.display(path))
        .context("verify --cache reads the lock files")?;
    let store = Store::new(&workspace.artifacts());
    let mut all_passed = true;
    for (key, reference) in &references.entries {
        all_passed &= verify_entry(workspace, &store, key, reference)?;
    }
    Ok(all_passed)
}

fn verify_entry(
    workspace: &Workspace,
    store: &Store,
    key: &str,
    record: &Reference,
) -> Result<bool> {
    let users = record.users.join(", ");
    let short = crate::report::short(key);
    match store.lookup(key, &mut DigestMemo::default())? {
        Lookup::Hit(entry) => {
            if let Some(other) = record.digests.iter().find(|d| **d != entry.digest) {
                println!(
                    "FAILED  {short} ({users}): its manifest (digest {}) is not the output the \
                     lock file recorded ({}): the entry was replaced since, or its manifest \
                     rewritten; `finetune run` records what is there now",
                    crate::report::short(&entry.digest),
                    crate::report::short(other)
                );
                return Ok(false);
            }
            println!(
                "ok      {short} ({users}): {} files, {} bytes rehashed",
                entry.manifest.files.len(),
                entry.manifest.bytes()
            );
            Ok(true)
        }
        Lookup::Missing => {
            println!(
                "missing {short} ({users}): not in the cache (removed by hand, or never run \
                 here); `finetune run` computes it"
            );
            Ok(true)
        }
        Lookup::Damaged(problem) => {
            let moved = store.set_aside(key)?;
            println!(
                "FAILED  {short} ({users}): {problem}; moved to {}, so the next `finetune run` \
                 computes it again",
                workspace.display(&moved)
            );
            Ok(false)
        }
    }
}
