//! One optimizer update: gradient accumulation equals one large batch of the same samples.

#[path = "../../model/tests/common/mod.rs"]
mod common;
use common::{fixtures, minilm, repo};

use burn::tensor::Device;
use finetune_model::Batch;
use finetune_model::hf::{load, named_tensors};
use finetune_trainer::{
    AdamW, Loss, MicroBatch, UpdatePlan, WordGradient, gradients_taking, update,
};

/// The CPU device with autodiff, and the reviews' two labels.
fn training_device_and_labels() -> (Device, Vec<String>) {
    let device = finetune_model::device("cpu").unwrap().device().clone();
    let labels = vec!["negative".to_string(), "positive".to_string()];
    (device.autodiff(), labels)
}

/// The first `n` Amazon sentences: MiniLM ids from the golden file, labels from the shipped data.
fn samples(n: usize) -> (Vec<Vec<i32>>, Vec<i64>) {
    let golden = std::fs::read_to_string(fixtures().join("golden/tokenize_minilm.jsonl")).unwrap();
    let rows = golden
        .lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() as i32)
                .collect()
        })
        .collect();
    let data = std::fs::read_to_string(repo().join("data/raw/product_reviews.tsv")).unwrap();
    let labels = data
        .lines()
        .take(n)
        .map(|l| l.rsplit('\t').next().unwrap().trim().parse().unwrap())
        .collect();
    (rows, labels)
}

#[test]
fn batch_16_equals_batch_8_accumulated_twice() {
    accumulation_matches_one_batch(&Loss::default());
}

/// With class weights each micro-batch's loss scales by its share of the update's weight, not
/// of its rows; label smoothing changes nothing about that.
#[test]
fn weighted_and_smoothed_batch_16_equals_8_plus_8_and_5_plus_11() {
    accumulation_matches_one_batch(&weighted_smoothed());
}

fn weighted_smoothed() -> Loss {
    Loss {
        problem_type: Default::default(),
        class_weights: Some(vec![0.3, 1.7]),
        label_smoothing: 0.1,
        huber_delta: None,
    }
}

/// The weighted, smoothed loss of MiniLM's logits on 16 real sentences is PyTorch's
/// `cross_entropy(logits, y, weight=w, label_smoothing=ε)`, written out here in f64 (the same
/// formula gives torch's value to 1e-15 on random logits: see the #27 note).
#[test]
fn the_weighted_smoothed_loss_is_pytorchs() {
    let _device = finetune_kernels::exclusive_device();
    let (device, labels) = training_device_and_labels();
    let (rows, targets) = samples(16);
    let (model, _) = load(&minilm(), Some(&labels), 42, &device).unwrap();
    let model = model.without_dropout();
    let logits: Vec<f64> = model
        .logits(&Batch::from_rows(&rows, &model.config, None, &device))
        .into_data()
        .iter::<f32>()
        .map(f64::from)
        .collect();
    let loss = weighted_smoothed();
    let (w, eps) = ([0.3f64, 1.7], 0.1f64);
    let (mut cost, mut weight) = (0.0, 0.0);
    for (row, &y) in logits.chunks(2).zip(&targets) {
        let top = row[0].max(row[1]);
        let log_sum = top + row.iter().map(|z| (z - top).exp()).sum::<f64>().ln();
        let neg_log_p = |c: usize| log_sum - row[c];
        let y = y as usize;
        cost += (1.0 - eps) * w[y] * neg_log_p(y)
            + eps / 2.0 * (w[0] * neg_log_p(0) + w[1] * neg_log_p(1));
        weight += w[y];
    }
    let expected = cost / weight;
    let micro = [MicroBatch {
        type_ids: Vec::new(),
        rows,
        labels: targets,
        targets: Vec::new(),
    }];
    let dense = WordGradient::Dense;
    let (_, ours) = gradients_taking(&model, &micro, None, dense, &loss, &device);
    let (_, plain) = gradients_taking(&model, &micro, None, dense, &Loss::default(), &device);
    assert!(
        (ours - expected).abs() < 1e-5,
        "ours {ours}, PyTorch's formula {expected}"
    );
    assert!(
        (ours - plain).abs() > 1e-3,
        "weights and smoothing must change the loss ({ours} vs {plain})"
    );
}

fn accumulation_matches_one_batch(loss: &Loss) {
    // The CPU backend's RNG is the process's: another test's seeding would change the masks.
    let _device = finetune_kernels::exclusive_device();
    let (device, labels) = training_device_and_labels();
    let (rows, targets) = samples(16);
    let adamw = AdamW {
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let run = |split: &[usize]| {
        let (model, _) = load(&minilm(), Some(&labels), 42, &device).unwrap();
        let model = model.without_dropout();
        let mut optimizer = adamw.build(&model);
        let mut start = 0;
        let micro: Vec<MicroBatch> = split
            .iter()
            .map(|&n| {
                let m = MicroBatch {
                    type_ids: Vec::new(),
                    rows: rows[start..start + n].to_vec(),
                    labels: targets[start..start + n].to_vec(),
                    targets: Vec::new(),
                };
                start += n;
                m
            })
            .collect();
        let plan = UpdatePlan {
            lr: 5e-5,
            max_grad_norm: Some(1.0),
            pad_to: None,
            dropout_seed: 0,
            attack: None,
            words: optimizer.word_gradient(),
            loss,
        };
        let (model, stats) = update(model, &mut optimizer, &micro, &plan, &device);
        (named_tensors(&model), stats)
    };
    let (one, one_stats) = run(&[16]);
    let (two, two_stats) = run(&[8, 8]);
    let (uneven, uneven_stats) = run(&[5, 11]);
    for (stats, name) in [(two_stats, "8 + 8"), (uneven_stats, "5 + 11")] {
        assert!(
            (stats.loss - one_stats.loss).abs() < 1e-5,
            "{name}: loss {} vs {}",
            stats.loss,
            one_stats.loss
        );
        assert!(
            (stats.grad_norm - one_stats.grad_norm).abs() / one_stats.grad_norm < 1e-4,
            "{name}: grad norm {} vs {}",
            stats.grad_norm,
            one_stats.grad_norm
        );
    }
    let max_diff = |a: &[(String, Vec<usize>, Vec<f32>)], b: &[(String, Vec<usize>, Vec<f32>)]| {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.2.iter().zip(&y.2).map(|(p, q)| (p - q).abs()))
            .fold(0.0f32, f32::max)
    };
    let (d_two, d_uneven) = (max_diff(&one, &two), max_diff(&one, &uneven));
    eprintln!(
        "accumulation: loss {:.6}, grad norm {:.6}; max |weight diff| 8+8: {d_two:e}, 5+11: {d_uneven:e}",
        one_stats.loss, one_stats.grad_norm
    );
    // Adam's first step moves each weight by about lr = 5e-5; float reassociation may only move it by a sliver of that.
    assert!(
        d_two < 1e-6 && d_uneven < 1e-6,
        "8+8: {d_two:e}, 5+11: {d_uneven:e}"
    );
    let (model, _) = load(&minilm(), Some(&labels), 42, &device).unwrap();
    let before = named_tensors(&model);
    assert!(
        max_diff(&before, &one) > 1e-5,
        "the update must change the weights"
    );
}

/// The word embeddings trained by rows take the dense update's steps bit for bit: three updates
/// of 5 + 11 accumulated samples with dropout and weight decay, so that rows used, rows used
/// before and rows never used all occur. With clipping, only the gradient norm's summation
/// order differs (float reassociation).
#[test]
fn word_embeddings_by_rows_equal_the_dense_update() {
    let _device = finetune_kernels::exclusive_device();
    let (device, labels) = training_device_and_labels();
    let (rows, targets) = samples(48);
    let run = |word_rows: bool, max_grad_norm: Option<f64>| {
        let (mut model, _) = load(&minilm(), Some(&labels), 42, &device).unwrap();
        let mut optimizer = AdamW {
            weight_decay: 0.01,
            word_rows,
            ..AdamW::default()
        }
        .build(&model);
        let mut norms = Vec::new();
        for step in 0..3 {
            let at = step * 16;
            let micro = [(at, 5), (at + 5, 11)].map(|(start, n)| MicroBatch {
                type_ids: Vec::new(),
                rows: rows[start..start + n].to_vec(),
                labels: targets[start..start + n].to_vec(),
                targets: Vec::new(),
            });
            let plan = UpdatePlan {
                lr: 1e-3,
                max_grad_norm,
                pad_to: None,
                dropout_seed: step as u64,
                attack: None,
                words: optimizer.word_gradient(),
                loss: &Loss::default(),
            };
            let stats;
            (model, stats) = update(model, &mut optimizer, &micro, &plan, &device);
            norms.push(stats.grad_norm);
        }
        (named_tensors(&model), norms)
    };
    let (dense, dense_norms) = run(false, None);
    let (by_rows, row_norms) = run(true, None);
    for ((name, _, a), (_, _, b)) in dense.iter().zip(&by_rows) {
        assert!(
            a == b,
            "{name} differs between the dense and the row update"
        );
    }
    for (a, b) in dense_norms.iter().zip(&row_norms) {
        assert!((a - b).abs() <= 1e-12 * a, "gradient norm {a} against {b}");
    }
    let (clipped_dense, _) = run(false, Some(1.0));
    let (clipped_rows, _) = run(true, Some(1.0));
    let worst = clipped_dense
        .iter()
        .zip(&clipped_rows)
        .flat_map(|(a, b)| a.2.iter().zip(&b.2).map(|(p, q)| (p - q).abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "clipped: max |weight diff| {worst:e}");
    let (start, _) = load(&minilm(), Some(&labels), 42, &device).unwrap();
    let words = |t: &[(String, Vec<usize>, Vec<f32>)]| {
        t.iter()
            .find(|(name, _, _)| name.contains("word_embeddings"))
            .map(|(_, _, v)| v.clone())
            .unwrap()
    };
    assert!(
        words(&by_rows) != words(&named_tensors(&start)),
        "the word embeddings trained"
    );
}
