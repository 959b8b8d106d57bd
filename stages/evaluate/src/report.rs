//! The evaluate stage's pictures and report: a confusion matrix and the training curves as SVG
//! (plotters), and a one-page report.md / report.html that shows the figures and links them.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use finetune_trainer::Metrics;

use finetune_trainer::TaskMetrics;

use crate::Outcome;

pub const CONFUSION_MATRIX: &str = "confusion_matrix.svg";
pub const TRAINING_CURVES: &str = "training_curves.svg";
pub const PREDICTED_VS_ACTUAL: &str = "predicted_vs_actual.svg";

/// The records of a train stage's logs/train.jsonl (none if the file is absent).
pub fn read_log(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON record", path.display(), i + 1))
        })
        .collect()
}

/// Writes the pictures and the report into `dir`.
pub fn write_all(
    dir: &Path,
    scores: &TaskMetrics,
    outcome: &Outcome,
    summary: &Value,
    log: &[Value],
    split: &str,
) -> Result<()> {
    let figure = match (scores, outcome) {
        (TaskMetrics::SingleLabel(metrics), _) => {
            confusion_matrix(&dir.join(CONFUSION_MATRIX), metrics)?;
            Some(("Confusion matrix", CONFUSION_MATRIX))
        }
        (TaskMetrics::Regression(_), Outcome::Values { truth, predicted }) => {
            predicted_vs_actual(&dir.join(PREDICTED_VS_ACTUAL), truth, predicted)?;
            Some(("Predicted against actual", PREDICTED_VS_ACTUAL))
        }
        _ => None,
    };
    training_curves(&dir.join(TRAINING_CURVES), log)?;
    let page = Page::new(scores, summary, log, split, figure);
    write(&dir.join("report.md"), &page.markdown())?;
    write(&dir.join("report.html"), &page.html())
}

/// `text` at `path`, creating the directories it lies in.
pub(crate) fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw: {e}")
}

/// Counts per (true, predicted) label, each cell shaded by its share of the true label's row.
fn confusion_matrix(path: &Path, metrics: &Metrics) -> Result<()> {
    let labels: Vec<&str> = metrics.per_class.iter().map(|c| c.label.as_str()).collect();
    let n = labels.len();
    let side = 160 + 80 * n as u32;
    let root = SVGBackend::new(path, (side, side)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Confusion matrix (rows: true label)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        // A segmented range `0..k` has k + 1 segments (its end included).
        .build_cartesian_2d(
            (0..n.saturating_sub(1)).into_segmented(),
            (0..n.saturating_sub(1)).into_segmented(),
        )
        .map_err(plot_error)?;
    // Rows top to bottom in label order: row `truth` sits at y = n − 1 − truth.
    let name = |value: &SegmentValue<usize>, flip: bool| match value {
        SegmentValue::CenterOf(i) if *i < n => {
            labels[if flip { n - 1 - i } else { *i }].to_string()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&|v| name(v, false))
        .y_label_formatter(&|v| name(v, true))
        .draw()
        .map_err(plot_error)?;
    let centred = ("sans-serif", 18)
        .into_font()
        .into_text_style(&root)
        .pos(Pos::new(HPos::Center, VPos::Center));
    for (truth, row) in metrics.confusion.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        let y = n - 1 - truth;
        for (predicted, &count) in row.iter().enumerate() {
            let share = count as f64 / total as f64;
            let shade = RGBColor(
                (255.0 - 200.0 * share) as u8,
                (255.0 - 140.0 * share) as u8,
                255,
            );
            chart
                .draw_series([Rectangle::new(
                    [
                        (SegmentValue::Exact(predicted), SegmentValue::Exact(y)),
                        (
                            SegmentValue::Exact(predicted + 1),
                            SegmentValue::Exact(y + 1),
                        ),
                    ],
                    shade.filled(),
                )])
                .map_err(plot_error)?;
            let ink = if share > 0.6 { WHITE } else { BLACK };
            chart
                .draw_series([Text::new(
                    count.to_string(),
                    (SegmentValue::CenterOf(predicted), SegmentValue::CenterOf(y)),
                    centred.color(&ink),
                )])
                .map_err(plot_error)?;
        }
    }
    root.present().map_err(plot_error)
}

/// (step, value) of `key` over the log's records that have it.
/// A regression's predictions against the truth, one point per (example, target), with the
/// diagonal a perfect model would lie on.
fn predicted_vs_actual(path: &Path, truth: &[Vec<f32>], predicted: &[Vec<f32>]) -> Result<()> {
    let points: Vec<(f64, f64)> = truth
        .iter()
        .zip(predicted)
        .flat_map(|(t, p)| t.iter().zip(p).map(|(&t, &p)| (f64::from(t), f64::from(p))))
        .collect();
    let (low, high) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (t, p)| {
            (lo.min(*t).min(*p), hi.max(*t).max(*p))
        });
    let (low, high) = if low.is_finite() && high > low {
        (low, high)
    } else {
        (low.min(0.0), low.max(0.0) + 1.0)
    };
    let root = SVGBackend::new(path, (560, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Predicted against actual", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(low..high, low..high)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("actual")
        .y_desc("predicted")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new([(low, low), (high, high)], BLACK.mix(0.4)))
        .map_err(plot_error)?;
    chart
        .draw_series(
            points
                .iter()
                .map(|&point| Circle::new(point, 2, BLUE.mix(0.25).filled())),
        )
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

fn series(log: &[Value], key: &str) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// One curve of a panel: its log key, colour and (step, value) points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Three panels over the steps: train and eval loss; the learning rate; eval accuracy and
/// macro F1.
fn training_curves(path: &Path, log: &[Value]) -> Result<()> {
    let root = SVGBackend::new(path, (720, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = root.split_evenly((3, 1));
    let groups: [(&str, &[(&str, RGBColor)]); 3] = [
        (
            "loss",
            &[("loss", BLUE), ("eval_loss", RED), ("awp_loss", MAGENTA)],
        ),
        ("learning rate", &[("learning_rate", GREEN)]),
        (
            "evaluation",
            &[("eval_accuracy", BLUE), ("eval_f1_macro", RED)],
        ),
    ];
    for (panel, (title, keys)) in panels.iter().zip(groups) {
        let lines: Vec<Line> = keys
            .iter()
            .map(|(key, color)| (*key, *color, series(log, key)))
            .filter(|(_, _, points)| !points.is_empty())
            .collect();
        let points = lines.iter().flat_map(|(_, _, p)| p.iter());
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        let pad = ((y_max - y_min) * 0.05).max(1e-9);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|y| {
                if y.abs() < 1e-2 && *y != 0.0 {
                    format!("{y:.1e}")
                } else {
                    format!("{y:.3}")
                }
            })
            .draw()
            .map_err(plot_error)?;
        for (key, color, points) in lines {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(key)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)
}

/// What the report says, rendered as Markdown or HTML.
struct Page {
    split: String,
    headline: Vec<(&'static str, String)>,
    /// The per-output table: its title, column names and rows.
    table: (&'static str, Vec<&'static str>, Vec<Vec<String>>),
    /// The task's picture: its title and file.
    figure: Option<(&'static str, &'static str)>,
    training: Option<String>,
}

fn number(x: f64) -> String {
    format!("{x:.4}")
}

fn class_rows(classes: &[finetune_trainer::ClassScores]) -> Vec<Vec<String>> {
    classes
        .iter()
        .map(|c| {
            vec![
                c.label.clone(),
                number(c.precision),
                number(c.recall),
                number(c.f1),
                c.support.to_string(),
            ]
        })
        .collect()
}

impl Page {
    fn new(
        scores: &TaskMetrics,
        summary: &Value,
        log: &[Value],
        split: &str,
        figure: Option<(&'static str, &'static str)>,
    ) -> Page {
        let mut headline = vec![
            ("examples", summary["examples"].to_string()),
            ("loss", number(summary["loss"].as_f64().unwrap_or(f64::NAN))),
        ];
        let class_columns = vec!["label", "precision", "recall", "F1", "support"];
        let table = match scores {
            TaskMetrics::SingleLabel(m) => {
                headline.extend([
                    ("accuracy", number(m.accuracy)),
                    ("macro F1", number(m.f1_macro)),
                    ("weighted F1", number(m.f1_weighted)),
                    ("macro precision", number(m.precision_macro)),
                    ("macro recall", number(m.recall_macro)),
                ]);
                ("Per class", class_columns, class_rows(&m.per_class))
            }
            TaskMetrics::MultiLabel(m) => {
                headline.extend([
                    ("threshold", format!("{:.2}", m.threshold)),
                    ("micro F1", number(m.f1_micro)),
                    ("macro F1", number(m.f1_macro)),
                    ("weighted F1", number(m.f1_weighted)),
                    ("subset accuracy", number(m.subset_accuracy)),
                    ("Hamming loss", number(m.hamming_loss)),
                ]);
                ("Per label", class_columns, class_rows(&m.per_label))
            }
            TaskMetrics::Regression(m) => {
                headline.extend([
                    ("MSE", number(m.mse)),
                    ("RMSE", number(m.rmse)),
                    ("MAE", number(m.mae)),
                    ("R²", number(m.r2)),
                    ("Pearson", number(m.pearson)),
                    ("Spearman", number(m.spearman)),
                ]);
                let rows = m
                    .per_target
                    .iter()
                    .map(|t| {
                        let values = [t.mse, t.rmse, t.mae, t.r2, t.pearson, t.spearman];
                        std::iter::once(t.target.clone())
                            .chain(values.map(number))
                            .collect()
                    })
                    .collect();
                let columns = vec!["target", "MSE", "RMSE", "MAE", "R²", "Pearson", "Spearman"];
                ("Per target", columns, rows)
            }
        };
        let updates = log.iter().filter(|r| r.get("loss").is_some()).count();
        let evaluations = log.iter().filter(|r| r.get("eval_loss").is_some()).count();
        let last_step = log.iter().filter_map(|r| r.get("step")?.as_u64()).max();
        let training = last_step.map(|step| {
            format!(
                "{step} optimizer updates, {updates} log records, {evaluations} evaluations during training"
            )
        });
        Page {
            split: split.to_string(),
            headline,
            table,
            figure,
            training,
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("# Evaluation on the {} split\n\n", self.split);
        out.push_str("| metric | value |\n|---|---|\n");
        for (name, value) in &self.headline {
            out.push_str(&format!("| {name} | {value} |\n"));
        }
        let (title, columns, rows) = &self.table;
        out.push_str(&format!(
            "\n## {title}\n\n| {} |\n|{}\n",
            columns.join(" | "),
            "---|".repeat(columns.len())
        ));
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        if let Some((title, file)) = self.figure {
            out.push_str(&format!(
                "\n## {title}\n\n![{}]({file})\n\n[{file}]({file})\n",
                title.to_lowercase()
            ));
        }
        out.push_str("\n## Training\n\n");
        if let Some(training) = &self.training {
            out.push_str(&format!("{training}.\n\n"));
        }
        out.push_str(&format!(
            "![training curves]({TRAINING_CURVES})\n\n[{TRAINING_CURVES}]({TRAINING_CURVES})\n\nAll figures: [metrics.json](metrics.json); every prediction: predictions.parquet.\n"
        ));
        out
    }

    fn html(&self) -> String {
        let mut out =
            String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        out.push_str(&format!(
            "<title>Evaluation on the {} split</title>\n",
            escape(&self.split)
        ));
        out.push_str("<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>\n</head>\n<body>\n");
        out.push_str(&format!(
            "<h1>Evaluation on the {} split</h1>\n<table>\n",
            escape(&self.split)
        ));
        for (name, value) in &self.headline {
            out.push_str(&format!(
                "<tr><th>{name}</th><td>{}</td></tr>\n",
                escape(value)
            ));
        }
        let (title, columns, rows) = &self.table;
        let header: Vec<String> = columns.iter().map(|c| format!("<th>{c}</th>")).collect();
        out.push_str(&format!(
            "</table>\n<h2>{title}</h2>\n<table>\n<tr>{}</tr>\n",
            header.concat()
        ));
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .map(|c| format!("<td>{}</td>", escape(c)))
                .collect();
            out.push_str(&format!("<tr>{}</tr>\n", cells.concat()));
        }
        out.push_str("</table>\n");
        if let Some((title, file)) = self.figure {
            out.push_str(&format!(
                "<h2>{title}</h2>\n<p><a href=\"{file}\"><img src=\"{file}\" alt=\"{}\"></a></p>\n",
                title.to_lowercase()
            ));
        }
        out.push_str("<h2>Training</h2>\n");
        if let Some(training) = &self.training {
            out.push_str(&format!("<p>{}.</p>\n", escape(training)));
        }
        out.push_str(&format!(
            "<p><a href=\"{TRAINING_CURVES}\"><img src=\"{TRAINING_CURVES}\" alt=\"training curves\"></a></p>\n<p>All figures: <a href=\"metrics.json\">metrics.json</a>; every prediction: predictions.parquet.</p>\n</body>\n</html>\n"
        ));
        out
    }
}

/// Text safe inside HTML elements and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
