//! The `evaluate` stage: the trained model (a `train` stage's output) on a split of the
//! `tokenize` output. Writes `metrics.json` (loss, accuracy, precision/recall/F1 macro,
//! weighted and per class with label names, the confusion matrix), `predictions.parquet`
//! (text, label, prediction, probabilities), the pictures (`confusion_matrix.svg`,
//! `training_curves.svg`), a one-page `report.md` / `report.html` that links them, and the
//! training curves and confusion pairs in DVCLive's layout under `plots/` (for `dvc plots`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{ArrayRef, Float32Builder, ListBuilder, StringArray};
use arrow::record_batch::RecordBatch;
use finetune_core::output::write_json;
use finetune_core::schemars::{self, JsonSchema};
use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, UpstreamInfo, UpstreamReads, Value,
    parse_params, schema_for,
};
use serde::Deserialize;
use serde_json::json;

use finetune_model::{ComputeDevice, DeviceSpec, Example, hf};
use finetune_tokenize::tokenized::{Texts, read_examples, read_labels, read_texts};
use finetune_trainer::{Metrics, metrics_json, predict_fitting};

mod dvclive;
mod predictor;
mod report;

pub use predictor::ModelPredictor;

/// `with:` of an `evaluate` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// The split of the tokenize output to evaluate on: `test` (default) or `validation`.
    #[serde(default = "default_split")]
    pub split: String,
    /// Examples per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where to run: a device name as train's `device:` takes (`cpu`, `cuda`, `auto`, ...).
    #[serde(default = "finetune_model::default_device_name")]
    pub device: String,
}

fn default_split() -> String {
    "test".into()
}

fn default_batch_size() -> usize {
    64
}

/// The `evaluate` plugin.
pub struct Evaluate;

impl Stage for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    /// 2: the DVCLive plots under `plots/`.
    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "Evaluate a trained model on a tokenized split: metrics, predictions, pictures and a report"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<EvaluateParams>()
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let params: EvaluateParams = parse_params(with)?;
        ctx.upstream_using("train")?;
        ctx.upstream_using("tokenize")?;
        if !["test", "validation"].contains(&params.split.as_str()) {
            return Err(ConfigError::at(
                "split",
                format!(
                    "`{}` is not a split; one of: test, validation",
                    params.split
                ),
            ));
        }
        if params.batch_size == 0 {
            return Err(ConfigError::at("batch_size", "must be at least 1"));
        }
        let device = DeviceSpec::parse(&params.device)
            .map_err(|e| ConfigError::at("device", e.to_string()))?;
        Ok(Box::new(EvaluateJob { params, device }))
    }
}

struct EvaluateJob {
    params: EvaluateParams,
    /// `device:`, checked; `auto` is resolved when the key is made.
    device: DeviceSpec,
}

impl Job for EvaluateJob {
    fn reads(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Of the train output, the model and the computed half of its log (for the curves):
    /// not the checkpoints, nor the timings that differ on every rerun.
    fn reads_from(&self, upstream: &UpstreamInfo) -> UpstreamReads {
        match upstream.uses.as_str() {
            "train" => UpstreamReads::Only(vec!["model", "logs/train.jsonl"]),
            _ => UpstreamReads::Everything,
        }
    }

    /// `device: auto`'s output differs with the device it picks; any other keeps its old key.
    fn key_extra(&self) -> Option<Value> {
        (self.device == DeviceSpec::Auto)
            .then(|| json!({ "device": self.device.resolved().to_string() }))
    }

    fn run(&self, ctx: &RunContext) -> Result<()> {
        let device = self.device.open()?;
        finetune_kernels::on_own_pool(|| device.run(|| self.evaluate(ctx, &device)))
    }
}

impl EvaluateJob {
    fn evaluate(&self, ctx: &RunContext, compute: &ComputeDevice) -> Result<()> {
        let tokenized = &ctx.upstream_using("tokenize")?.dir;
        let trained = &ctx.upstream_using("train")?.dir;
        let split = &self.params.split;
        let split_file = tokenized.join(format!("{split}.parquet"));
        let examples = read_examples(&split_file, |row| Example {
            ids: row.ids,
            type_ids: row.type_ids,
            label: row.label,
        })?;
        if examples.is_empty() {
            return Err(anyhow!("the {split} split is empty: nothing to evaluate"));
        }
        let Texts { texts, pairs } = read_texts(&split_file)?;
        let labels = read_labels(&tokenized.join("labels.json"))?;
        let device = compute.device().clone();
        let (model, _) = hf::load(&trained.join("model"), Some(&labels), 0, &device)
            .context("cannot load the trained model")?;
        ctx.reporter.message(&format!(
            "evaluating on {} {split} examples on {}",
            examples.len(),
            compute.describe()
        ));
        let predictions = predict_fitting(&model, &examples, self.params.batch_size, &device)?;
        let truth: Vec<usize> = examples.iter().map(|e| e.label as usize).collect();
        let metrics = Metrics::compute(&truth, &predictions.predicted, &labels);
        let mut summary = metrics_json(predictions.loss, &metrics)?;
        summary["split"] = json!(split);
        summary["examples"] = json!(examples.len());
        write_json(&ctx.out_dir.join("metrics.json"), &summary)?;
        write_predictions(
            &ctx.out_dir.join("predictions.parquet"),
            (&texts, pairs.as_deref()),
            &truth,
            &predictions.predicted,
            &predictions.probabilities,
            &labels,
        )?;
        let log = report::read_log(&trained.join("logs/train.jsonl"))?;
        report::write_all(&ctx.out_dir, &metrics, &summary, &log, split)?;
        let names = |ids: &[usize]| ids.iter().map(|&i| labels[i].as_str()).collect::<Vec<_>>();
        dvclive::write_plots(
            &ctx.out_dir,
            &log,
            &names(&truth),
            &names(&predictions.predicted),
        )?;
        ctx.reporter.message(&format!(
            "{split}: accuracy {:.4}, macro F1 {:.4}; report.html",
            metrics.accuracy, metrics.f1_macro
        ));
        Ok(())
    }
}

/// text (and text_pair, for pairs), label, prediction (label names) and the probability of
/// every label, one row each.
fn write_predictions(
    path: &Path,
    (texts, pairs): (&[String], Option<&[String]>),
    truth: &[usize],
    predicted: &[usize],
    probabilities: &[Vec<f32>],
    labels: &[String],
) -> Result<()> {
    let names = |ids: &[usize]| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|&i| labels[i].as_str()),
        ))
    };
    let mut lists = ListBuilder::new(Float32Builder::new());
    for row in probabilities {
        lists.values().append_slice(row);
        lists.append(true);
    }
    let strings =
        |values: &[String]| -> ArrayRef { Arc::new(StringArray::from_iter_values(values)) };
    let mut columns = vec![("text", strings(texts))];
    if let Some(pairs) = pairs {
        columns.push(("text_pair", strings(pairs)));
    }
    let batch = RecordBatch::try_from_iter(columns.into_iter().chain([
        ("label", names(truth)),
        ("prediction", names(predicted)),
        ("probabilities", Arc::new(lists.finish()) as ArrayRef),
    ]))?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
