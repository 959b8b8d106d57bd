//! The `train` stage through the binary: the embedded default trains from scratch, keeps its
//! best epoch, saves a model Hugging Face can load, logs to JSONL and TensorBoard, reproduces
//! a run exactly from its seed, and resumes after being killed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use finetune_trainer::tensorboard::{ValueKind, What, read_events};
use serde_json::Value;

/// The records of logs/train.jsonl.
fn log_records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("logs/train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// The training-loss curve of a run: (step, mean loss) of every training record.
fn loss_curve(dir: &Path) -> Vec<(u64, f64)> {
    log_records(dir)
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

/// Every (tag, step, value) scalar in the run's TensorBoard event files.
fn tensorboard_scalars(dir: &Path) -> Vec<(String, i64, f32)> {
    let mut scalars = Vec::new();
    for entry in std::fs::read_dir(dir.join("logs/tensorboard")).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        );
        for event in read_events(&path).unwrap() {
            if let Some(What::Summary(summary)) = event.what {
                for value in summary.value {
                    let Some(ValueKind::SimpleValue(v)) = value.kind else {
                        panic!("{} holds no scalar", value.tag)
                    };
                    scalars.push((value.tag, event.step, v));
                }
            }
        }
    }
    scalars
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
    let curve = loss_curve(&out_a);
    let logged: Vec<u64> = (1..=352).filter(|s| s % 10 == 0 || s % 44 == 0).collect();
    assert_eq!(
        curve.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        logged,
        "44 updates per epoch, logged every 10 and at every epoch's end"
    );
    assert_eq!(
        curve,
        loss_curve(&out_b),
        "same seed, same data: the loss curve must be identical"
    );
    assert!(
        curve[curve.len() - 1].1 < curve[0].1 / 2.0,
        "the loss must fall: {curve:?}"
    );
    let weights = |out: &Path| std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(
        weights(&out_a) == weights(&out_b),
        "same seed, different weights"
    );

    // The best epoch by validation accuracy is the output model, and its checkpoint survives.
    let history = read_json(&out_a.join("run_history.json"));
    assert_eq!(
        history["params"]["model"]["scratch"]["layers"], 2,
        "run_history.json records the params"
    );
    let epochs = history["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 8);
    let best = history["best_metric"].as_f64().unwrap();
    let best_epoch = epochs
        .iter()
        .find(|e| e["eval_accuracy"].as_f64() == Some(best))
        .expect("the best metric is one epoch's accuracy");
    assert!(
        epochs
            .iter()
            .all(|e| e["eval_accuracy"].as_f64().unwrap() <= best)
    );
    let best_checkpoint = format!("checkpoint-{}", best_epoch["step"]);
    assert_eq!(history["best_model_checkpoint"], best_checkpoint.as_str());
    assert!(
        weights(&out_a)
            == std::fs::read(
                out_a
                    .join("checkpoints")
                    .join(&best_checkpoint)
                    .join("model.safetensors")
            )
            .unwrap(),
        "the output model is the best checkpoint's"
    );
    let kept: Vec<String> = std::fs::read_dir(out_a.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.len() <= 2 && kept.contains(&"checkpoint-352".to_string()),
        "{kept:?}"
    );

    let metrics = read_json(&out_a.join("metrics.json"));
    assert_eq!(metrics["step"], best_epoch["step"]);
    assert_eq!(metrics["validation"]["accuracy"].as_f64(), Some(best));
    let test_accuracy = metrics["test"]["accuracy"].as_f64().unwrap();
    assert!(test_accuracy >= 0.70, "test accuracy {test_accuracy}");
    assert_eq!(metrics["test"]["confusion"].as_array().unwrap().len(), 2);

    // TensorBoard holds what the JSONL log holds.
    let scalars = tensorboard_scalars(&out_a);
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/samples_per_second",
        "eval/accuracy",
        "eval/f1_macro",
        "eval/loss",
    ] {
        assert!(
            scalars.iter().any(|(t, _, _)| t == tag),
            "no {tag} in the event files"
        );
    }
    let tb_losses: Vec<(u64, f64)> = scalars
        .iter()
        .filter(|(t, _, _)| t == "train/loss")
        .map(|(_, step, v)| (*step as u64, f64::from(*v)))
        .collect();
    assert_eq!(tb_losses.len(), curve.len());
    for ((s1, l1), (s2, l2)) in tb_losses.iter().zip(&curve) {
        assert_eq!(s1, s2);
        assert_eq!(*l1 as f32, *l2 as f32);
    }

    let device = finetune_model::device("cpu").unwrap().device().clone();
    let (model, report) = finetune_model::hf::load(&out_a.join("model"), None, 0, &device).unwrap();
    assert!(report.newly_initialized.is_empty() && report.unexpected.is_empty());
    assert_eq!(model.config.labels, ["0", "1"]);
    assert!(out_a.join("model/tokenizer.json").is_file());

    the_evaluate_stage_reports_on_the_saved_model(&a, &metrics["test"]);
}

/// The evaluate stage loads the saved model and agrees with the train stage's own test
/// figures; its predictions, pictures and report are complete and valid.
fn the_evaluate_stage_reports_on_the_saved_model(ws: &Ws, train_test: &Value) {
    let out = output_dir(ws, "reviews", "evaluate");
    let metrics = read_json(&out.join("metrics.json"));
    assert_eq!(metrics["split"], "test");
    assert_eq!(metrics["examples"], 200);
    for key in [
        "accuracy",
        "f1_macro",
        "f1_weighted",
        "precision_macro",
        "recall_macro",
    ] {
        assert_eq!(metrics[key], train_test[key], "{key}");
    }
    let loss_gap = (metrics["loss"].as_f64().unwrap() - train_test["loss"].as_f64().unwrap()).abs();
    assert!(loss_gap < 1e-6, "loss differs by {loss_gap}");
    assert_eq!(metrics["per_class"][0]["label"], "0");
    assert_eq!(metrics["confusion"], train_test["confusion"]);

    let file = std::fs::File::open(out.join("predictions.parquet")).unwrap();
    let batches: Vec<_> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 200);
    let batch = &batches[0];
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let strings = |name: &str| {
        column(name)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone()
    };
    let (labels, predictions) = (strings("label"), strings("prediction"));
    let probabilities = column("probabilities")
        .as_any()
        .downcast_ref::<arrow::array::ListArray>()
        .unwrap();
    let mut correct = 0;
    for row in 0..batch.num_rows() {
        let p = probabilities.value(row);
        let p = p
            .as_any()
            .downcast_ref::<arrow::array::Float32Array>()
            .unwrap();
        let sum: f32 = p.values().iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "row {row}: probabilities sum to {sum}"
        );
        let argmax = if p.value(1) > p.value(0) { "1" } else { "0" };
        assert_eq!(predictions.value(row), argmax, "row {row}");
        correct += usize::from(labels.value(row) == predictions.value(row));
    }
    assert!(!strings("text").value(0).is_empty());
    let accuracy = correct as f64 / batch.num_rows() as f64;
    assert_eq!(Some(accuracy), metrics["accuracy"].as_f64());

    // DVCLive's layout: the confusion pairs are predictions.parquet's, row by row, and each
    // eval series is the run's own per-epoch record.
    let pairs = read_json(&out.join("plots/sklearn/confusion_matrix.json"));
    let pairs = pairs.as_array().unwrap();
    assert_eq!(pairs.len(), 200);
    for (row, pair) in pairs.iter().enumerate() {
        assert_eq!(pair["actual"], labels.value(row), "row {row}");
        assert_eq!(pair["predicted"], predictions.value(row), "row {row}");
    }
    let history = read_json(&output_dir(ws, "reviews", "train").join("run_history.json"));
    let mut expected = String::from("step\teval/accuracy\n");
    for epoch in history["epochs"].as_array().unwrap() {
        expected += &format!("{}\t{}\n", epoch["step"], epoch["eval_accuracy"]);
    }
    let series = std::fs::read_to_string(out.join("plots/metrics/eval/accuracy.tsv")).unwrap();
    assert_eq!(series, expected);
    let train_loss = std::fs::read_to_string(out.join("plots/metrics/train/loss.tsv")).unwrap();
    assert_eq!(
        train_loss.lines().count(),
        1 + loss_curve(&output_dir(ws, "reviews", "train")).len()
    );

    for picture in ["confusion_matrix.svg", "training_curves.svg"] {
        let data = std::fs::read(out.join(picture)).unwrap();
        let tree = usvg::Tree::from_data(&data, &usvg::Options::default())
            .unwrap_or_else(|e| panic!("{picture} is not a valid SVG: {e}"));
        let size = tree.size();
        assert!(
            size.width() > 100.0 && size.height() > 100.0,
            "{picture}: {size:?}"
        );
        assert!(tree.root().has_children(), "{picture} draws nothing");
    }
    for page in ["report.md", "report.html"] {
        let text = std::fs::read_to_string(out.join(page)).unwrap();
        for linked in [
            "confusion_matrix.svg",
            "training_curves.svg",
            "metrics.json",
        ] {
            assert!(text.contains(linked), "{page} does not link {linked}");
        }
        assert!(text.contains(&format!("{:.4}", metrics["accuracy"].as_f64().unwrap())));
    }
}

#[test]
fn a_run_killed_mid_training_resumes_from_its_last_checkpoint_with_the_same_result() {
    let (whole, killed) = (Ws::new(), Ws::new());
    short_run(&whole);
    short_run(&killed);
    whole.run_ok(&[]);

    let mut child = killed
        .command(&["run", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint_20 = kill_once_scratch_has(
        &killed,
        &mut child,
        "checkpoints/checkpoint-20/trainer_state.json",
    );
    assert!(checkpoint_20.is_file());
    assert!(
        !killed.file("artifacts/runs/reviews/train").exists(),
        "a killed stage publishes nothing"
    );

    let events = killed.run_ok(&[]);
    let resumed = events
        .iter()
        .filter(|e| e["stage"] == "train")
        .filter_map(|e| e["text"].as_str())
        .find(|t| t.starts_with("resuming from checkpoint-"))
        .unwrap_or_else(|| panic!("the rerun did not resume: {events:?}"));
    let step: u64 = resumed["resuming from checkpoint-".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((20..60).contains(&step), "{resumed}");

    let (a, b) = (
        output_dir(&whole, "reviews", "train"),
        output_dir(&killed, "reviews", "train"),
    );
    let weights = |out: &Path| std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(
        weights(&a) == weights(&b),
        "the resumed run's model differs from the uninterrupted run's"
    );
    assert_eq!(
        loss_curve(&a),
        loss_curve(&b),
        "the resumed log must hold the whole curve"
    );
    let eval = |out: &Path| read_json(&out.join("metrics.json"));
    assert_eq!(eval(&a)["test"], eval(&b)["test"]);
    assert!(
        std::fs::read_dir(killed.file("artifacts/scratch"))
            .unwrap()
            .next()
            .is_none(),
        "the scratch state is removed once the stage succeeds"
    );
}

/// A killed `--force train` left checkpoints that the next `--force train` silently resumed
/// from, and that neither `run` nor `gc` removed: a forced rerun now starts clean and says
/// so, and `gc` removes an interrupted run's checkpoints.
#[test]
fn a_forced_rerun_starts_clean_and_gc_removes_what_a_killed_run_left() {
    let ws = Ws::new();
    short_run(&ws);
    ws.run_ok(&[]);
    let kill_forced_train = || {
        let mut child = ws
            .command(&["run", "--json", "--force", "train"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        kill_once_scratch_has(
            &ws,
            &mut child,
            "checkpoints/checkpoint-20/trainer_state.json",
        );
    };
    kill_forced_train();
    let events = ws.run_ok(&["--force", "train"]);
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["stage"] == "train")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(
        texts.iter().any(|t| t.starts_with("--force starts clean")),
        "{texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.starts_with("resuming from")),
        "{texts:?}"
    );

    kill_forced_train();
    let out = ws.run(&["gc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("removed the checkpoints of 1 interrupted runs in artifacts/scratch"),
        "{text}"
    );
    assert!(!ws.file("artifacts/scratch").exists());
}

/// Waits until the train stage of `ws`'s run has created its scratch directory (training has
/// begun); panics if `child` ends first or nothing starts within 2 minutes.
fn wait_for_training(ws: &Ws, child: &mut std::process::Child) {
    let scratch = ws.file("artifacts/scratch");
    let started = Instant::now();
    while !std::fs::read_dir(&scratch).is_ok_and(|mut entries| entries.next().is_some()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before training began"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no training after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL can land anywhere: while a batch runs, while a checkpoint is half written, between
/// the checkpoint and its rename. Moments drawn from fixed seeds across the training window
/// (twice in one of the runs), each then rerun to the end, must give the uninterrupted result.
#[test]
fn runs_killed_at_random_moments_finish_with_the_uninterrupted_result() {
    let whole = Ws::new();
    short_run(&whole);
    let mut child = whole
        .command(&["run", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_training(&whole, &mut child);
    let training_began = Instant::now();
    assert!(child.wait().unwrap().success());
    let window_ms = training_began.elapsed().as_millis() as u64;
    let reference = output_dir(&whole, "reviews", "train");
    let weights = |out: &Path| std::fs::read(out.join("model/model.safetensors")).unwrap();

    for (seed, kills) in [(1u64, 1), (2, 1), (3, 2)] {
        let ws = Ws::new();
        short_run(&ws);
        let mut draw = finetune_core::rng::SplitMix64::new(seed);
        let mut moments = Vec::new();
        for _ in 0..kills {
            let mut child = ws
                .command(&["run", "--json"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            wait_for_training(&ws, &mut child);
            let after_ms = draw.below(window_ms);
            std::thread::sleep(Duration::from_millis(after_ms));
            child.kill().unwrap();
            child.wait().unwrap();
            moments.push(after_ms);
        }
        ws.run_ok(&[]);
        let out = output_dir(&ws, "reviews", "train");
        assert!(
            weights(&out) == weights(&reference),
            "seed {seed}: killed {moments:?} ms into a {window_ms} ms training, the rerun's model differs"
        );
        assert_eq!(
            loss_curve(&out),
            loss_curve(&reference),
            "seed {seed}: killed at {moments:?} ms"
        );
    }
}

/// Runs `finetune run --json` with `artifacts/scratch` (where checkpoints go) on a tmpfs of
/// `bytes`, in a private mount namespace (`unshare`, no privileges needed), then copies what
/// the scratch directory held when the run ended to `keep`. Returns the run's output.
fn run_on_small_disk(ws: &Ws, bytes: u64, keep: &Path) -> std::process::Output {
    std::fs::create_dir_all(ws.file("artifacts/scratch")).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={bytes} finetune-test artifacts/scratch || exit 99; \
         \"$0\" run --json; status=$?; cp -a artifacts/scratch/. '{}'/; exit $status",
        keep.display()
    );
    in_own_namespace(ws, &script)
}

/// A disk that fills up mid-run fails the stage with the cause and the checkpoint it kept; that
/// checkpoint is intact (the failed one leaves nothing behind), and a rerun with room resumes
/// from it to the uninterrupted result.
#[test]
fn a_full_disk_fails_the_stage_and_keeps_the_last_good_checkpoint() {
    let whole = Ws::new();
    short_run(&whole);
    whole.run_ok(&[]);
    let reference = output_dir(&whole, "reviews", "train");
    let checkpoint_bytes: u64 = std::fs::read_dir(reference.join("checkpoints/checkpoint-10"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();

    let ws = Ws::new();
    short_run(&ws);
    let kept = tempfile::tempdir().unwrap();
    // Room for two checkpoints and a half: the third one fills the disk.
    let out = run_on_small_disk(&ws, checkpoint_bytes * 5 / 2, kept.path());
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("cannot save checkpoint-30"), "{err}");
    assert!(err.contains("checkpoint-20, is intact"), "{err}");
    assert!(
        !ws.file("artifacts/runs/reviews/train").exists(),
        "a failed stage publishes nothing"
    );

    let run_scratch: Vec<_> = std::fs::read_dir(kept.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(run_scratch.len(), 1, "{run_scratch:?}");
    let checkpoints = run_scratch[0].join("checkpoints");
    let mut names: Vec<_> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["checkpoint-10", "checkpoint-20"],
        "the failed save left its files"
    );
    for name in &names {
        // The weights are bitwise those of the uninterrupted run (trainer_state.json holds
        // timings; optimizer.bpk stores a hash map, in no fixed order); the resume below
        // proves the optimizer state.
        let weights = |dir: &Path| std::fs::read(dir.join(name).join("model.safetensors")).unwrap();
        assert!(
            weights(&checkpoints) == weights(&reference.join("checkpoints")),
            "{name}'s weights differ from the uninterrupted run's"
        );
    }

    // Room again: the rerun resumes from checkpoint-20 and ends where the whole run ended.
    copy_dir(kept.path(), &ws.file("artifacts/scratch"));
    let events = ws.run_ok(&[]);
    assert!(
        events
            .iter()
            .filter_map(|e| e["text"].as_str())
            .any(|t| t.starts_with("resuming from checkpoint-20 ")),
        "{events:?}"
    );
    let out = output_dir(&ws, "reviews", "train");
    assert!(
        std::fs::read(out.join("model/model.safetensors")).unwrap()
            == std::fs::read(reference.join("model/model.safetensors")).unwrap()
    );
}

/// Each edit `(from, to, message)` of the default pipeline, alone, is a config error (exit 2)
/// whose message contains `message`.
fn refused_before_anything_runs(edits: &[(&str, &str, &str)]) {
    let ws = Ws::new();
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    for (from, to, message) in edits {
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

#[test]
fn bad_training_params_are_refused_before_anything_runs() {
    refused_before_anything_runs(&[
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
            "save_total_limit: 1",
            "save_total_limit: 1\n        save_strategy: steps",
            "key `with.training.save_steps`: is required when save_strategy is `steps`",
        ),
        (
            "metric_for_best_model: accuracy",
            "metric_for_best_model: acc",
            "key `with.training.metric_for_best_model`: `acc` is not a metric; one of: loss, accuracy",
        ),
        (
            "heads: 4",
            "heads: 3",
            "key `with.model.scratch`: hidden (128) must be a multiple of heads (3)",
        ),
        (
            "        lr: 1.0e-3",
            "        lr: 1.0e-3\n        learning_rate: 1.0e-3",
            "key `with.training.learning_rate`: `learning_rate` (TrainingArguments' name) and `lr` are one setting; give one",
        ),
        (
            "save_total_limit: 1",
            "save_total_limit: 1\n        output_dir: out",
            "key `with.training.output_dir`: unknown field `output_dir`",
        ),
    ]);
}

/// The default pipeline with `training:` edited by `(from, to)` pairs, as `pipelines/NAME.yaml`.
fn edited_default(ws: &Ws, name: &str, edits: &[(&str, &str)]) {
    let mut yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml"))
        .unwrap()
        .replace("name: reviews\n", &format!("name: {name}\n"));
    for (from, to) in edits {
        assert!(
            yaml.contains(from),
            "{from:?} is not in the default pipeline"
        );
        yaml = yaml.replace(from, to);
    }
    ws.write(&format!("pipelines/{name}.yaml"), yaml);
}

/// `label_smoothing_factor: 0.1` keeps the training loss above the entropy of its target
/// (0.95, 0.05): 0.1985, which the plain loss falls far below on these 700 sentences.
/// `class_weights: [1, 20]` makes the model call (nearly) every test review positive, which the
/// plain run does not. A weight list that does not fit the labels fails the stage naming both.
#[test]
fn label_smoothing_and_class_weights_change_what_the_model_learns() {
    let ws = Ws::new();
    let limit = "        save_total_limit: 1\n";
    edited_default(&ws, "plain", &[]);
    let smoothing = format!("{limit}        label_smoothing_factor: 0.1\n");
    edited_default(&ws, "smoothed", &[(limit, &smoothing)]);
    let weights = format!("{limit}        class_weights: [1, 20]\n");
    let few_epochs = ("epochs: 8", "epochs: 2");
    edited_default(&ws, "weighted", &[(limit, &weights), few_epochs]);
    edited_default(&ws, "plain-short", &[few_epochs]);
    for pipeline in ["plain", "smoothed", "weighted", "plain-short"] {
        ws.run_ok(&[&format!("pipelines/{pipeline}.yaml")]);
    }

    let smoothing_floor = -(0.95f64 * 0.95f64.ln() + 0.05 * 0.05f64.ln());
    let lowest = |pipeline: &str| {
        loss_curve(&output_dir(&ws, pipeline, "train"))
            .iter()
            .map(|(_, loss)| *loss)
            .fold(f64::INFINITY, f64::min)
    };
    let (plain, smoothed) = (lowest("plain"), lowest("smoothed"));
    assert!(plain < smoothing_floor / 10.0, "plain loss {plain}");
    assert!(
        smoothed >= smoothing_floor - 1e-4 && smoothed < smoothing_floor + 0.05,
        "smoothed loss {smoothed}, floor {smoothing_floor}"
    );

    // confusion[true][predicted]: the share of test rows predicted positive.
    let called_positive = |pipeline: &str| {
        let metrics = read_json(&output_dir(&ws, pipeline, "evaluate").join("metrics.json"));
        let confusion = metrics["confusion"].as_array().unwrap();
        let positive: u64 = confusion.iter().map(|row| row[1].as_u64().unwrap()).sum();
        positive as f64 / metrics["examples"].as_f64().unwrap()
    };
    let (plain, weighted) = (called_positive("plain-short"), called_positive("weighted"));
    assert!(
        weighted > 0.9,
        "weighted: {weighted} of the test rows called positive"
    );
    assert!(
        plain < 0.7,
        "plain: {plain} of the test rows called positive"
    );
    let history = read_json(&output_dir(&ws, "weighted", "train").join("run_history.json"));
    let recorded: Vec<f64> = history["params"]["training"]["class_weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert_eq!(recorded, [1.0, 20.0]);

    let three = format!("{limit}        class_weights: [1, 2, 3]\n");
    edited_default(&ws, "misfit", &[(limit, &three)]);
    let out = ws.run(&["run", "pipelines/misfit.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "`training.class_weights`: 3 weights for 2 labels (0, 1); give one per label"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_loss_params_are_refused_before_anything_runs() {
    let limit = "save_total_limit: 1";
    refused_before_anything_runs(&[
        (
            limit,
            "save_total_limit: 1\n        label_smoothing_factor: 1.0",
            "key `with.training.label_smoothing_factor`: 1 is not in [0, 1)",
        ),
        (
            limit,
            "save_total_limit: 1\n        class_weights: [1, 0]",
            "key `with.training.class_weights`: 0 is not a positive weight",
        ),
        (
            limit,
            "save_total_limit: 1\n        class_weights: balance",
            "key `with.training.class_weights`: `balanced` or a list of one positive weight per label",
        ),
    ]);
}

/// Removes what a clock measured (`*seconds*`, `*runtime*`, `*per_second*`) from a JSON value.
fn drop_wall_clock(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|key, _| {
                !(key.contains("seconds") || key.contains("runtime") || key.contains("per_second"))
            });
            map.values_mut().for_each(drop_wall_clock);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_wall_clock),
        _ => {}
    }
}

/// A `training:` block in TrainingArguments' own names (as pasted from a Python script)
/// trains exactly the model the short names do: every file of the train output is the same
/// bytes, but for its wall-clock records.
#[test]
fn trainer_names_train_the_same_bits_as_ours() {
    let ws = Ws::new();
    let ours = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    let theirs = ours
        .replace("name: reviews\n", "name: reviews-hf\n")
        .replace("        epochs: 8\n", "        num_train_epochs: 8\n")
        .replace("        batch_size: 16\n", "        per_device_train_batch_size: 16\n        per_device_eval_batch_size: 64\n        gradient_accumulation_steps: 1\n")
        .replace("        lr: 1.0e-3\n", "        learning_rate: 1.0e-3\n")
        .replace("        schedule: linear\n", "        lr_scheduler_type: linear\n")
        .replace("metric_for_best_model: accuracy", "metric_for_best_model: eval_accuracy\n        greater_is_better: true");
    assert_eq!(theirs.matches("num_train_epochs").count(), 1, "{theirs}");
    assert!(theirs.contains("learning_rate") && theirs.contains("lr_scheduler_type"));
    ws.write("pipelines/reviews-hf.yaml", theirs);
    ws.run_ok(&[]);
    let events = ws.run_ok(&["pipelines/reviews-hf.yaml"]);
    assert!(
        stages_with(&events, "stage_started").contains(&"train".to_string()),
        "the other spelling trains on its own (its params differ as written): {events:?}"
    );
    let files = |pipeline: &str| {
        let dir = output_dir(&ws, pipeline, "train");
        let mut files = Vec::new();
        walk(&dir, &mut |path| {
            let name = path.strip_prefix(&dir).unwrap().display().to_string();
            let wall_clock = name == "run_history.json"
                || name == ".finetune-manifest.json"
                || name.ends_with("timings.jsonl")
                || name.contains("tensorboard");
            if name.ends_with("trainer_state.json") {
                // As in Trainer's, its log history has the speeds: compare the rest.
                let mut state = read_json(path);
                drop_wall_clock(&mut state);
                files.push((name, state.to_string().into_bytes()));
            } else if !wall_clock {
                files.push((name, std::fs::read(path).unwrap()));
            }
        });
        files.sort();
        files
    };
    let (a, b) = (files("reviews"), files("reviews-hf"));
    assert!(a.iter().any(|(name, _)| name == "model/model.safetensors"));
    assert_eq!(
        a.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        b.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let (x, y) = (String::from_utf8_lossy(x), String::from_utf8_lossy(y));
        let differing: Vec<(&str, &str)> =
            x.lines().zip(y.lines()).filter(|(a, b)| a != b).collect();
        assert!(
            x == y,
            "{name} differs between the two spellings: {differing:?}"
        );
    }
}

/// Counts far beyond any run are config errors that name the key: a batch of 2^62 × 4
/// samples wrapped to 0 and divided by it (the run then hung), and 8·10^17 epochs wrapped to six
/// updates and "succeeded".
#[test]
fn absurd_training_counts_are_refused_with_their_key() {
    refused_before_anything_runs(&[
        (
            "batch_size: 16",
            "batch_size: 4611686018427387904\n        grad_accum: 4",
            "key `with.training.batch_size`: 4611686018427387904 is above the largest this trainer takes, 1048576",
        ),
        (
            "epochs: 8",
            "epochs: 838488366986797801",
            "key `with.training.epochs`: 838488366986797801 is above the largest this trainer takes, 1000000",
        ),
        (
            "batch_size: 16",
            "batch_size: 1024\n        grad_accum: 2048",
            "key `with.training.grad_accum`: batch_size × grad_accum is 2097152 samples per update",
        ),
    ]);
}

/// A scratch model too large for the machine fails its stage with the figure instead of
/// aborting the process on the allocation (`hidden: 65536` did, rc 134, no event); sizes past
/// any model are config errors before anything runs.
#[test]
fn a_scratch_model_larger_than_the_machine_is_refused_with_its_size() {
    let ws = Ws::new();
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    ws.write(
        "pipelines/reviews.yaml",
        yaml.replace("hidden: 128, heads: 4", "hidden: 65536, heads: 4"),
    );
    let out = ws.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    for part in [
        "model.scratch: ",
        "parameters need at least",
        "more than this machine's",
    ] {
        assert!(
            stderr(&out).contains(part),
            "expected {part:?} in {}",
            stderr(&out)
        );
    }
    assert!(
        !ws.dir
            .path()
            .join("artifacts/cache")
            .read_dir()
            .unwrap()
            .any(|entry| {
                entry
                    .unwrap()
                    .path()
                    .join("model/model.safetensors")
                    .exists()
            }),
        "no trained model was published"
    );

    ws.write(
        "pipelines/reviews.yaml",
        yaml.replace("hidden: 128, heads: 4", "hidden: 2000000, heads: 4"),
    );
    let out = ws.run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = "key `with.model.scratch`: hidden 2000000 is above the largest a scratch model takes, 1048576";
    assert!(
        stderr(&out).contains(message),
        "expected {message:?} in {}",
        stderr(&out)
    );
}

/// The reference protocol of ../shared/bench/hf_trainer, on the very rows Python uses (its
/// Trainer reaches 0.915 there).
#[test]
fn fine_tuning_minilm_on_the_reference_protocol_reaches_090_on_the_test_split() {
    let ws = Ws::new();
    let model = model_dir();
    let out = ws
        .command(&["run", "--json", "pipelines/reviews-minilm.yaml"])
        .env("FINETUNE_MODEL_DIR", &model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let train = output_dir(&ws, "reviews-minilm", "train");
    let metrics = read_json(&train.join("metrics.json"));
    let (accuracy, f1) = (
        metrics["test"]["accuracy"].as_f64().unwrap(),
        metrics["test"]["f1_macro"].as_f64().unwrap(),
    );
    assert!(
        accuracy >= 0.90 && f1 >= 0.90,
        "test accuracy {accuracy}, macro F1 {f1}"
    );
    let history = read_json(&train.join("run_history.json"));
    assert_eq!(
        history["global_step"], 150,
        "800 rows at batch 16 for 3 epochs"
    );
    assert_eq!(history["epochs"].as_array().unwrap().len(), 3);
    // The tokenizer files derived from tokenizer.json and config.json say what the model's
    // own published ones say.
    let saved = train.join("model");
    assert_eq!(
        read_json(&saved.join("special_tokens_map.json")),
        read_json(&model.join("special_tokens_map.json"))
    );
    let (ours, published) = (
        read_json(&saved.join("tokenizer_config.json")),
        read_json(&model.join("tokenizer_config.json")),
    );
    for key in [
        "model_max_length",
        "cls_token",
        "sep_token",
        "pad_token",
        "unk_token",
        "mask_token",
    ] {
        assert_eq!(ours[key], published[key], "tokenizer_config.json: {key}");
    }
}

fn split_events(out: &Path) -> Vec<Value> {
    log_records(out)
        .into_iter()
        .filter(|r| r["event"] == "micro_batch_split")
        .collect()
}

#[test]
fn an_out_of_memory_failure_halves_the_micro_batch_and_keeps_the_effective_batch() {
    let runs = HalfBatchRuns::run(|_| {});
    let out = &runs.out;
    let messages: Vec<String> = events(out)
        .iter()
        .filter_map(|e| e["text"].as_str().map(String::from))
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("step 5: micro_batch_split: the device ran out of memory")),
        "{messages:?}"
    );
    let (a, b) = (&runs.faulty_train, &runs.small_train);
    let splits = split_events(a);
    assert_eq!(splits.len(), 1, "{splits:?}");
    assert_eq!(splits[0]["step"], 4, "the split happens before update 5");
    assert_eq!(
        (
            splits[0]["micro_batch_size"].as_u64(),
            splits[0]["grad_accum"].as_u64()
        ),
        (Some(8), Some(2))
    );
    assert!(split_events(b).is_empty());

    // Updates 1-4 at 16 × 1 equal 8 × 2 to float tolerance (the loss is sample-weighted), and
    // from update 5 on both runs compute the same micro-batches.
    assert_same_weights(a, b, 1e-4);
    let loss = |out: &Path| loss_curve(out).last().unwrap().1;
    assert!((loss(a) - loss(b)).abs() < 1e-4);
}

#[test]
fn a_memory_budget_splits_micro_batches_before_they_run_and_too_small_a_budget_is_an_error() {
    let ws = Ws::new();
    dropout_free_run(&ws, "        max_memory: 28MiB\n");
    ws.run_ok(&[]);
    let out = output_dir(&ws, "reviews", "train");
    let splits = split_events(&out);
    assert!(
        !splits.is_empty(),
        "a 28 MiB budget must split 16-row micro-batches"
    );
    assert!(
        splits[0]["reason"]
            .as_str()
            .unwrap()
            .contains("over max_memory (28 MiB)"),
        "{splits:?}"
    );

    let tight = Ws::new();
    dropout_free_run(&tight, "        max_memory: 1MiB\n");
    let failed = tight.run(&["run"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        stderr(&failed).contains("out of memory with a micro-batch of 1 at sequence length"),
        "{}",
        stderr(&failed)
    );
    assert!(!tight.file("artifacts/runs/reviews/train").exists());

    let bad = Ws::new();
    dropout_free_run(&bad, "        max_memory: lots\n");
    let refused = bad.run(&["run"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("key `with.training.max_memory`: `lots` is not a size"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn ctrl_c_stops_training_with_a_checkpoint_and_the_rerun_finishes_the_same_run() {
    let (whole, stopped) = (Ws::new(), Ws::new());
    short_run(&whole);
    short_run(&stopped);
    whole.run_ok(&[]);

    let child = stopped
        .command(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = stopped.file("artifacts/scratch");
    let started = Instant::now();
    while !std::fs::read_dir(&scratch).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            e.path()
                .join("checkpoints/checkpoint-10/trainer_state.json")
                .is_file()
        })
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let text = stderr(&out);
    let at = text
        .find("interrupted at step ")
        .unwrap_or_else(|| panic!("no interruption message: {text}"));
    let step: u64 = text[at + "interrupted at step ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((10..60).contains(&step), "{text}");
    assert!(
        !stopped.file("artifacts/runs/reviews/train").exists(),
        "nothing published"
    );

    let events = stopped.run_ok(&[]);
    let expected = format!("resuming from checkpoint-{step} ");
    assert!(
        events
            .iter()
            .filter_map(|e| e["text"].as_str())
            .any(|t| t.starts_with(&expected)),
        "the rerun did not resume at step {step}: {events:?}"
    );
    let weights = |ws: &Ws| {
        std::fs::read(output_dir(ws, "reviews", "train").join("model/model.safetensors")).unwrap()
    };
    assert!(
        weights(&whole) == weights(&stopped),
        "the resumed model differs"
    );
}

/// `finetune audit` checks the regularizers' sources compiled into the binary and prints one
/// fingerprint per algorithm-carrying function.
#[test]
fn finetune_audit_passes_and_fingerprints_each_implementation() {
    let ws = Ws::new();
    let out = ws.run(&["audit"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("AWP (crates/regularizers/src/awp.rs)"),
        "{text}"
    );
    assert!(
        text.contains("Mixout (crates/regularizers/src/mixout.rs)"),
        "{text}"
    );
    assert_eq!(
        text.matches("fingerprint sha256:").count(),
        3 + 3 + 2,
        "{text}"
    );
    assert!(text.contains("none named for AWP or Mixout"), "{text}");
    assert!(text.trim_end().ends_with("audit passed"), "{text}");
}
