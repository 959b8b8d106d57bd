//! The `command` stage: runs any program (an argv, no shell) as a cached pipeline step, so
//! users can plug external tools into a pipeline the way they would with make or DVC.
//!
//! The program runs in the workspace root. It writes its results into the stage's output
//! directory, given as `{out}` in the argv and as `$FINETUNE_OUT`; an upstream stage's output
//! is `{needs.ID}` and `$FINETUNE_NEEDS_<ID>`. `deps` are the workspace files it reads (their
//! contents enter the cache key); `outs` are the files it must create in its output directory.
//! In the script of a shell (`sh -c SCRIPT`) the placeholders become quoted references to
//! those variables, so that no path is ever parsed as shell code (see [`shell`]).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use finetune_core::paths::contained_relative;
use finetune_core::schemars::{self, JsonSchema};
use finetune_core::{
    ConfigError, ConfigureContext, Job, Reporter, RunContext, Stage, Value, parse_params,
    schema_for,
};
use serde::Deserialize;

mod shell;

/// `with:` of a `command` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The program and its arguments. No shell is involved; `{out}` and `{needs.ID}` are
    /// replaced by the output directory and an upstream stage's output directory (in a
    /// shell's `-c` script, by `"$FINETUNE_OUT"` and `"$FINETUNE_NEEDS_<ID>"`). Numbers
    /// and booleans are taken as their text (`[sleep, 5]`).
    #[serde(deserialize_with = "argv")]
    pub run: Vec<String>,
    /// Workspace files or directories the program reads; their contents enter the cache key.
    #[serde(default)]
    pub deps: Vec<PathBuf>,
    /// Files the program must create, relative to its output directory.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Extra environment variables for the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// An argv from YAML scalars: `[sleep, 5]` means `["sleep", "5"]`, as a user would expect.
fn argv<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let items = Vec::<Value>::deserialize(deserializer)?;
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(serde::de::Error::custom(format!(
                "each argument must be a string, number or boolean, not {other}"
            ))),
        })
        .collect()
}

/// The `command` plugin.
pub struct Command;

impl Stage for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "Run an external program (argv, no shell) with declared deps and outs, cached like any stage"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<Params>()
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let params: Params = parse_params(with)?;
        if params.run.is_empty() || params.run[0].is_empty() {
            return Err(ConfigError::at("run", "needs at least the program to run"));
        }
        for (i, out) in params.outs.iter().enumerate() {
            contained_relative(out).map_err(|why| {
                ConfigError::at(
                    format!("outs[{i}]"),
                    format!("outputs must stay inside the stage's output directory: {why}"),
                )
            })?;
        }
        for (i, arg) in params.run.iter().enumerate() {
            for stage in needs_placeholders(arg) {
                if !ctx.upstream.iter().any(|u| u.stage == stage) {
                    return Err(ConfigError::at(
                        format!("run[{i}]"),
                        format!(
                            "`{{needs.{stage}}}` refers to `{stage}`, which is not in this stage's `needs`"
                        ),
                    ));
                }
            }
        }
        for name in params.env.keys() {
            if ctx.key_variables.contains(name) {
                return Err(ConfigError::at(
                    format!("env.{name}"),
                    "this variable holds the pipeline's signing key, which no command receives",
                ));
            }
        }
        Ok(Box::new(CommandJob {
            params,
            key_variables: ctx.key_variables.clone(),
        }))
    }
}

/// The stage ids of the `{needs.ID}` placeholders in an argument. Other braces are left
/// alone: they belong to the program (a shell's `${VAR:-x}`, a format string).
fn needs_placeholders(arg: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find("{needs.") {
        let body = &rest[start + "{needs.".len()..];
        let Some(end) = body.find('}') else { break };
        found.push(&body[..end]);
        rest = &body[end + 1..];
    }
    found
}

struct CommandJob {
    params: Params,
    /// Removed from the program's environment: a printed environment would put a key in logs.
    key_variables: Vec<String>,
}

/// The environment variable that holds upstream stage `stage`'s output directory: the id
/// upper-cased, anything but letters and digits as `_` (`count@lr=1e-5` has `@`, `=`).
fn needs_variable(stage: &str) -> String {
    let name: String = stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("FINETUNE_NEEDS_{name}")
}

/// Lines of stderr kept for the error message of a failed command.
const STDERR_TAIL: usize = 20;

impl Job for CommandJob {
    fn reads(&self) -> Vec<PathBuf> {
        self.params.deps.clone()
    }

    fn run(&self, ctx: &RunContext) -> Result<()> {
        // (placeholder, path, the variable that holds the path)
        let mut placeholders = vec![(
            "{out}".to_string(),
            ctx.out_dir.display().to_string(),
            "FINETUNE_OUT".to_string(),
        )];
        let mut process = Process::new(&self.params.run[0]);
        for upstream in &ctx.upstream {
            let var = needs_variable(&upstream.stage);
            process.env(&var, &upstream.dir);
            placeholders.push((
                format!("{{needs.{}}}", upstream.stage),
                upstream.dir.display().to_string(),
                var,
            ));
        }
        // The signing keys are the engine's and the signing stages', never a command's.
        process.env_remove(finetune_core::integrity::DEFAULT_KEY_ENV);
        for name in &self.key_variables {
            process.env_remove(name);
        }
        let script = shell::script_index(&self.params.run);
        let variables: Vec<(String, String)> = placeholders
            .iter()
            .map(|(placeholder, _, var)| (placeholder.clone(), var.clone()))
            .collect();
        let args = self.params.run.iter().enumerate().skip(1).map(|(i, arg)| {
            if Some(i) == script {
                shell::with_variables(arg, &variables)
            } else {
                placeholders
                    .iter()
                    .fold(arg.clone(), |a, (from, to, _)| a.replace(from, to))
            }
        });
        process
            .args(args)
            .current_dir(&ctx.workspace)
            .env("FINETUNE_OUT", &ctx.out_dir)
            .env("FINETUNE_WORKSPACE", &ctx.workspace)
            .env("FINETUNE_STAGE", &ctx.stage)
            .envs(&self.params.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let program = &self.params.run[0];
        let mut child = process
            .spawn()
            .with_context(|| format!("cannot start `{program}`"))?;
        let tail = Mutex::new(VecDeque::new());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let status = std::thread::scope(|scope| {
            scope.spawn(|| forward_lines(stdout, ctx.reporter, None));
            scope.spawn(|| forward_lines(stderr, ctx.reporter, Some(&tail)));
            child.wait()
        })
        .with_context(|| format!("waiting for `{program}`"))?;
        if !status.success() {
            let tail: Vec<String> = tail.into_inner().unwrap_or_default().into();
            bail!(
                "`{}` failed ({status}){}{}",
                self.params.run.join(" "),
                if tail.is_empty() {
                    ""
                } else {
                    "; its last lines of stderr:\n"
                },
                tail.join("\n")
            );
        }
        for out in &self.params.outs {
            if !ctx.out_dir.join(out).exists() {
                bail!(
                    "`{program}` succeeded but did not create its declared output `{out}` in {{out}}"
                );
            }
        }
        Ok(())
    }
}

/// Sends each line of a child's output to the reporter, keeping a tail if asked.
fn forward_lines(
    stream: Option<impl Read>,
    reporter: &dyn Reporter,
    tail: Option<&Mutex<VecDeque<String>>>,
) {
    let Some(stream) = stream else { return };
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        reporter.message(&line);
        if let Some(tail) = tail {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_core::{SilentReporter, UpstreamInfo};
    use serde_json::json;

    fn configure(with: serde_json::Value) -> Result<Box<dyn Job>, ConfigError> {
        let ctx = ConfigureContext {
            workspace: PathBuf::from("."),
            stage: "c".into(),
            upstream: vec![UpstreamInfo {
                stage: "ingest".into(),
                uses: "ingest_csv".into(),
            }],
            key_variables: vec!["FINETUNE_HMAC_KEY".into(), "TEAM_KEY".into()],
        };
        Command.configure(&with, &ctx)
    }

    #[test]
    fn rejects_outputs_outside_and_unknown_placeholders() {
        let err = configure(json!({"run": ["true"], "outs": ["../evil"]}))
            .err()
            .unwrap();
        assert_eq!(err.key, finetune_core::ConfigKey::With("outs[0]".into()));
        assert!(err.message.contains("escapes"));
        let err = configure(json!({"run": ["cat", "{needs.other}/x"]}))
            .err()
            .unwrap();
        assert!(err.message.contains("not in this stage's `needs`"));
        assert!(configure(json!({"run": ["sh", "-c", "echo ${X:-1} {y}"]})).is_ok());
        assert!(configure(json!({"run": []})).is_err());
        assert!(configure(json!({"run": ["sleep", {"a": 1}]})).is_err());
        assert!(configure(json!({"run": ["cat", "{needs.ingest}/stats.json"]})).is_ok());
    }

    #[test]
    fn runs_and_checks_declared_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let ctx = RunContext {
            workspace: dir.path().to_path_buf(),
            stage: "c".into(),
            cache_key: "test".into(),
            out_dir: out.clone(),
            scratch_dir: dir.path().join("scratch"),
            upstream: vec![],
            reporter: &SilentReporter,
        };
        let job =
            configure(json!({"run": ["sh", "-c", "echo hi > {out}/a.txt"], "outs": ["a.txt"]}))
                .unwrap();
        job.run(&ctx).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "hi\n");
        let job = configure(json!({"run": ["sh", "-c", "true"], "outs": ["missing.txt"]})).unwrap();
        assert!(
            job.run(&ctx)
                .unwrap_err()
                .to_string()
                .contains("did not create")
        );
        let job = configure(json!({"run": ["sh", "-c", "echo boom >&2; exit 3"]})).unwrap();
        let err = job.run(&ctx).unwrap_err().to_string();
        assert!(
            err.contains("boom") && err.contains("exit status: 3"),
            "{err}"
        );
    }
}
