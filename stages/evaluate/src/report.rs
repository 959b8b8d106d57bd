//! The evaluate stage's pictures and report: a confusion matrix and the training curves as SVG
//! (plotters), and a one-page report.md / report.html that shows the figures and links them.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use finetune_trainer::Metrics;

pub const CONFUSION_MATRIX: &str = "confusion_matrix.svg";
pub const TRAINING_CURVES: &str = "training_curves.svg";

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
    metrics: &Metrics,
    summary: &Value,
    log: &[Value],
    split: &str,
) -> Result<()> {
    confusion_matrix(&dir.join(CONFUSION_MATRIX), metrics)?;
    training_curves(&dir.join(TRAINING_CURVES), log)?;
    let page = Page::new(metrics, summary, log, split);
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
    classes: Vec<[String; 5]>,
    training: Option<String>,
}

impl Page {
    fn new(metrics: &Metrics, summary: &Value, log: &[Value], split: &str) -> Page {
        let number = |x: f64| format!("{x:.4}");
        let headline = vec![
            ("examples", summary["examples"].to_string()),
            ("loss", number(summary["loss"].as_f64().unwrap_or(f64::NAN))),
            ("accuracy", number(metrics.accuracy)),
            ("macro F1", number(metrics.f1_macro)),
            ("weighted F1", number(metrics.f1_weighted)),
            ("macro precision", number(metrics.precision_macro)),
            ("macro recall", number(metrics.recall_macro)),
        ];
        let classes = metrics
            .per_class
            .iter()
            .map(|c| {
                [
                    c.label.clone(),
                    number(c.precision),
                    number(c.recall),
                    number(c.f1),
                    c.support.to_string(),
                ]
            })
            .collect();
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
            classes,
            training,
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("# Evaluation on the {} split\n\n", self.split);
        out.push_str("| metric | value |\n|---|---|\n");
        for (name, value) in &self.headline {
            out.push_str(&format!("| {name} | {value} |\n"));
        }
        out.push_str("\n## Per class\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n");
        for row in &self.classes {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out.push_str(&format!(
            "\n## Confusion matrix\n\n![confusion matrix]({CONFUSION_MATRIX})\n\n[{CONFUSION_MATRIX}]({CONFUSION_MATRIX})\n"
        ));
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
        out.push_str("</table>\n<h2>Per class</h2>\n<table>\n<tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>\n");
        for row in &self.classes {
            let cells: Vec<String> = row
                .iter()
                .map(|c| format!("<td>{}</td>", escape(c)))
                .collect();
            out.push_str(&format!("<tr>{}</tr>\n", cells.concat()));
        }
        out.push_str(&format!(
            "</table>\n<h2>Confusion matrix</h2>\n<p><a href=\"{CONFUSION_MATRIX}\"><img src=\"{CONFUSION_MATRIX}\" alt=\"confusion matrix\"></a></p>\n<h2>Training</h2>\n"
        ));
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
