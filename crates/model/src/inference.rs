//! Inference without autodiff: label probabilities (or a regression's values) for token rows,
//! and the predictions and loss of a model on labelled examples, each by the model's
//! `problem_type`. Used by the trainer's evaluations, the `evaluate` stage and
//! `finetune predict`.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::activation::{log_sigmoid, sigmoid, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use finetune_task::ProblemType;

use crate::model::{Batch, Classifier};

/// One tokenized text (or sentence pair) and what it is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<i32>,
    /// Each token's segment for a sentence pair (0: first text, 1: second); empty for one
    /// text.
    pub type_ids: Vec<i32>,
    /// The label's index (single-label classification; 0 for the other tasks).
    pub label: i64,
    /// One value per output: 1 or 0 per label (multi-label), the targets (regression); empty
    /// for single-label classification.
    pub targets: Vec<f32>,
}

/// What a model said about a set of examples.
pub struct Predictions {
    /// Per example, the probability of each label: a softmax over them (single-label), or one
    /// sigmoid per label (multi-label); for regression, the predicted values.
    pub outputs: Vec<Vec<f32>>,
    /// Per example, the most probable label (the first on a tie, as argmax); for regression, 0.
    pub predicted: Vec<usize>,
    /// The mean loss against the examples' labels, as the task defines it (see [`task_loss`]).
    pub loss: f64,
}

/// What the head said about one text, per output in the model's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelScores {
    pub logits: Vec<f32>,
    /// The probability of each label (see [`Predictions::outputs`]); for regression, the
    /// predicted values (the logits themselves).
    pub outputs: Vec<f32>,
}

/// What the head's logits mean for `problem`: label probabilities, or the values themselves.
pub fn outputs_of(problem: ProblemType, logits: Tensor<2>) -> Tensor<2> {
    match problem {
        ProblemType::SingleLabelClassification => softmax(logits, 1),
        ProblemType::MultiLabelClassification => sigmoid(logits),
        ProblemType::Regression => logits,
    }
}

/// The summed loss of a batch's `logits` (rows × outputs) against `targets` (a row's values,
/// flattened), for the two tasks whose labels are vectors, as PyTorch (and so Hugging Face's
/// `*ForSequenceClassification`) defines them: binary cross-entropy with logits per label
/// (multi-label) or the squared error per target (regression). Divide by the elements
/// (rows × outputs) for PyTorch's mean.
pub fn vector_loss_sum(
    problem: ProblemType,
    logits: Tensor<2>,
    targets: Vec<f32>,
    device: &Device,
) -> Tensor<1> {
    let shape = logits.dims();
    let targets = Tensor::<2>::from_data(TensorData::new(targets, shape), device);
    match problem {
        // -(y·log σ(x) + (1-y)·log σ(-x)), with log σ computed stably.
        ProblemType::MultiLabelClassification => {
            let positive = log_sigmoid(logits.clone()).mul(targets.clone());
            let negative = log_sigmoid(logits.neg()).mul(targets.neg().add_scalar(1.0));
            positive.add(negative).sum().neg()
        }
        _ => logits.sub(targets).powi_scalar(2).sum(),
    }
}

/// Logits and probabilities for `rows` of token ids (with `type_ids`, their segments, for
/// sentence pairs; empty for single texts), `batch_size` rows at a time.
pub fn label_scores(
    model: &Classifier,
    rows: &[Vec<i32>],
    type_ids: &[Vec<i32>],
    batch_size: usize,
    device: &Device,
) -> Vec<LabelScores> {
    let mut out = vec![LabelScores::default(); rows.len()];
    let no_types: &[i32] = &[];
    logits_by_length(
        model,
        rows.len(),
        |i| (&rows[i], type_ids.get(i).map_or(no_types, Vec::as_slice)),
        batch_size,
        device,
        |batch, logits| {
            let labels = logits.dims()[1];
            let raw: Vec<f32> = logits.clone().into_data().iter::<f32>().collect();
            let outputs = rows_of(outputs_of(model.config.problem_type, logits));
            for (&i, (logits, outputs)) in batch.iter().zip(raw.chunks(labels).zip(outputs)) {
                out[i] = LabelScores {
                    logits: logits.to_vec(),
                    outputs,
                };
            }
        },
    );
    out
}

/// `model.logits` of `count` rows (`row(i)`: the token ids and token type ids of row `i`) in
/// [`batches_by_length`], each batch handed to `each` with the indices of its rows.
fn logits_by_length<'a>(
    model: &Classifier,
    count: usize,
    row: impl Fn(usize) -> (&'a [i32], &'a [i32]),
    batch_size: usize,
    device: &Device,
    mut each: impl FnMut(&[usize], Tensor<2>),
) {
    for batch in batches_by_length((0..count).map(|i| row(i).0.len()), batch_size) {
        let ids: Vec<Vec<i32>> = batch.iter().map(|&i| row(i).0.to_vec()).collect();
        let types: Vec<Vec<i32>> = batch.iter().map(|&i| row(i).1.to_vec()).collect();
        let tokens = Batch::from_segmented_rows(&ids, &types, &model.config, None, device);
        each(&batch, model.logits(&tokens));
    }
}

/// The indices of the rows in batches of `batch_size`, shortest rows first. Each batch is
/// padded only to its longest row, so batching rows of like length does the least padded work;
/// the mask makes every row's result independent of its batch.
fn batches_by_length(lengths: impl Iterator<Item = usize>, batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<(usize, usize)> = lengths.enumerate().map(|(i, len)| (len, i)).collect();
    order.sort();
    order
        .chunks(batch_size.max(1))
        .map(|chunk| chunk.iter().map(|&(_, i)| i).collect())
        .collect()
}

/// Each row of a batch × outputs tensor.
fn rows_of(values: Tensor<2>) -> Vec<Vec<f32>> {
    let width = values.dims()[1];
    let flat: Vec<f32> = values.into_data().iter::<f32>().collect();
    flat.chunks(width).map(<[f32]>::to_vec).collect()
}

/// Outputs, predictions and loss of `model` on `examples`, by the model's `problem_type`.
pub fn predict(
    model: &Classifier,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Predictions {
    let problem = model.config.problem_type;
    let mut outputs = vec![Vec::new(); examples.len()];
    let mut predicted = vec![0; examples.len()];
    let mut loss_sum = 0.0f64;
    let row = |i: usize| (examples[i].ids.as_slice(), examples[i].type_ids.as_slice());
    logits_by_length(
        model,
        examples.len(),
        row,
        batch_size,
        device,
        |batch, logits| {
            let chosen: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
            loss_sum += batch_loss(problem, logits.clone(), &chosen, device);
            if problem.is_classification() {
                let argmax = logits.clone().argmax(1).into_data();
                for (&i, p) in batch.iter().zip(argmax.iter::<i64>()) {
                    predicted[i] = p as usize;
                }
            }
            for (&i, row) in batch.iter().zip(rows_of(outputs_of(problem, logits))) {
                outputs[i] = row;
            }
        },
    );
    Predictions {
        outputs,
        predicted,
        loss: loss_sum / examples.len().max(1) as f64,
    }
}

/// A batch's loss, summed over its examples: cross-entropy for single-label classification
/// (through burn's own loss, as evaluations computed it before other tasks existed), else
/// [`vector_loss_sum`] per example (its mean over the outputs).
fn batch_loss(problem: ProblemType, logits: Tensor<2>, batch: &[&Example], device: &Device) -> f64 {
    let rows = batch.len() as f64;
    if problem == ProblemType::SingleLabelClassification {
        let labels: Vec<i64> = batch.iter().map(|e| e.label).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch.len()]), device);
        let mean = CrossEntropyLossConfig::new()
            .init(device)
            .forward(logits, targets);
        return f64::from(mean.into_scalar::<f32>()) * rows;
    }
    let outputs = logits.dims()[1] as f64;
    let targets: Vec<f32> = batch
        .iter()
        .flat_map(|e| e.targets.iter().copied())
        .collect();
    let sum = vector_loss_sum(problem, logits, targets, device);
    f64::from(sum.into_scalar::<f32>()) / outputs
}

#[cfg(test)]
mod tests {
    use super::batches_by_length;

    #[test]
    fn batches_cover_every_row_once_shortest_first() {
        let lengths = [5, 1, 9, 3, 3, 7, 2];
        let batches = batches_by_length(lengths.iter().copied(), 3);
        assert_eq!(batches, vec![vec![1, 6, 3], vec![4, 0, 5], vec![2]]);
        assert!(batches_by_length(std::iter::empty(), 4).is_empty());
    }
}
