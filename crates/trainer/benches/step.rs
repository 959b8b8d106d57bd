//! Training step benchmark (`cargo bench -p finetune-trainer --bench step [-- MODEL]`): forward,
//! and the whole update as the trainer makes it (clipping to norm 1, weight decay 0.01), on the
//! CPU (burn's flex backend), on real token ids (the first 16 Amazon sentences, padded to the
//! width; set `FINETUNE_BENCH_TOKENS` for another width, rows longer than it are cut).
//!
//! MODEL is `minilm` (the default: all-MiniLM-L6-v2 at 16 × 64), a model directory, or a
//! family at its real width with 2 layers, made here with seeded random weights and saved for
//! both sides to load (16 × 128 by default): `bert` (bert-base), `deberta-v3` (deberta-v3-base:
//! 128k vocabulary, 256 log buckets), `modernbert` (ModernBERT-base: one global and one
//! sliding-window layer, mean pooling).
//! Prints each median against PyTorch's step on the same batch, measured in the same run when
//! `HF_PYTHON` names a Python with the reference's packages
//! (../shared/bench/hf_trainer/requirements.txt; it runs `benches/reference/torch_step.py`), else
//! against `FINETUNE_BENCH_REFERENCE_S` (default 0.5 s: PyTorch 2 + MKL on this machine type in
//! ../shared/BURN_NOTES.md). Also prints the step's split into gradients (forward, backward, norm
//! and clipping) and AdamW, and the time the linear layers' matmuls take alone.
//! `FINETUNE_BENCH_RUNS` sets the number of timed runs of each (default 5), and
//! `FINETUNE_BENCH_BATCH` the rows per batch (default 16).
//! `FINETUNE_BENCH_DEVICE` names the device as a pipeline's `device:` does (default `cpu`;
//! `cuda` in a `--features cuda` build, with the reference run on `cuda` too); each timed
//! step then ends with a sync of the device, so that a GPU's queued work is in the time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use finetune_model::{Batch, Classifier, ComputeDevice, hf};
use finetune_trainer::{AdamW, MicroBatch, UpdatePlan, update_gradients};

/// Rows per batch: `FINETUNE_BENCH_BATCH`, default 16.
fn batch_rows() -> usize {
    std::env::var("FINETUNE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = std::env::var_os("FINETUNE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("../shared"));
    // cargo bench passes `--bench` to a harness-less bench; the model is the first other word.
    let model = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "minilm".into());
    let made = tempfile::tempdir().expect("a temporary directory");
    let (model_name, model_dir, default_seq) = match model.as_str() {
        "minilm" => (
            "MiniLM-L6".to_string(),
            std::env::var_os("FINETUNE_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| shared.join("models/all-MiniLM-L6-v2")),
            64,
        ),
        family => match full_width_config(family) {
            Some(config) => {
                make_checkpoint(&config, made.path());
                (
                    format!("{family} (full width, 2 layers)"),
                    made.path().to_path_buf(),
                    128,
                )
            }
            None => (family.to_string(), PathBuf::from(family), 64),
        },
    };
    let seq: usize = std::env::var("FINETUNE_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_seq);
    let device_name = std::env::var("FINETUNE_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = finetune_model::device(&device_name).unwrap_or_else(|e| panic!("{e}"));
    let torch_device = if device.is_gpu() { "cuda" } else { "cpu" };
    let (reference, reference_name) = match std::env::var_os("HF_PYTHON") {
        Some(python) => (
            torch_step(
                &PathBuf::from(python),
                &model_dir,
                &shared,
                seq,
                torch_device,
            ),
            "PyTorch's (measured now)",
        ),
        None => (
            std::env::var("FINETUNE_BENCH_REFERENCE_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.5),
            "the given reference",
        ),
    };
    // Measured as the train stage runs: on a pool of its own, the reference left outside it.
    finetune_kernels::on_own_pool(|| {
        device.run(|| {
            let bench = Bench {
                model_name: &model_name,
                seq,
                shared: &shared,
                model_dir: &model_dir,
                device: &device,
            };
            bench.measure(reference, reference_name)
        })
    });
}

/// config.json of a family's base model cut to 2 layers, for `MODEL` = the family's name.
fn full_width_config(family: &str) -> Option<serde_json::Value> {
    let base = serde_json::json!({
        "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
        "num_hidden_layers": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0,
    });
    let family_keys = match family {
        "bert" => serde_json::json!({
            "model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        }),
        "deberta-v3" => serde_json::json!({
            "model_type": "deberta-v2", "vocab_size": 128100, "max_position_embeddings": 512,
            "type_vocab_size": 0, "layer_norm_eps": 1e-7, "relative_attention": true,
            "position_buckets": 256, "max_relative_positions": -1, "norm_rel_ebd": "layer_norm",
            "share_att_key": true, "pos_att_type": "p2c|c2p", "position_biased_input": false,
            "pooler_hidden_size": 768, "pooler_dropout": 0, "pooler_hidden_act": "gelu",
        }),
        "modernbert" => serde_json::json!({
            "model_type": "modernbert", "vocab_size": 50368, "intermediate_size": 1152,
            "max_position_embeddings": 8192, "hidden_activation": "gelu", "norm_eps": 1e-5,
            "global_attn_every_n_layers": 3, "local_attention": 128,
            "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
            "classifier_pooling": "mean", "attention_dropout": 0.0, "mlp_dropout": 0.0,
            "embedding_dropout": 0.0, "classifier_dropout": 0.0,
        }),
        _ => return None,
    };
    let mut config = base;
    for (key, value) in family_keys.as_object().expect("an object") {
        config[key] = value.clone();
    }
    Some(config)
}

/// Writes `config` and seeded random weights (seed 42) to `dir` as a Hugging Face checkpoint.
fn make_checkpoint(config: &serde_json::Value, dir: &Path) {
    let config =
        finetune_model::ModelConfig::from_hf_value(&dir.join("config.json"), config.clone())
            .expect("a valid config");
    let device = finetune_model::device("cpu")
        .expect("the CPU")
        .device()
        .clone();
    let mut init = finetune_model::InitSource::new(&config, 42);
    let model = finetune_model::build(&config, &mut init, &device).expect("a model");
    hf::save(&model, dir).expect("save the checkpoint");
}

struct Bench<'a> {
    model_name: &'a str,
    seq: usize,
    shared: &'a Path,
    model_dir: &'a Path,
    device: &'a ComputeDevice,
}

impl Bench<'_> {
    /// Loads the model, times its forward pass and its training step, and prints both against the
    /// reference (`reference` seconds a step).
    fn measure(&self, reference: f64, reference_name: &str) {
        let Bench {
            model_name,
            seq,
            shared,
            model_dir,
            device: compute,
        } = *self;
        let rows_per_batch = batch_rows();
        let sync = || compute.device().sync().expect("the device's queued work");
        // Real sentences, cut to `seq` tokens when shorter widths are asked for.
        let rows: Vec<Vec<i32>> = golden_rows(shared, rows_per_batch)
            .into_iter()
            .map(|row| row[..row.len().min(seq)].to_vec())
            .collect();
        let labels = vec!["negative".to_string(), "positive".to_string()];
        let device = compute.device().clone();
        let train_device = device.clone().autodiff();

        let (model, _) = hf::load(model_dir, Some(&labels), 42, &device).expect("load the model");
        let batch = Batch::from_rows(&rows, &model.config, Some(seq), &device);
        let forward = median(|| {
            let _ = model.logits(&batch).into_data();
        });

        let (model, _) =
            hf::load(model_dir, Some(&labels), 42, &train_device).expect("load the model");
        let micro = [MicroBatch {
            type_ids: Vec::new(),
            rows: rows.clone(),
            labels: (0..rows_per_batch as i64).map(|i| i % 2).collect(),
            targets: Vec::new(),
        }];
        let mut optimizer = AdamW {
            weight_decay: 0.01,
            ..Default::default()
        }
        .build(&model);
        let plan = UpdatePlan {
            lr: 5e-5,
            max_grad_norm: Some(1.0),
            pad_to: Some(seq),
            dropout_seed: 0,
            attack: None,
            words: optimizer.word_gradient(),
            loss: &finetune_trainer::Loss::default(),
        };
        // flex runs each operation to completion before returning; a GPU's queue is synced.
        let mut phases: Vec<[Duration; 2]> = Vec::new();
        let mut slot = Some(model);
        let mut step = || {
            let started = Instant::now();
            let model = slot.take().expect("the model of the last step");
            let (grads, _) = update_gradients(&model, &micro, &plan, &train_device);
            sync();
            let gradients = started.elapsed();
            slot = Some(optimizer.step(plan.lr, model, grads));
            sync();
            phases.push([gradients, started.elapsed() - gradients]);
        };
        step(); // warm-up: allocations, optimizer state
        let train_step = median(&mut step);
        let phase = |i: usize| {
            let mut all: Vec<Duration> = phases[1..].iter().map(|p| p[i]).collect();
            all.sort();
            all[all.len() / 2]
        };
        let model = slot.expect("the trained model");
        let matmuls = matmul_time(&model.valid(), &device, seq);

        println!(
            "{model_name}, batch {rows_per_batch} x {seq} tokens, on {}, median of {}:",
            compute.describe(),
            runs()
        );
        println!("  forward (eval):                  {:7.1} ms", ms(forward));
        println!(
            "  forward + backward + AdamW step: {:7.1} ms | {reference_name} {:.1} ms | ratio {:.2}",
            ms(train_step),
            reference * 1e3,
            train_step.as_secs_f64() / reference
        );
        println!(
            "    of which forward + backward + gradient norm and clipping {:.1} ms, AdamW {:.1} ms (medians)",
            ms(phase(0)),
            ms(phase(1))
        );
        println!(
            "  profile: the linear layers' matmuls alone take {:.1} ms ({:.0}% of the step); everything else {:.1} ms",
            ms(matmuls),
            100.0 * matmuls.as_secs_f64() / train_step.as_secs_f64(),
            ms(train_step.saturating_sub(matmuls))
        );
    }
}

/// The linear layers' matmuls of one training step, run alone: each layer's forward product
/// and its two backward products (attention is a fused kernel, not matmuls).
fn matmul_time(model: &Classifier, device: &Device, seq: usize) -> Duration {
    let c = &model.config;
    let rows_per_batch = batch_rows();
    let tokens = rows_per_batch * seq;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<([usize; 2], [usize; 2])> = Vec::new();
    let mut linear = |rows: usize, d_in: usize, d_out: usize| {
        shapes.push(([rows, d_in], [d_in, d_out])); // forward
        shapes.push(([rows, d_out], [d_out, d_in])); // input gradient
        shapes.push(([d_in, rows], [rows, d_out])); // weight gradient
    };
    for layer in 0..c.num_layers {
        // The last layer computes the first token's row only (`Classifier::logits`).
        let rows = match layer + 1 == c.num_layers {
            true => rows_per_batch,
            false => tokens,
        };
        linear(tokens, h, h); // key
        linear(tokens, h, h); // value
        linear(rows, h, h); // query
        linear(rows, h, h); // attention output
        linear(rows, h, i);
        linear(rows, i, h);
    }
    let operands: Vec<(Tensor<2>, Tensor<2>)> = shapes
        .iter()
        .map(|(a, b)| (Tensor::<2>::ones(*a, device), Tensor::<2>::ones(*b, device)))
        .collect();
    median(|| {
        for (a, b) in &operands {
            let _ = a.clone().matmul(b.clone()).into_data();
        }
    })
}

fn golden_rows(shared: &Path, n: usize) -> Vec<Vec<i32>> {
    let text = std::fs::read_to_string(shared.join("golden/tokenize_minilm.jsonl"))
        .expect("golden token ids");
    text.lines()
        .take(n)
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("json");
            row["input_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_i64().unwrap_or(0) as i32)
                .collect()
        })
        .collect()
}

/// PyTorch's median step on the same rows (`benches/reference/torch_step.py`), in seconds.
fn torch_step(
    python: &std::path::Path,
    model_dir: &std::path::Path,
    shared: &std::path::Path,
    seq: usize,
    device: &str,
) -> f64 {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../benches/reference/torch_step.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model_dir)
        .arg("--golden")
        .arg(shared.join("golden/tokenize_minilm.jsonl"))
        .args(["--tokens", &seq.to_string(), "--runs", &runs().to_string()])
        .args(["--device", device])
        .args(["--batch", &batch_rows().to_string()])
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("run the PyTorch reference");
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or_default())
        .expect("the reference's JSON line");
    result["step_median_s"].as_f64().expect("step_median_s")
}

fn runs() -> usize {
    std::env::var("FINETUNE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(5)
}

fn median(mut work: impl FnMut()) -> Duration {
    let runs = runs();
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples[runs / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
