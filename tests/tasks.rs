//! Multi-label classification and regression (`problem_type:`) on the clothing reviews: the
//! labels as ingest reads them from every format, the saved model's config.json, the metrics
//! evaluate reports (recomputed here from its own predictions file), `predict`'s answers, and
//! the bad-input cases each task adds.

mod common;

use common::*;

const CLOTHING: &str = "data/raw/womens_clothing_reviews.csv";

/// A pipeline `name` over `ingest` (the stage's `with:` lines) that trains a small model from
/// scratch, tuned as `training` says, and evaluates it on test.
fn pipeline(ws: &Ws, name: &str, ingest: &str, training: &str) {
    let scratch = (
        "{ train: wordpiece, vocab_size: 2000 }",
        "{ scratch: { layers: 1, hidden: 32, heads: 2 } }",
    );
    pipeline_with(ws, name, ingest, scratch, training);
}

/// [`pipeline`] with `(tokenizer, model)` as tokenize's and train's settings.
fn pipeline_with(
    ws: &Ws,
    name: &str,
    ingest: &str,
    (tokenizer, model): (&str, &str),
    training: &str,
) {
    ws.write(
        &format!("{name}.yaml"),
        format!(
            r#"name: {name}
stages:
  ingest:
    uses: ingest_csv
    with:
{ingest}
  tokenize:
    uses: tokenize
    needs: [ingest]
    with: {{ tokenizer: {tokenizer}, max_length: 64 }}
  train:
    uses: train
    needs: [tokenize]
    with:
      model: {model}
      training: {{ batch_size: 16, eval_strategy: epoch, {training} }}
  evaluate:
    uses: evaluate
    needs: [tokenize, train]
"#
        ),
    );
}

fn metric(metrics: &serde_json::Value, key: &str) -> f64 {
    metrics[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no `{key}` in {metrics}"))
}

/// Runs `predict --json` on `texts` with the model of pipeline `name`.
fn predict_json(ws: &Ws, name: &str, texts: &[String], extra: &[&str]) -> Vec<serde_json::Value> {
    let model = format!("artifacts/runs/{name}/train");
    let mut args = vec!["predict", "--model", model.as_str(), "--json"];
    args.extend_from_slice(extra);
    args.extend(texts.iter().map(String::as_str));
    let out = ws.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The star rating as a regression target: stored as float lists, trained with the squared
/// error, scored with MSE, RMSE, MAE, R², Pearson and Spearman (recomputed here from the
/// predictions file), and saved as a Hugging Face regression head that `predict` reads.
#[test]
fn star_ratings_as_regression() {
    let ws = Ws::new();
    let ingest = format!(
        "      path: {CLOTHING}\n      text: Review Text\n      label: Rating\n      problem_type: regression\n      split: {{ validation: 0.1, test: 0.2, sample: 1500 }}"
    );
    pipeline(
        &ws,
        "rating",
        &ingest,
        "epochs: 6, lr: 3.0e-3, metric_for_best_model: rmse",
    );
    ws.run_ok(&["rating.yaml"]);
    let ingested = output_dir(&ws, "rating", "ingest");
    let labels = read_json(&ingested.join("labels.json"));
    assert_eq!(labels["problem_type"], "regression");
    assert_eq!(labels["names"], serde_json::json!(["Rating"]));
    let stars = float_lists(&ingested.join("train.parquet"), "label");
    assert_eq!(stars.len(), 1050);
    assert!(
        stars
            .iter()
            .all(|s| s.len() == 1 && (1.0..=5.0).contains(&s[0]))
    );
    let stats = read_json(&ingested.join("stats.json"));
    let mean = stars.iter().map(|s| f64::from(s[0])).sum::<f64>() / stars.len() as f64;
    let stated = stats["splits"]["train"]["targets"]["Rating"]["mean"]
        .as_f64()
        .unwrap();
    assert!((stated - mean).abs() < 1e-9, "{stated} vs {mean}");

    let config = read_json(&output_dir(&ws, "rating", "train").join("model/config.json"));
    assert_eq!(config["problem_type"], "regression");
    assert_eq!(config["id2label"], serde_json::json!({ "0": "Rating" }));

    let evaluated = output_dir(&ws, "rating", "evaluate");
    let metrics = read_json(&evaluated.join("metrics.json"));
    let predictions = evaluated.join("predictions.parquet");
    let truth = float_lists(&predictions, "label");
    let predicted = float_lists(&predictions, "prediction");
    assert_eq!(truth.len(), 300);
    let n = truth.len() as f64;
    let errors: Vec<f64> = truth
        .iter()
        .zip(&predicted)
        .map(|(t, p)| f64::from(p[0]) - f64::from(t[0]))
        .collect();
    let mse = errors.iter().map(|e| e * e).sum::<f64>() / n;
    let mae = errors.iter().map(|e| e.abs()).sum::<f64>() / n;
    let truth_mean = truth.iter().map(|t| f64::from(t[0])).sum::<f64>() / n;
    let spread: f64 = truth
        .iter()
        .map(|t| (f64::from(t[0]) - truth_mean).powi(2))
        .sum();
    assert!((metric(&metrics, "mse") - mse).abs() < 1e-9);
    assert!((metric(&metrics, "rmse") - mse.sqrt()).abs() < 1e-9);
    assert!((metric(&metrics, "mae") - mae).abs() < 1e-9);
    assert!((metric(&metrics, "r2") - (1.0 - mse * n / spread)).abs() < 1e-9);
    // The evaluation loss of a regression head is its mean squared error, as Python's.
    assert!((metric(&metrics, "loss") - mse).abs() < 1e-4);
    // Better than predicting the mean star, and ranked with the truth.
    assert!(metric(&metrics, "r2") > 0.05, "{metrics}");
    assert!(metric(&metrics, "spearman") > 0.3, "{metrics}");
    assert!(evaluated.join("predicted_vs_actual.svg").exists());
    let points = read_json(&evaluated.join("plots/predictions/predicted_vs_actual.json"));
    assert_eq!(points.as_array().unwrap().len(), 300);
    let report = std::fs::read_to_string(evaluated.join("report.md")).unwrap();
    assert!(report.contains("| target | MSE | RMSE | MAE | R² | Pearson | Spearman |"));

    // `predict` answers with the value evaluate computed for the same text.
    let texts: Vec<String> = strings(&predictions, "text").into_iter().take(5).collect();
    for (line, expected) in predict_json(&ws, "rating", &texts, &[])
        .iter()
        .zip(&predicted)
    {
        let value = line["values"]["Rating"].as_f64().unwrap();
        assert!((value - f64::from(expected[0])).abs() < 1e-4, "{line}");
        assert!(line.get("label").is_none());
    }
    let model = "artifacts/runs/rating/train";
    let out = ws.run(&["predict", "--model", model, "Lovely dress, fits well"]);
    let line = String::from_utf8(out.stdout).unwrap();
    let value: f64 = line.split('\t').next().unwrap().parse().unwrap();
    assert!(value.is_finite(), "{line}");
    let out = ws.run(&["predict", "--model", model, "--threshold", "0.3", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--threshold is for multi-label models"));
}

/// The Huber loss trains differently from the squared error (it is the loss train reports),
/// while the evaluation still scores the squared error; weights and smoothing are refused.
#[test]
fn regression_losses_and_refused_settings() {
    let ws = Ws::new();
    let ingest = format!(
        "      path: {CLOTHING}\n      text: Review Text\n      label: Rating\n      problem_type: regression\n      split: {{ validation: 0.1, test: 0.2, sample: 400 }}"
    );
    pipeline(&ws, "mse", &ingest, "epochs: 1, lr: 3.0e-3");
    pipeline(
        &ws,
        "huber",
        &ingest,
        "epochs: 1, lr: 3.0e-3, huber_delta: 0.5",
    );
    ws.run_ok(&["mse.yaml"]);
    ws.run_ok(&["huber.yaml"]);
    let first_loss = |name: &str| {
        let log = std::fs::read_to_string(output_dir(&ws, name, "train").join("logs/train.jsonl"))
            .unwrap();
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find_map(|r| r["loss"].as_f64())
            .unwrap()
    };
    // Targets of 1 to 5 stars against outputs near 0: the squared error is far larger.
    assert!(first_loss("mse") > 2.0 * first_loss("huber"));
    for (setting, expected) in [
        (
            "class_weights: balanced",
            "`training.class_weights` is for single-label classification; this model's task is regression",
        ),
        (
            "metric_for_best_model: accuracy",
            "`accuracy` is not a metric of regression; one of: loss, mse, rmse, mae, r2, pearson, spearman",
        ),
    ] {
        pipeline(&ws, "refused", &ingest, &format!("epochs: 1, {setting}"));
        let out = ws.run(&["run", "refused.yaml"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    }
}

/// The department and class of each review, as a list of labels.
fn clothing_tags() -> Vec<(String, Vec<String>)> {
    let mut reader = csv::Reader::from_path(repo().join(CLOTHING)).unwrap();
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (text, department, class) = (
        column("Review Text"),
        column("Department Name"),
        column("Class Name"),
    );
    reader
        .records()
        .take(2000)
        .map(|record| {
            let record = record.unwrap();
            let tags = [department, class]
                .iter()
                .map(|&c| record[c].to_string())
                .filter(|t| !t.is_empty())
                .collect();
            (record[text].to_string(), tags)
        })
        .collect()
}

/// Department and class names as the labels of a multi-label task: a JSON Lines list and a
/// CSV field split at `label_delimiter` give the same split files; the model trains with
/// binary cross-entropy, evaluate tunes the threshold on validation and scores test at it
/// (micro F1 and subset accuracy recomputed here), and `predict` prints the labels over it.
#[test]
fn department_and_class_as_multi_label() {
    let ws = Ws::new();
    let tags = clothing_tags();
    let jsonl: String = tags
        .iter()
        .map(|(text, labels)| format!("{}\n", serde_json::json!({ "text": text, "tags": labels })))
        .collect();
    ws.write("data/tags.jsonl", jsonl);
    // The CSV holds the labels twice: joined in one field, and one per column (a review
    // without a department or class has that field empty).
    let mut writer = csv::Writer::from_path(ws.file("data/tags.csv")).unwrap();
    writer
        .write_record(["text", "tags", "department", "class"])
        .unwrap();
    for (text, labels) in &tags {
        let column = |i: usize| labels.get(i).map_or("", String::as_str);
        writer
            .write_record([text.as_str(), &labels.join("|"), column(0), column(1)])
            .unwrap();
    }
    writer.flush().unwrap();
    let ingest = |path: &str, label: &str| {
        format!(
            "      path: {path}\n      text: text\n      label: {label}\n      problem_type: multi_label_classification\n      split: {{ validation: 0.15, test: 0.2 }}"
        )
    };
    // BCE learns the label frequencies first; the texts' own labels take many updates.
    let training = "epochs: 40, lr: 2.0e-3, metric_for_best_model: f1_micro";
    pipeline(&ws, "tags", &ingest("data/tags.jsonl", "tags"), training);
    ws.run_ok(&["tags.yaml"]);
    // The CSV reads into the same split files either way (only its ingest runs).
    let delimited = format!(
        "{}\n      label_delimiter: \"|\"",
        ingest("data/tags.csv", "tags")
    );
    let columns = ingest("data/tags.csv", "[department, class]");
    let ingested = output_dir(&ws, "tags", "ingest");
    for (name, with) in [("tags-csv", delimited), ("tags-columns", columns)] {
        pipeline(&ws, name, &with, training);
        ws.run_ok(&[&format!("{name}.yaml"), "ingest"]);
        for split in ["train.parquet", "validation.parquet", "test.parquet"] {
            assert_eq!(
                std::fs::read(ingested.join(split)).unwrap(),
                std::fs::read(output_dir(&ws, name, "ingest").join(split)).unwrap(),
                "{name} {split}"
            );
        }
    }
    let labels = read_json(&ingested.join("labels.json"));
    assert_eq!(labels["problem_type"], "multi_label_classification");
    let names: Vec<String> = labels["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"Dresses".to_string()) && names.contains(&"Tops".to_string()));
    // Every row has its department and class: two labels ("Dresses" is both, one label).
    let hot = float_lists(&ingested.join("train.parquet"), "label");
    assert!(hot.iter().all(|row| row.len() == names.len()));
    assert!(
        hot.iter()
            .all(|row| (1.0..=2.0).contains(&row.iter().sum::<f32>()))
    );
    let config = read_json(&output_dir(&ws, "tags", "train").join("model/config.json"));
    assert_eq!(config["problem_type"], "multi_label_classification");

    let evaluated = output_dir(&ws, "tags", "evaluate");
    let metrics = read_json(&evaluated.join("metrics.json"));
    assert_eq!(metrics["threshold_tuned_on"], "validation");
    let threshold = metric(&metrics, "threshold");
    assert!((0.05..=0.95).contains(&threshold));
    let predictions = evaluated.join("predictions.parquet");
    let probabilities = float_lists(&predictions, "probabilities");
    let truth: Vec<Vec<bool>> = float_lists(
        &output_dir(&ws, "tags", "tokenize").join("test.parquet"),
        "label",
    )
    .iter()
    .map(|row| row.iter().map(|&v| v == 1.0).collect())
    .collect();
    let said: Vec<Vec<bool>> = probabilities
        .iter()
        .map(|row| row.iter().map(|&p| f64::from(p) >= threshold).collect())
        .collect();
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (t, s) in truth.iter().flatten().zip(said.iter().flatten()) {
        match (t, s) {
            (true, true) => tp += 1.0,
            (false, true) => fp += 1.0,
            (true, false) => fn_ += 1.0,
            _ => {}
        }
    }
    let f1_micro = 2.0 * tp / (2.0 * tp + fp + fn_);
    assert!(
        (metric(&metrics, "f1_micro") - f1_micro).abs() < 1e-12,
        "{metrics}"
    );
    let exact = truth.iter().zip(&said).filter(|(t, s)| t == s).count() as f64;
    let subset = exact / truth.len() as f64;
    assert!((metric(&metrics, "subset_accuracy") - subset).abs() < 1e-12);
    // Learned beyond the label frequencies: the most frequent department alone scores less.
    assert!(f1_micro > 0.45, "{metrics}");
    assert_eq!(metrics["per_label"].as_array().unwrap().len(), names.len());

    // Train tuned the same threshold on the same validation rows and saved it for predict.
    let config = read_json(&output_dir(&ws, "tags", "train").join("model/config.json"));
    assert_eq!(config["decision_threshold"].as_f64(), Some(threshold));
    // A threshold given is used as it is, for evaluate only (train stays cached).
    ws.run_ok(&["tags.yaml", "--set", "stages.evaluate.with.threshold=0.3"]);
    let fixed = read_json(&output_dir(&ws, "tags", "evaluate").join("metrics.json"));
    assert_eq!(fixed["threshold"], 0.3);
    assert!(fixed.get("threshold_tuned_on").is_none());
    ws.run_ok(&["tags.yaml"]);
    // `predict` at evaluate's threshold prints the labels evaluate predicted.
    let texts: Vec<String> = strings(&predictions, "text").into_iter().take(8).collect();
    let at = format!("{threshold}");
    let lines = predict_json(&ws, "tags", &texts, &["--threshold", &at]);
    assert_eq!(
        lines,
        predict_json(&ws, "tags", &texts, &[]),
        "the saved threshold"
    );
    for (line, row) in lines.iter().zip(&said) {
        let expected: Vec<&str> = names
            .iter()
            .zip(row)
            .filter(|(_, on)| **on)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(line["labels"], serde_json::json!(expected), "{line}");
        assert_eq!(
            line["probabilities"].as_object().unwrap().len(),
            names.len()
        );
    }
}

/// `head_bias: priors` starts a new head's output bias at the training labels' log-odds
/// (recomputed here from train.parquet); the default starts it at zero, as Hugging Face does.
/// On the same data the priors' first evaluation is far better than zero's (the label
/// frequencies already known); the learning rate is too small to move the bias measurably.
#[test]
fn head_bias_priors_start_at_the_label_frequencies() {
    let ws = Ws::new();
    let jsonl: String = clothing_tags()
        .iter()
        .map(|(text, labels)| format!("{}\n", serde_json::json!({ "text": text, "tags": labels })))
        .collect();
    ws.write("data/tags.jsonl", jsonl);
    let ingest = "      path: data/tags.jsonl\n      text: text\n      label: tags\n      problem_type: multi_label_classification";
    let tokenizer = "{ train: wordpiece, vocab_size: 2000 }";
    let training = "epochs: 1, lr: 1.0e-7, metric_for_best_model: f1_micro";
    let mut eval_loss = Vec::new();
    for (name, bias) in [("zeros", "zeros"), ("priors", "priors")] {
        let model = format!(
            "{{ scratch: {{ layers: 1, hidden: 32, heads: 2 }} }}\n      head_bias: {bias}"
        );
        pipeline_with(&ws, name, ingest, (tokenizer, &model), training);
        ws.run_ok(&[&format!("{name}.yaml"), "train"]);
        let trained = output_dir(&ws, name, "train");
        let bias = model_tensors(&trained)
            .into_iter()
            .find(|(key, _, _)| key == "classifier.bias")
            .expect("classifier.bias")
            .2;
        let hot = float_lists(
            &output_dir(&ws, name, "tokenize").join("train.parquet"),
            "label",
        );
        let rows = hot.len() as f32;
        for (i, &b) in bias.iter().enumerate() {
            let positives: f32 = hot.iter().map(|row| row[i]).sum();
            let share = (positives + 1.0) / (rows + 2.0);
            let expected = if name == "priors" {
                (share / (1.0 - share)).ln()
            } else {
                0.0
            };
            assert!(
                (b - expected).abs() < 1e-3,
                "{name} label {i}: {b} vs {expected}"
            );
        }
        let metrics = read_json(&trained.join("metrics.json"));
        eval_loss.push(metric(&metrics["validation"], "loss"));
    }
    assert!(eval_loss[1] < 0.5 * eval_loss[0], "{eval_loss:?}");
}

/// The cases each task adds to the bad-input table: every one a clear error naming the place.
#[test]
fn task_settings_and_labels_that_do_not_fit() {
    let ws = Ws::new();
    ws.write("data/stars.csv", "text,stars\ngood,5\nbad,one\nfine,3\n");
    ws.write(
        "data/lists.jsonl",
        "{\"text\": \"a\", \"tag\": [\"x\", \"y\"]}\n{\"text\": \"b\", \"tag\": [\"x\"]}\n",
    );
    ws.write(
        "data/widths.jsonl",
        "{\"text\": \"a\", \"v\": [1, 2]}\n{\"text\": \"b\", \"v\": [3]}\n",
    );
    let cases = [
        (
            "path: data/stars.csv\n      text: text\n      label: stars\n      problem_type: regression",
            "data/stars.csv:3: the target `one` is not a finite number (`problem_type: regression`)",
        ),
        (
            "path: data/lists.jsonl\n      text: text\n      label: tag",
            "data/lists.jsonl:1: the label is a list of labels; for several labels per text set `problem_type: multi_label_classification`",
        ),
        (
            "path: data/widths.jsonl\n      text: text\n      label: v\n      problem_type: regression",
            "data/widths.jsonl:2: 1 targets, but the first row has 2",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: stars\n      problem_type: regression\n      split: { stratify: true }",
            "regression data has no one label per row to stratify by",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: stars\n      label_delimiter: \"|\"",
            "`problem_type: multi_label_classification`",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: stars\n      problem_type: classification",
            "problem_type",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: [stars, text]",
            "names several columns, and a single-label row has one label",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: [stars, stars]\n      problem_type: multi_label_classification",
            "lists column `stars` twice",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: [stars, score]\n      problem_type: regression",
            "data/stars.csv: no column named `score` for the label; the header has: text, stars",
        ),
        (
            "path: data/stars.csv\n      text: text\n      label: [stars]\n      labels: [a, b]\n      problem_type: regression",
            "names 2 targets, but `label` lists 1 columns",
        ),
    ];
    for (with, expected) in cases {
        ws.write(
            "bad.yaml",
            format!(
                "name: bad\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      {with}\n"
            ),
        );
        let out = ws.run(&["run", "bad.yaml"]);
        assert!(!out.status.success(), "{with}");
        assert!(stderr(&out).contains(expected), "{with}\n{}", stderr(&out));
        assert!(!ws.file("artifacts/runs/bad/ingest/labels.json").exists());
    }
}
