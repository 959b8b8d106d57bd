//! The command line: `run`, `status`, `dag`, `stages`, `audit`, `verify`, `metrics`,
//! `predict`, `push`, `pull`, `gc`.
//!
//! Exit codes: 0 success, 1 a stage failed, 2 a bad pipeline file or bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::UsageError;
use crate::dag::DagFormat;
use crate::pipeline::{Override, Pipeline, PipelineError};
use crate::plan::Plan;
use crate::registry::Registry;
use crate::remote::RemoteGcOptions;
use crate::remote::commands::{Target, gc_remote_command, pull_command, push_command};
use crate::report::{Event, sink_for};
use crate::runner::{RunOptions, Shard, run};
use crate::workspace::Workspace;
use finetune_core::{Answer, PredictInput, PredictOptions, Prediction};

pub const DEFAULT_PIPELINE: &str = "pipelines/reviews.yaml";

#[derive(Parser, Debug)]
#[command(
    name = "finetune",
    version,
    about = "Declarative, content-cached pipelines that fine-tune transformer text classifiers"
)]
#[command(
    after_help = "Exit codes: 0 success, 1 a stage failed, 2 a bad pipeline file or bad usage."
)]
pub struct Cli {
    /// Run as if started in DIR: the workspace whose relative paths and artifacts/ are used.
    #[arg(
        short = 'C',
        long = "workspace",
        value_name = "DIR",
        global = true,
        default_value = "."
    )]
    pub workspace: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Bring a pipeline's stages up to date, running only what changed.
    Run {
        /// The pipeline file (default pipelines/reviews.yaml), then stage ids to bring up to
        /// date with what they need (default: all). A first argument that is not a file
        /// ending in .yaml/.yml is taken as a stage id.
        #[arg(value_name = "PIPELINE | STAGE")]
        args: Vec<String>,
        /// Rerun STAGE and everything downstream of it even if cached (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Show what would run and why; run nothing, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stages to run at once (default: the number of cores).
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// One JSON event per line on stdout instead of progress output.
        #[arg(long)]
        json: bool,
        /// Change a param for this run: `params.NAME=VALUE` or `stages.ID.with.KEY=VALUE`
        /// (dotted for nested keys; VALUE read as a YAML scalar). Repeatable; recorded in the
        /// lock file.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = Override::parse)]
        set: Vec<Override>,
        /// Fetch a stage missing from the local cache from the remote, when it has it (every
        /// file checked), rather than run it.
        #[arg(long)]
        pull: bool,
        /// The remote for --pull: a name from .finetune/config.toml, or a URL
        /// (s3://BUCKET/PREFIX, a directory). Default: $FINETUNE_REMOTE, then the config's.
        #[arg(long, value_name = "NAME | URL", requires = "pull")]
        remote: Option<String>,
        /// Run only the K-th of N shares of the targets (by stage id; of the final stages
        /// when no target is named), with what they need: a sweep split across CI jobs.
        #[arg(long, value_name = "K/N", value_parser = Shard::parse)]
        shard: Option<Shard>,
    },
    /// Show each stage as fresh or stale, and why (which param, file or upstream changed).
    Status {
        #[arg(value_name = "PIPELINE")]
        pipeline: Option<PathBuf>,
        /// The same overrides as `run --set`, to see what such a run would do.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = Override::parse)]
        set: Vec<Override>,
        /// Also ask this remote (default: $FINETUNE_REMOTE, then .finetune/config.toml's)
        /// which stale stages it can serve.
        #[arg(long, value_name = "NAME | URL")]
        remote: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Draw the stage graph.
    Dag {
        #[arg(value_name = "PIPELINE")]
        pipeline: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// List the installed stage plugins and their params.
    Stages {
        /// Print each plugin's full JSON Schema.
        #[arg(long)]
        json: bool,
    },
    /// Check the plugins' own code: the regularizers are written here, not borrowed (exit 1 if
    /// a check fails). Prints a fingerprint of each implementation for review.
    Audit,
    /// Check fingerprints: rehash every file they cover and recompute the HMAC (compared in
    /// constant time). Exit 1 on a changed, missing or extra file, a wrong key or no key.
    /// An HMAC proves integrity to holders of the key, not authorship to anyone else.
    Verify {
        /// A pipeline file (default pipelines/reviews.yaml): every output of its latest run
        /// that holds a fingerprint.json. Or a directory that holds one.
        #[arg(value_name = "PIPELINE | DIR")]
        target: Option<PathBuf>,
        /// Take the key from this environment variable, not where each fingerprint says.
        #[arg(long, value_name = "NAME")]
        key_env: Option<String>,
        /// Take the key from this file (mode 0600), not where each fingerprint says.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Check the cache instead: rehash every entry that a lock file (pipelines/*.lock,
        /// and the given pipeline's) references, and move a damaged one aside.
        #[arg(long, conflicts_with_all = ["key_env", "key_file"])]
        cache: bool,
    },
    /// Show the metrics (every number in each stage's metrics.json) of the latest run.
    Metrics {
        #[arg(value_name = "PIPELINE")]
        pipeline: Option<PathBuf>,
        /// Compare the run recorded by the lock file committed at git revision A with the
        /// workspace's latest run, or with the one committed at B.
        #[arg(long, value_names = ["A", "B"], num_args = 1..=2)]
        diff: Vec<String>,
        /// With --diff, list unchanged metrics too.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "md")]
        json: bool,
        /// Print the table in Markdown (for a pull-request comment).
        #[arg(long)]
        md: bool,
    },
    /// Label texts with a trained model: the arguments, or stdin one text a line.
    Predict {
        /// A model directory (config.json, model.safetensors, tokenizer.json), or a train
        /// stage's output holding one in model/ (e.g. artifacts/runs/reviews/train).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Texts to label; none reads stdin.
        #[arg(value_name = "TEXT")]
        texts: Vec<String>,
        /// The second text of a sentence pair, once per TEXT, in order (for a model trained on
        /// pairs: ingest's `text_pair`).
        #[arg(long = "pair", value_name = "TEXT_PAIR")]
        pairs: Vec<String>,
        /// Read sentence pairs from stdin: `text<TAB>text_pair` a line.
        #[arg(long = "pairs", conflicts_with = "pairs")]
        pairs_on_stdin: bool,
        /// Texts per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Where to run the model: cpu, cuda[:N], vulkan[:N], wgpu[:N] (in a build with that
        /// feature) or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Run the model in bfloat16 (weights and activations): half the memory, and faster
        /// on GPUs with bf16 units; probabilities differ from f32 in the second or third digit.
        #[arg(long)]
        bf16: bool,
        /// A multi-label model's decision threshold: every label whose probability is at
        /// least this is printed (default: the one train tuned on validation and saved, else 0.5).
        #[arg(long, value_name = "P")]
        threshold: Option<f64>,
        /// One JSON object per text (`text`, `label`, `probabilities` by label, `logits` in label
        /// order; `labels` for a multi-label model, `values` by target for a regression) instead
        /// of `label<TAB>probability<TAB>text` (`labels<TAB>text`, `values<TAB>text`).
        #[arg(long)]
        json: bool,
    },
    /// Upload the cache entries the lock files reference to the remote, each file under its
    /// digest (stored once), each entry's manifest last.
    Push {
        /// Pipelines whose lock files name the entries (default: every pipelines/*.lock).
        #[arg(value_name = "PIPELINE")]
        pipelines: Vec<PathBuf>,
        /// Every entry in the local cache instead.
        #[arg(long, conflicts_with = "pipelines")]
        all: bool,
        /// A name from .finetune/config.toml, or a URL (s3://BUCKET/PREFIX, a directory).
        /// Default: $FINETUNE_REMOTE, then the config's default_remote.
        #[arg(long, value_name = "NAME | URL")]
        remote: Option<String>,
        /// Transfers at once.
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
    },
    /// Fetch the cache entries the lock files reference from the remote, each file checked
    /// against its digest; `finetune run` then finds them cached.
    Pull {
        /// Pipelines whose lock files name the entries (default: every pipelines/*.lock).
        #[arg(value_name = "PIPELINE")]
        pipelines: Vec<PathBuf>,
        /// A name from .finetune/config.toml, or a URL. Default: $FINETUNE_REMOTE, then the
        /// config's default_remote.
        #[arg(long, value_name = "NAME | URL")]
        remote: Option<String>,
        /// Transfers at once.
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
    },
    /// Delete cache entries that no lock file (pipelines/*.lock) references.
    Gc {
        /// More pipelines whose lock files keep their entries.
        #[arg(value_name = "PIPELINE")]
        pipelines: Vec<PathBuf>,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Collect the remote instead (`--remote=NAME|URL`, or the default one): its entries
        /// no lock file references, then the files no remaining entry lists.
        #[arg(
            long,
            value_name = "NAME | URL",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = ""
        )]
        remote: Option<String>,
        /// With --remote, the lock files committed at git revision REV keep their entries
        /// too (repeatable).
        #[arg(long = "rev", value_name = "REV", requires = "remote")]
        revisions: Vec<String>,
        /// With --remote, every commit's lock files keep their entries.
        #[arg(long, requires = "remote")]
        all_commits: bool,
        /// With --remote, keep unreferenced files younger than this: a push in flight
        /// uploads its files before its manifest.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 3600,
            requires = "remote"
        )]
        min_age: i64,
    },
}

pub fn main(registry: Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if !matches!(cli.command, Command::Run { .. }) {
        die_quietly_on_a_closed_pipe();
    }
    match execute(cli, &registry) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            let bad_input = err.downcast_ref::<PipelineError>().is_some()
                || err.downcast_ref::<UsageError>().is_some();
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// `finetune verify | head` closes the pipe early; Rust ignores SIGPIPE, so the next print
/// would panic. A command that only reports ends quietly instead, as `cat` and `grep` do. Not
/// for `run`: its reporter drops write errors, so a closed pipe never stops a stage midway.
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: called on the main thread before any other thread starts; SIG_DFL is a valid
    // disposition for SIGPIPE, and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The first Ctrl-C asks running stages to stop at a safe point (training writes a checkpoint
/// first) and starts no new stage; a second one exits at once.
fn stop_on_ctrl_c() {
    let installed = ctrlc::set_handler(|| {
        if finetune_core::interrupt::request() {
            std::process::exit(130);
        }
        eprintln!("stopping: running stages finish their step and save; Ctrl-C again to quit now");
    });
    if let Err(err) = installed {
        eprintln!("warning: Ctrl-C will stop at once, without saving: {err}");
    }
}

fn execute(cli: Cli, registry: &Registry) -> Result<ExitCode> {
    let workspace = Workspace::new(&cli.workspace)?;
    match cli.command {
        Command::Run {
            args,
            force,
            dry_run,
            jobs,
            json,
            set,
            pull,
            remote,
            shard,
        } => {
            let (pipeline_file, targets) = split_run_args(&workspace, args);
            let pull = pull_remote(&workspace, pull, remote.as_deref())?;
            let plan = load_plan(&workspace, &pipeline_file, registry, &set)?;
            let sink = sink_for(json);
            let _lock = if dry_run {
                None
            } else {
                Some(workspace.lock(|| {
                    sink.emit(Event::Waiting {
                        text: "waiting for another finetune to finish in this workspace...".into(),
                    })
                })?)
            };
            let options = RunOptions {
                targets,
                force,
                dry_run,
                jobs: jobs
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                pull,
                shard,
            };
            stop_on_ctrl_c();
            let summary = run(&plan, &workspace, &options, sink.as_ref())?;
            Ok(if finetune_core::interrupt::requested() {
                ExitCode::from(130)
            } else if summary.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status {
            pipeline,
            json,
            set,
            remote,
        } => {
            let plan = load_plan(
                &workspace,
                &pipeline.unwrap_or_else(|| DEFAULT_PIPELINE.into()),
                registry,
                &set,
            )?;
            let remote = status_remote(&workspace, remote.as_deref());
            let report = crate::status::status(&plan, &workspace, remote.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let width = report.iter().map(|s| s.stage.len()).max().unwrap_or(0);
                for stage in &report {
                    let state = if stage.fresh { "fresh" } else { "stale" };
                    let detail = if stage.fresh {
                        stage
                            .key
                            .as_deref()
                            .map(crate::report::short)
                            .unwrap_or("")
                            .to_string()
                    } else if stage.on_remote == Some(true) {
                        format!(
                            "{}; the remote has it (`run --pull` fetches it)",
                            stage.reason
                        )
                    } else {
                        stage.reason.clone()
                    };
                    println!("{:width$}  {state}  {detail}", stage.stage);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { pipeline, format } => {
            let file = pipeline.unwrap_or_else(|| DEFAULT_PIPELINE.into());
            let pipeline = load_pipeline(&workspace, &file, &[])?;
            let dag = crate::dag::Dag::build(&pipeline)?;
            print!("{}", dag.render(&pipeline, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Stages { json } => {
            print_stages(registry, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit => {
            let mut passed = true;
            for stage in registry.iter() {
                if let Some(audit) = stage.audit() {
                    println!("== {} ==\n{}", stage.name(), audit.report);
                    passed &= audit.passed;
                }
            }
            println!(
                "{}",
                if passed {
                    "audit passed"
                } else {
                    "audit FAILED"
                }
            );
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify { target, cache, .. } if cache => {
            let pipelines: Vec<PathBuf> = target.into_iter().collect();
            if let Some(dir) = pipelines
                .first()
                .filter(|p| workspace.root.join(p).is_dir())
            {
                return Err(UsageError(format!(
                    "verify --cache takes a pipeline file, not a directory ({})",
                    dir.display()
                ))
                .into());
            }
            let _lock = workspace.lock(|| {
                eprintln!("waiting for another finetune to finish in this workspace...")
            })?;
            Ok(if crate::verify::verify_cache(&workspace, &pipelines)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify {
            target,
            key_env,
            key_file,
            ..
        } => {
            let key = crate::verify::key_override(&workspace, key_env, key_file)?;
            let target = target.unwrap_or_else(|| DEFAULT_PIPELINE.into());
            let resolved = workspace.root.join(&target);
            let targets = if resolved.is_dir() {
                vec![resolved]
            } else {
                let pipeline = load_pipeline(&workspace, &target, &[])?;
                crate::verify::pipeline_targets(&workspace, &pipeline)?
            };
            let passed = crate::verify::verify_all(&workspace, &targets, key.as_ref());
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Metrics {
            pipeline,
            diff,
            all,
            json,
            md,
        } => {
            let file = pipeline.unwrap_or_else(|| DEFAULT_PIPELINE.into());
            let pipeline = load_pipeline(&workspace, &file, &[])?;
            let format = match (json, md) {
                (true, _) => crate::metrics::Format::Json,
                (false, true) => crate::metrics::Format::Markdown,
                (false, false) => crate::metrics::Format::Text,
            };
            crate::metrics::show(&workspace, &pipeline, &diff, all, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict {
            model,
            texts,
            pairs,
            pairs_on_stdin,
            batch_size,
            device,
            bf16,
            threshold,
            json,
        } => {
            if let Some(t) = threshold
                && !(0.0..=1.0).contains(&t)
            {
                return Err(
                    UsageError(format!("--threshold {t} is not a probability in [0, 1]")).into(),
                );
            }
            let options = PredictOptions {
                batch_size,
                device,
                bf16,
                threshold,
            };
            let inputs = predict_inputs(texts, pairs, pairs_on_stdin)?;
            predict(registry, &workspace, &model, &inputs, &options, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Push {
            pipelines,
            all,
            remote,
            jobs,
        } => {
            let target = Target {
                remote: remote.as_deref(),
                jobs,
            };
            push_command(&workspace, &pipelines, all, target)
        }
        Command::Pull {
            pipelines,
            remote,
            jobs,
        } => {
            let target = Target {
                remote: remote.as_deref(),
                jobs,
            };
            pull_command(&workspace, &pipelines, target)
        }
        Command::Gc {
            pipelines,
            dry_run,
            remote: Some(remote),
            revisions,
            all_commits,
            min_age,
        } => {
            let options = RemoteGcOptions {
                pipelines,
                revisions,
                all_commits,
                dry_run,
                min_age_s: min_age,
            };
            gc_remote_command(
                &workspace,
                Some(remote.as_str()).filter(|r| !r.is_empty()),
                &options,
            )
        }
        Command::Gc {
            pipelines, dry_run, ..
        } => {
            let _lock = workspace.lock(|| {
                eprintln!("waiting for another finetune to finish in this workspace...")
            })?;
            let report = crate::gc::gc(&workspace, &pipelines, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for key in &report.removed {
                println!("{verb} {key}");
            }
            for stray in &report.strays {
                println!("{verb} artifacts/cache/{stray} (not a cache entry)");
            }
            if report.scratch > 0 {
                println!(
                    "{verb} the checkpoints of {} interrupted runs in artifacts/scratch",
                    report.scratch
                );
            }
            if report.damaged > 0 {
                println!(
                    "{verb} {} damaged entries set aside in artifacts/damaged",
                    report.damaged
                );
            }
            println!(
                "{verb} {} entries ({} bytes); kept {} referenced by {} lock files",
                report.removed.len(),
                report.bytes_freed,
                report.kept,
                report.lock_files.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `predict` labels: the TEXT arguments (with `--pair`s), else stdin's lines, one text
/// or (with `--pairs`) one `text<TAB>text_pair` a line.
fn predict_inputs(
    texts: Vec<String>,
    pairs: Vec<String>,
    pairs_on_stdin: bool,
) -> Result<Vec<PredictInput>> {
    if !texts.is_empty() {
        if pairs_on_stdin {
            return Err(UsageError(
                "--pairs reads stdin; with TEXT arguments give each its --pair".into(),
            )
            .into());
        }
        if !pairs.is_empty() && pairs.len() != texts.len() {
            return Err(UsageError(format!(
                "{} texts but {} --pair values: give one --pair per text",
                texts.len(),
                pairs.len()
            ))
            .into());
        }
        let mut pairs = pairs.into_iter().map(Some).chain(std::iter::repeat(None));
        return Ok(texts
            .into_iter()
            .map(|text| PredictInput {
                text,
                text_pair: pairs.next().flatten(),
            })
            .collect());
    }
    if !pairs.is_empty() {
        return Err(UsageError("--pair needs a TEXT argument to pair with".into()).into());
    }
    let mut inputs = Vec::new();
    for (n, line) in std::io::stdin().lines().enumerate() {
        let line = line.context("cannot read texts from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let input = match (pairs_on_stdin, line.split_once('\t')) {
            (false, _) => PredictInput {
                text: line,
                text_pair: None,
            },
            (true, Some((text, pair))) => PredictInput {
                text: text.to_string(),
                text_pair: Some(pair.to_string()),
            },
            (true, None) => {
                return Err(UsageError(format!(
                    "stdin line {}: no tab between the text and its pair (--pairs reads `text<TAB>text_pair`)",
                    n + 1
                ))
                .into());
            }
        };
        inputs.push(input);
    }
    if inputs.is_empty() {
        return Err(UsageError("no texts: give them as arguments or on stdin".into()).into());
    }
    Ok(inputs)
}

/// `finetune predict`: the inputs through the registered predictor.
fn predict(
    registry: &Registry,
    workspace: &Workspace,
    model: &Path,
    inputs: &[PredictInput],
    options: &PredictOptions,
    json: bool,
) -> Result<()> {
    let predictor = registry
        .predictor()
        .ok_or_else(|| UsageError("this build of finetune has no model loader".into()))?;
    let mut dir = workspace.root.join(model);
    if !dir.join("config.json").exists() && dir.join("model/config.json").exists() {
        dir = dir.join("model");
    }
    if !dir.join("config.json").exists() {
        return Err(UsageError(format!(
            "{} holds no model (no config.json); pass a train stage's output or its model/",
            model.display()
        ))
        .into());
    }
    let predictions = predictor.predict(&dir, inputs, options)?;
    for (input, prediction) in inputs.iter().zip(&predictions) {
        if json {
            println!("{}", prediction_json(input, prediction));
            continue;
        }
        let pair = input
            .text_pair
            .as_ref()
            .map_or(String::new(), |p| format!("\t{p}"));
        let said = match &prediction.answer {
            Answer::Label(label) => {
                let probability = prediction
                    .outputs
                    .iter()
                    .find(|(name, _)| name == label)
                    .map_or(0.0, |(_, p)| *p);
                format!("{label}\t{probability:.4}")
            }
            // `-`: no label over the threshold.
            Answer::Labels(labels) if labels.is_empty() => "-".to_string(),
            Answer::Labels(labels) => labels.join(","),
            Answer::Values => {
                let values: Vec<String> = prediction
                    .outputs
                    .iter()
                    .map(|(_, v)| format!("{v:.4}"))
                    .collect();
                values.join(",")
            }
        };
        println!("{said}\t{}{pair}", input.text);
    }
    Ok(())
}

/// One `predict --json` line: the input, the answer, every output by name, the logits.
fn prediction_json(input: &PredictInput, prediction: &Prediction) -> serde_json::Value {
    let by_name: serde_json::Map<String, serde_json::Value> = prediction
        .outputs
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::json!(value)))
        .collect();
    let mut line = serde_json::json!({ "text": input.text });
    if let Some(pair) = &input.text_pair {
        line["text_pair"] = serde_json::json!(pair);
    }
    match &prediction.answer {
        Answer::Label(label) => {
            line["label"] = serde_json::json!(label);
            line["probabilities"] = by_name.into();
        }
        Answer::Labels(labels) => {
            line["labels"] = serde_json::json!(labels);
            line["probabilities"] = by_name.into();
        }
        Answer::Values => line["values"] = by_name.into(),
    }
    line["logits"] = serde_json::json!(prediction.logits);
    line
}

/// The remote `run --pull` fetches from; a remote that cannot be opened fails the run early.
fn pull_remote(
    workspace: &Workspace,
    pull: bool,
    flag: Option<&str>,
) -> Result<Option<std::sync::Arc<finetune_remote::Remote>>> {
    if !pull {
        return Ok(None);
    }
    let chosen = crate::remote::config::require(workspace, flag)?;
    let remote = crate::remote::open(workspace, &chosen, finetune_remote::Access::Read)?;
    Ok(Some(std::sync::Arc::new(remote)))
}

/// The remote `status` asks, if one is given or configured; one that cannot be opened is a
/// warning (status still reports the local cache).
fn status_remote(workspace: &Workspace, flag: Option<&str>) -> Option<finetune_remote::Remote> {
    let opened = crate::remote::config::choose(workspace, flag).and_then(|chosen| {
        chosen
            .map(|chosen| crate::remote::open(workspace, &chosen, finetune_remote::Access::Read))
            .transpose()
    });
    opened.unwrap_or_else(|err| {
        eprintln!("warning: not asking the remote: {err:#}");
        None
    })
}

/// `run [PIPELINE] [STAGE...]`: the first argument is the pipeline if it looks like a file.
fn split_run_args(workspace: &Workspace, mut args: Vec<String>) -> (PathBuf, Vec<String>) {
    let first_is_file = args.first().is_some_and(|first| {
        let path = Path::new(first);
        path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            || workspace.root.join(path).is_file()
    });
    if first_is_file {
        let file = PathBuf::from(args.remove(0));
        (file, args)
    } else {
        (PathBuf::from(DEFAULT_PIPELINE), args)
    }
}

fn load_pipeline(workspace: &Workspace, file: &Path, set: &[Override]) -> Result<Pipeline> {
    let env = |name: &str| std::env::var(name).ok();
    let absolute = workspace.root.join(file);
    let mut pipeline = Pipeline::load_with(&absolute, &env, set).map_err(|mut err| {
        err.file = file.to_path_buf();
        err
    })?;
    pipeline.file = file.to_path_buf();
    Ok(pipeline)
}

fn load_plan<'r>(
    workspace: &Workspace,
    file: &Path,
    registry: &'r Registry,
    set: &[Override],
) -> Result<Plan<'r>> {
    let pipeline = load_pipeline(workspace, file, set)?;
    Ok(Plan::build(pipeline, registry, workspace)?)
}

fn print_stages(registry: &Registry, json: bool) -> Result<()> {
    if json {
        let all: serde_json::Map<String, serde_json::Value> = registry
            .iter()
            .map(|stage| (stage.name().to_string(), serde_json::json!({ "version": stage.version(), "summary": stage.summary(), "params": stage.params_schema() })))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for stage in registry.iter() {
        println!(
            "{} (version {})\n  {}",
            stage.name(),
            stage.version(),
            stage.summary()
        );
        let schema = stage.params_schema();
        let value = schema.as_value();
        print_properties(value, value, "  ", 0);
        println!();
    }
    Ok(())
}

/// Prints the params of a JSON Schema as an indented list: name, type, default, description.
fn print_properties(
    root: &serde_json::Value,
    schema: &serde_json::Value,
    indent: &str,
    depth: usize,
) {
    let schema = resolve_ref(root, schema);
    let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    for (name, property) in properties {
        let resolved = resolve_ref(root, property);
        let kind = describe_type(root, resolved);
        let mut line = format!("{indent}  {name}: {kind}");
        if required.contains(&name.as_str()) {
            line.push_str(" (required)");
        } else if let Some(default) = property.get("default").or_else(|| resolved.get("default")) {
            line.push_str(&format!(" = {default}"));
        }
        if let Some(text) = property
            .get("description")
            .or_else(|| resolved.get("description"))
            .and_then(|d| d.as_str())
        {
            line.push_str(&format!("  -- {}", text.replace('\n', " ")));
        }
        println!("{line}");
        if depth < 3 {
            print_properties(root, resolved, &format!("{indent}  "), depth + 1);
        }
    }
}

fn resolve_ref<'a>(
    root: &'a serde_json::Value,
    schema: &'a serde_json::Value,
) -> &'a serde_json::Value {
    let mut current = schema;
    for _ in 0..8 {
        let target = current
            .get("$ref")
            .or_else(|| {
                current
                    .get("allOf")
                    .and_then(|a| a.get(0))
                    .and_then(|a| a.get("$ref"))
            })
            // An optional section (`anyOf: [{$ref}, {type: null}]`) lists its fields too.
            .or_else(|| {
                current
                    .get("anyOf")
                    .and_then(|a| a.as_array())
                    .and_then(|a| a.iter().find_map(|v| v.get("$ref")))
            })
            .and_then(|r| r.as_str())
            .and_then(|r| r.strip_prefix("#/"))
            .and_then(|path| path.split('/').try_fold(root, |node, part| node.get(part)));
        match target {
            Some(next) => current = next,
            None => break,
        }
    }
    current
}

fn describe_type(root: &serde_json::Value, schema: &serde_json::Value) -> String {
    if let Some(values) = schema.get("enum").and_then(|e| e.as_array()) {
        return values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(variants) = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(|v| v.as_array())
    {
        return variants
            .iter()
            .map(|v| describe_type(root, resolve_ref(root, v)))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    match schema.get("type") {
        Some(serde_json::Value::String(t)) => t.clone(),
        Some(serde_json::Value::Array(types)) => types
            .iter()
            .filter_map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        _ if schema.get("const").is_some() => schema["const"].to_string(),
        _ => "any".into(),
    }
}
