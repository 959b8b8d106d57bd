//! Runs a plan: every selected stage after the stages it needs, independent stages in parallel,
//! each either found in the cache by its key or run into a staging directory and published.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use finetune_core::{RunContext, Upstream};
use finetune_remote::Remote;

use crate::UsageError;
use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::{KeyInputs, LockEntry, LockFile, OutputRecord};
use crate::cache::store::{Entry, Lookup, Store, remember};
use crate::explain::why_stale;
use crate::plan::Plan;
use crate::remote::Pulled;
use crate::report::{Event, Sink, StageReporter};
use crate::workspace::Workspace;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stage ids to bring up to date (with what they need); empty means all.
    pub targets: Vec<String>,
    /// Stage ids to rerun even if cached, with everything downstream of them.
    pub force: Vec<String>,
    pub dry_run: bool,
    pub jobs: usize,
    /// Fetch a stage missing from the local cache from this remote, when it has it, rather
    /// than run it (`run --pull`).
    pub pull: Option<Arc<Remote>>,
    /// Run only this share of the targets (`--shard K/N`), for a sweep split across CI jobs.
    pub shard: Option<Shard>,
}

/// `K/N`: the K-th of N shares of a run's targets (1-based), taken by stage id in order, so
/// that every job computes the same split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(text: &str) -> Result<Shard, String> {
        let bad = || format!("`{text}` is not a shard: write K/N with 1 <= K <= N, e.g. 2/4");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// This shard's part of `stages`, dealt out round-robin in the order of their ids.
    fn take(&self, plan: &Plan, mut stages: Vec<usize>) -> Vec<usize> {
        stages.sort_by(|&a, &b| plan.pipeline.stages[a].id.cmp(&plan.pipeline.stages[b].id));
        stages.dedup();
        stages
            .into_iter()
            .enumerate()
            .filter(|(position, _)| position % self.count == self.index - 1)
            .map(|(_, stage)| stage)
            .collect()
    }
}

/// The stages a run brings up to date, with what they need: the targets (all stages when
/// none), or this shard's part of them (of the final stages when none are named).
fn selection(plan: &Plan, options: &RunOptions) -> Result<BTreeSet<usize>> {
    let all = || (0..plan.stages.len()).collect::<Vec<usize>>();
    let targets = if options.targets.is_empty() {
        match options.shard {
            None => return Ok(all().into_iter().collect()),
            Some(_) => all()
                .into_iter()
                .filter(|&i| plan.dag.with_descendants(&[i]).len() == 1)
                .collect(),
        }
    } else {
        indices(plan, &options.targets, "target")?
    };
    let targets = match options.shard {
        Some(shard) => shard.take(plan, targets),
        None => targets,
    };
    Ok(plan.dag.with_ancestors(&targets))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub ran: usize,
    pub cached: usize,
    pub pulled: usize,
    pub failed: usize,
    pub skipped: usize,
}

enum State {
    Pending,
    Running,
    Done(Entry),
    /// Dry run: would run, so its output (and everything downstream) is unknown.
    WouldRun,
    Failed,
    Skipped,
}

struct Finished {
    index: usize,
    key: String,
    inputs: KeyInputs,
    result: Result<Entry>,
    duration_s: f64,
}

/// Resolves stage ids given on the command line; an unknown id is a usage error.
/// The stages `ids` name: an id, a matrix stage's declared id (every combination), or a
/// prefix ending in `*` (`train@lr=1e-5*`).
fn indices(plan: &Plan, ids: &[String], what: &str) -> Result<Vec<usize>> {
    let stages = &plan.pipeline.stages;
    let mut found = Vec::new();
    for id in ids {
        let named: Vec<usize> = match (plan.index_of(id), id.strip_suffix('*')) {
            (Some(index), _) => vec![index],
            (None, Some(prefix)) => (0..stages.len())
                .filter(|&i| stages[i].id.starts_with(prefix))
                .collect(),
            (None, None) => (0..stages.len())
                .filter(|&i| stages[i].matrix_of.as_deref() == Some(id.as_str()))
                .collect(),
        };
        if named.is_empty() {
            let known: Vec<&str> = stages.iter().map(|s| s.id.as_str()).collect();
            return Err(anyhow!(UsageError(format!(
                "unknown {what} stage `{id}`; the stages are: {}",
                known.join(", ")
            ))));
        }
        found.extend(named);
    }
    Ok(found)
}

pub fn run(
    plan: &Plan,
    workspace: &Workspace,
    options: &RunOptions,
    sink: &dyn Sink,
) -> Result<RunSummary> {
    let started = Instant::now();
    let selected = selection(plan, options)?;
    let forced = plan
        .dag
        .with_descendants(&indices(plan, &options.force, "--force")?);
    let store = Store::new(&workspace.artifacts());
    if !options.dry_run {
        store.clear_tmp()?;
    }
    let lock_path = workspace.root.join(LockFile::path_for(&plan.pipeline.file));
    let mut lock = LockFile::load(&lock_path, &plan.pipeline.name)?;
    let mut memo = DigestMemo::load(&workspace.memo_file());
    let mut states: Vec<State> = (0..plan.stages.len()).map(|_| State::Pending).collect();
    let mut summary = RunSummary::default();
    let jobs = options.jobs.max(1);
    let mut pull_from = options.pull.clone();

    std::thread::scope(|scope| -> Result<()> {
        let (done_tx, done_rx) = mpsc::channel::<Finished>();
        let mut running = 0usize;
        let mut stop_dispatch = false;
        loop {
            stop_dispatch |= finetune_core::interrupt::requested();
            for &index in plan.dag.order() {
                if stop_dispatch || running >= jobs {
                    break;
                }
                if !selected.contains(&index) || !matches!(states[index], State::Pending) {
                    continue;
                }
                let decl = &plan.pipeline.stages[index];
                let needs = decl
                    .needs
                    .iter()
                    .map(|n| plan.index_of(n).unwrap_or(usize::MAX));
                let mut upstream_digests = BTreeMap::new();
                let mut ready = true;
                let mut upstream_unknown = false;
                for (need_id, need) in decl.needs.iter().zip(needs) {
                    match states.get(need) {
                        Some(State::Done(entry)) => {
                            let digest = plan.upstream_digest(index, need_id, entry);
                            upstream_digests.insert(need_id.clone(), digest);
                        }
                        Some(State::WouldRun) => upstream_unknown = true,
                        Some(State::Failed | State::Skipped) => {
                            states[index] = State::Skipped;
                            summary.skipped += 1;
                            sink.emit(Event::StageSkipped {
                                stage: decl.id.clone(),
                                reason: format!("`{need_id}` did not finish"),
                            });
                            ready = false;
                            break;
                        }
                        _ => ready = false,
                    }
                }
                if !ready {
                    continue;
                }
                if upstream_unknown {
                    states[index] = State::WouldRun;
                    sink.emit(Event::StageWouldRun {
                        stage: decl.id.clone(),
                        reason: "an upstream stage would run".into(),
                    });
                    continue;
                }
                let inputs = match plan.key_inputs(index, upstream_digests, &mut memo, workspace) {
                    Ok(inputs) => inputs,
                    Err(err) => {
                        states[index] = State::Failed;
                        summary.failed += 1;
                        stop_dispatch = true;
                        sink.emit(Event::StageFailed {
                            stage: decl.id.clone(),
                            error: format!("{err:#}"),
                            duration_s: 0.0,
                        });
                        continue;
                    }
                };
                let key = inputs.key(&decl.needs);
                let recorded = lock.stages.get(&decl.id);
                let lookup = if forced.contains(&index) {
                    Lookup::Missing
                } else {
                    store.lookup(&key, &mut memo)?
                };
                let (lookup, pulled) = match (lookup, &pull_from) {
                    (Lookup::Missing, Some(remote))
                        if !forced.contains(&index) && !options.dry_run =>
                    {
                        let recorded = recorded
                            .filter(|r| r.key == key)
                            .map(|r| r.output.digest.as_str());
                        match pull_instead(
                            remote, &store, workspace, &decl.id, &key, recorded, sink,
                        ) {
                            Attempt::Pulled(entry) => (Lookup::Hit(entry), true),
                            Attempt::Run => (Lookup::Missing, false),
                            Attempt::Unreachable => {
                                pull_from = None;
                                (Lookup::Missing, false)
                            }
                        }
                    }
                    (lookup, _) => (lookup, false),
                };
                let reason = match lookup {
                    Lookup::Hit(entry) => {
                        if pulled {
                            let _ = remember(&mut memo, &entry);
                            summary.pulled += 1;
                        } else {
                            sink.emit(Event::StageCached {
                                stage: decl.id.clone(),
                                key: key.clone(),
                                output: entry.digest.clone(),
                            });
                            summary.cached += 1;
                        }
                        let duration_s = recorded
                            .filter(|r| r.key == key)
                            .map_or(0.0, |r| r.duration_s);
                        lock.stages.insert(
                            decl.id.clone(),
                            lock_entry(&key, inputs, &entry, duration_s),
                        );
                        states[index] = State::Done(entry);
                        continue;
                    }
                    Lookup::Damaged(problem) => {
                        damaged(&store, workspace, &decl.id, &key, &problem, options, sink)?
                    }
                    Lookup::Missing if forced.contains(&index) => "forced".to_string(),
                    Lookup::Missing => why_stale(recorded, &inputs, &key),
                };
                if options.dry_run {
                    sink.emit(Event::StageWouldRun {
                        stage: decl.id.clone(),
                        reason,
                    });
                    states[index] = State::WouldRun;
                    continue;
                }
                if forced.contains(&index) && store.discard_scratch(&key)? {
                    sink.emit(Event::Notice {
                        stage: decl.id.clone(),
                        text: "--force starts clean: discarded the checkpoints an interrupted \
                               run of this stage left to resume from"
                            .to_string(),
                    });
                }
                sink.emit(Event::StageStarted {
                    stage: decl.id.clone(),
                    uses: decl.uses.clone(),
                    key: key.clone(),
                    reason,
                });
                let upstream = decl
                    .needs
                    .iter()
                    .filter_map(|need| {
                        let i = plan.index_of(need)?;
                        match &states[i] {
                            State::Done(entry) => Some(Upstream {
                                stage: need.clone(),
                                uses: plan.pipeline.stages[i].uses.clone(),
                                dir: entry.dir.clone(),
                                cache_key: entry_key(entry),
                                params: plan.pipeline.stages[i].with.clone(),
                            }),
                            _ => None,
                        }
                    })
                    .collect();
                states[index] = State::Running;
                running += 1;
                let done_tx = done_tx.clone();
                let store = &store;
                scope.spawn(move || {
                    let clock = Instant::now();
                    let result = run_stage(plan, index, &key, upstream, store, workspace, sink);
                    let _ = done_tx.send(Finished {
                        index,
                        key,
                        inputs,
                        result,
                        duration_s: clock.elapsed().as_secs_f64(),
                    });
                });
            }
            if running == 0 {
                break;
            }
            let Ok(finished) = done_rx.recv() else { break };
            running -= 1;
            let id = plan.pipeline.stages[finished.index].id.clone();
            match finished.result {
                Ok(entry) => {
                    // Only a speed-up: a file the memo misses is hashed at its next lookup.
                    let _ = remember(&mut memo, &entry);
                    sink.emit(Event::StageFinished {
                        stage: id.clone(),
                        key: finished.key.clone(),
                        output: entry.digest.clone(),
                        duration_s: finished.duration_s,
                    });
                    lock.stages.insert(
                        id,
                        lock_entry(
                            &finished.key,
                            finished.inputs,
                            &entry,
                            round_ms(finished.duration_s),
                        ),
                    );
                    states[finished.index] = State::Done(entry);
                    summary.ran += 1;
                }
                Err(err) => {
                    sink.emit(Event::StageFailed {
                        stage: id,
                        error: format!("{err:#}"),
                        duration_s: finished.duration_s,
                    });
                    states[finished.index] = State::Failed;
                    summary.failed += 1;
                    stop_dispatch = true;
                }
            }
        }
        Ok(())
    })?;

    for (index, state) in states.iter_mut().enumerate() {
        if selected.contains(&index) && matches!(state, State::Pending) {
            *state = State::Skipped;
            summary.skipped += 1;
            let reason = if finetune_core::interrupt::requested() {
                "interrupted"
            } else {
                "an earlier stage failed"
            };
            sink.emit(Event::StageSkipped {
                stage: plan.pipeline.stages[index].id.clone(),
                reason: reason.into(),
            });
        }
    }
    if !options.dry_run {
        lock.stages.retain(|id, _| plan.index_of(id).is_some());
        lock.pipeline = plan.pipeline.name.clone();
        lock.set = plan.pipeline.overrides.clone();
        lock.save(&lock_path)?;
        memo.save()?;
        link_outputs(plan, workspace, &states)?;
    }
    sink.emit(Event::RunFinished {
        ran: summary.ran,
        cached: summary.cached,
        pulled: summary.pulled,
        failed: summary.failed,
        skipped: summary.skipped,
        duration_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: crate::report::peak_rss_mib(),
    });
    Ok(summary)
}

/// A damaged entry is never used: a run moves it aside (telling the user where) and runs the
/// stage again; a dry run only says so. Returns the reason the stage runs.
fn damaged(
    store: &Store,
    workspace: &Workspace,
    stage: &str,
    key: &str,
    problem: &str,
    options: &RunOptions,
    sink: &dyn Sink,
) -> Result<String> {
    if options.dry_run {
        return Ok(format!(
            "its cache entry is damaged ({problem}); a run sets it aside and recomputes it"
        ));
    }
    let moved = store.set_aside(key)?;
    sink.emit(Event::Notice {
        stage: stage.to_string(),
        text: format!(
            "cache entry {} is damaged: {problem}; moved it to {} and running the stage again",
            crate::report::short(key),
            workspace.display(&moved)
        ),
    });
    Ok(format!("its cache entry was damaged ({problem})"))
}

/// What asking the remote for a stage's entry came to.
enum Attempt {
    Pulled(Entry),
    /// The remote has no entry that passes every check: run the stage.
    Run,
    /// The remote failed (unreachable, no permission): run the stage, and ask no more.
    Unreachable,
}

/// `run --pull`: the stage's entry fetched from the remote, if it has one that passes every
/// check. A refused entry or a failing remote is a notice, and the stage runs: the remote is
/// a cache, and a cache miss never fails a run.
fn pull_instead(
    remote: &Remote,
    store: &Store,
    workspace: &Workspace,
    stage: &str,
    key: &str,
    recorded: Option<&str>,
    sink: &dyn Sink,
) -> Attempt {
    let notice = |text: String| {
        sink.emit(Event::Notice {
            stage: stage.to_string(),
            text,
        })
    };
    let bar = crate::remote::TransferBar::new("pull");
    let pulled = crate::remote::pull_entry(remote, store, workspace, key, recorded, &bar);
    bar.finish();
    match pulled {
        Ok(Pulled::Entry(entry, caveat)) => {
            if let Some(caveat) = caveat {
                notice(format!(
                    "pulled entry {}: {caveat}",
                    crate::report::short(key)
                ));
            }
            sink.emit(Event::StagePulled {
                stage: stage.to_string(),
                key: key.to_string(),
                output: entry.digest.clone(),
                remote: remote.url().to_string(),
                files: entry.manifest.files.len(),
                bytes: entry.manifest.bytes(),
            });
            Attempt::Pulled(entry)
        }
        Ok(Pulled::Absent) => Attempt::Run,
        Ok(Pulled::Refused(why)) => {
            notice(format!(
                "refused the remote's entry {}: {why}; running the stage instead",
                crate::report::short(key)
            ));
            Attempt::Run
        }
        Err(err) => {
            notice(format!(
                "cannot pull from {}: {err:#}; running the stage instead, and not asking the \
                 remote again in this run",
                remote.url()
            ));
            Attempt::Unreachable
        }
    }
}

/// Durations are recorded to the millisecond: enough for review, and stable to read.
fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn lock_entry(key: &str, inputs: KeyInputs, entry: &Entry, duration_s: f64) -> LockEntry {
    LockEntry {
        key: key.to_string(),
        inputs,
        output: OutputRecord {
            digest: entry.digest.clone(),
            files: entry.manifest.files.len(),
            bytes: entry.manifest.bytes(),
        },
        duration_s,
    }
}

/// Runs one stage's job in a staging directory and publishes the result.
fn run_stage(
    plan: &Plan,
    index: usize,
    key: &str,
    upstream: Vec<Upstream>,
    store: &Store,
    workspace: &Workspace,
    sink: &dyn Sink,
) -> Result<Entry> {
    let decl = &plan.pipeline.stages[index];
    let staged = store.stage_dir(key)?;
    let reporter = StageReporter {
        sink,
        stage: decl.id.clone(),
    };
    let ctx = RunContext {
        workspace: workspace.root.clone(),
        stage: decl.id.clone(),
        cache_key: key.to_string(),
        out_dir: staged.clone(),
        scratch_dir: store.scratch_dir(key)?,
        upstream,
        reporter: &reporter,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| plan.stages[index].job.run(&ctx)));
    let result = match outcome {
        Ok(Ok(())) => store.publish(key, &staged),
        Ok(Err(err)) => Err(err),
        Err(panic) => {
            let text = finetune_core::panic_text(panic.as_ref()).unwrap_or("unknown panic");
            Err(anyhow!("the stage panicked: {text}"))
        }
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    result
}

/// The key an entry was published under: its directory's name.
fn entry_key(entry: &Entry) -> String {
    entry
        .dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Points `artifacts/runs/<pipeline>/<stage>` at each finished stage's cache entry, so users
/// find outputs by name. Links are replaced atomically and left alone when already right.
fn link_outputs(plan: &Plan, workspace: &Workspace, states: &[State]) -> Result<()> {
    let run_dir = workspace.run_dir(&plan.pipeline.name);
    for (index, state) in states.iter().enumerate() {
        let State::Done(entry) = state else { continue };
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let target = Path::new("../../cache").join(entry_key(entry));
        let link = run_dir.join(&plan.pipeline.stages[index].id);
        if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
            continue;
        }
        let temp = run_dir.join(format!(
            ".{}.{}.link",
            plan.pipeline.stages[index].id,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(&target, &temp)?;
        std::fs::rename(&temp, &link)
            .with_context(|| format!("cannot update {}", link.display()))?;
    }
    Ok(())
}
