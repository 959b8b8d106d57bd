//! The plugin interface of `finetune`.
//!
//! A pipeline stage is a [`Stage`]: it names itself, versions its output format, describes
//! its `with:` params, and turns validated params into a [`Job`] that declares the workspace
//! files it reads and writes its results into a directory the engine hands it. The engine knows
//! only these traits; it never sees a model, a tokenizer or a Parquet file.
//!
//! This crate has no ML dependencies on purpose: every plugin and the engine depend on it.

mod context;
pub mod digest;
mod error;
pub mod integrity;
pub mod interrupt;
pub mod output;
mod params;
pub mod paths;
pub use finetune_rng as rng;

pub use context::{ConfigureContext, Reporter, RunContext, SilentReporter, Upstream, UpstreamInfo};
pub use error::{ConfigError, ConfigKey};
pub use params::{parse_params, schema_for};
pub use schemars;
pub use serde_json::Value;

/// A kind of pipeline stage (`uses:` in a pipeline file).
pub trait Stage: Send + Sync {
    /// The name a pipeline refers to in `uses:`.
    fn name(&self) -> &'static str;

    /// Part of every cache key: bump it whenever the same inputs would now give other output.
    fn version(&self) -> u32;

    /// One line for `finetune stages`.
    fn summary(&self) -> &'static str;

    /// JSON Schema of the `with:` mapping, for `finetune stages` and editors.
    fn params_schema(&self) -> schemars::Schema;

    /// Validates `with:` (already interpolated) and returns the job to run. Must not touch the
    /// outside world beyond reading metadata: `finetune status` and `--dry-run` call it too.
    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError>;

    /// Evidence about the plugin's own code for `finetune audit` (what it checked, and whether
    /// every check passed), or `None` when it has nothing to audit.
    fn audit(&self) -> Option<Audit> {
        None
    }
}

/// A plugin's self-audit.
pub struct Audit {
    pub report: String,
    pub passed: bool,
}

/// Loads a trained model from a directory and labels texts with it: what `finetune predict`
/// calls, so that the engine needs no ML code. The `train` plugin provides one.
pub trait Predictor: Send + Sync {
    /// Labels and class probabilities for each input, run as `options` say.
    fn predict(
        &self,
        model_dir: &std::path::Path,
        inputs: &[PredictInput],
        options: &PredictOptions,
    ) -> anyhow::Result<Vec<Prediction>>;
}

/// What a [`Predictor`] labels: one text, or a sentence pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictInput {
    pub text: String,
    pub text_pair: Option<String>,
}

/// How a [`Predictor`] runs its forward passes.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// A device name, as a pipeline's `device:` takes it.
    pub device: String,
    /// Weights and activations in bfloat16 instead of f32.
    pub bf16: bool,
    /// A multi-label model's decision threshold (default 0.5); other models take none.
    pub threshold: Option<f64>,
}

/// What a model said about one input, by its task.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Answer {
    /// The most probable label (single-label classification).
    Label(String),
    /// Every label at or over the threshold, in the model's order (multi-label).
    Labels(Vec<String>),
    /// The predicted values, one per target (regression): [`Prediction::outputs`].
    Values,
}

/// One input's answer, and per output in the model's order its name and the label's
/// probability (for regression, the predicted value), and the logits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub answer: Answer,
    pub outputs: Vec<(String, f32)>,
    /// The head's raw outputs, before the softmax or sigmoid (for ensembling and calibration).
    pub logits: Vec<f32>,
}

/// A configured stage, ready to run.
pub trait Job: Send + Sync {
    /// Files or directories the job reads from the workspace (relative to it, or absolute).
    /// Their content digests enter the cache key; a directory counts with every file in it.
    fn reads(&self) -> Vec<std::path::PathBuf>;

    /// What else, besides params and files, makes the output differ: the id of the key a job
    /// signs with, say. It enters the cache key and the lock file, so never return a secret.
    fn key_extra(&self) -> Option<Value> {
        None
    }

    /// What the job reads of upstream stage `upstream`'s output. Only that part's digest
    /// enters the cache key, so a change elsewhere in the upstream output (a log's timings)
    /// does not rerun this stage; a job that reads more than it declares gets stale results.
    fn reads_from(&self, upstream: &UpstreamInfo) -> UpstreamReads {
        let _ = upstream;
        UpstreamReads::Everything
    }

    /// Writes the stage's results into `ctx.out_dir`. The engine publishes that directory
    /// atomically only if this returns `Ok`; on error it is thrown away.
    fn run(&self, ctx: &RunContext) -> anyhow::Result<()>;
}

/// The part of an upstream output a job reads (see [`Job::reads_from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamReads {
    Everything,
    /// These files, and every file under these directories, relative to the output.
    Only(Vec<&'static str>),
}

/// The message a panic carries (`panic!` with a literal or with formatting), if it is text.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}
