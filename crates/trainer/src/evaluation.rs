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
    let targets: Vec<Vec<f32>> = examples.iter().map(|e| e.targets.clone()).collect();
    let metrics =
        match problem {
            ProblemType::SingleLabelClassification => {
                let truth: Vec<usize> = examples.iter().map(|e| e.label as usize).collect();
                serde_json::to_value(Metrics::compute(&truth, &predictions.predicted, labels))?
            }
            ProblemType::MultiLabelClassification => serde_json::to_value(
                MultiLabelMetrics::compute(&targets, &predictions.outputs, labels, threshold),
            )?,
            ProblemType::Regression => serde_json::to_value(RegressionMetrics::compute(
                &targets,
                &predictions.outputs,
                labels,
            ))?,
        };
    with_loss_first(predictions.loss, metrics)
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
