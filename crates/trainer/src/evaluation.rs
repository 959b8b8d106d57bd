//! Scoring a model during training: the [`Evaluator`] the trainer calls, and the loss and
//! metrics of a model on a labelled split.

use anyhow::{Result, bail};
use burn::tensor::Device;
use finetune_model::{Classifier, Example, Predictions, ProblemType, predict};
use serde_json::{Value, json};

use crate::metrics::{Metrics, MultiLabelMetrics, RegressionMetrics};

/// Scores a model; the trainer calls it at every evaluation.
pub trait Evaluator {
    /// Full metrics as JSON (`loss`, `accuracy`, `f1_macro`, …, `per_class`, `confusion`).
    fn evaluate(&mut self, model: &Classifier) -> Result<Value>;
    /// Examples scored per evaluation (for eval samples/s).
    fn examples(&self) -> usize;
}

/// Evaluates on a labelled split.
pub struct DatasetEvaluator<'a> {
    pub examples: &'a [Example],
    pub labels: &'a [String],
    pub batch_size: usize,
    pub device: Device,
}

impl Evaluator for DatasetEvaluator<'_> {
    fn evaluate(&mut self, model: &Classifier) -> Result<Value> {
        evaluate(
            model,
            self.examples,
            self.labels,
            self.batch_size,
            &self.device,
        )
    }
    fn examples(&self) -> usize {
        self.examples.len()
    }
}

/// Loss and metrics of `model` on `examples` as one JSON object (`{}` for no examples).
pub fn evaluate(
    model: &Classifier,
    examples: &[Example],
    labels: &[String],
    batch_size: usize,
    device: &Device,
) -> Result<Value> {
    if examples.is_empty() {
        return Ok(json!({}));
    }
    let predictions = predict_fitting(model, examples, batch_size, device)?;
    scores_json(
        model.config.problem_type,
        &predictions,
        examples,
        labels,
        DEFAULT_THRESHOLD,
    )
}

/// Where a multi-label head decides for a label, unless `evaluate` tuned it.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// The loss and the task's metrics of `predictions` on `examples` (a multi-label run's
/// decided at `threshold`) as one JSON object.
pub fn scores_json(
    problem: ProblemType,
    predictions: &Predictions,
    examples: &[Example],
    labels: &[String],
    threshold: f64,
) -> Result<Value> {
    TaskMetrics::compute(problem, predictions, examples, labels, threshold)
        .to_json(predictions.loss)
}

/// The metrics of one evaluation, of the kind its task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskMetrics {
    SingleLabel(Metrics),
    MultiLabel(MultiLabelMetrics),
    Regression(RegressionMetrics),
}

impl TaskMetrics {
    /// Scores `predictions` against `examples`' labels (named by `labels`) as `problem` does;
    /// a multi-label head decides at `threshold`.
    pub fn compute(
        problem: ProblemType,
        predictions: &Predictions,
        examples: &[Example],
        labels: &[String],
        threshold: f64,
    ) -> TaskMetrics {
        let targets: Vec<Vec<f32>> = examples.iter().map(|e| e.targets.clone()).collect();
        match problem {
            ProblemType::SingleLabelClassification => {
                let truth: Vec<usize> = examples.iter().map(|e| e.label as usize).collect();
                TaskMetrics::SingleLabel(Metrics::compute(&truth, &predictions.predicted, labels))
            }
            ProblemType::MultiLabelClassification => TaskMetrics::MultiLabel(
                MultiLabelMetrics::compute(&targets, &predictions.outputs, labels, threshold),
            ),
            ProblemType::Regression => TaskMetrics::Regression(RegressionMetrics::compute(
                &targets,
                &predictions.outputs,
                labels,
            )),
        }
    }

    /// `{"loss": …, metric: …}`: the loss first, then every metric.
    pub fn to_json(&self, loss: f64) -> Result<Value> {
        let metrics = match self {
            TaskMetrics::SingleLabel(m) => serde_json::to_value(m)?,
            TaskMetrics::MultiLabel(m) => serde_json::to_value(m)?,
            TaskMetrics::Regression(m) => serde_json::to_value(m)?,
        };
        with_loss_first(loss, metrics)
    }
}

/// A multi-label model's decision threshold, tuned on `validation` (see
/// [`MultiLabelMetrics::tuned_threshold`]): what train saves with the model and evaluate
/// applies by default.
pub fn tune_threshold(
    model: &Classifier,
    validation: &[Example],
    labels: &[String],
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let predictions = predict_fitting(model, validation, batch_size, device)?;
    let truth: Vec<Vec<f32>> = validation.iter().map(|e| e.targets.clone()).collect();
    Ok(MultiLabelMetrics::tuned_threshold(
        &truth,
        &predictions.outputs,
        labels,
    ))
}

/// [`predict`] in batches of `batch_size`, halved (after the device's cached memory is freed)
/// each time the device runs out of memory: an evaluation shrinks its own batch, never the
/// training's. On the CPU nothing is caught: there an allocation failure ends the process.
pub fn predict_fitting(
    model: &Classifier,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Result<Predictions> {
    let mut batch = batch_size;
    loop {
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            predict(model, examples, batch, device)
        }));
        match attempt {
            Ok(predictions) => return Ok(predictions),
            Err(payload) if crate::run::is_out_of_memory(payload.as_ref()) => {
                device.memory_cleanup();
                if batch == 1 {
                    bail!("the device ran out of memory evaluating one example at a time");
                }
                batch = batch.div_ceil(2);
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
}

/// `{"loss": …, "accuracy": …, …}`: the loss first, then every metric.
pub fn metrics_json(loss: f64, metrics: &Metrics) -> Result<Value> {
    with_loss_first(loss, serde_json::to_value(metrics)?)
}

fn with_loss_first(loss: f64, metrics: Value) -> Result<Value> {
    let mut value = json!({ "loss": loss });
    for (key, metric) in metrics.as_object().into_iter().flatten() {
        value[key] = metric.clone();
    }
    Ok(value)
}
