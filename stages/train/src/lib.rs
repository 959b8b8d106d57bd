//! The `train` stage: fine-tunes (or trains from scratch) a classifier on the `tokenize`
//! output with the `finetune-trainer` loop, configured under `with: training:` as Trainer is
//! with TrainingArguments.
//!
//! Output: `model/` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
//! special_tokens_map.json: loadable by Python `transformers`; the best checkpoint's with
//! `load_best_model_at_end`), `metrics.json` (the
//! output model on the evaluation split, and on the test split), `logs/train.jsonl`,
//! `logs/tensorboard/`, `run_history.json`, and `checkpoints/`. Checkpoints are written to the
//! stage's scratch directory first, which survives a crash: a rerun resumes from the last one.
//!
//! `FINETUNE_FAULT_OOM_AT_STEP=N` makes update N fail once as if out of memory (a fault
//! injection switch for tests of the micro-batch split).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use finetune_core::integrity::{self, KeyConfig, SigningKey};
use finetune_core::output::write_json;
use finetune_core::schemars::{self, JsonSchema};
use finetune_core::{
    Audit, ConfigError, ConfigureContext, Job, RunContext, Stage, Value, parse_params, schema_for,
};
use serde::Deserialize;
use serde_json::json;

use finetune_model::{
    Classifier, ComputeDevice, DeviceSpec, Example, ProblemType, ScratchSpec, hf,
};
use finetune_tokenize::tokenized::{Task, read_examples, read_task, tokenizer_facts};
use finetune_trainer::{
    Callback, Checkpoints, DatasetEvaluator, EarlyStopping, EvalSplit, Evaluator, Padding,
    Regularizers, RunHistory, Start, Trainer, TrainingArgs, evaluate, jsonl_logger, restore,
    tensorboard_logger, tune_threshold,
};

use crate::progress::Progress;

mod progress;

/// `with:` of a `train` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// `{ from: HF_MODEL_DIR }` to fine-tune, or `{ scratch: { layers, hidden, heads } }`.
    pub model: ModelSource,
    #[serde(default)]
    pub training: TrainingArgs,
    /// Where a new head's output bias starts: `zeros` (as Hugging Face initialises it) or
    /// `priors` (the training labels' base rates: log-odds per label, log shares per class,
    /// target means), so that a short multi-label run learns from the texts rather than
    /// spending its updates on the label frequencies. A checkpoint's own head is kept.
    #[serde(default)]
    pub head_bias: HeadBias,
    /// `awp:` (Adversarial Weight Perturbation) and `mixout:`; either, both or neither.
    #[serde(default)]
    pub regularizers: Regularizers,
    /// Where to train: `cpu` (burn's flex backend with the fused kernels), `cpu-generic`,
    /// `cuda[:N]`, `vulkan[:N]`, `wgpu[:N]` (in a build with that feature) or `auto`.
    #[serde(default = "finetune_model::default_device_name")]
    pub device: String,
    /// When this key is configured (`key_env` set, or `key_file` given), every checkpoint and
    /// the output carry a `fingerprint.json` (HMAC-SHA256 over their files), and a resume
    /// refuses a checkpoint that no longer matches it.
    #[serde(default)]
    pub fingerprint: KeyConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadBias {
    #[default]
    Zeros,
    Priors,
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

/// The `train` plugin.
pub struct Train;

impl Stage for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    /// 2: the model directory has tokenizer_config.json and special_tokens_map.json.
    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "Fine-tune a BERT-family classifier (or train one from scratch) on the tokenize output, Trainer-style"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<TrainParams>()
    }

    fn audit(&self) -> Option<Audit> {
        let (report, passed) = finetune_regularizers::audit::report();
        Some(Audit { report, passed })
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let with = &with_our_names(with)?;
        let params: TrainParams = parse_params(with)?;
        ctx.upstream_using("tokenize")?;
        params.training.validate()?;
        params.regularizers.validate()?;
        let device = DeviceSpec::parse(&params.device)
            .map_err(|e| ConfigError::at("device", e.to_string()))?;
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
                    .map_err(|e| ConfigError::at("model.scratch", e.to_string()))?;
            }
        }
        // Loaded once, so that the key that signs is the one whose id is in the cache key.
        let signing = params
            .fingerprint
            .configured(&ctx.workspace)
            .map_err(|e| {
                ConfigError::at(
                    format!("fingerprint.{}", params.fingerprint.param()),
                    e.to_string(),
                )
            })?
            .map(Arc::new);
        Ok(Box::new(TrainJob {
            params,
            device,
            signing,
            with: with.clone(),
        }))
    }
}

/// `with:` with TrainingArguments' names under `training:` rewritten to ours.
fn with_our_names(with: &Value) -> Result<Value, ConfigError> {
    let mut with = with.clone();
    if let Some(training) = with.get_mut("training").and_then(Value::as_object_mut) {
        finetune_trainer::accept_trainer_names(training)?;
    }
    Ok(with)
}

struct TrainJob {
    params: TrainParams,
    /// The `with:` as the pipeline gave it (in our names), for run_history.json.
    with: Value,
    /// The key that signs checkpoints and the output, when one is configured.
    /// `device:`, checked; `auto` is resolved when the key is made.
    device: DeviceSpec,
    signing: Option<Arc<SigningKey>>,
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

    /// A signed output differs with the key, and `device: auto`'s with the device it picks
    /// (a GPU's floats are not the CPU's); any other output keeps its old cache key.
    fn key_extra(&self) -> Option<Value> {
        let mut extra = serde_json::Map::new();
        if let Some(key) = &self.signing {
            extra.insert("key_id".into(), json!(key.id()));
        }
        if self.device == DeviceSpec::Auto {
            extra.insert("device".into(), json!(self.device.resolved().to_string()));
        }
        (!extra.is_empty()).then_some(Value::Object(extra))
    }

    fn run(&self, ctx: &RunContext) -> Result<()> {
        let device = self.device.open()?;
        ctx.reporter
            .message(&format!("training on {}", device.describe()));
        finetune_kernels::on_own_pool(|| device.run(|| self.train(ctx, &device)))
    }
}

impl TrainJob {
    fn train(&self, ctx: &RunContext, compute: &ComputeDevice) -> Result<()> {
        let tokenized = &ctx.upstream_using("tokenize")?.dir;
        let task = read_task(&tokenized.join("labels.json"))?;
        let split = |name: &str| {
            read_examples(&tokenized.join(format!("{name}.parquet")), &task, |row| {
                Example {
                    ids: row.ids,
                    type_ids: row.type_ids,
                    label: row.label,
                    targets: row.targets,
                }
            })
        };
        let train = split("train")?;
        if train.is_empty() {
            return Err(anyhow!("the train split is empty"));
        }
        let args = &self.params.training;
        let eval_examples = split(args.eval_split.name())?;
        let test = split("test")?;
        let metrics = finetune_trainer::task_metrics(task.problem_type);
        if !metrics.contains(&args.best_metric()) {
            return Err(anyhow!(
                "`training.metric_for_best_model`: `{}` is not a metric of {}; one of: {}",
                args.best_metric(),
                task.problem_type,
                metrics.join(", ")
            ));
        }
        let labels = task.names.clone();
        let tokenizer_json = tokenized.join("tokenizer.json");
        let device = compute.device().clone();
        device.seed(args.seed);
        let checkpoints =
            Checkpoints::new(ctx.scratch_dir.join("checkpoints")).signed_with(self.signing.clone());
        if !args.resume {
            checkpoints.clear()?;
        }
        let start = match checkpoints.latest()?.filter(|_| args.resume) {
            Some(dir) => {
                checkpoints.check(&dir)?;
                let mut restored = restore(&dir, &labels, &device.clone().autodiff(), |m| {
                    finetune_trainer::optimizer(args, self.params.regularizers.awp.as_ref(), m)
                })?;
                ctx.reporter.message(&format!(
                    "resuming from {} (step {} of {})",
                    restored.name, restored.state.global_step, restored.state.max_steps
                ));
                if self.params.regularizers.mixout.is_some() {
                    // Mixout's targets are the starting weights, rebuilt exactly from their source.
                    let initial = self.fresh_model(ctx, &task, &train, &tokenizer_json, &device)?;
                    self.attach_mixout(ctx, &mut restored.model, &initial)?;
                }
                Start::Resume(restored)
            }
            None => {
                let mut model = self.fresh_model(ctx, &task, &train, &tokenizer_json, &device)?;
                if self.params.regularizers.mixout.is_some() {
                    let initial = model.clone();
                    self.attach_mixout(ctx, &mut model, &initial)?;
                }
                Start::Fresh(model)
            }
        };
        let max_length = tokenize_max_length(tokenized)?;
        let model_positions = match &start {
            Start::Fresh(m) => m.config.usable_positions(),
            Start::Resume(r) => r.model.config.usable_positions(),
        };
        if max_length > model_positions {
            return Err(anyhow!(
                "tokenize's max_length {max_length} is above the model's {model_positions} positions"
            ));
        }
        let mut trainer = Trainer {
            args,
            callbacks: self.callbacks(ctx, compute)?,
            evaluator: (!eval_examples.is_empty()).then(|| {
                Box::new(DatasetEvaluator {
                    examples: &eval_examples,
                    labels: &labels,
                    batch_size: args.eval_batch_size,
                    device: device.clone(),
                }) as Box<dyn Evaluator>
            }),
            // Always a directory: even with `save_strategy: no`, Ctrl-C saves a checkpoint.
            checkpoints: Some(checkpoints.clone()),
            pad_to: (args.padding == Padding::MaxLength).then_some(max_length),
            labels: &labels,
            device: device.clone(),
            inject_oom_at: std::env::var("FINETUNE_FAULT_OOM_AT_STEP")
                .ok()
                .and_then(|v| v.parse().ok()),
            awp: self.params.regularizers.awp.as_ref(),
            stop_requested: finetune_core::interrupt::requested,
        };
        let outcome = trainer.train(start, &train)?;
        drop(trainer);
        let mut model = outcome.model.valid();
        if model.config.problem_type == ProblemType::MultiLabelClassification
            && args.eval_split == EvalSplit::Validation
            && !eval_examples.is_empty()
        {
            let batch = args.eval_batch_size;
            let threshold = tune_threshold(&model, &eval_examples, &labels, batch, &device)?;
            ctx.reporter.message(&format!(
                "decision threshold {threshold:.2} (the best micro F1 on validation), saved in config.json"
            ));
            model.config.decision_threshold = Some(threshold);
        }
        hf::save_with_tokenizer(&model, &ctx.out_dir.join("model"), &tokenizer_json)?;
        let evaluation = match outcome.last_evaluation {
            Some((step, metrics)) if step == outcome.model_step => metrics,
            _ => evaluate(
                &model,
                &eval_examples,
                &labels,
                args.eval_batch_size,
                &device,
            )?,
        };
        let mut metrics = json!({ "step": outcome.model_step, args.eval_split.name(): evaluation });
        if args.eval_split != EvalSplit::Test && !test.is_empty() {
            metrics["test"] = evaluate(&model, &test, &labels, args.eval_batch_size, &device)?;
        }
        write_json(&ctx.out_dir.join("metrics.json"), &metrics)?;
        link_tree(checkpoints.dir(), &ctx.out_dir.join("checkpoints"))?;
        if let Some(key) = &self.signing {
            let context = json!({
                "stage": ctx.stage,
                "uses": "train",
                "params": self.with,
                "cache_key": ctx.cache_key,
            });
            integrity::sign_dir(&ctx.out_dir, context, key)?;
            ctx.reporter
                .message(&format!("signed the output with key id {}", key.id()));
        }
        Ok(())
    }

    fn fresh_model(
        &self,
        ctx: &RunContext,
        task: &Task,
        train: &[Example],
        tokenizer_json: &Path,
        device: &burn::tensor::Device,
    ) -> Result<Classifier> {
        let seed = self.params.training.seed;
        let train_device = device.clone().autodiff();
        let labels = &task.names;
        // The task is the data's: a checkpoint's own head may have predicted something else.
        let (mut model, new_head) = match &self.params.model {
            ModelSource::From { from } => {
                let (model, report) =
                    hf::load(&ctx.resolve(from), Some(labels), seed, &train_device)?;
                let new_head = report.new_output_layer(model.config.family);
                covers_vocabulary(&model, &ctx.resolve(from), tokenizer_json)?;
                if !report.newly_initialized.is_empty() {
                    ctx.reporter.message(&format!(
                        "newly initialised: {}",
                        report.newly_initialized.join(", ")
                    ));
                }
                (model, new_head)
            }
            ModelSource::Scratch { scratch } => {
                let (vocab, pad) = tokenizer_facts(tokenizer_json)?;
                let config = scratch.to_config(vocab, pad, labels.to_vec())?;
                fits_in_memory(&config)?;
                (finetune_model::scratch(&config, seed, &train_device), true)
            }
        };
        model.config.problem_type = task.problem_type;
        if self.params.head_bias == HeadBias::Priors {
            self.start_at_priors(ctx, &mut model, task, train, new_head)?;
        }
        Ok(model)
    }

    /// `head_bias: priors` on a new output layer; a checkpoint's own is left as trained.
    fn start_at_priors(
        &self,
        ctx: &RunContext,
        model: &mut Classifier,
        task: &Task,
        train: &[Example],
        new_head: bool,
    ) -> Result<()> {
        if !new_head {
            ctx.reporter.message(
                "head_bias: priors leaves the checkpoint's own output layer as it was trained",
            );
            return Ok(());
        }
        let priors = finetune_trainer::output_priors(task.problem_type, train, task.names.len());
        if !model.set_output_bias(&priors) {
            return Err(anyhow!(
                "`head_bias: priors`: this model's output layer has no bias of {} values to set",
                priors.len()
            ));
        }
        ctx.reporter.message(
            "the output bias starts at the training labels' base rates (head_bias: priors)",
        );
        Ok(())
    }

    /// Mixes the configured layers of `model` towards `initial`'s weights.
    fn attach_mixout(
        &self,
        ctx: &RunContext,
        model: &mut Classifier,
        initial: &Classifier,
    ) -> Result<()> {
        let Some(mixout) = &self.params.regularizers.mixout else {
            return Ok(());
        };
        let layers = mixout.attach(model, initial)?;
        let target = match self.params.model {
            ModelSource::From { .. } => "the pretrained weights",
            ModelSource::Scratch { .. } => "the initial weights",
        };
        ctx.reporter.message(&format!(
            "mixout p={} on {} Linear layers, towards {target}{}",
            mixout.p,
            layers.len(),
            if mixout.disable_dropout {
                "; dropout off"
            } else {
                ""
            }
        ));
        Ok(())
    }

    fn callbacks<'a>(
        &self,
        ctx: &'a RunContext,
        compute: &ComputeDevice,
    ) -> Result<Vec<Box<dyn Callback + 'a>>> {
        let args = &self.params.training;
        let logs = ctx.out_dir.join("logs");
        let mut callbacks: Vec<Box<dyn Callback + 'a>> = vec![
            Box::new(Progress::new(ctx.reporter)),
            Box::new(jsonl_logger(&logs.join("train.jsonl"))?),
        ];
        if args.tensorboard {
            callbacks.push(Box::new(tensorboard_logger(&logs.join("tensorboard"))?));
        }
        if let Some(early) = &args.early_stopping {
            callbacks.push(Box::new(EarlyStopping::new(
                early,
                args.best_metric(),
                args.greater_is_better(),
            )));
        }
        callbacks.push(Box::new(RunHistory::new(
            &ctx.out_dir.join("run_history.json"),
            self.with.clone(),
            json!(compute.report()),
        )));
        Ok(callbacks)
    }
}

/// Refuses a model whose word embeddings have fewer rows than the tokenizer has ids (a
/// tokenizer trained here for a pretrained model, say): those ids would have no embedding.
fn covers_vocabulary(model: &Classifier, model_dir: &Path, tokenizer_json: &Path) -> Result<()> {
    let (tokens, _) = tokenizer_facts(tokenizer_json)?;
    let rows = model.config.vocab_size;
    if tokens > rows {
        bail!(
            "the tokenizer ({}) has {tokens} tokens, but the model ({}) embeds only {rows} \
             (`vocab_size` in its config.json): tokenize with the model's own tokenizer \
             (`tokenizer: {{ from: ... }}`), or train one of at most {rows} tokens",
            tokenizer_json.display(),
            model_dir.display()
        );
    }
    Ok(())
}

/// tokenize's `max_length` (the length `padding: max_length` pads to).
fn tokenize_max_length(tokenized: &Path) -> Result<usize> {
    let path = tokenized.join("stats.json");
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    stats["max_length"]
        .as_u64()
        .map(|n| n as usize)
        .with_context(|| format!("{} has no `max_length`", path.display()))
}

/// Hard-links every file under `from` into `to` (same file system: the artifacts directory),
/// so the output holds the checkpoints without copying gigabytes, and the scratch copy stays
/// until the engine has published the output.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // a partial checkpoint
        }
        let (source, target) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            link_tree(&source, &target)?;
        } else {
            std::fs::hard_link(&source, &target)
                .or_else(|_| std::fs::copy(&source, &target).map(|_| ()))
                .with_context(|| format!("cannot link {} into the output", source.display()))?;
        }
    }
    Ok(())
}

/// Refuses a model whose weights, gradients and AdamW moments alone (16 bytes a parameter)
/// exceed this machine's memory: allocating it would abort the process instead of failing the
/// stage (`hidden: 65536` did).
fn fits_in_memory(config: &finetune_model::ModelConfig) -> Result<()> {
    let Some(total) = machine_memory_bytes() else {
        return Ok(());
    };
    let parameters = config.parameter_count();
    let need = parameters.saturating_mul(16);
    if need > total {
        return Err(anyhow!(
            "model.scratch: {parameters} parameters need at least {} MiB to train (weights, gradients and AdamW's two moments), more than this machine's {} MiB",
            need >> 20,
            total >> 20
        ));
    }
    Ok(())
}

/// The machine's memory (`MemTotal` of /proc/meminfo), where the OS tells it.
fn machine_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}
