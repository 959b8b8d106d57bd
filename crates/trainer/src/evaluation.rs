//! Scoring a model during training: the [`Evaluator`] the trainer calls, and the loss and
//! metrics of a model on a labelled split.

use anyhow::Result;
use burn::tensor::Device;
use finetune_model::{Classifier, Example, predict};
use serde_json::{Value, json};

use crate::metrics::Metrics;

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
    let predictions = predict(model, examples, batch_size, device);
    let truth: Vec<usize> = examples.iter().map(|e| e.label as usize).collect();
    metrics_json(
        predictions.loss,
        &Metrics::compute(&truth, &predictions.predicted, labels),
    )
}

/// `{"loss": …, "accuracy": …, …}`: the loss first, then every metric.
pub fn metrics_json(loss: f64, metrics: &Metrics) -> Result<Value> {
    let mut value = json!({ "loss": loss });
    for (key, metric) in serde_json::to_value(metrics)?
        .as_object()
        .into_iter()
        .flatten()
    {
        value[key] = metric.clone();
    }
    Ok(value)
}
