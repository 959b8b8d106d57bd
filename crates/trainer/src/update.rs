//! One optimizer update, as Hugging Face Trainer makes it: AdamW with decoupled weight decay
//! (none on biases and LayerNorm weights), gradients accumulated over micro-batches with the
//! loss scaled so that the update equals one large batch of the same samples, and clipping by
//! the global gradient norm (torch's `clip_grad_norm_`, not burn's per-tensor clipping).
//!
//! The word-embedding table trains by rows ([`RowAdamW`]) unless AWP perturbs it: the
//! same update, bit for bit, without a dense gradient of half the model's weights.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::module::ParamGroup;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsAccumulator, GradientsParams, LearningRate, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use finetune_kernels::RowGradient;
use finetune_model::{Batch, Classifier, ProblemType, vector_loss_sum};
use finetune_optim::{FusedAdamW, GradientScale, RowAdamW, global_norm};
use finetune_regularizers::Attack;

use crate::regularize::with_mixout_masks;

/// The file, in a checkpoint, of burn's optimizer record (every parameter's AdamW state but a
/// word-embedding table trained by rows, which is in [`finetune_optim::STATE_FILE`]).
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// AdamW's settings with PyTorch's defaults (burn's differ: epsilon 1e-5, decay 1e-4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// Train the word-embedding table by rows (the default). Off when something needs its
    /// dense gradient (AWP on the word embeddings).
    pub word_rows: bool,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            word_rows: true,
        }
    }
}

impl AdamW {
    /// The optimizer for `model`: decay on weights and embeddings, none on biases and norms.
    pub fn build(&self, model: &Classifier) -> Optimizer {
        let gradient_scale = GradientScale::default();
        let config = |decay: f64| FusedAdamW {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            epsilon: self.epsilon as f32,
            weight_decay: decay as f32,
            gradient_scale: gradient_scale.clone(),
        };
        let params = ModuleOptimizer::from(config(self.weight_decay)).with_group(
            ParamGroup::from_ids(model.no_decay_ids()),
            config(0.0),
            None,
        );
        Optimizer {
            params,
            gradient_scale: gradient_scale.clone(),
            word_rows: self
                .word_rows
                .then(|| RowAdamW::new(config(self.weight_decay))),
        }
    }
}

/// A run's optimizer: [`FusedAdamW`] on every parameter through burn's `ModuleOptimizer`, but
/// on the word-embedding table through [`RowAdamW`] when it trains by rows.
#[derive(Clone)]
pub struct Optimizer {
    params: ModuleOptimizer,
    /// Shared with every group's [`FusedAdamW`] and the rows' optimizer.
    gradient_scale: GradientScale,
    word_rows: Option<RowAdamW>,
}

/// How the word-embedding table's gradient is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordGradient {
    /// As a gradient of the table's shape, like every other parameter's.
    Dense,
    /// As the rows the batch looked up ([`RowGradient`]).
    Rows,
}

/// An update's gradients: `scale` times the values held.
pub struct Gradients {
    /// Every parameter's, the word-embedding table's too unless it is in `word_rows`.
    pub params: GradientsParams,
    pub word_rows: Option<RowGradient>,
    /// Clipping's coefficient (1 when not clipped), which the optimizer multiplies each
    /// gradient by as it steps ([`GradientScale`]).
    pub scale: f32,
}

impl Optimizer {
    /// The gradient this optimizer steps the word-embedding table with.
    pub fn word_gradient(&self) -> WordGradient {
        match self.word_rows {
            Some(_) => WordGradient::Rows,
            None => WordGradient::Dense,
        }
    }

    /// One update of `model` from `grads` (taken as [`Optimizer::word_gradient`] says).
    pub fn step(&mut self, lr: LearningRate, model: Classifier, grads: Gradients) -> Classifier {
        self.gradient_scale.set(grads.scale);
        let mut model = self.params.step(lr, model, grads.params);
        match (&mut self.word_rows, grads.word_rows) {
            (Some(optimizer), Some(rows)) => {
                let table = model.embeddings.word.weight;
                model.embeddings.word.weight = table.map(|table| {
                    let tracked = table.is_require_grad();
                    let table = Tensor::from_inner(optimizer.step(lr, table.inner(), &rows));
                    if tracked { table.require_grad() } else { table }
                });
            }
            (None, None) => {}
            (Some(_), None) => {
                panic!(
                    "the word embeddings' gradient was taken densely; this optimizer steps them by rows"
                )
            }
            (None, Some(_)) => {
                panic!(
                    "the word embeddings' gradient was taken by rows; this optimizer steps them densely"
                )
            }
        }
        model
    }

    /// Writes the state into checkpoint directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(OPTIMIZER_FILE);
        write_in_fixed_order(&self.params, &path)
            .map_err(|e| anyhow!("{}: cannot save the optimizer state: {e}", path.display()))?;
        match &self.word_rows {
            Some(rows) => Ok(rows.save(dir)?),
            None => Ok(()),
        }
    }

    /// Loads the state a checkpoint of `model` saved in `dir`. A checkpoint that kept the word
    /// embeddings' state with the others' (written before they trained by rows) goes on
    /// training them densely, from that state.
    pub fn load(mut self, dir: &Path, model: &Classifier) -> Result<Self> {
        let path = dir.join(OPTIMIZER_FILE);
        self.params = self
            .params
            .load(&path)
            .map_err(|e| anyhow!("{}: cannot load the optimizer state: {e}", path.display()))?;
        if !dir.join(finetune_optim::STATE_FILE).exists() {
            self.word_rows = None;
            return Ok(self);
        }
        let Some(word_rows) = &mut self.word_rows else {
            bail!(
                "{}: this checkpoint trained the word embeddings by rows, and this run needs \
                 their dense gradient (AWP on the word embeddings); resume without AWP on them, \
                 or start from the checkpoint's model",
                dir.display()
            );
        };
        let [rows, dim] = model.embeddings.word.weight.dims();
        word_rows.load(dir, rows, dim)?;
        Ok(self)
    }
}

/// Writes burn's optimizer record with its tensors sorted by name. burn lists them in the
/// order of a `HashMap` with a per-process seed, so the same state gave different bytes on
/// every run, and a rerun of `train` with the same model made every downstream key new.
fn write_in_fixed_order(optimizer: &ModuleOptimizer, path: &Path) -> Result<()> {
    let record = burn_pack::Reader::from_bytes(optimizer.into_bytes()?)?;
    let (scalars, metadata) = (record.scalars().clone(), record.metadata().clone());
    let mut tensors = record.into_tensors()?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut writer = burn_pack::Writer::new(tensors).auto_extension(false);
    for (key, value) in &scalars {
        writer = writer.with_scalar(key, *value);
    }
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    writer.write_to_file(path)?;
    Ok(())
}

/// The training loss: cross-entropy, with class weights and label smoothing as PyTorch's
/// `CrossEntropyLoss(weight=w, label_smoothing=ε)` defines them (Trainer's
/// `label_smoothing_factor` is the same without weights): row i costs
/// `(1-ε)·w[y_i]·(-log p_i[y_i]) + ε/K·Σ_c w[c]·(-log p_i[c])`, and the update's loss is their
/// sum over Σ w[y_i] of all the update's rows, so that accumulated micro-batches give exactly
/// the one large batch's loss and gradient (each micro-batch scaled by its share of the weight,
/// not of the rows).
///
/// Multi-label classification trains with binary cross-entropy on the logits, regression with
/// the squared error, each the mean over all of the update's rows × outputs (PyTorch's
/// `BCEWithLogitsLoss` and `MSELoss`, as Hugging Face's heads call them); neither takes
/// weights or smoothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loss {
    /// Which loss: by what the head predicts.
    pub problem_type: ProblemType,
    /// One weight per label, in label-id order; `None`: all 1.
    pub class_weights: Option<Vec<f32>>,
    /// ε in [0, 1).
    pub label_smoothing: f32,
    /// Regression with the Huber loss of this δ instead of the squared error.
    pub huber_delta: Option<f32>,
}

impl Loss {
    /// Plain cross-entropy, through burn's own loss (the results of runs without weights or
    /// smoothing are those of before either existed).
    fn is_plain(&self) -> bool {
        self.problem_type == ProblemType::SingleLabelClassification
            && self.class_weights.is_none()
            && self.label_smoothing == 0.0
    }

    fn weight(&self, label: i64) -> f64 {
        self.class_weights
            .as_ref()
            .map_or(1.0, |w| f64::from(w[label as usize]))
    }

    /// Σ over rows of their cost (see [`Loss`]), not yet divided by the update's weight.
    fn sum(&self, logits: Tensor<2>, labels: &[i64], device: &Device) -> Tensor<1> {
        let [rows, classes] = logits.dims();
        let log_p = log_softmax(logits, 1);
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(labels.to_vec(), [rows, 1]), device);
        let row_weights: Vec<f32> = labels.iter().map(|&y| self.weight(y) as f32).collect();
        let row_weights = Tensor::<1>::from_data(TensorData::new(row_weights, [rows]), device);
        let picked = log_p.clone().gather(1, targets).reshape([rows]);
        let nll = picked.mul(row_weights).sum().neg();
        let eps = self.label_smoothing;
        if eps == 0.0 {
            return nll;
        }
        let class_weights: Vec<f32> = (0..classes as i64).map(|c| self.weight(c) as f32).collect();
        let class_weights =
            Tensor::<1>::from_data(TensorData::new(class_weights, [classes]), device)
                .reshape([1, classes]);
        let smooth = log_p
            .mul(class_weights)
            .sum()
            .neg()
            .div_scalar(classes as f32);
        nll.mul_scalar(1.0 - eps).add(smooth.mul_scalar(eps))
    }
}

/// PyTorch's `HuberLoss(delta=δ, reduction="sum")` of `logits` against `targets`: per
/// element ½d² where |d| ≤ δ, else δ(|d| − ½δ); written as ½q² + δ(|d| − q) with q = min(|d|, δ),
/// which is both pieces at once.
fn huber_sum(logits: Tensor<2>, targets: Vec<f32>, delta: f32, device: &Device) -> Tensor<1> {
    let shape = logits.dims();
    let targets = Tensor::<2>::from_data(TensorData::new(targets, shape), device);
    let distance = logits.sub(targets).abs();
    let quadratic = distance.clone().clamp_max(delta);
    let linear = distance.sub(quadratic.clone());
    quadratic
        .powi_scalar(2)
        .mul_scalar(0.5)
        .add(linear.mul_scalar(delta))
        .sum()
}

/// Token rows and their labels: one micro-batch.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub rows: Vec<Vec<i32>>,
    /// Each row's token type ids, for sentence pairs; empty (for a row, or for all): segment 0.
    pub type_ids: Vec<Vec<i32>>,
    /// Each row's label id (single-label classification).
    pub labels: Vec<i64>,
    /// Each row's target vector (multi-label, regression: see [`finetune_model::Example::targets`]); empty for
    /// single-label classification.
    pub targets: Vec<Vec<f32>>,
}

/// What an update measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// The update's loss ([`Loss`]): mean cross-entropy over its samples, weighted and
    /// smoothed as configured.
    pub loss: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// With AWP: the loss at the perturbed weights.
    pub awp_loss: Option<f64>,
}

/// How one update is made.
#[derive(Debug, Clone, Copy)]
pub struct UpdatePlan<'a> {
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    /// Fixed padding length, or `None` for dynamic padding.
    pub pad_to: Option<usize>,
    /// The device RNG's seed for this update's dropout (and Mixout) masks: set before every
    /// pass, so that an AWP pass sees the masks of the clean one.
    pub dropout_seed: u64,
    /// Adversarial Weight Perturbation for this update.
    pub attack: Option<&'a Attack>,
    /// How to take the word embeddings' gradient: as the optimizer steps them
    /// ([`Optimizer::word_gradient`]).
    pub words: WordGradient,
    pub loss: &'a Loss,
}

/// Applies one optimizer update from `micro_batches` (all of them: one update).
pub fn update(
    model: Classifier,
    optimizer: &mut Optimizer,
    micro_batches: &[MicroBatch],
    plan: &UpdatePlan,
    device: &Device,
) -> (Classifier, UpdateStats) {
    let (grads, stats) = update_gradients(&model, micro_batches, plan, device);
    (optimizer.step(plan.lr, model, grads), stats)
}

/// Everything of an update up to the optimizer step: the gradients (with AWP's attack, and
/// clipped to the global norm) and what the update measured. It borrows the model, so a
/// failure here (out of memory) leaves the model as it was, with no copy of it kept.
pub fn update_gradients(
    model: &Classifier,
    micro_batches: &[MicroBatch],
    plan: &UpdatePlan,
    device: &Device,
) -> (Gradients, UpdateStats) {
    let gradients_of = |model: &Classifier| {
        device.seed(plan.dropout_seed);
        gradients_taking(
            model,
            micro_batches,
            plan.pad_to,
            plan.words,
            plan.loss,
            device,
        )
    };
    let (clean, loss) = gradients_of(model);
    let (mut grads, awp_loss) = match plan.attack {
        // The clean gradient only aims the attack; the update uses the perturbed one.
        Some(attack) => {
            assert!(
                plan.words == WordGradient::Dense
                    || !attack.targets.contains(&model.embeddings.word.weight.id),
                "AWP on the word embeddings needs their dense gradient"
            );
            let mut word_rows = None;
            let adversarial = attack.run(model, &clean.params, |model| {
                let (grads, loss) = gradients_of(model);
                word_rows = grads.word_rows;
                (grads.params, loss)
            });
            let grads = Gradients {
                params: adversarial.grads,
                word_rows,
                scale: 1.0,
            };
            (grads, Some(adversarial.loss))
        }
        None => (clean, None),
    };
    let grad_norm = clip_to_global_norm(model, &mut grads, plan.max_grad_norm);
    let stats = UpdateStats {
        loss,
        grad_norm,
        awp_loss,
    };
    (grads, stats)
}

/// The gradient of the mean loss over all of `micro_batches` (accumulated, each micro-batch's
/// mean weighted by its share of the samples, as one large batch computes it), and that loss.
pub fn gradients(
    model: &Classifier,
    micro_batches: &[MicroBatch],
    pad_to: Option<usize>,
    device: &Device,
) -> (GradientsParams, f64) {
    let dense = WordGradient::Dense;
    let (grads, loss) = gradients_taking(
        model,
        micro_batches,
        pad_to,
        dense,
        &Loss::default(),
        device,
    );
    (grads.params, loss)
}

/// [`gradients`] of `loss`, with the word embeddings' gradient taken as `words` says.
pub fn gradients_taking(
    model: &Classifier,
    micro_batches: &[MicroBatch],
    pad_to: Option<usize>,
    words: WordGradient,
    loss: &Loss,
    device: &Device,
) -> (Gradients, f64) {
    // One Mixout mask per update, shared by its micro-batches, as one large batch would draw.
    let masked = with_mixout_masks(model);
    let model = masked.as_ref().unwrap_or(model);
    let total: usize = micro_batches.iter().map(|m| m.rows.len()).sum();
    let total_weight: f64 = micro_batches
        .iter()
        .flat_map(|m| &m.labels)
        .map(|&y| loss.weight(y))
        .sum();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut accumulated = GradientsAccumulator::new();
    let mut word_rows: Option<RowGradient> = None;
    let mut loss_sum = 0.0;
    for micro in micro_batches {
        let batch =
            Batch::from_segmented_rows(&micro.rows, &micro.type_ids, &model.config, pad_to, device);
        let share = micro.rows.len() as f64 / total as f64;
        let (logits, leaf) = match words {
            WordGradient::Dense => (model.logits(&batch), None),
            WordGradient::Rows => {
                let leaf = model.word_leaf(&batch);
                (model.logits_from_words(leaf.clone(), &batch), Some(leaf))
            }
        };
        let micro_loss = if loss.problem_type != ProblemType::SingleLabelClassification {
            let outputs = logits.dims()[1];
            let values: Vec<f32> = micro.targets.iter().flatten().copied().collect();
            let sum = match loss.huber_delta {
                Some(delta) => huber_sum(logits, values, delta, device),
                None => vector_loss_sum(loss.problem_type, logits, values, device),
            };
            sum.div_scalar((total * outputs) as f32)
        } else if loss.is_plain() {
            let targets = Tensor::<1, Int>::from_data(
                TensorData::new(micro.labels.clone(), [micro.labels.len()]),
                device,
            );
            loss_fn.forward(logits, targets).mul_scalar(share)
        } else {
            let sum = loss.sum(logits, &micro.labels, device);
            sum.div_scalar(total_weight as f32)
        };
        let mut backward = micro_loss.backward();
        if let Some(leaf) = leaf {
            let rows = lookup_gradient(model, &batch, &leaf, &mut backward);
            match &mut word_rows {
                Some(sum) => sum.accumulate(&rows),
                None => word_rows = Some(rows),
            }
        }
        let grads = GradientsParams::from_grads(backward, model);
        loss_sum += f64::from(micro_loss.into_scalar::<f32>());
        accumulated.accumulate(model, grads);
    }
    let grads = Gradients {
        params: accumulated.grads(),
        word_rows,
        scale: 1.0,
    };
    (grads, loss_sum)
}

/// The word-embedding table's gradient from that of its lookup `leaf` (see
/// [`Classifier::word_leaf`]).
fn lookup_gradient(
    model: &Classifier,
    batch: &Batch,
    leaf: &Tensor<3>,
    backward: &mut burn::tensor::Gradients,
) -> RowGradient {
    let [rows, dim] = model.embeddings.word.weight.dims();
    let grad = leaf
        .grad_remove(backward)
        .expect("the word lookup is a leaf of the graph")
        .into_data();
    let ids: Vec<usize> = batch
        .input_ids
        .to_data()
        .iter::<i64>()
        .map(|id| id as usize)
        .collect();
    let grad = grad.as_slice::<f32>().expect("f32 gradients");
    RowGradient::from_lookup(rows, dim, &ids, grad)
}

/// The L2 norm of all gradients together (accumulated in f64), returned as it was before
/// clipping; with `max_norm`, the gradients are then scaled down to it when above it (torch's
/// `clip_grad_norm_`: by the f32 coefficient `max / (norm + 1e-6)`), through their `scale`.
///
pub fn clip_to_global_norm(
    model: &Classifier,
    grads: &mut Gradients,
    max_norm: Option<f64>,
) -> f64 {
    let rows = grads.word_rows.as_ref().map(RowGradient::values);
    let norm = global_norm(model, &mut grads.params, rows);
    if let Some(max) = max_norm {
        let coefficient = max / (norm + 1e-6);
        // Nothing else scales gradients: the norm above is of the values held.
        if coefficient < 1.0 {
            grads.scale = coefficient as f32;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch: `HuberLoss(delta=1.0, reduction="sum")(tensor([[0., 3.], [-0.25, 1.5]]),
    /// tensor([[0.5, 0.], [0., 0.]]))` = ½·0.25 + (3 − ½) + ½·0.0625 + (1.5 − ½) = 3.65625.
    #[test]
    fn huber_is_quadratic_within_delta_and_linear_beyond() {
        let device = finetune_model::device("cpu").unwrap().device().clone();
        let logits =
            Tensor::<2>::from_data(TensorData::new(vec![0.0, 3.0, -0.25, 1.5], [2, 2]), &device);
        let sum = huber_sum(logits, vec![0.5, 0.0, 0.0, 0.0], 1.0, &device);
        assert!((sum.into_scalar::<f32>() - 3.656_25).abs() < 1e-6);
    }
}
