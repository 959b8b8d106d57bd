//! The evaluate output as a DVCLive directory, so that `dvc plots show` / `dvc plots diff`
//! draw our runs as they draw a Python run logged with DVCLive: `plots/metrics/train/*.tsv`
//! and `plots/metrics/eval/*.tsv` (one `step<TAB>value` series per logged value) and
//! `plots/sklearn/confusion_matrix.json` (one `{actual, predicted}` per evaluated row, DVC's
//! `confusion` template). Beside them, `metrics.json` is already the summary DVC reads.
//!
//! DVCLive also writes a wall-clock `timestamp` column; these files leave it out, so that the
//! same model gives the same bytes (DVC's plots take `step` as x either way).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::Outcome;
use crate::report::write;

pub const METRICS_DIR: &str = "plots/metrics";
pub const CONFUSION_JSON: &str = "plots/sklearn/confusion_matrix.json";
pub const PREDICTED_VS_ACTUAL_JSON: &str = "plots/predictions/predicted_vs_actual.json";

/// Writes every series of the training log under `dir`, and the split's confusion pairs
/// (single-label) or (actual, predicted) points of every target (regression), each a list
/// of rows for DVC's `confusion` and `scatter` templates. Multi-label sets fit neither.
pub fn write_plots(dir: &Path, log: &[Value], outcome: &Outcome) -> Result<()> {
    for (name, points) in series_by_name(log) {
        let mut tsv = format!("step\t{name}\n");
        for (step, value) in points {
            writeln!(tsv, "{step}\t{value}").expect("writing to a String");
        }
        write(&dir.join(METRICS_DIR).join(format!("{name}.tsv")), &tsv)?;
    }
    let (file, rows): (&str, Vec<Value>) = match outcome {
        Outcome::Labels { truth, predicted } => (
            CONFUSION_JSON,
            truth
                .iter()
                .zip(predicted)
                .map(|(a, p)| json!({ "actual": a, "predicted": p }))
                .collect(),
        ),
        Outcome::Values { truth, predicted } => (
            PREDICTED_VS_ACTUAL_JSON,
            truth
                .iter()
                .zip(predicted)
                .flat_map(|(a, p)| {
                    let pairs = a.iter().zip(p).enumerate();
                    pairs.map(
                        |(target, (a, p))| json!({ "target": target, "actual": a, "predicted": p }),
                    )
                })
                .collect(),
        ),
        Outcome::LabelSets { .. } => return Ok(()),
    };
    let text = serde_json::to_string_pretty(&rows).context("cannot encode the plot rows")?;
    write(&dir.join(file), &text)
}

/// DVCLive's name of a Trainer log key, as its Hugging Face callback logs it: `eval_loss` is
/// `eval/loss`, `loss` is `train/loss`. Wall-clock values and the epoch (an x, not a y) are
/// not series.
fn dvclive_name(key: &str) -> Option<String> {
    let wall_clock = ["runtime", "per_second", "seconds"];
    if key == "step" || key == "epoch" || wall_clock.iter().any(|w| key.contains(w)) {
        return None;
    }
    Some(match key.strip_prefix("eval_") {
        Some(metric) => format!("eval/{metric}"),
        None => format!("train/{key}"),
    })
}

/// (step, value) of each numeric log key, by DVCLive name, in the log's order.
fn series_by_name(log: &[Value]) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for record in log {
        let (Some(step), Some(fields)) = (record["step"].as_u64(), record.as_object()) else {
            continue;
        };
        for (key, value) in fields {
            if let (Some(name), Some(value)) = (dvclive_name(key), value.as_f64())
                && value.is_finite()
            {
                series.entry(name).or_default().push((step, value));
            }
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_take_dvclives_names_and_wall_clock_values_are_left_out() {
        assert_eq!(dvclive_name("loss").as_deref(), Some("train/loss"));
        assert_eq!(
            dvclive_name("eval_f1_macro").as_deref(),
            Some("eval/f1_macro")
        );
        assert_eq!(
            dvclive_name("learning_rate").as_deref(),
            Some("train/learning_rate")
        );
        assert_eq!(dvclive_name("train_runtime"), None);
        assert_eq!(dvclive_name("eval_samples_per_second"), None);
        assert_eq!(dvclive_name("epoch"), None);
    }

    #[test]
    fn each_series_is_a_step_and_value_tsv_and_the_confusion_lists_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let log = [
            json!({"step": 10, "epoch": 0.5, "loss": 0.69, "train_runtime": 3.2}),
            json!({"step": 20, "epoch": 1.0, "loss": 0.5}),
            json!({"step": 20, "epoch": 1.0, "eval_accuracy": 0.75}),
        ];
        let outcome = Outcome::Labels {
            truth: vec!["neg".into(), "pos".into()],
            predicted: vec!["pos".into(), "pos".into()],
        };
        write_plots(dir.path(), &log, &outcome).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(
            read("plots/metrics/train/loss.tsv"),
            "step\ttrain/loss\n10\t0.69\n20\t0.5\n"
        );
        assert_eq!(
            read("plots/metrics/eval/accuracy.tsv"),
            "step\teval/accuracy\n20\t0.75\n"
        );
        assert!(
            !dir.path()
                .join("plots/metrics/train/train_runtime.tsv")
                .exists()
        );
        let pairs: Value = serde_json::from_str(&read(CONFUSION_JSON)).unwrap();
        assert_eq!(
            pairs,
            json!([{"actual": "neg", "predicted": "pos"}, {"actual": "pos", "predicted": "pos"}])
        );
    }
}
