//! `ingest_csv` on the real review data and on each kind of broken file.

mod common;

use std::fs::File;

use arrow::array::{Array, Int64Array, StringArray};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// Runs a one-stage pipeline ingesting `path` with extra `with:` lines; returns the output dir.
fn ingest(ws: &Ws, path: &str, extra: &str) -> Result<std::path::PathBuf, String> {
    let yaml = format!(
        "name: t\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      path: {path}\n{extra}"
    );
    ws.write("t.yaml", yaml);
    let out = ws.run(&["run", "t.yaml"]);
    if out.status.success() {
        Ok(output_dir(ws, "t", "ingest"))
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let cache = ws.file("artifacts/cache");
        let entries = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
        assert_eq!(entries, 0, "a failed ingest left a cache entry");
        Err(stderr(&out))
    }
}

fn read_split(dir: &std::path::Path, split: &str) -> (Vec<String>, Vec<i64>) {
    let file = File::open(dir.join(format!("{split}.parquet"))).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let (mut texts, mut labels) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch.unwrap();
        let text = batch
            .column_by_name("text")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let label = batch
            .column_by_name("label")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        texts.extend((0..text.len()).map(|i| text.value(i).to_string()));
        labels.extend(label.values().iter().copied());
    }
    (texts, labels)
}

const TSV: &str = "      format: tsv\n      text: 0\n      label: 1\n";

#[test]
fn the_amazon_tsv_reads_one_row_per_line_despite_quotes() {
    let ws = Ws::new();
    let dir = ingest(&ws, "data/raw/product_reviews.tsv", TSV).unwrap();
    let stats = read_json(&dir.join("stats.json"));
    assert_eq!(stats["rows_read"], 1000);
    assert_eq!(stats["splits"]["train"]["rows"], 700);
    assert_eq!(
        stats["splits"]["test"]["labels"],
        serde_json::json!({"0": 100, "1": 100})
    );
    let (train, _) = read_split(&dir, "train");
    let (validation, _) = read_split(&dir, "validation");
    let (test, _) = read_split(&dir, "test");
    assert_eq!(train.len() + validation.len() + test.len(), 1000);
    let quoted = train
        .iter()
        .chain(&validation)
        .chain(&test)
        .filter(|t| t.contains('"'))
        .count();
    assert!(quoted > 0, "sentences with quotes should survive intact");
    assert_eq!(
        read_json(&dir.join("labels.json"))["names"],
        serde_json::json!(["0", "1"])
    );
}

#[test]
fn the_split_is_seeded_stratified_and_deterministic() {
    let ws = Ws::new();
    let first = read_split(
        &ingest(&ws, "data/raw/product_reviews.tsv", TSV).unwrap(),
        "test",
    );
    let other_ws = Ws::new();
    let again = read_split(
        &ingest(&other_ws, "data/raw/product_reviews.tsv", TSV).unwrap(),
        "test",
    );
    assert_eq!(first, again);
    let reseeded = ingest(
        &ws,
        "data/raw/product_reviews.tsv",
        &format!("{TSV}      split: {{seed: 7}}\n"),
    )
    .unwrap();
    assert_ne!(read_split(&reseeded, "test").0, first.0);
}

#[test]
fn duplicates_and_empty_texts_are_dropped_and_counted() {
    let ws = Ws::new();
    let dir = ingest(
        &ws,
        "data/raw/product_reviews.tsv",
        &format!("{TSV}      drop_duplicates: true\n"),
    )
    .unwrap();
    let stats = read_json(&dir.join("stats.json"));
    assert_eq!(
        stats["dropped"]["duplicate_text"], 10,
        "PROVENANCE.md lists 10 duplicated sentences"
    );
    assert_eq!(stats["rows_kept"], 990);
    ws.write(
        "e.tsv",
        "good one\t1\n   \t0\nbad one\t0\n\t1\nfine\t1\nawful\t0\n",
    );
    let stats = read_json(
        &ingest(
            &ws,
            "e.tsv",
            &format!("{TSV}      split: {{validation: 0.0, test: 0.25, stratify: false}}\n"),
        )
        .unwrap()
        .join("stats.json"),
    );
    assert_eq!(stats["dropped"]["empty_text"], 2, "{stats}");
    assert_eq!(stats["rows_kept"], 4);
}

#[test]
fn a_row_with_the_wrong_field_count_is_an_error_or_a_counted_skip() {
    let ws = Ws::new();
    ws.write(
        "r.csv",
        "text,label\nfine,1\nalso fine,0\nbroken,1,extra\nok,0\ngood,1\nbad,0\n",
    );
    let err = ingest(&ws, "r.csv", "      text: text\n      label: label\n").unwrap_err();
    assert!(err.contains("r.csv:4: expected 2 fields, found 3"), "{err}");
    let extra = "      text: text\n      label: label\n      on_bad_row: skip\n      split: {validation: 0.0, test: 0.4}\n";
    let stats = read_json(&ingest(&ws, "r.csv", extra).unwrap().join("stats.json"));
    assert_eq!(stats["dropped"]["bad_row"], 1);
    assert_eq!(stats["rows_kept"], 5);
}

#[test]
fn invalid_utf8_names_line_and_byte_unless_lossy() {
    let ws = Ws::new();
    ws.write(
        "u.tsv",
        b"good\t1\nbad \xff byte\t0\nfine\t1\nawful\t0\n".as_slice(),
    );
    let err = ingest(&ws, "u.tsv", TSV).unwrap_err();
    assert!(
        err.contains("u.tsv:2: invalid UTF-8 in the text field at byte offset 11"),
        "{err}"
    );
    let extra =
        format!("{TSV}      encoding: lossy\n      split: {{validation: 0.0, test: 0.5}}\n");
    let dir = ingest(&ws, "u.tsv", &extra).unwrap();
    let all: Vec<String> = ["train", "test"]
        .iter()
        .flat_map(|s| read_split(&dir, s).0)
        .collect();
    assert!(all.contains(&"bad \u{fffd} byte".to_string()), "{all:?}");
}

#[test]
fn empty_files_header_only_and_one_class_are_errors() {
    let ws = Ws::new();
    ws.write("empty.csv", "");
    assert!(
        ingest(&ws, "empty.csv", "      text: 0\n      label: 1\n")
            .unwrap_err()
            .contains("empty.csv has no data rows")
    );
    ws.write("header.csv", "text,label\n");
    assert!(
        ingest(&ws, "header.csv", "      text: text\n      label: label\n")
            .unwrap_err()
            .contains("no data rows")
    );
    ws.write("one.tsv", "a\t1\nb\t1\nc\t1\n");
    assert!(
        ingest(&ws, "one.tsv", TSV)
            .unwrap_err()
            .contains("only one label (1) in the data")
    );
    ws.write("few.tsv", "a\t1\nb\t0\nc\t1\nd\t0\n");
    let err = ingest(&ws, "few.tsv", TSV).unwrap_err();
    assert!(err.contains("the validation split is empty"), "{err}");
    let err = ingest(
        &ws,
        "data/raw/product_reviews.tsv",
        &format!("{TSV}      labels: [\"1\", \"2\"]\n"),
    )
    .unwrap_err();
    assert!(
        err.contains("product_reviews.tsv:1: label `0` is not in `labels` (1, 2)"),
        "{err}"
    );
    let err = ingest(&ws, "missing.tsv", TSV).unwrap_err();
    assert!(err.contains("missing.tsv"), "{err}");
}

#[test]
fn a_giant_single_line_is_a_bad_row_not_a_hang() {
    let ws = Ws::new();
    let mut text = "word ".repeat(1_000_000);
    text.push_str("\t1\nshort\t0\n");
    ws.write("giant.tsv", text);
    let err = ingest(&ws, "giant.tsv", TSV).unwrap_err();
    assert!(
        err.contains("giant.tsv:1: the text is 4999999 bytes, over `max_text_bytes` (1048576)"),
        "{err}"
    );
}

#[test]
fn the_clothing_reviews_give_the_counts_in_their_provenance() {
    let ws = Ws::new();
    let csv = repo().join("data/raw/womens_clothing_reviews.csv");
    assert!(
        csv.exists(),
        "the real data ships in the repository: {} is missing",
        csv.display()
    );
    let path = csv.display().to_string();
    let all = ingest(
        &ws,
        &path,
        "      text: Review Text\n      label: Rating\n      drop_empty: false\n",
    )
    .unwrap();
    let stats = read_json(&all.join("stats.json"));
    assert_eq!(stats["rows_read"], 23486);
    let per_label = |split: &Value, label: &str| split["labels"][label].as_u64().unwrap();
    let totals: Vec<u64> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|l| {
            ["train", "validation", "test"]
                .iter()
                .map(|s| per_label(&stats["splits"][*s], l))
                .sum()
        })
        .collect();
    assert_eq!(totals, [842, 1565, 2871, 5077, 13131]);
    let kept = ingest(&ws, &path, "      text: Review Text\n      label: Rating\n").unwrap();
    let stats = read_json(&kept.join("stats.json"));
    assert_eq!(stats["rows_kept"], 22641);
    assert_eq!(stats["dropped"]["empty_text"], 845);
    let (texts, _) = read_split(&kept, "train");
    assert!(
        texts.iter().any(|t| t.contains('\n')),
        "multi-line quoted reviews must stay whole"
    );
}

/// `split.sample` takes a seeded sample of exactly the asked size with the labels' shares
/// (largest remainder), then splits it as usual; the same seed gives the same rows.
#[test]
fn a_stratified_sample_keeps_the_label_shares_and_its_size() {
    let ws = Ws::new();
    let csv = repo().join("data/raw/womens_clothing_reviews.csv");
    let extra = "      text: Review Text\n      label: Rating\n      split: {sample: 3000, validation: 0.1, test: 0.2, seed: 42}\n";
    let out = ingest(&ws, &csv.display().to_string(), extra).unwrap();
    let stats = read_json(&out.join("stats.json"));
    let count =
        |split: &str, label: &str| stats["splits"][split]["labels"][label].as_u64().unwrap();
    let per_label: Vec<u64> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|l| {
            ["train", "validation", "test"]
                .iter()
                .map(|s| count(s, l))
                .sum()
        })
        .collect();
    // 22,641 reviews with text: 821, 1549, 2823, 4908, 12540 per rating.
    assert_eq!(per_label.iter().sum::<u64>(), 3000);
    assert_eq!(
        per_label,
        [109, 205, 374, 650, 1662],
        "shares of 3000 by largest remainder"
    );
    let (train, _) = read_split(&out, "train");
    assert_eq!(train.len(), 2100);
    let again = ingest(&ws, &csv.display().to_string(), extra).unwrap();
    assert_eq!(read_split(&again, "train").0, train);
    let err = ingest(
        &Ws::new(), // `ingest` checks that a failure leaves the cache empty
        "data/raw/product_reviews.tsv",
        &format!("{TSV}      split: {{sample: 5000}}\n"),
    )
    .unwrap_err();
    assert!(
        err.contains("split.sample (5000) must be between 1 and the 1000 rows read"),
        "{err}"
    );
}

#[test]
fn like_datasets_picks_the_rows_of_hugging_face_train_test_split() {
    let ws = Ws::new();
    let out = ingest(
        &ws,
        "data/raw/product_reviews.tsv",
        &format!("{TSV}      split: {{validation: 0.0, test: 0.2, seed: 42, like: datasets}}\n"),
    )
    .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(ws.file("data/raw/product_reviews.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once('\t').unwrap().0.trim().to_string())
        .collect();
    let (test, _) = read_split(&out, "test");
    let (train, _) = read_split(&out, "train");
    assert_eq!((train.len(), test.len()), (800, 200));
    // Printed by Python: ds.train_test_split(test_size=0.2, seed=42)["test"]["idx"][:10], and
    // ["train"]["idx"][:5], over the 1,000 lines in file order.
    for index in [978, 933, 859, 916, 127, 608, 856, 260, 147, 810] {
        assert!(
            test.contains(&lines[index]),
            "line {index} is not a test row"
        );
    }
    for index in [911, 356, 388, 281, 511] {
        assert!(
            train.contains(&lines[index]),
            "line {index} is not a train row"
        );
    }

    ws.write(
        "t.yaml",
        format!("name: t\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n      path: data/raw/product_reviews.tsv\n{TSV}      split: {{validation: 0.1, like: datasets}}\n"),
    );
    let out = ws.run(&["run", "t.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("t.yaml:10:15: stage `ingest`, key `with.split.validation`: must be 0 with `like: datasets`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn label_names_name_the_labels_through_to_the_trained_model() {
    let ws = Ws::new();
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    let named = yaml.replace(
        "      labels: [\"0\", \"1\"]   # 0 = negative, 1 = positive\n",
        "      labels: [\"0\", \"1\"]\n      label_names: { 0: negative, 1: positive }\n",
    );
    assert_ne!(named, yaml);
    ws.write("pipelines/reviews.yaml", &named);
    ws.run_ok(&[]);
    let labels = read_json(&output_dir(&ws, "reviews", "ingest").join("labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["negative", "positive"]));
    assert_eq!(labels["label2id"]["positive"], 1);
    let config = read_json(&output_dir(&ws, "reviews", "train").join("model/config.json"));
    assert_eq!(
        config["id2label"],
        serde_json::json!({"0": "negative", "1": "positive"})
    );
    let out = ws.run(&[
        "predict",
        "--model",
        "artifacts/runs/reviews/train",
        "works great, love it",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("negative\t") || said.starts_with("positive\t"),
        "{said}"
    );

    // A label without a name, a name for no label, and two labels under one name.
    for (names, expected) in [
        (
            "{ 0: negative }",
            "label `1` of data/raw/product_reviews.tsv has no name in `label_names`",
        ),
        (
            "{ 0: negative, 1: positive, 2: neutral }",
            "`label_names` names `2`, a label data/raw/product_reviews.tsv does not hold",
        ),
        (
            "{ 0: same, 1: same }",
            "key `with.label_names.1`: `same` is empty or names another label too",
        ),
    ] {
        let bad = yaml.replace(
            "      labels: [\"0\", \"1\"]   # 0 = negative, 1 = positive\n",
            &format!("      labels: [\"0\", \"1\"]\n      label_names: {names}\n"),
        );
        ws.write("pipelines/reviews.yaml", bad);
        let out = ws.run(&["run"]);
        assert_ne!(out.status.code(), Some(0), "{names}");
        assert!(stderr(&out).contains(expected), "{names}: {}", stderr(&out));
    }
}
