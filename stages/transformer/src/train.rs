//! The `train` stage: fine-tunes (or trains from scratch) a classifier on the `tokenize`
//! output, shaped like Hugging Face Trainer: AdamW, warmup and decay, gradient accumulation,
//! global-norm clipping, dynamic or fixed padding, optional length grouping, evaluation on the
//! validation split after every epoch, seeds for everything.
//!
//! Output: `model/` (config.json, model.safetensors, tokenizer.json: loadable by Python
//! `transformers`), `metrics.json` (the last evaluation), `logs/train.jsonl` (one line per
//! update and per evaluation), `run_history.json` (params, per-epoch metrics, durations).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use finetune_core::rng::SplitMix64;
use finetune_core::schemars::{self, JsonSchema};
use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, Value, parse_params, schema_for,
};
use serde::Deserialize;
use serde_json::json;

use crate::config::ScratchSpec;
use crate::data::{Example, read_examples, read_labels, tokenizer_facts};
use crate::metrics::Metrics;
use crate::model::{Batch, Classifier};
use crate::optim::{AdamW, MicroBatch, update};
use crate::schedule::{Schedule, ScheduleKind};

/// `with:` of a `train` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// `{ from: HF_MODEL_DIR }` to fine-tune, or `{ scratch: { layers, hidden, heads } }`.
    pub model: ModelSource,
    #[serde(default)]
    pub training: TrainingArgs,
    /// Where to train: `cpu` (burn's flex backend).
    #[serde(default = "default_device")]
    pub device: String,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "either `{ from: MODEL_DIR }` or `{ scratch: { layers: N, hidden: N, heads: N } }`"
)]
pub enum ModelSource {
    From {
        /// A Hugging Face model directory (config.json + model.safetensors).
        from: PathBuf,
    },
    Scratch {
        scratch: ScratchSpec,
    },
}

/// The role of Trainer's TrainingArguments; names follow them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingArgs {
    /// num_train_epochs.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// max_steps: optimizer updates in all; overrides `epochs` when set.
    pub max_steps: Option<usize>,
    /// per_device_train_batch_size: samples per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// gradient_accumulation_steps: micro-batches per optimizer update.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// learning_rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// weight_decay (none on biases and LayerNorm weights).
    #[serde(default)]
    pub weight_decay: f64,
    /// adam_epsilon.
    #[serde(default = "default_epsilon")]
    pub adam_epsilon: f64,
    /// warmup_ratio of all updates (rounded up).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// warmup_steps; wins over warmup_ratio.
    pub warmup_steps: Option<usize>,
    /// lr_scheduler_type.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// max_grad_norm (global L2 norm); null for none.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// seed: shuffling, dropout, new weights.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `dynamic` (pad to the longest in the batch) or `max_length` (pad to tokenize's max_length).
    #[serde(default)]
    pub padding: Padding,
    /// group_by_length: batches of similar lengths (less padding), shuffled order of groups.
    #[serde(default)]
    pub group_by_length: bool,
    /// per_device_eval_batch_size.
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    #[default]
    Dynamic,
    MaxLength,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_epochs() -> usize {
    3
}
fn default_batch_size() -> usize {
    16
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_epsilon() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_seed() -> u64 {
    42
}
fn default_eval_batch_size() -> usize {
    64
}

/// The `train` plugin.
pub struct Train;

impl Stage for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "Fine-tune a BERT-family classifier (or train one from scratch) on the tokenize output, Trainer-style"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<TrainParams>()
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let params: TrainParams = parse_params(with)?;
        ctx.upstream_using("tokenize")?;
        let t = &params.training;
        let positive = [
            ("training.epochs", t.epochs),
            ("training.batch_size", t.batch_size),
            ("training.grad_accum", t.grad_accum),
            ("training.eval_batch_size", t.eval_batch_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::at(key, "must be at least 1"));
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(ConfigError::at(
                "training.lr",
                format!("{} is not a positive learning rate", t.lr),
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(ConfigError::at(
                "training.warmup_ratio",
                format!("{} is not in [0, 1)", t.warmup_ratio),
            ));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm.is_some_and(|m| m <= 0.0) {
            return Err(ConfigError::at(
                "training",
                "weight_decay must be ≥ 0 and max_grad_norm > 0",
            ));
        }
        crate::device(&params.device).map_err(|e| ConfigError::at("device", e.to_string()))?;
        match &params.model {
            ModelSource::From { from } => {
                let dir = ctx.resolve(from);
                for file in ["config.json", "model.safetensors"] {
                    if !dir.join(file).is_file() {
                        return Err(ConfigError::at(
                            "model.from",
                            format!("`{}` has no {file}", from.display()),
                        ));
                    }
                }
            }
            ModelSource::Scratch { scratch } => {
                scratch
                    .to_config(1, 0, vec![])
                    .map_err(|e| ConfigError::at("model.scratch", e))?;
            }
        }
        Ok(Box::new(TrainJob {
            params,
            with: with.clone(),
        }))
    }
}

struct TrainJob {
    params: TrainParams,
    /// The `with:` as the pipeline gave it, for run_history.json.
    with: Value,
}

impl Job for TrainJob {
    fn reads(&self) -> Vec<PathBuf> {
        match &self.params.model {
            ModelSource::From { from } => {
                vec![from.join("config.json"), from.join("model.safetensors")]
            }
            ModelSource::Scratch { .. } => Vec::new(),
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<()> {
        let tokenized = &ctx.upstream_using("tokenize")?.dir;
        let train = read_examples(&tokenized.join("train.parquet"))?;
        let validation = read_examples(&tokenized.join("validation.parquet"))?;
        let labels = read_labels(&tokenized.join("labels.json"))?;
        let tokenizer_json = tokenized.join("tokenizer.json");
        let stats: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tokenized.join("stats.json"))?)?;
        let max_length = stats["max_length"].as_u64().unwrap_or(512) as usize;
        if train.is_empty() {
            return Err(anyhow!("the train split is empty"));
        }
        let args = &self.params.training;
        let device = crate::device(&self.params.device)?;
        device.seed(args.seed);
        let train_device = device.clone().autodiff();
        let model = match &self.params.model {
            ModelSource::From { from } => {
                let (model, report) =
                    crate::hf::load(&ctx.resolve(from), Some(&labels), args.seed, &train_device)?;
                if !report.newly_initialized.is_empty() {
                    ctx.reporter.message(&format!(
                        "newly initialised: {}",
                        report.newly_initialized.join(", ")
                    ));
                }
                model
            }
            ModelSource::Scratch { scratch } => {
                let (vocab, pad) = tokenizer_facts(&tokenizer_json)?;
                let config = scratch
                    .to_config(vocab, pad, labels.clone())
                    .map_err(|e| anyhow!(e))?;
                crate::scratch(&config, args.seed, &train_device)
            }
        };
        if max_length > model.config.usable_positions() {
            return Err(anyhow!(
                "tokenize's max_length {max_length} is above the model's {} positions",
                model.config.usable_positions()
            ));
        }
        let pad_to = (args.padding == Padding::MaxLength).then_some(max_length);
        let mut loop_state = Loop::new(args, train.len(), ctx)?;
        let model = loop_state.run(
            model,
            &train,
            &validation,
            &labels,
            pad_to,
            &train_device,
            &device,
        )?;
        crate::hf::save_with_tokenizer(
            &model.valid(),
            &ctx.out_dir.join("model"),
            &tokenizer_json,
        )?;
        loop_state.finish(&self.with, ctx)
    }
}

/// The training loop's bookkeeping.
struct Loop<'a> {
    args: &'a TrainingArgs,
    schedule: Schedule,
    updates_per_epoch: usize,
    log: std::fs::File,
    history: Vec<serde_json::Value>,
    last_metrics: Option<serde_json::Value>,
    started: Instant,
    ctx: &'a RunContext<'a>,
}

impl<'a> Loop<'a> {
    fn new(args: &'a TrainingArgs, n_train: usize, ctx: &'a RunContext<'a>) -> Result<Self> {
        let per_update = args.batch_size * args.grad_accum;
        let updates_per_epoch = n_train.div_ceil(per_update);
        let total = args.max_steps.unwrap_or(updates_per_epoch * args.epochs);
        let schedule = Schedule::new(
            args.schedule,
            args.lr,
            total,
            args.warmup_ratio,
            args.warmup_steps,
        );
        std::fs::create_dir_all(ctx.out_dir.join("logs"))?;
        let log = std::fs::File::create(ctx.out_dir.join("logs/train.jsonl"))
            .context("cannot create logs/train.jsonl")?;
        Ok(Loop {
            args,
            schedule,
            updates_per_epoch,
            log,
            history: Vec::new(),
            last_metrics: None,
            started: Instant::now(),
            ctx,
        })
    }

    fn write_log(&mut self, line: serde_json::Value) -> Result<()> {
        writeln!(self.log, "{line}").context("cannot write logs/train.jsonl")
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        mut model: Classifier,
        train: &[Example],
        validation: &[Example],
        labels: &[String],
        pad_to: Option<usize>,
        train_device: &Device,
        eval_device: &Device,
    ) -> Result<Classifier> {
        let args = self.args;
        let mut optimizer = AdamW {
            weight_decay: args.weight_decay,
            epsilon: args.adam_epsilon,
            ..AdamW::default()
        }
        .build(&model);
        let mut rng = SplitMix64::new(args.seed);
        let total = self.schedule.total_steps;
        let mut step = 0usize;
        'epochs: for epoch in 0.. {
            let order = epoch_order(train, args, &mut rng);
            let epoch_start = Instant::now();
            for (i, chunk) in order.chunks(args.batch_size * args.grad_accum).enumerate() {
                if step >= total {
                    break 'epochs;
                }
                let micro: Vec<MicroBatch> = chunk
                    .chunks(args.batch_size)
                    .map(|ids| MicroBatch {
                        rows: ids.iter().map(|&j| train[j].ids.clone()).collect(),
                        labels: ids.iter().map(|&j| train[j].label).collect(),
                    })
                    .collect();
                let lr = self.schedule.lr(step);
                let clock = Instant::now();
                let (next, stats) = update(
                    model,
                    &mut optimizer,
                    &micro,
                    lr,
                    args.max_grad_norm,
                    pad_to,
                    train_device,
                );
                model = next;
                step += 1;
                let epoch_progress = epoch as f64 + (i + 1) as f64 / self.updates_per_epoch as f64;
                self.write_log(json!({
                    "step": step, "epoch": epoch_progress, "loss": stats.loss, "lr": lr,
                    "grad_norm": stats.grad_norm, "samples_per_s": chunk.len() as f64 / clock.elapsed().as_secs_f64(),
                }))?;
                self.ctx.reporter.progress(step as u64, total as u64);
                self.ctx.reporter.message(&format!(
                    "epoch {} step {step}/{total} loss {:.4} lr {lr:.2e}",
                    epoch + 1,
                    stats.loss
                ));
            }
            let metrics = evaluate(
                &model.valid(),
                validation,
                labels,
                args.eval_batch_size,
                eval_device,
            )?;
            let mut record = json!({ "epoch": epoch + 1, "step": step, "train_seconds": epoch_start.elapsed().as_secs_f64() });
            for (k, v) in metrics.as_object().into_iter().flatten() {
                record[format!("eval_{k}")] = v.clone();
            }
            self.write_log(record.clone())?;
            self.ctx.reporter.message(&format!(
                "epoch {}: eval accuracy {:.4}, macro F1 {:.4}",
                epoch + 1,
                metrics["accuracy"],
                metrics["f1_macro"]
            ));
            self.history.push(record);
            self.last_metrics = Some(metrics);
            if step >= total {
                break;
            }
        }
        Ok(model)
    }

    fn finish(self, with: &Value, ctx: &RunContext) -> Result<()> {
        let metrics = self.last_metrics.unwrap_or_else(|| json!({}));
        let write = |name: &str, value: &serde_json::Value| -> Result<()> {
            let mut text = serde_json::to_string_pretty(value)?;
            text.push('\n');
            std::fs::write(ctx.out_dir.join(name), text)
                .with_context(|| format!("cannot write {name}"))
        };
        write("metrics.json", &metrics)?;
        write(
            "run_history.json",
            &json!({ "params": with, "epochs": self.history, "final": metrics, "train_seconds": self.started.elapsed().as_secs_f64() }),
        )
    }
}

/// The sample order of one epoch: a seeded shuffle, or HF's length grouping (mega-batches of
/// 50 batches, each sorted longest first, the longest batch first).
fn epoch_order(train: &[Example], args: &TrainingArgs, rng: &mut SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    rng.shuffle(&mut order);
    if args.group_by_length {
        for mega in order.chunks_mut(50 * args.batch_size) {
            mega.sort_by_key(|&i| std::cmp::Reverse(train[i].ids.len()));
        }
    }
    order
}

/// Loss and metrics of `model` on `examples`, without autodiff.
pub fn evaluate(
    model: &Classifier,
    examples: &[Example],
    labels: &[String],
    batch_size: usize,
    device: &Device,
) -> Result<serde_json::Value> {
    if examples.is_empty() {
        return Ok(json!({}));
    }
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let (mut predictions, mut truth, mut loss_sum) = (Vec::new(), Vec::new(), 0.0f64);
    for chunk in examples.chunks(batch_size) {
        let rows: Vec<Vec<i32>> = chunk.iter().map(|e| e.ids.clone()).collect();
        let logits = model
            .forward(&Batch::from_rows(&rows, &model.config, None, device))
            .logits;
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(
                chunk.iter().map(|e| e.label).collect::<Vec<_>>(),
                [chunk.len()],
            ),
            device,
        );
        loss_sum += f64::from(
            loss_fn
                .forward(logits.clone(), targets)
                .into_scalar::<f32>(),
        ) * chunk.len() as f64;
        let predicted: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
        predictions.extend(predicted.into_iter().map(|p| p as usize));
        truth.extend(chunk.iter().map(|e| e.label as usize));
    }
    let metrics = Metrics::compute(&truth, &predictions, labels);
    let mut value = serde_json::to_value(&metrics)?;
    value["loss"] = json!(loss_sum / examples.len() as f64);
    Ok(value)
}
