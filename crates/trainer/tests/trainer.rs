//! The training loop on real sentences with a small model: reproducibility, exact resume,
//! early stopping at the right evaluation, best-model selection, checkpoint rotation.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use anyhow::Result;
use finetune_model::Classifier;
use finetune_model::ScratchSpec;
use finetune_model::hf::named_tensors;
use finetune_trainer::EarlyStopping;
use finetune_trainer::restore;
use finetune_trainer::{
    Callback, Checkpoints, Control, Evaluator, Start, Trainer, TrainerState, TrainingArgs,
};
use serde_json::{Value, json};

fn labels() -> Vec<String> {
    vec!["0".into(), "1".into()]
}

/// A 2-layer, 64-wide BERT over the real tokenizer's vocabulary, dropout on.
fn fresh_model(seed: u64) -> Classifier {
    let spec: ScratchSpec =
        serde_json::from_value(json!({"layers": 2, "hidden": 64, "heads": 4, "max_positions": 64}))
            .unwrap();
    let config = spec.to_config(30522, 0, labels()).unwrap();
    let device = finetune_model::device("cpu")
        .unwrap()
        .device()
        .clone()
        .autodiff();
    finetune_model::scratch(&config, seed, &device)
}

fn args(extra: Value) -> TrainingArgs {
    let mut base = json!({
        "epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "weight_decay": 0.01,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "tensorboard": false
    });
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    let args: TrainingArgs = serde_json::from_value(base).unwrap();
    args.validate().unwrap();
    args
}

fn trainer<'a>(args: &'a TrainingArgs, labels: &'a [String]) -> Trainer<'a> {
    Trainer {
        args,
        callbacks: Vec::new(),
        evaluator: None,
        checkpoints: None,
        pad_to: None,
        labels,
        device: finetune_model::device("cpu").unwrap().device().clone(),
        inject_oom_at: None,
        awp: None,
        stop_requested: || false,
    }
}

fn weights(model: &Classifier) -> Vec<Vec<f32>> {
    named_tensors(model)
        .into_iter()
        .map(|(_, _, v)| v)
        .collect()
}

fn losses(state: &TrainerState) -> Vec<f64> {
    state
        .log_history
        .iter()
        .filter_map(|r| r.get("loss")?.as_f64())
        .collect()
}

/// Stops training once `global_step` reaches `at` (a crash, as far as the run can tell).
struct StopAt(usize);

impl Callback for StopAt {
    fn name(&self) -> &'static str {
        "stop_at"
    }
    fn on_step_end(&mut self, state: &TrainerState, control: &mut Control) -> Result<()> {
        control.should_training_stop |= state.global_step == self.0;
        Ok(())
    }
}

/// Reports a scripted accuracy per evaluation, and counts evaluations.
struct Scripted {
    accuracies: Vec<f64>,
    calls: usize,
}

impl Evaluator for Scripted {
    fn evaluate(&mut self, _: &Classifier) -> Result<Value> {
        let accuracy = self.accuracies[self.calls.min(self.accuracies.len() - 1)];
        self.calls += 1;
        Ok(json!({ "loss": 1.0 - accuracy, "accuracy": accuracy }))
    }
    fn examples(&self) -> usize {
        1
    }
}

#[test]
fn same_seed_same_data_gives_the_same_loss_curve_and_weights() {
    let data = common::amazon_examples(96);
    let labels = labels();
    let args = args(json!({}));
    let run = || {
        let outcome = trainer(&args, &labels)
            .train(Start::Fresh(fresh_model(1)), &data)
            .unwrap();
        (losses(&outcome.state), weights(&outcome.model))
    };
    let (curve, model) = run();
    assert_eq!(curve.len(), 24, "2 epochs of 12 updates, one record each");
    assert!(curve.iter().all(|l| l.is_finite()));
    let (again_curve, again_model) = run();
    assert_eq!(curve, again_curve, "loss curves differ");
    assert!(model == again_model, "weights differ");

    let other_args = self::args(json!({ "seed": 43 }));
    let other = trainer(&other_args, &labels)
        .train(Start::Fresh(fresh_model(1)), &data)
        .unwrap();
    assert_ne!(
        losses(&other.state),
        curve,
        "another seed must shuffle and drop out differently"
    );
}

#[test]
fn stopping_at_step_k_and_resuming_gives_the_weights_of_an_uninterrupted_run() {
    let data = common::amazon_examples(90); // 12 updates per epoch, the last one short
    let labels = labels();
    let args =
        args(json!({ "epochs": 3, "save_strategy": "steps", "save_steps": 5, "grad_accum": 1 }));
    let scratch = tempfile::tempdir().unwrap();
    let uninterrupted = trainer(&args, &labels)
        .train(Start::Fresh(fresh_model(3)), &data)
        .unwrap();

    // Interrupted mid-epoch at step 17 (the last checkpoint: step 15), then resumed.
    let checkpoints = Checkpoints::new(scratch.path().join("checkpoints"));
    let mut first = trainer(&args, &labels);
    first.checkpoints = Some(checkpoints.clone());
    first.callbacks.push(Box::new(StopAt(17)));
    let stopped = first.train(Start::Fresh(fresh_model(3)), &data).unwrap();
    assert_eq!(stopped.state.global_step, 17);
    let latest = checkpoints.latest().unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-15"), "{}", latest.display());

    let mut second = trainer(&args, &labels);
    second.checkpoints = Some(checkpoints.clone());
    let device = finetune_model::device("cpu")
        .unwrap()
        .device()
        .clone()
        .autodiff();
    let restored = restore(&latest, &labels, &device, |m| second.optimizer(m)).unwrap();
    assert_eq!(restored.state.global_step, 15);
    let resumed = second.train(Start::Resume(restored), &data).unwrap();
    assert_eq!(resumed.state.global_step, uninterrupted.state.global_step);
    assert!(
        weights(&resumed.model) == weights(&uninterrupted.model),
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(
        losses(&resumed.state),
        losses(&uninterrupted.state),
        "loss curves differ"
    );
}

#[test]
fn early_stopping_stops_at_the_evaluation_that_exhausts_patience() {
    // Patience 2, threshold 0.01: .60 and .70 improve, .69 does not (1 strike), .705 beats .70
    // by only .005 (2 strikes): training stops there, before the later, better values.
    let script = vec![0.60, 0.70, 0.69, 0.705, 0.80, 0.80, 0.79, 0.95, 0.99];
    let data = common::amazon_examples(64);
    let labels = labels();
    let args = args(json!({
        "epochs": 20, "eval_strategy": "steps", "eval_steps": 2,
        "metric_for_best_model": "accuracy", "early_stopping": { "patience": 2, "threshold": 0.01 }
    }));
    let mut t = trainer(&args, &labels);
    t.evaluator = Some(Box::new(Scripted {
        accuracies: script,
        calls: 0,
    }));
    let early = args.early_stopping.as_ref().unwrap();
    t.callbacks
        .push(Box::new(EarlyStopping::new(early, "accuracy", true)));
    let outcome = t.train(Start::Fresh(fresh_model(5)), &data).unwrap();
    let evaluations: Vec<f64> = outcome
        .state
        .log_history
        .iter()
        .filter_map(|r| r.get("eval_accuracy")?.as_f64())
        .collect();
    // .69 and .705 are no improvement by more than 0.01 over .70, but .705 still became the best
    // (Trainer's best metric ignores the threshold): patience ran out at the 4th evaluation.
    assert_eq!(evaluations, [0.60, 0.70, 0.69, 0.705]);
    assert_eq!(
        outcome.state.global_step, 8,
        "stopped after the 4th evaluation (step 8)"
    );
    assert_eq!(outcome.state.best_metric, Some(0.705));
}

#[test]
fn the_best_checkpoint_survives_rotation_and_becomes_the_output_model() {
    let data = common::amazon_examples(64); // 8 updates per epoch
    let labels = labels();
    let args = args(json!({
        "epochs": 1, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps",
        "save_steps": 2, "save_total_limit": 1, "load_best_model_at_end": true,
        "metric_for_best_model": "accuracy"
    }));
    let scratch = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(scratch.path());
    let mut t = trainer(&args, &labels);
    t.checkpoints = Some(checkpoints.clone());
    t.evaluator = Some(Box::new(Scripted {
        accuracies: vec![0.5, 0.9, 0.6, 0.7],
        calls: 0,
    }));
    let outcome = t.train(Start::Fresh(fresh_model(9)), &data).unwrap();
    assert_eq!(
        outcome.state.best_model_checkpoint.as_deref(),
        Some("checkpoint-4")
    );
    let kept: Vec<usize> = checkpoints
        .list()
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [4, 8], "the best and the newest are kept, no more");
    assert_eq!(outcome.model_step, 4);
    let device = finetune_model::device("cpu")
        .unwrap()
        .device()
        .clone()
        .autodiff();
    let best = restore(
        &scratch.path().join("checkpoint-4"),
        &labels,
        &device,
        |m| t.optimizer(m),
    )
    .unwrap();
    assert!(
        weights(&outcome.model) == weights(&best.model),
        "the output is not the best model"
    );
    let last = restore(
        &scratch.path().join("checkpoint-8"),
        &labels,
        &device,
        |m| t.optimizer(m),
    )
    .unwrap();
    assert!(weights(&outcome.model) != weights(&last.model));
}

/// The word embeddings' AdamW state lives in its own checkpoint file when they train by rows. A
/// checkpoint without it (the state kept in optimizer.bpk, as before rows) resumes them densely
/// from that state; a run that needs their dense gradient refuses a checkpoint with it, naming
/// the checkpoint.
#[test]
fn word_embedding_state_round_trips_and_falls_back_to_dense() {
    use finetune_optim::STATE_FILE;
    use finetune_trainer::{AdamW, MicroBatch, UpdatePlan, WordGradient, update};
    let _device = finetune_kernels::exclusive_device();
    let device = finetune_model::device("cpu")
        .unwrap()
        .device()
        .clone()
        .autodiff();
    let micro = [MicroBatch {
        type_ids: Vec::new(),
        rows: vec![vec![101, 2307, 102], vec![101, 2919, 2307, 102]],
        labels: vec![0, 1],
        targets: Vec::new(),
    }];
    let step = |model: Classifier, optimizer: &mut finetune_trainer::Optimizer| {
        let plan = UpdatePlan {
            lr: 1e-3,
            max_grad_norm: None,
            pad_to: None,
            dropout_seed: 3,
            attack: None,
            words: optimizer.word_gradient(),
            loss: &finetune_trainer::Loss::default(),
        };
        update(model, optimizer, &micro, &plan, &device).0
    };
    let by_rows = AdamW {
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let dense = AdamW {
        word_rows: false,
        ..by_rows
    };
    let dir = tempfile::tempdir().unwrap();
    let model = fresh_model(5);
    let mut optimizer = by_rows.build(&model);
    let model = step(model, &mut optimizer);
    optimizer.save(dir.path()).unwrap();
    assert!(dir.path().join(STATE_FILE).is_file());

    // Saved and loaded, the next step is the one the optimizer in memory takes.
    let mut loaded = by_rows.build(&model).load(dir.path(), &model).unwrap();
    assert_eq!(loaded.word_gradient(), WordGradient::Rows);
    let expected = weights(&step(model.clone(), &mut optimizer));
    assert!(weights(&step(model.clone(), &mut loaded)) == expected);

    let refused = dense.build(&model).load(dir.path(), &model).err().unwrap();
    assert!(
        refused
            .to_string()
            .contains("trained the word embeddings by rows")
            && refused
                .to_string()
                .contains(&dir.path().display().to_string()),
        "{refused:#}"
    );

    // A checkpoint of a dense run has no rows file: a rows run resumes it densely.
    let dense_dir = tempfile::tempdir().unwrap();
    let mut dense_optimizer = dense.build(&model);
    let model = step(model, &mut dense_optimizer);
    dense_optimizer.save(dense_dir.path()).unwrap();
    assert!(!dense_dir.path().join(STATE_FILE).exists());
    let mut resumed = by_rows
        .build(&model)
        .load(dense_dir.path(), &model)
        .unwrap();
    assert_eq!(resumed.word_gradient(), WordGradient::Dense);
    let expected = weights(&step(model.clone(), &mut dense_optimizer));
    assert!(weights(&step(model, &mut resumed)) == expected);
}
