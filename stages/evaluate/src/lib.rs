//! The `evaluate` stage: the trained model (a `train` stage's output) on a split of the
//! `tokenize` output, scored as its task is (see finetune-trainer's metrics). Writes
//! `metrics.json` (single-label: loss, accuracy, precision/recall/F1 macro, weighted and per
//! class, the confusion matrix; multi-label: the same micro/macro/weighted and per label at a
//! threshold tuned on validation, subset accuracy, Hamming loss; regression: MSE, RMSE, MAE,
//! R², Pearson, Spearman), `predictions.parquet` (text, label, prediction, probabilities), the
//! pictures (`confusion_matrix.svg` or `predicted_vs_actual.svg`, `training_curves.svg`), a
//! one-page `report.md` / `report.html` that links them, and the training curves and
//! prediction pairs in DVCLive's layout under `plots/` (for `dvc plots`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{ArrayRef, Float32Builder, ListBuilder, StringArray, StringBuilder};
use arrow::record_batch::RecordBatch;
use finetune_core::output::write_json;
use finetune_core::schemars::{self, JsonSchema};
use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, UpstreamInfo, UpstreamReads, Value,
    parse_params, schema_for,
};
use serde::Deserialize;
use serde_json::json;

use finetune_model::{
    Classifier, ComputeDevice, DeviceSpec, Example, Predictions, ProblemType, hf,
};
use finetune_tokenize::tokenized::{Task, Texts, read_examples, read_task, read_texts};
use finetune_trainer::{DEFAULT_THRESHOLD, TaskMetrics, predict_fitting, tune_threshold};

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
    /// A multi-label model's decision threshold: `tune` (the default: the best micro F1 on
    /// the validation split, when another split is evaluated and validation has rows; else
    /// 0.5) or a probability in (0, 1).
    pub threshold: Option<Threshold>,
}

/// `threshold:` a probability, or `tune`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "`tune` or a probability in (0, 1)")]
pub enum Threshold {
    Fixed(f64),
    Named(TuneThreshold),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TuneThreshold {
    Tune,
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
        if let Some(Threshold::Fixed(p)) = params.threshold
            && !(p > 0.0 && p < 1.0)
        {
            return Err(ConfigError::at(
                "threshold",
                format!("{p} is not a probability in (0, 1)"),
            ));
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
        let task = read_task(&tokenized.join("labels.json"))?;
        let split_file = tokenized.join(format!("{split}.parquet"));
        let examples = read_split(&split_file, &task)?;
        if examples.is_empty() {
            return Err(anyhow!("the {split} split is empty: nothing to evaluate"));
        }
        let Texts { texts, pairs } = read_texts(&split_file)?;
        let labels = &task.names;
        let device = compute.device().clone();
        let (model, _) = hf::load(&trained.join("model"), Some(labels), 0, &device)
            .context("cannot load the trained model")?;
        if model.config.problem_type != task.problem_type {
            return Err(anyhow!(
                "the trained model predicts {}, but the data's task is {}",
                model.config.problem_type,
                task.problem_type
            ));
        }
        ctx.reporter.message(&format!(
            "evaluating on {} {split} examples on {}",
            examples.len(),
            compute.describe()
        ));
        let batch = self.params.batch_size;
        let predictions = predict_fitting(&model, &examples, batch, &device)?;
        let (decided_at, tuned) = match (task.problem_type, self.params.threshold) {
            (ProblemType::MultiLabelClassification, Some(Threshold::Fixed(p))) => (p, false),
            (ProblemType::MultiLabelClassification, _) => {
                match self.tuned_threshold(tokenized, &task, &model, compute)? {
                    Some(tuned) => (tuned, true),
                    None => (DEFAULT_THRESHOLD, false),
                }
            }
            (_, Some(_)) => {
                return Err(anyhow!(
                    "`threshold` is for multi-label models; this one's task is {}",
                    task.problem_type
                ));
            }
            _ => (DEFAULT_THRESHOLD, false),
        };
        let scores = TaskMetrics::compute(
            task.problem_type,
            &predictions,
            &examples,
            labels,
            decided_at,
        );
        let mut summary = scores.to_json(predictions.loss)?;
        summary["split"] = json!(split);
        summary["examples"] = json!(examples.len());
        if tuned {
            summary["threshold_tuned_on"] = json!("validation");
        }
        write_json(&ctx.out_dir.join("metrics.json"), &summary)?;
        let outcome = Outcome::of(&task, &predictions, &examples, decided_at);
        write_predictions(
            &ctx.out_dir.join("predictions.parquet"),
            (&texts, pairs.as_deref()),
            &outcome,
            &predictions.outputs,
        )?;
        let log = report::read_log(&trained.join("logs/train.jsonl"))?;
        report::write_all(&ctx.out_dir, &scores, &outcome, &summary, &log, split)?;
        dvclive::write_plots(&ctx.out_dir, &log, &outcome)?;
        ctx.reporter
            .message(&format!("{split}: {}; report.html", headline(&scores)));
        Ok(())
    }

    /// A multi-label run's decision threshold: the one with the best micro F1 on the
    /// validation split (when this stage evaluates another split and validation has rows),
    /// from 0.05 to 0.95 in steps of 0.05.
    fn tuned_threshold(
        &self,
        tokenized: &Path,
        task: &Task,
        model: &Classifier,
        compute: &ComputeDevice,
    ) -> Result<Option<f64>> {
        if self.params.split == "validation" {
            return Ok(None);
        }
        let validation = read_split(&tokenized.join("validation.parquet"), task)?;
        if validation.is_empty() {
            return Ok(None);
        }
        let batch = self.params.batch_size;
        let threshold = tune_threshold(model, &validation, &task.names, batch, compute.device())?;
        Ok(Some(threshold))
    }
}

fn read_split(path: &Path, task: &Task) -> Result<Vec<Example>> {
    read_examples(path, task, |row| Example {
        ids: row.ids,
        type_ids: row.type_ids,
        label: row.label,
        targets: row.targets,
    })
}

/// The stage's one-line summary of an evaluation.
fn headline(scores: &TaskMetrics) -> String {
    match scores {
        TaskMetrics::SingleLabel(m) => {
            format!("accuracy {:.4}, macro F1 {:.4}", m.accuracy, m.f1_macro)
        }
        TaskMetrics::MultiLabel(m) => format!(
            "micro F1 {:.4}, macro F1 {:.4}, subset accuracy {:.4} at threshold {:.2}",
            m.f1_micro, m.f1_macro, m.subset_accuracy, m.threshold
        ),
        TaskMetrics::Regression(m) => format!(
            "RMSE {:.4}, MAE {:.4}, R² {:.4}, Spearman {:.4}",
            m.rmse, m.mae, m.r2, m.spearman
        ),
    }
}

/// Per example, what was true and what the model said, as the predictions file and the plots
/// show them.
pub(crate) enum Outcome {
    /// Label names.
    Labels {
        truth: Vec<String>,
        predicted: Vec<String>,
    },
    /// Per example, the names of its labels.
    LabelSets {
        truth: Vec<Vec<String>>,
        predicted: Vec<Vec<String>>,
    },
    /// Per example, the targets' values.
    Values {
        truth: Vec<Vec<f32>>,
        predicted: Vec<Vec<f32>>,
    },
}

impl Outcome {
    fn of(task: &Task, predictions: &Predictions, examples: &[Example], threshold: f64) -> Outcome {
        let names = &task.names;
        match task.problem_type {
            ProblemType::SingleLabelClassification => Outcome::Labels {
                truth: examples
                    .iter()
                    .map(|e| names[e.label as usize].clone())
                    .collect(),
                predicted: predictions
                    .predicted
                    .iter()
                    .map(|&p| names[p].clone())
                    .collect(),
            },
            ProblemType::MultiLabelClassification => {
                let over = |values: &[f32], at: f64| -> Vec<String> {
                    let on = values
                        .iter()
                        .zip(names)
                        .filter(|(v, _)| f64::from(**v) >= at);
                    on.map(|(_, name)| name.clone()).collect()
                };
                Outcome::LabelSets {
                    truth: examples.iter().map(|e| over(&e.targets, 0.5)).collect(),
                    predicted: predictions
                        .outputs
                        .iter()
                        .map(|p| over(p, threshold))
                        .collect(),
                }
            }
            ProblemType::Regression => Outcome::Values {
                truth: examples.iter().map(|e| e.targets.clone()).collect(),
                predicted: predictions.outputs.clone(),
            },
        }
    }
}

/// text (and text_pair, for pairs), label and prediction (label names, lists of them for
/// multi-label, the values for regression) and the head's outputs (`probabilities` of every
/// label; for regression the values again, as `prediction`), one row each.
fn write_predictions(
    path: &Path,
    (texts, pairs): (&[String], Option<&[String]>),
    outcome: &Outcome,
    outputs: &[Vec<f32>],
) -> Result<()> {
    let strings =
        |values: &[String]| -> ArrayRef { Arc::new(StringArray::from_iter_values(values)) };
    let string_lists = |rows: &[Vec<String>]| -> ArrayRef {
        let mut lists = ListBuilder::new(StringBuilder::new());
        for row in rows {
            for name in row {
                lists.values().append_value(name);
            }
            lists.append(true);
        }
        Arc::new(lists.finish())
    };
    let float_lists = |rows: &[Vec<f32>]| -> ArrayRef {
        let mut lists = ListBuilder::new(Float32Builder::new());
        for row in rows {
            lists.values().append_slice(row);
            lists.append(true);
        }
        Arc::new(lists.finish())
    };
    let mut columns = vec![("text", strings(texts))];
    if let Some(pairs) = pairs {
        columns.push(("text_pair", strings(pairs)));
    }
    match outcome {
        Outcome::Labels { truth, predicted } => {
            columns.push(("label", strings(truth)));
            columns.push(("prediction", strings(predicted)));
            columns.push(("probabilities", float_lists(outputs)));
        }
        Outcome::LabelSets { truth, predicted } => {
            columns.push(("label", string_lists(truth)));
            columns.push(("prediction", string_lists(predicted)));
            columns.push(("probabilities", float_lists(outputs)));
        }
        Outcome::Values { truth, predicted } => {
            columns.push(("label", float_lists(truth)));
            columns.push(("prediction", float_lists(predicted)));
        }
    }
    let batch = RecordBatch::try_from_iter(columns)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
