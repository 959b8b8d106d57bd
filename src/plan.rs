//! Binds a pipeline to the installed plugins: every stage's `uses` is known and its `with:`
//! validated before anything runs, so a typo in the last stage fails in milliseconds.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use finetune_core::{ConfigError, ConfigKey, ConfigureContext, Job, Stage, UpstreamInfo};

use crate::cache::digest::DigestMemo;
use crate::cache::lockfile::KeyInputs;
use crate::cache::store::Entry;
use crate::dag::Dag;
use crate::pipeline::{Pipeline, PipelineError, StageDecl};
use crate::registry::Registry;
use crate::workspace::Workspace;

pub struct Plan<'r> {
    pub pipeline: Pipeline,
    pub dag: Dag,
    /// One per stage of the pipeline, same index.
    pub stages: Vec<Planned<'r>>,
}

pub struct Planned<'r> {
    pub plugin: &'r dyn Stage,
    pub job: Box<dyn Job>,
}

impl<'r> Plan<'r> {
    pub fn build(
        pipeline: Pipeline,
        registry: &'r Registry,
        workspace: &Workspace,
    ) -> Result<Plan<'r>, PipelineError> {
        let dag = Dag::build(&pipeline)?;
        let mut stages = Vec::with_capacity(pipeline.stages.len());
        for decl in &pipeline.stages {
            let plugin = registry.get(&decl.uses).ok_or_else(|| {
                let names: Vec<&str> = registry.names().collect();
                pipeline.error_at(
                    decl,
                    "uses",
                    format!(
                        "unknown plugin `{}`; installed: {}",
                        decl.uses,
                        names.join(", ")
                    ),
                )
            })?;
            let upstream = decl
                .needs
                .iter()
                .map(|need| {
                    let uses = pipeline
                        .stage(need)
                        .map(|s| s.uses.clone())
                        .unwrap_or_default();
                    UpstreamInfo {
                        stage: need.clone(),
                        uses,
                    }
                })
                .collect();
            let ctx = ConfigureContext {
                workspace: workspace.root.clone(),
                stage: decl.id.clone(),
                upstream,
                key_variables: pipeline.key_variables.clone(),
            };
            let job = plugin
                .configure(&decl.with, &ctx)
                .map_err(|err| locate(&pipeline, decl, err))?;
            stages.push(Planned { plugin, job });
        }
        Ok(Plan {
            pipeline,
            dag,
            stages,
        })
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.pipeline.stages.iter().position(|s| s.id == id)
    }

    /// The digest of `entry`, the output of `need`, as the key of stage `index` sees it:
    /// of the part its job reads.
    pub fn upstream_digest(&self, index: usize, need: &str, entry: &Entry) -> String {
        let Some(upstream) = self.index_of(need) else {
            return entry.digest.clone();
        };
        let info = UpstreamInfo {
            stage: need.to_string(),
            uses: self.pipeline.stages[upstream].uses.clone(),
        };
        entry.digest_of(&self.stages[index].job.reads_from(&info))
    }

    /// The inputs of stage `index`'s key, given its upstream outputs' digests. Hashes the files
    /// it reads (through the memo).
    pub fn key_inputs(
        &self,
        index: usize,
        needs: BTreeMap<String, String>,
        memo: &mut DigestMemo,
        workspace: &Workspace,
    ) -> Result<KeyInputs> {
        let decl = &self.pipeline.stages[index];
        let planned = &self.stages[index];
        let mut reads = BTreeMap::new();
        for path in planned.job.reads() {
            let digest = memo
                .path_digest(&workspace.root.join(&path))
                .with_context(|| format!("stage `{}` reads `{}`", decl.id, path.display()))?;
            reads.insert(path.display().to_string(), digest);
        }
        Ok(KeyInputs {
            uses: decl.uses.clone(),
            version: planned.plugin.version(),
            params: decl.with.clone(),
            needs,
            reads,
            extra: planned.job.key_extra(),
        })
    }
}

fn locate(pipeline: &Pipeline, decl: &StageDecl, err: ConfigError) -> PipelineError {
    let key = match err.key {
        ConfigKey::Needs => "needs".to_string(),
        ConfigKey::With(key) if key.is_empty() => "with".to_string(),
        ConfigKey::With(key) => format!("with.{key}"),
    };
    pipeline.error_at(decl, &key, err.message)
}
