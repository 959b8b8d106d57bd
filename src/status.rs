//! `finetune status`: each stage fresh or stale, and why, without running anything.

use std::collections::BTreeMap;

use anyhow::Result;
use finetune_remote::Remote;
use serde::Serialize;

use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::LockFile;
use crate::cache::store::{Entry, Lookup, Store};
use crate::explain::why_stale;
use crate::plan::Plan;
use crate::remote::remote_entry;
use crate::workspace::Workspace;

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub uses: String,
    pub fresh: bool,
    /// The cache key, when it can be known (all upstream stages fresh).
    pub key: Option<String>,
    /// Empty when fresh.
    pub reason: String,
    /// For a stale stage, when a remote was asked: whether it has the stage's entry (so
    /// that `run --pull` fetches it rather than run it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_remote: Option<bool>,
}

/// Each stage's state. With a remote, a stale stage whose entry the remote holds says so, and
/// the stages after it are judged as if it were pulled.
pub fn status(
    plan: &Plan,
    workspace: &Workspace,
    mut remote: Option<&Remote>,
) -> Result<Vec<StageStatus>> {
    let store = Store::new(&workspace.artifacts());
    let lock = LockFile::load(
        &workspace.root.join(LockFile::path_for(&plan.pipeline.file)),
        &plan.pipeline.name,
    )?;
    let mut memo = DigestMemo::load(&workspace.memo_file());
    let mut outputs: BTreeMap<usize, Entry> = BTreeMap::new();
    let mut report: BTreeMap<usize, StageStatus> = BTreeMap::new();
    for &index in plan.dag.order() {
        let decl = &plan.pipeline.stages[index];
        let mut status = StageStatus {
            stage: decl.id.clone(),
            uses: decl.uses.clone(),
            fresh: false,
            key: None,
            reason: String::new(),
            on_remote: None,
        };
        let stale_upstream: Vec<&str> = decl
            .needs
            .iter()
            .filter(|need| {
                plan.index_of(need)
                    .is_none_or(|i| !outputs.contains_key(&i))
            })
            .map(String::as_str)
            .collect();
        if !stale_upstream.is_empty() {
            status.reason = format!("upstream stale: {}", stale_upstream.join(", "));
        } else {
            let needs = decl
                .needs
                .iter()
                .filter_map(|need| {
                    let entry = outputs.get(&plan.index_of(need)?)?;
                    Some((need.clone(), plan.upstream_digest(index, need, entry)))
                })
                .collect();
            match plan.key_inputs(index, needs, &mut memo, workspace) {
                Err(err) => status.reason = format!("{err:#}"),
                Ok(inputs) => {
                    let key = inputs.key(&decl.needs);
                    match store.lookup(&key, &mut memo)? {
                        Lookup::Hit(entry) => {
                            status.fresh = true;
                            outputs.insert(index, entry);
                        }
                        Lookup::Damaged(problem) => {
                            status.reason = format!("its cache entry is damaged: {problem}");
                        }
                        Lookup::Missing => {
                            status.reason = why_stale(lock.stages.get(&decl.id), &inputs, &key);
                            match remote.map(|r| remote_entry(r, &store, &key)) {
                                Some(Ok(held)) => {
                                    status.on_remote = Some(held.is_some());
                                    outputs.extend(held.map(|entry| (index, entry)));
                                }
                                Some(Err(err)) => {
                                    eprintln!("warning: not asking the remote further: {err:#}");
                                    remote = None;
                                }
                                None => {}
                            }
                        }
                    }
                    status.key = Some(key);
                }
            }
        }
        report.insert(index, status);
    }
    Ok(plan
        .dag
        .order()
        .iter()
        .filter_map(|i| report.remove(i))
        .collect())
}
