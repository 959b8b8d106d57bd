//! `finetune status`: each stage fresh or stale, and why, without running anything.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::LockFile;
use crate::cache::store::{Entry, Lookup, Store};
use crate::explain::why_stale;
use crate::plan::Plan;
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
}

pub fn status(plan: &Plan, workspace: &Workspace) -> Result<Vec<StageStatus>> {
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
