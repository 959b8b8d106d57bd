//! `finetune metrics`: the numbers in each stage's `metrics.json` from a pipeline's latest run,
//! or, with `--diff REV`, side by side with those of the run that the lock file committed at
//! git revision REV recorded (as `dvc metrics diff` does). Old outputs are read from the cache
//! by the keys in that lock file, so they must not have been removed by `finetune gc`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cache::lockfile::LockFile;
use crate::cache::store::Store;
use crate::pipeline::Pipeline;
use crate::workspace::Workspace;

const METRICS_FILE: &str = "metrics.json";

/// Stage id -> dotted metric name -> value, for the stages that wrote a `metrics.json`.
pub type StageMetrics = BTreeMap<String, BTreeMap<String, f64>>;

/// The metrics of the latest run (`artifacts/runs/<pipeline>/<stage>/metrics.json`).
pub fn latest(workspace: &Workspace, pipeline: &Pipeline) -> Result<StageMetrics> {
    let run_dir = workspace.run_dir(&pipeline.name);
    let mut all = StageMetrics::new();
    for stage in &pipeline.stages {
        let file = run_dir.join(&stage.id).join(METRICS_FILE);
        if let Some(metrics) = read_metrics(&file)? {
            all.insert(stage.id.clone(), metrics);
        }
    }
    if all.is_empty() {
        bail!(
            "no stage of {} has written {METRICS_FILE} yet; run `finetune run {}` first",
            pipeline.file.display(),
            pipeline.file.display()
        );
    }
    Ok(all)
}

/// The metrics of the run recorded by the lock file as committed at `rev`.
pub fn at_revision(workspace: &Workspace, pipeline: &Pipeline, rev: &str) -> Result<StageMetrics> {
    let lock_path = LockFile::path_for(&pipeline.file);
    let spec = format!("{rev}:./{}", lock_path.display());
    let output = Command::new("git")
        .arg("-C")
        .arg(&workspace.root)
        .args(["show", &spec])
        .output()
        .context("cannot run git (needed for --diff)")?;
    if !output.status.success() {
        bail!(
            "cannot read {} at git revision {rev}: {}; commit the lock file after a run to \
             compare runs later",
            lock_path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let lock: LockFile = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{} at {rev} is not a valid lock file", lock_path.display()))?;
    let store = Store::new(&workspace.artifacts());
    let run_dir = workspace.run_dir(&pipeline.name);
    let mut all = StageMetrics::new();
    for (stage, entry) in &lock.stages {
        let dir = store.entry_dir(&entry.key);
        if dir.exists() {
            if let Some(metrics) = read_metrics(&dir.join(METRICS_FILE))? {
                all.insert(stage.clone(), metrics);
            }
        } else if run_dir.join(stage).join(METRICS_FILE).exists() {
            // Gone from the cache, and a stage that has metrics now: the comparison would lie.
            bail!(
                "the output of stage `{stage}` at {rev} (key {}) is no longer in the cache \
                 (removed by `finetune gc`?); check out {rev} and run the pipeline to rebuild it",
                crate::report::short(&entry.key)
            );
        }
    }
    Ok(all)
}

fn read_metrics(file: &Path) -> Result<Option<BTreeMap<String, f64>>> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", file.display())),
    };
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let mut flat = BTreeMap::new();
    flatten("", &value, &mut flat);
    Ok(Some(flat))
}

/// Numbers at any depth of objects, under dotted names. A list of objects that name their
/// `label` (per-class figures) is keyed by label; other lists (confusion matrices, histories)
/// are left out: they are not one metric.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Number(number) => {
            if let Some(x) = number.as_f64() {
                out.insert(prefix.to_string(), x);
            }
        }
        Value::Object(map) => {
            for (key, child) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, child, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                if let Some(label) = item.get("label").and_then(Value::as_str) {
                    flatten(&format!("{prefix}.{label}"), item, out);
                }
            }
        }
        _ => {}
    }
}

/// `stage  metric  value`, aligned.
pub fn print_latest(metrics: &StageMetrics) {
    let rows: Vec<[String; 3]> = metrics
        .iter()
        .flat_map(|(stage, values)| {
            values
                .iter()
                .map(move |(name, x)| [stage.clone(), name.clone(), format_value(Some(*x))])
        })
        .collect();
    print_table(&["stage", "metric", "value"], &rows);
}

/// `stage  metric  REV  workspace  change`, for every metric in either run.
pub fn print_diff(rev: &str, old: &StageMetrics, new: &StageMetrics, all: bool) {
    let mut rows = Vec::new();
    let stages: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for stage in stages {
        let empty = BTreeMap::new();
        let (before, after) = (
            old.get(stage).unwrap_or(&empty),
            new.get(stage).unwrap_or(&empty),
        );
        let names: std::collections::BTreeSet<&String> =
            before.keys().chain(after.keys()).collect();
        for name in names {
            let (a, b) = (before.get(name).copied(), after.get(name).copied());
            if a == b && !all {
                continue;
            }
            let change = match (a, b) {
                (Some(a), Some(b)) if (b - a).fract() == 0.0 => format!("{:+}", (b - a) as i64),
                (Some(a), Some(b)) => format!("{:+.4}", b - a),
                _ => "-".into(),
            };
            rows.push([
                stage.clone(),
                name.clone(),
                format_value(a),
                format_value(b),
                change,
            ]);
        }
    }
    if rows.is_empty() {
        println!("no metric differs between {rev} and the workspace");
        return;
    }
    print_table(&["stage", "metric", rev, "workspace", "change"], &rows);
}

fn format_value(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
    }
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
