//! Devices through the binary: `device: cpu-generic` runs the flex device through burn's own
//! operations, the path every GPU takes, and must train and evaluate as the fused CPU kernels
//! do (up to float reassociation); a GPU's out-of-memory restart, taken on that path, keeps the
//! run's result; device names this build cannot serve are refused with the feature to build.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// `device: NAME` on the train and evaluate stages of `ws`'s pipeline `file`.
fn on_device(ws: &Ws, file: &str, name: &str) {
    let yaml = std::fs::read_to_string(ws.file(file)).unwrap();
    let yaml = yaml
        .replacen(
            "      model: { ",
            &format!("      device: {name}\n      model: {{ "),
            1,
        )
        .replacen(
            "    with: { split: test }\n",
            &format!("    with: {{ split: test, device: {name} }}\n"),
            1,
        );
    assert!(yaml.contains(&format!("device: {name}\n")), "{yaml}");
    ws.write(file, yaml);
}

/// The train stage's records of logs/train.jsonl that carry a training loss.
fn losses(train: &Path) -> Vec<f64> {
    std::fs::read_to_string(train.join("logs/train.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).unwrap()["loss"].as_f64())
        .collect()
}

fn assert_close(what: &str, a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-4, "{what}: {a} against {b}");
}

/// Trains `pipeline` (cut to `steps` updates) on `cpu` and on `cpu-generic`, and returns both
/// train outputs.
fn train_both_ways(pipeline: &str, steps: usize) -> [(Ws, std::path::PathBuf); 2] {
    let file = format!("pipelines/{pipeline}.yaml");
    ["cpu", "cpu-generic"].map(|device| {
        let ws = Ws::new();
        let yaml = std::fs::read_to_string(ws.file(&file)).unwrap();
        let cut = yaml.replacen(
            "        batch_size: 16\n",
            &format!(
                "        batch_size: 16\n        max_steps: {steps}\n        logging_steps: 1\n"
            ),
            1,
        );
        assert!(cut.contains("max_steps"));
        ws.write(&file, cut);
        on_device(&ws, &file, device);
        let out = ws
            .command(&["run", "--json", &file])
            .env("FINETUNE_MODEL_DIR", model_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{device}: {}", stderr(&out));
        let train = output_dir(&ws, pipeline, "train");
        (ws, train)
    })
}

fn compare_runs(fused: &Path, generic: &Path) {
    let (a, b) = (losses(fused), losses(generic));
    assert!(a.len() >= 10 && a.len() == b.len(), "{a:?} / {b:?}");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_close(&format!("training loss at record {step}"), *x, *y);
    }
    let (ma, mb) = (
        read_json(&fused.join("metrics.json")),
        read_json(&generic.join("metrics.json")),
    );
    assert_eq!(
        ma["test"]["accuracy"], mb["test"]["accuracy"],
        "{ma} / {mb}"
    );
    assert_close(
        "test loss",
        ma["test"]["loss"].as_f64().unwrap(),
        mb["test"]["loss"].as_f64().unwrap(),
    );
    let history = read_json(&generic.join("run_history.json"));
    assert_eq!(
        history["device"]["name"], "cpu-generic",
        "{}",
        history["device"]
    );
    let history = read_json(&fused.join("run_history.json"));
    assert_eq!(history["device"]["name"], "cpu", "{}", history["device"]);
}

#[test]
fn minilm_fine_tunes_on_the_generic_path_as_on_the_fused_kernels() {
    let [(_a, fused), (_b, generic)] = train_both_ways("reviews-minilm", 12);
    compare_runs(&fused, &generic);
}

/// The default pipeline trains a scratch model with AWP and Mixout: both regularizers, and the
/// evaluate stage, on the generic path.
#[test]
fn the_default_pipeline_with_awp_and_mixout_runs_the_same_on_the_generic_path() {
    let [(a, fused), (b, generic)] = train_both_ways("reviews", 30);
    compare_runs(&fused, &generic);
    let (ea, eb) = (
        read_json(&output_dir(&a, "reviews", "evaluate").join("metrics.json")),
        read_json(&output_dir(&b, "reviews", "evaluate").join("metrics.json")),
    );
    assert_eq!(ea["accuracy"], eb["accuracy"], "{ea} / {eb}");
}

/// On a device that queues its work (every GPU; `cpu-generic` takes the same path) the
/// injected fault comes after the optimizer's step, as cubecl reports a failed allocation at the
/// next sync: the restart must undo that step (model and optimizer state) and redo the update
/// in halves, ending where a run at 8 × 2 from the start ends.
#[test]
fn an_out_of_memory_failure_at_a_queued_devices_sync_rolls_the_step_back() {
    let runs = HalfBatchRuns::run(|ws| on_device(ws, "pipelines/reviews.yaml", "cpu-generic"));
    let splits: Vec<Value> = std::fs::read_to_string(runs.faulty_train.join("logs/train.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|r| r["event"] == "micro_batch_split")
        .collect();
    assert_eq!(splits.len(), 1, "{splits:?}");
    assert_eq!(splits[0]["step"], 4, "the split happens at update 5");
    assert_same_weights(&runs.faulty_train, &runs.small_train, 1e-4);
}

#[test]
fn a_device_this_build_lacks_is_refused_with_the_feature_to_build() {
    for (name, expected) in [
        ("cuda:0", "needs a build with the `cuda` feature"),
        ("tpu", "unknown device `tpu`"),
    ] {
        let ws = Ws::new();
        on_device(&ws, "pipelines/reviews.yaml", name);
        let out = ws.run(&["run"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(expected) && err.contains("device"), "{err}");
        assert!(
            !ws.file("artifacts/runs").exists(),
            "refused before anything ran"
        );
    }
}

/// `finetune predict --json` on the real MiniLM checkpoint: each text's probabilities.
fn predicted(ws: &Ws, extra: &[&str], texts: &[&str]) -> Vec<Vec<f64>> {
    let model = model_dir();
    let mut args = vec!["predict", "--json", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(texts);
    let out = ws.run(&args);
    assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let probabilities = row["probabilities"].as_object().unwrap();
            probabilities
                .values()
                .map(|p| p.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn predict_in_bf16_stays_within_bf16s_precision_of_f32() {
    let ws = Ws::new();
    let texts = [
        "Great sound, and the battery lasts all week.",
        "Stopped working after two days; the seller never answered.",
        "It is fine.",
    ];
    let f32s = predicted(&ws, &[], &texts);
    let generic = predicted(&ws, &["--device", "cpu-generic"], &texts);
    let bf16s = predicted(&ws, &["--bf16"], &texts);
    assert_eq!(f32s.len(), texts.len());
    let mut bf16_moved = false;
    for ((a, g), b) in f32s.iter().zip(&generic).zip(&bf16s) {
        for ((x, y), z) in a.iter().zip(g).zip(b) {
            assert!((x - y).abs() <= 1e-5, "generic path {y} against {x}");
            assert!((x - z).abs() <= 2e-2, "bf16 {z} against f32 {x}");
            bf16_moved |= x != z;
        }
    }
    assert!(
        bf16_moved,
        "bf16 gave f32's probabilities exactly: it did not run in bf16"
    );
}
