use std::path::{Path, PathBuf};

use crate::ConfigError;

/// What a stage learns about one of its `needs` when it is configured.
#[derive(Debug, Clone)]
pub struct UpstreamInfo {
    /// The upstream stage's id in the pipeline file.
    pub stage: String,
    /// The plugin it uses (`ingest_csv`, `tokenize`, ...).
    pub uses: String,
}

/// Everything [`crate::Stage::configure`] may look at.
#[derive(Debug, Clone)]
pub struct ConfigureContext {
    /// The workspace root: relative paths in params are relative to it.
    pub workspace: PathBuf,
    /// This stage's id in the pipeline file.
    pub stage: String,
    /// The stages this one `needs`, in the order the pipeline lists them.
    pub upstream: Vec<UpstreamInfo>,
    /// The environment variables that hold the pipeline's signing keys: a stage that starts
    /// programs removes them from their environment.
    pub key_variables: Vec<String>,
}

impl ConfigureContext {
    /// The one upstream stage that uses plugin `uses`; an error if there is none or several.
    pub fn upstream_using(&self, uses: &str) -> Result<&UpstreamInfo, ConfigError> {
        find_single(&self.upstream, |u| u.uses == uses, uses, &self.stage)
    }

    /// `path` resolved against the workspace (absolute paths are kept).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.workspace.join(path)
    }
}

/// An upstream stage's published output, as a running job sees it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub stage: String,
    pub uses: String,
    /// The read-only, complete output directory of that stage.
    pub dir: PathBuf,
    /// The cache key that output was made under.
    pub cache_key: String,
    /// Its `with:` params, after interpolation.
    pub params: serde_json::Value,
}

/// Receives progress from a running job; the engine draws bars, plain lines or JSON from it.
pub trait Reporter: Send + Sync {
    /// A human-readable status line ("reading data/raw/x.tsv", "epoch 2/3").
    fn message(&self, text: &str);
    /// Something the user must still see after the run (a key was created, a fallback was
    /// taken): printed on a line of its own, never overwritten by progress.
    fn notice(&self, text: &str) {
        self.message(text)
    }
    /// Units of work done out of `total` (rows, steps). May be called often; keep it cheap.
    fn progress(&self, done: u64, total: u64);
}

/// A reporter that drops everything (unit tests of stages).
pub struct SilentReporter;

impl Reporter for SilentReporter {
    fn message(&self, _text: &str) {}
    fn progress(&self, _done: u64, _total: u64) {}
}

/// Everything [`crate::Job::run`] gets from the engine.
pub struct RunContext<'a> {
    pub workspace: PathBuf,
    pub stage: String,
    /// The cache key this run's output will be published under.
    pub cache_key: String,
    /// An empty directory to write results into; published atomically on success.
    pub out_dir: PathBuf,
    /// A directory that survives a crash of this stage with these exact inputs (same cache
    /// key), for checkpoints a rerun can resume from. Removed once the stage succeeds.
    pub scratch_dir: PathBuf,
    pub upstream: Vec<Upstream>,
    pub reporter: &'a dyn Reporter,
}

impl RunContext<'_> {
    /// The output of the one upstream stage that uses plugin `uses`.
    pub fn upstream_using(&self, uses: &str) -> anyhow::Result<&Upstream> {
        Ok(find_single(
            &self.upstream,
            |u| u.uses == uses,
            uses,
            &self.stage,
        )?)
    }

    /// `path` resolved against the workspace (absolute paths are kept).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.workspace.join(path)
    }
}

fn find_single<'a, T>(
    items: &'a [T],
    wanted: impl Fn(&T) -> bool,
    uses: &str,
    stage: &str,
) -> Result<&'a T, ConfigError> {
    let mut matching = items.iter().filter(|item| wanted(item));
    match (matching.next(), matching.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(ConfigError::needs(format!(
            "stage `{stage}` needs a stage that uses `{uses}`; add it to `needs:`"
        ))),
        (Some(_), Some(_)) => Err(ConfigError::needs(format!(
            "stage `{stage}` needs exactly one stage that uses `{uses}`, but several are listed"
        ))),
    }
}
