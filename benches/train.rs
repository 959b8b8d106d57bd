//! Training throughput and memory (`cargo bench --bench train`) on the reference protocol of
//! ../shared/bench/hf_trainer: all-MiniLM-L6-v2 on the 1,000 Amazon sentences, 80/20 split,
//! batch 16, 3 epochs, max 64 tokens. Runs `finetune run pipelines/reviews-minilm.yaml` in a
//! fresh workspace with `padding: max_length` (the reference's fixed padding: equal work), with
//! `padding: dynamic` (the default), and with length grouping on top, and prints Trainer's figure
//! (training samples/s over the whole loop, evaluations included), the wall time of the run,
//! the process's peak RSS, and the test accuracy.
//!
//! With `HF_PYTHON` pointing at a Python that has torch and transformers
//! (../shared/bench/hf_trainer/requirements.txt), the reference runs in the same sitting and
//! the ratios are printed; benches/reference/hf_trainer_best.py runs Trainer with its best CPU
//! settings (dynamic padding, `group_by_length`) against ours with length grouping. `BENCH_RUNS` (default 1) repeats each and reports medians.
//! Needs the real model (FINETUNE_MODEL_DIR or models/all-MiniLM-L6-v2). Time on an idle
//! machine: a build on the other core makes every figure meaningless.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_finetune");

/// 800 training rows, 3 epochs.
const TRAINING_SAMPLES: f64 = 2400.0;

struct Figures {
    /// Process start to the trained model (ours: the whole `finetune run`).
    wall_seconds: f64,
    samples_per_second: f64,
    peak_rss_mib: f64,
    test_accuracy: f64,
}

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("FINETUNE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("models/all-MiniLM-L6-v2"));
    assert!(
        model.join("model.safetensors").is_file(),
        "the real model is needed at {}: run scripts/fetch-model.sh or set FINETUNE_MODEL_DIR",
        model.display()
    );
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let shared = std::env::var_os("FINETUNE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("../shared"));

    let python = std::env::var_os("HF_PYTHON").map(PathBuf::from);
    // Trainer with the reference's fixed padding, and with its best settings for this data.
    let reference_runs = |run: fn(&Path, &Path, &Path) -> Figures| {
        let python = python.as_deref()?;
        Some(median_figures(
            (0..runs).map(|_| run(python, &shared, &model)).collect(),
        ))
    };
    let reference = reference_runs(run_reference);
    if let Some(r) = &reference {
        println!(
            "HF Trainer, padding 64 (fixed):             {:.1} samples/s, {:.1} s to the trained model, peak RSS {:.0} MiB, test accuracy {:.3}",
            r.samples_per_second, r.wall_seconds, r.peak_rss_mib, r.test_accuracy
        );
    }
    let best_reference = reference_runs(run_best_reference);
    if let Some(r) = &best_reference {
        println!(
            "HF Trainer, dynamic padding + group_by_length: {:.1} samples/s, {:.1} s to the trained model, peak RSS {:.0} MiB, test accuracy {:.3}",
            r.samples_per_second, r.wall_seconds, r.peak_rss_mib, r.test_accuracy
        );
    }
    for padding in ["max_length", "dynamic", "dynamic + group_by_length"] {
        let ours = median_figures(
            (0..runs)
                .map(|_| run_ours(&repo, &model, padding))
                .collect(),
        );
        let mut line = format!(
            "finetune, padding {padding:<26} {:.1} samples/s, {:.1} s in all, peak RSS {:.0} MiB, test accuracy {:.3}",
            ours.samples_per_second, ours.wall_seconds, ours.peak_rss_mib, ours.test_accuracy
        );
        if let Some(r) = &reference {
            line += &format!(
                " | vs HF: speed ratio {:.2} (target >= 1.0 with dynamic), memory ratio {:.2} (target <= 0.6)",
                ours.samples_per_second / r.samples_per_second,
                ours.peak_rss_mib / r.peak_rss_mib
            );
        }
        println!("{line}");
        if let (Some(best), "dynamic + group_by_length") = (&best_reference, padding) {
            println!(
                "  each tool's best settings: wall time ratio {:.2} (target <= 0.5), memory ratio {:.2} (target <= 0.6)",
                ours.wall_seconds / best.wall_seconds,
                ours.peak_rss_mib / best.peak_rss_mib
            );
        }
    }
}

fn run_ours(repo: &Path, model: &Path, padding: &str) -> Figures {
    let ws = tempfile::tempdir().expect("temp dir");
    for dir in ["pipelines", "data"] {
        copy_dir(&repo.join(dir), &ws.path().join(dir));
    }
    let pipeline = ws.path().join("pipelines/reviews-minilm.yaml");
    let yaml = std::fs::read_to_string(&pipeline).expect("reviews-minilm.yaml");
    let settings = match padding {
        "dynamic + group_by_length" => {
            "padding: dynamic\n        group_by_length: true".to_string()
        }
        other => format!("padding: {other}"),
    };
    let yaml = yaml.replace("padding: dynamic", &settings);
    std::fs::write(&pipeline, yaml).expect("write pipeline");
    let started = std::time::Instant::now();
    let out = Command::new(BIN)
        .args(["run", "--json", "pipelines/reviews-minilm.yaml"])
        .current_dir(ws.path())
        .env("FINETUNE_MODEL_DIR", model)
        .output()
        .expect("run finetune");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let finished = events
        .iter()
        .find(|e| e["event"] == "run_finished")
        .expect("run_finished event");
    let train = ws.path().join("artifacts/runs/reviews-minilm/train");
    let history = read_json(&train.join("run_history.json"));
    let metrics = read_json(&train.join("metrics.json"));
    Figures {
        wall_seconds: started.elapsed().as_secs_f64(),
        samples_per_second: history["train_samples_per_second"]
            .as_f64()
            .expect("samples/s"),
        peak_rss_mib: finished["peak_rss_mib"].as_f64().expect("peak RSS"),
        test_accuracy: metrics["test"]["accuracy"].as_f64().expect("test accuracy"),
    }
}

fn run_reference(python: &Path, shared: &Path, model: &Path) -> Figures {
    let out_file = tempfile::NamedTempFile::new().expect("temp file");
    let bench = shared.join("bench/hf_trainer/bench_hf.py");
    let status = reference_command(python, &bench, shared, model)
        .args(["--bs", "16", "--ga", "1", "--tag", "A", "--json"])
        .arg(out_file.path())
        .status()
        .expect("run the reference benchmark");
    assert!(status.success(), "{} failed", bench.display());
    let result = read_json(out_file.path());
    let number = |pointer: &str| {
        result
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("the reference reported no {pointer}"))
    };
    Figures {
        wall_seconds: number("/t_to_first_step_begin_s") + number("/train_wall_s"),
        samples_per_second: number("/train_metrics/train_samples_per_second"),
        peak_rss_mib: number("/rss_peak_mib"),
        test_accuracy: number("/final_eval/eval_accuracy"),
    }
}

/// A Python reference script on the Amazon sentences, offline, on two threads.
fn reference_command(python: &Path, script: &Path, shared: &Path, model: &Path) -> Command {
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg("--data")
        .arg(shared.join("data/uci_sentiment/amazon_cells_labelled.txt"))
        .arg("--model")
        .arg(model)
        .env("HF_HUB_OFFLINE", "1")
        .env("OMP_NUM_THREADS", "2");
    command
}

/// benches/reference/hf_trainer_best.py: the same protocol with Trainer's best CPU settings.
fn run_best_reference(python: &Path, shared: &Path, model: &Path) -> Figures {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference/hf_trainer_best.py");
    let work = tempfile::tempdir().expect("temp dir");
    let out = reference_command(python, &script, shared, model)
        .current_dir(work.path())
        .output()
        .expect("run the best-settings reference");
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("{} printed no JSON line", script.display()));
    let number = |key: &str| result[key].as_f64().unwrap_or_else(|| panic!("no {key}"));
    Figures {
        wall_seconds: number("wall_to_trained_model_s"),
        samples_per_second: TRAINING_SAMPLES / number("train_loop_s"),
        peak_rss_mib: number("peak_rss_mib"),
        test_accuracy: number("test_accuracy"),
    }
}

fn median_figures(mut all: Vec<Figures>) -> Figures {
    let median = |f: fn(&Figures) -> f64| {
        let mut values: Vec<f64> = all.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let figures = Figures {
        wall_seconds: median(|f| f.wall_seconds),
        samples_per_second: median(|f| f.samples_per_second),
        peak_rss_mib: median(|f| f.peak_rss_mib),
        test_accuracy: median(|f| f.test_accuracy),
    };
    all.clear();
    figures
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
