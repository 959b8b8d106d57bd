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

/// How `metrics` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// `finetune metrics [--diff A [B]]`: the latest run's metrics, or a comparison of the run
/// committed at revision A with the workspace's latest (or with the one committed at B).
pub fn show(
    workspace: &Workspace,
    pipeline: &Pipeline,
    diff: &[String],
    all: bool,
    format: Format,
) -> Result<()> {
    let Some(old_rev) = diff.first() else {
        let latest = latest(workspace, pipeline)?;
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&latest)?),
            Format::Text | Format::Markdown => print_latest(pipeline, &latest, format),
        }
        return Ok(());
    };
    let old = at_revision(workspace, pipeline, old_rev)?;
    let (new_name, new) = match diff.get(1) {
        Some(new_rev) => (new_rev.as_str(), at_revision(workspace, pipeline, new_rev)?),
        None => ("workspace", latest(workspace, pipeline)?),
    };
    if format == Format::Json {
        let both = serde_json::json!({ old_rev: old, new_name: new });
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else {
        print_diff((old_rev, &old), (new_name, &new), all, format);
    }
    Ok(())
}

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

/// `stage  metric  value`, aligned; then each matrix stage's combinations as one table, a
/// row per combination and a column per metric, for comparing a sweep at a glance.
pub fn print_latest(pipeline: &Pipeline, metrics: &StageMetrics, format: Format) {
    let matrix_of = |stage: &str| {
        pipeline
            .stage(stage)
            .and_then(|decl| decl.matrix_of.clone())
    };
    let rows: Vec<[String; 3]> = metrics
        .iter()
        .filter(|(stage, _)| matrix_of(stage).is_none())
        .flat_map(|(stage, values)| {
            values
                .iter()
                .map(move |(name, x)| [stage.clone(), name.clone(), format_value(Some(*x))])
        })
        .collect();
    if !rows.is_empty() {
        print_table(&["stage", "metric", "value"], &rows, format);
    }
    let mut sweeps: BTreeMap<String, Vec<SweepRun>> = BTreeMap::new();
    for (stage, values) in metrics {
        if let Some(declared) = matrix_of(stage) {
            sweeps.entry(declared).or_default().push((stage, values));
        }
    }
    for (declared, runs) in sweeps {
        if !rows.is_empty() {
            println!();
        }
        print_sweep(&declared, &runs, format);
    }
}

/// One combination of a matrix stage: its id and its metrics.
type SweepRun<'a> = (&'a String, &'a BTreeMap<String, f64>);

/// One matrix stage: `lr  seed  metric...`, a row per combination (from its id,
/// `train@lr=1e-05,seed=1`).
fn print_sweep(declared: &str, runs: &[SweepRun], format: Format) {
    let combination = |id: &str| -> Vec<(String, String)> {
        id.split_once('@')
            .map(|(_, items)| items)
            .unwrap_or("")
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let keys: Vec<String> = runs
        .first()
        .map(|(id, _)| combination(id).into_iter().map(|(k, _)| k).collect())
        .unwrap_or_default();
    let names: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|(_, values)| values.keys()).collect();
    let header: Vec<String> = keys
        .iter()
        .cloned()
        .chain(names.iter().map(|n| n.to_string()))
        .collect();
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|(id, values)| {
            let mut row: Vec<String> = combination(id).into_iter().map(|(_, v)| v).collect();
            row.extend(names.iter().map(|n| format_value(values.get(*n).copied())));
            row
        })
        .collect();
    println!("{declared} (matrix, {} combinations):", runs.len());
    print_rows(&header, &rows, format);
}

/// `stage  metric  REV  workspace  change`, for every metric in either run.
pub fn print_diff(
    (old_name, old): (&str, &StageMetrics),
    (new_name, new): (&str, &StageMetrics),
    all: bool,
    format: Format,
) {
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
        println!("no metric differs between {old_name} and {new_name}");
        return;
    }
    print_table(
        &["stage", "metric", old_name, new_name, "change"],
        &rows,
        format,
    );
}

fn format_value(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
    }
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]], format: Format) {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    print_rows(&header, &rows, format);
}

fn print_rows(header: &[String], rows: &[Vec<String>], format: Format) {
    if format == Format::Markdown {
        print_markdown(header, rows);
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(row);
    }
}

/// A GitHub-flavoured Markdown table; numbers (the columns after the first two) right-aligned.
fn print_markdown(header: &[String], rows: &[Vec<String>]) {
    let cell = |text: &str| text.replace('|', "\\|");
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header);
    let rule: Vec<&str> = (0..header.len())
        .map(|i| if i < 2 { "---" } else { "---:" })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in rows {
        line(row);
    }
}
