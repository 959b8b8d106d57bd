//! AWP and Mixout, proven on real sentences: AWP restores the weights bit for bit, keeps every
//! perturbed tensor in its box, climbs the loss, waits for its start epoch, leaves the schedule
//! alone and is exactly a no-op at `adv_lr = 0`; Mixout is the identity at `p = 0` and at
//! evaluation, tends to its target as `p → 1`, has the weight as its mean, the true gradient,
//! and a target the optimizer never moves.

#[path = "../../model/tests/common/mod.rs"]
mod common;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Distribution, Tensor, TensorData};
use finetune_model::Classifier;
use finetune_model::ScratchSpec;
use finetune_model::hf::{load, named_tensors};
use finetune_model::param_names;
use finetune_regularizers::{Mixout, mix};
use finetune_trainer::{AdamW, MicroBatch, UpdatePlan, gradients, update};
use finetune_trainer::{AwpConfig, MixoutConfig};
use finetune_trainer::{Start, Trainer, TrainerState, TrainingArgs};
use serde_json::{Value, json};

/// The device RNG is process-wide and these tests seed it and draw from it (dropout, Mixout
/// masks) outside the trainer's lock: one at a time, or a concurrent test changes the masks.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn labels() -> Vec<String> {
    vec!["0".into(), "1".into()]
}

fn cpu() -> burn::tensor::Device {
    finetune_model::device("cpu").unwrap().device().clone()
}

/// A 2-layer, 64-wide BERT from seed 1 (dropout on), on the autodiff device.
fn small_model() -> Classifier {
    let spec: ScratchSpec =
        serde_json::from_value(json!({"layers": 2, "hidden": 64, "heads": 4, "max_positions": 64}))
            .unwrap();
    let config = spec.to_config(30522, 0, labels()).unwrap();
    finetune_model::scratch(&config, 1, &cpu().autodiff())
}

/// all-MiniLM-L6-v2 with a seeded head and no dropout.
fn minilm() -> Classifier {
    let (model, _) = load(&common::minilm(), Some(&labels()), 42, &cpu().autodiff()).unwrap();
    model.without_dropout()
}

/// The first 16 Amazon sentences as micro-batches of the given sizes.
fn micro_batches(sizes: &[usize]) -> Vec<MicroBatch> {
    let examples = common::amazon_examples(sizes.iter().sum());
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = &examples[start..start + n];
            start += n;
            MicroBatch {
                type_ids: Vec::new(),
                rows: part.iter().map(|e| e.ids.clone()).collect(),
                labels: part.iter().map(|e| e.label).collect(),
                targets: Vec::new(),
            }
        })
        .collect()
}

fn awp(adv_lr: f64, adv_eps: f64) -> AwpConfig {
    serde_json::from_value(json!({ "adv_lr": adv_lr, "adv_eps": adv_eps })).unwrap()
}

/// Every tensor by checkpoint key.
type Weights = Vec<(String, Vec<f32>)>;

fn tensors(model: &Classifier) -> Weights {
    named_tensors(model)
        .into_iter()
        .map(|(name, _, values)| (name, values))
        .collect()
}

#[test]
fn awp_restores_bitwise_keeps_each_tensor_in_its_box_and_climbs_the_loss() {
    let _serial = one_at_a_time();
    let model = minilm();
    let before = tensors(&model);
    let batches = micro_batches(&[16]);
    let device = cpu().autodiff();
    let (clean, clean_loss) = gradients(&model, &batches, None, &device);
    let gradients_at = |m: &Classifier| gradients(m, &batches, None, &device);

    // A tight box that the ascent overshoots: the clamp must hold every element.
    let config = awp(1.0, 1e-3);
    let attack = config.attack(&model).unwrap();
    let targets: Vec<String> = param_names(&model)
        .into_iter()
        .filter(|(_, _, layer_matrix)| *layer_matrix)
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(attack.targets.len(), 36, "6 layers × 6 weight matrices");
    let adversarial = attack.run(&model, &clean, gradients_at);
    assert_eq!(adversarial.moved, 36);
    assert!(
        tensors(&model) == before,
        "the model the optimizer steps must keep its weights bit for bit"
    );
    let mut on_the_boundary = 0usize;
    for ((name, original), (_, perturbed)) in before.iter().zip(tensors(&adversarial.perturbed)) {
        if !targets.contains(name) {
            assert!(perturbed == *original, "{name} is not a target but moved");
            continue;
        }
        assert!(perturbed != *original, "{name} did not move");
        for (&w0, &w) in original.iter().zip(&perturbed) {
            // The box as f32 arithmetic draws it: w₀ ∓ adv_eps·|w₀|, each rounded once.
            let radius = w0.abs() * 1e-3f32;
            let (lower, upper) = (w0 - radius, w0 + radius);
            assert!(
                (lower..=upper).contains(&w),
                "{name}: {w} is outside [{lower}, {upper}]"
            );
            on_the_boundary += usize::from(w == lower || w == upper);
        }
    }
    assert!(
        on_the_boundary > 1000,
        "the box never bound: {on_the_boundary}"
    );

    // A small step (where the loss is close to linear) climbs.
    let small = awp(1e-3, 1e-2).attack(&model).unwrap();
    let adversarial = small.run(&model, &clean, |m| gradients(m, &batches, None, &device));
    assert!(
        adversarial.loss > clean_loss,
        "the perturbed loss {} is not above the clean loss {clean_loss}",
        adversarial.loss
    );
}

/// Accumulated micro-batches are one large batch with the regularizers too: AWP attacks along
/// the whole update's clean gradient, and Mixout draws one mask per update.
#[test]
fn awp_and_mixout_with_accumulation_equal_one_large_batch() {
    let _serial = one_at_a_time();
    let device = cpu().autodiff();
    let config = awp(1e-2, 1e-2);
    let mixout: MixoutConfig = serde_json::from_value(json!({ "p": 0.1 })).unwrap();
    let run = |sizes: &[usize]| {
        let mut model = minilm();
        let start = model.clone();
        mixout.attach(&mut model, &start).unwrap();
        let attack = config.attack(&model).unwrap();
        let mut optimizer = AdamW::default().build(&model);
        let plan = UpdatePlan {
            lr: 5e-5,
            max_grad_norm: Some(1.0),
            pad_to: None,
            dropout_seed: 7,
            attack: Some(&attack),
            words: optimizer.word_gradient(),
            loss: &finetune_trainer::Loss::default(),
        };
        let (model, stats) = update(model, &mut optimizer, &micro_batches(sizes), &plan, &device);
        (tensors(&model), stats)
    };
    let (whole, whole_stats) = run(&[16]);
    let (split, split_stats) = run(&[8, 8]);
    let whole_awp = whole_stats.awp_loss.unwrap();
    assert!((whole_awp - split_stats.awp_loss.unwrap()).abs() < 1e-5);
    assert!(whole_awp > whole_stats.loss);
    for ((name, a), (_, b)) in whole.iter().zip(&split) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 2e-6, "{name}: 16 vs 8 + 8 differ by {worst}");
    }
}

fn training_args() -> TrainingArgs {
    let args: TrainingArgs = serde_json::from_value(json!({
        "epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "weight_decay": 0.01,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "epoch", "tensorboard": false
    }))
    .unwrap();
    args.validate().unwrap();
    args
}

/// Two epochs of the small model (dropout on), optionally with AWP; returns the final weights,
/// the weights after epoch 1 (its checkpoint) and the state.
fn train(awp: Option<&AwpConfig>) -> (Weights, Weights, TrainerState) {
    let data = common::amazon_examples(96);
    let labels = labels();
    let args = training_args();
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = finetune_trainer::Checkpoints::new(dir.path());
    let mut trainer = Trainer {
        args: &args,
        callbacks: Vec::new(),
        evaluator: None,
        checkpoints: Some(checkpoints.clone()),
        pad_to: None,
        labels: &labels,
        device: cpu(),
        inject_oom_at: None,
        awp,
        stop_requested: || false,
    };
    let outcome = trainer.train(Start::Fresh(small_model()), &data).unwrap();
    let first_epoch = dir.path().join("checkpoint-12");
    let (after_epoch_1, _) = load(&first_epoch, Some(&labels), 0, &cpu()).unwrap();
    (
        tensors(&outcome.model),
        tensors(&after_epoch_1),
        outcome.state,
    )
}

fn logged(state: &TrainerState, key: &str) -> Vec<(u64, Option<f64>)> {
    state
        .log_history
        .iter()
        .filter(|r| r.contains_key("loss"))
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r.get(key).and_then(Value::as_f64),
            )
        })
        .collect()
}

#[test]
fn awp_waits_for_its_start_epoch_keeps_the_schedule_and_is_a_no_op_at_adv_lr_0() {
    let _serial = one_at_a_time();
    let (plain, plain_epoch_1, plain_state) = train(None);

    let zero = awp(0.0, 1e-2);
    let (with_zero, _, zero_state) = train(Some(&zero));
    assert!(
        with_zero == plain,
        "adv_lr = 0 must give exactly the run without AWP (same dropout masks, same gradient)"
    );
    assert!(
        logged(&zero_state, "awp_loss")
            .iter()
            .all(|(_, l)| l.is_some())
    );

    let mut later: AwpConfig = awp(1e-2, 1e-2);
    later.start_epoch = Some(1);
    let (attacked, attacked_epoch_1, attacked_state) = train(Some(&later));
    assert!(
        attacked_epoch_1 == plain_epoch_1,
        "AWP must not act before start_epoch"
    );
    assert!(attacked != plain, "AWP after start_epoch changed nothing");
    let awp_losses = logged(&attacked_state, "awp_loss");
    assert!(
        awp_losses
            .iter()
            .all(|(step, l)| l.is_some() == (*step > 12))
    );
    assert_eq!(
        logged(&attacked_state, "learning_rate"),
        logged(&plain_state, "learning_rate"),
        "one scheduler step per update, with or without AWP"
    );
    assert_eq!(attacked_state.global_step, plain_state.global_step);
}

/// A 48 × 32 weight and a different target, on the autodiff device.
fn weight_and_target() -> (Tensor<2>, Tensor<2>) {
    let device = cpu().autodiff();
    device.seed(3);
    let weight = Tensor::<2>::random([48, 32], Distribution::Normal(0.0, 1.0), &device);
    let target = Tensor::<2>::random([48, 32], Distribution::Normal(0.5, 1.0), &device);
    (weight.require_grad(), target.inner())
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn mixout_is_the_identity_at_p_0_and_at_evaluation_and_the_target_as_p_tends_to_1() {
    let _serial = one_at_a_time();
    let (weight, target) = weight_and_target();
    let w = values(weight.clone());
    let at_zero = Mixout::new(target.clone(), 0.0).mix(weight.clone());
    assert!(values(at_zero) == w);
    let evaluation = Mixout::new(target.clone(), 0.5).mix(weight.clone().inner());
    assert!(
        values(evaluation) == w,
        "no autodiff (evaluation): the identity"
    );
    let training = Mixout::new(target.clone(), 0.5).mix(weight.clone());
    assert!(values(training) != w, "in training p = 0.5 mixes");

    cpu().autodiff().seed(11);
    let near_one = values(mix(weight, target.clone(), 1.0 - 1e-7));
    for (mixed, u) in near_one.iter().zip(values(target)) {
        assert!(
            (mixed - u).abs() <= 1e-5 * u.abs().max(1.0),
            "{mixed} vs target {u}"
        );
    }
}

#[test]
fn mixout_has_the_weight_as_its_mean() {
    let _serial = one_at_a_time();
    let (weight, target) = weight_and_target();
    let (w, u) = (values(weight.clone()), values(target.clone()));
    let p = 0.3;
    let samples = 400;
    let mut sum = vec![0.0f64; w.len()];
    cpu().autodiff().seed(5);
    for _ in 0..samples {
        for (s, v) in sum
            .iter_mut()
            .zip(values(mix(weight.clone(), target.clone(), p)))
        {
            *s += f64::from(v);
        }
    }
    // Each sample is u + m·(w − u)/(1 − p): variance p/(1 − p)·(w − u)² per element.
    let mut z_sum = 0.0;
    for ((s, &w), &u) in sum.iter().zip(&w).zip(&u) {
        let mean = s / samples as f64;
        let sd = (p / (1.0 - p) / samples as f64).sqrt() * f64::from(w - u).abs();
        let z = (mean - f64::from(w)) / sd;
        assert!(
            z.abs() < 5.5,
            "an element's mean is {z:.1} standard errors from w"
        );
        z_sum += z;
    }
    let mean_z = z_sum / w.len() as f64;
    assert!(
        mean_z.abs() < 4.0 / (w.len() as f64).sqrt(),
        "biased: mean z {mean_z}"
    );
}

#[test]
fn mixout_gradients_are_the_true_derivative() {
    let _serial = one_at_a_time();
    let (weight, target) = weight_and_target();
    let p = 0.4;
    let device = cpu().autodiff();
    let input = Tensor::<2>::random([5, 48], Distribution::Normal(0.0, 1.0), &device).inner();
    // A nonlinear scalar of the mixed weight, with the same mask on every evaluation.
    let loss = |w: Tensor<2>| {
        device.seed(99);
        input.clone().matmul(mix(w, target.clone(), p)).tanh().sum()
    };
    let grads = loss(weight.clone()).backward();
    let analytic = values(weight.grad(&grads).unwrap());
    let w = values(weight.clone());
    let h = 1e-2f32;
    let mut checked = 0;
    for index in (0..w.len()).step_by(97) {
        let at = |delta: f32| {
            let mut shifted = w.clone();
            shifted[index] += delta;
            let t = Tensor::<2>::from_data(TensorData::new(shifted, [48, 32]), &device);
            f64::from(loss(t).into_scalar::<f32>())
        };
        let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
        let exact = f64::from(analytic[index]);
        assert!(
            (numeric - exact).abs() <= 2e-2 * exact.abs().max(0.05),
            "element {index}: autodiff {exact} vs finite differences {numeric}"
        );
        checked += usize::from(exact != 0.0);
    }
    assert!(checked > 5, "too few kept elements checked: {checked}");
}

struct Collect(Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param.val().into_data().try_to_vec::<f32>().unwrap();
        self.0.push((param.id, values));
    }
}

#[test]
fn mixout_targets_are_the_starting_weights_and_the_optimizer_never_moves_them() {
    let _serial = one_at_a_time();
    let mut model = small_model();
    let start = model.clone();
    let config: MixoutConfig = serde_json::from_value(json!({ "p": 0.2 })).unwrap();
    let mixed = config.attach(&mut model, &start).unwrap();
    assert_eq!(mixed.len(), 12, "2 layers × 6 Linear layers: {mixed:?}");
    let target_of = |m: &Classifier| {
        m.layers[0]
            .query
            .mixout
            .as_ref()
            .map(|x| values(x.target.val()))
            .unwrap()
    };
    let query = |m: &Classifier| values(m.layers[0].query.weight.val());
    assert!(target_of(&model) == query(&start));

    let device = cpu().autodiff();
    let mut optimizer = AdamW::default().build(&model);
    let batches = micro_batches(&[8]);
    let target_id = model.layers[0].query.mixout.as_ref().unwrap().target.id;
    let (grads, _) = gradients(&model, &batches, None, &device);
    assert!(
        grads.get::<2>(target_id).is_none(),
        "a gradient reached the target"
    );
    for step in 0..3 {
        let plan = UpdatePlan {
            lr: 1e-2,
            max_grad_norm: None,
            pad_to: None,
            dropout_seed: step,
            attack: None,
            words: optimizer.word_gradient(),
            loss: &finetune_trainer::Loss::default(),
        };
        (model, _) = update(model, &mut optimizer, &batches, &plan, &device);
    }
    assert!(query(&model) != query(&start), "the weights trained");
    assert!(target_of(&model) == query(&start), "the target moved");
    let mut all = Collect(Vec::new());
    model.visit(&mut all);
    assert!(
        all.0.iter().any(|(id, _)| *id == target_id),
        "the target travels with the module"
    );
}
