//! The `train` stage through the binary: the embedded default trains from scratch, saves a
//! model Hugging Face can load, logs every update, and a seed reproduces the run exactly.

mod common;

use common::*;

/// The `loss` of every update line of logs/train.jsonl.
fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("logs/train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| {
            v.get("loss")
                .and_then(|l| l.as_f64())
                .filter(|_| v.get("grad_norm").is_some())
        })
        .collect()
}

#[test]
fn the_default_pipeline_trains_a_model_from_scratch_reproducibly() {
    let (a, b) = (Ws::new(), Ws::new());
    for ws in [&a, &b] {
        let events = ws.run_ok(&[]);
        assert!(stages_with(&events, "stage_finished").contains(&"train".to_string()));
    }
    let (out_a, out_b) = (
        output_dir(&a, "reviews", "train"),
        output_dir(&b, "reviews", "train"),
    );
    let (la, lb) = (losses(&out_a), losses(&out_b));
    assert_eq!(la.len(), 44 * 8, "700 train rows at batch 16 for 8 epochs");
    assert_eq!(
        la, lb,
        "same seed, same data: the loss curve must be identical"
    );
    assert!(la[la.len() - 1] < la[0], "the loss must fall");
    let metrics = read_json(&out_a.join("metrics.json"));
    let accuracy = metrics["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.70, "validation accuracy {accuracy}");
    assert_eq!(metrics["confusion"].as_array().unwrap().len(), 2);
    let history = read_json(&out_a.join("run_history.json"));
    assert_eq!(
        history["params"]["model"]["scratch"]["layers"], 2,
        "run_history.json records the stage's params"
    );
    assert_eq!(history["epochs"].as_array().unwrap().len(), 8);
    let device = finetune_transformer::device("cpu").unwrap();
    let (model, report) =
        finetune_transformer::hf::load(&out_a.join("model"), None, 0, &device).unwrap();
    assert!(report.newly_initialized.is_empty() && report.unexpected.is_empty());
    assert_eq!(model.config.labels, ["0", "1"]);
    assert!(out_a.join("model/tokenizer.json").is_file());
}

#[test]
fn bad_training_params_are_refused_before_anything_runs() {
    let ws = Ws::new();
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    for (from, to, message) in [
        (
            "lr: 1.0e-3",
            "lr: -1.0e-3",
            "key `with.training.lr`: -0.001 is not a positive learning rate",
        ),
        (
            "batch_size: 16",
            "batch_size: 0",
            "key `with.training.batch_size`: must be at least 1",
        ),
        (
            "heads: 4",
            "heads: 3",
            "key `with.model.scratch`: hidden (128) must be a multiple of heads (3)",
        ),
    ] {
        ws.write("pipelines/reviews.yaml", yaml.replace(from, to));
        let out = ws.run(&["run"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(message),
            "expected {message:?} in {}",
            stderr(&out)
        );
    }
}
