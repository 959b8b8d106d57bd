//! Inference without autodiff: class probabilities for token rows, and the predictions and
//! loss of a model on labelled examples. Used by the trainer's evaluations, the `evaluate`
//! stage and `finetune predict`.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::model::{Batch, Classifier};

/// One tokenized text (or sentence pair) and its label's index.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<i32>,
    /// Each token's segment for a sentence pair (0: first text, 1: second); empty for one
    /// text.
    pub type_ids: Vec<i32>,
    pub label: i64,
}

/// What a model said about a set of examples.
pub struct Predictions {
    /// Per example, the probability of each label.
    pub probabilities: Vec<Vec<f32>>,
    /// Per example, the most probable label (the first on a tie, as argmax).
    pub predicted: Vec<usize>,
    /// Mean cross-entropy against the examples' labels.
    pub loss: f64,
}

/// What the head said about one text, per label in the model's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelScores {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
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
            let rows = raw.chunks(labels).zip(softmax_rows(logits));
            for (&i, (logits, probabilities)) in batch.iter().zip(rows) {
                out[i] = LabelScores {
                    logits: logits.to_vec(),
                    probabilities,
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

/// Each row of `logits` (batch × labels) as label probabilities.
fn softmax_rows(logits: Tensor<2>) -> Vec<Vec<f32>> {
    let labels = logits.dims()[1];
    let flat: Vec<f32> = softmax(logits, 1).into_data().iter::<f32>().collect();
    flat.chunks(labels).map(<[f32]>::to_vec).collect()
}

/// Probabilities, predictions and loss of `model` on `examples`.
pub fn predict(
    model: &Classifier,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Predictions {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut probabilities = vec![Vec::new(); examples.len()];
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
            let targets = Tensor::<1, Int>::from_data(
                TensorData::new(
                    batch.iter().map(|&i| examples[i].label).collect::<Vec<_>>(),
                    [batch.len()],
                ),
                device,
            );
            loss_sum += f64::from(
                loss_fn
                    .forward(logits.clone(), targets)
                    .into_scalar::<f32>(),
            ) * batch.len() as f64;
            let argmax = logits.clone().argmax(1).into_data();
            for (&i, p) in batch.iter().zip(argmax.iter::<i64>()) {
                predicted[i] = p as usize;
            }
            for (&i, row) in batch.iter().zip(softmax_rows(logits)) {
                probabilities[i] = row;
            }
        },
    );
    Predictions {
        probabilities,
        predicted,
        loss: loss_sum / examples.len().max(1) as f64,
    }
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
