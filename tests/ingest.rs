//! `ingest_csv` on the real review data and on each kind of broken file.

mod common;

use std::fs::File;

use arrow::array::{Array, Int64Array, StringArray};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// Runs a one-stage pipeline ingesting `path` with extra `with:` lines; returns the output dir.
fn ingest(ws: &Ws, path: &str, extra: &str) -> Result<std::path::PathBuf, String> {
    ingest_with(ws, &format!("      path: {path}\n{extra}"))
}

/// Runs a one-stage pipeline whose ingest has these `with:` lines; returns the output dir.
fn ingest_with(ws: &Ws, with: &str) -> Result<std::path::PathBuf, String> {
    let yaml = format!("name: t\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n{with}");
    ws.write("t.yaml", yaml);
    let out = ws.run(&["run", "t.yaml"]);
    if out.status.success() {
        Ok(output_dir(ws, "t", "ingest"))
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let cache = ws.file("artifacts/cache");
        let entries = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            entries,
            0,
            "a failed ingest left a cache entry: {}",
            stderr(&out)
        );
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

/// The `with:` lines of a pipeline that is refused before anything runs (exit 2); the message.
fn config_error(ws: &Ws, with: &str) -> String {
    let yaml = format!("name: t\nstages:\n  ingest:\n    uses: ingest_csv\n    with:\n{with}");
    ws.write("t.yaml", yaml);
    let out = ws.run(&["run", "t.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    stderr(&out)
}

/// The Amazon sentences and labels, in file order.
fn amazon_rows() -> Vec<(String, String)> {
    let tsv = std::fs::read_to_string(repo().join("data/raw/product_reviews.tsv")).unwrap();
    tsv.lines()
        .map(|line| {
            let (text, label) = line.rsplit_once('\t').unwrap();
            (text.to_string(), label.to_string())
        })
        .collect()
}

fn csv_of(rows: &[(String, String)]) -> String {
    let mut csv = String::from("text,label\n");
    for (text, label) in rows {
        csv.push_str(&format!("\"{}\",{label}\n", text.replace('"', "\"\"")));
    }
    csv
}

fn jsonl_of(rows: &[(String, String)]) -> String {
    rows.iter()
        .map(|(text, label)| {
            let label: i64 = label.parse().unwrap();
            format!("{}\n", serde_json::json!({"text": text, "label": label}))
        })
        .collect()
}

/// A Parquet file as pandas writes one: the given columns, nullable.
fn write_parquet(path: &std::path::Path, columns: Vec<(&str, arrow::array::ArrayRef)>) {
    use arrow::datatypes::{Field, Schema};
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
        .collect();
    let schema = std::sync::Arc::new(Schema::new(fields));
    let arrays = columns.into_iter().map(|(_, array)| array).collect();
    let batch = arrow::array::RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn amazon_parquet(ws: &Ws, name: &str, rows: &[(String, String)]) {
    let texts = StringArray::from_iter_values(rows.iter().map(|(t, _)| t.as_str()));
    let labels = Int64Array::from_iter_values(rows.iter().map(|(_, l)| l.parse::<i64>().unwrap()));
    write_parquet(
        &ws.file(name),
        vec![
            ("label", std::sync::Arc::new(labels)),
            ("text", std::sync::Arc::new(texts)),
        ],
    );
}

#[test]
fn jsonl_and_parquet_give_the_same_splits_as_the_tsv() {
    let ws = Ws::new();
    let rows = amazon_rows();
    ws.write("reviews.jsonl", jsonl_of(&rows));
    amazon_parquet(&ws, "reviews.parquet", &rows);
    let extra = "      drop_duplicates: true\n";
    let tsv = ingest(
        &ws,
        "data/raw/product_reviews.tsv",
        &format!("{TSV}{extra}"),
    )
    .unwrap();
    let named = format!("      text: text\n      label: label\n{extra}");
    for file in ["reviews.jsonl", "reviews.parquet"] {
        let dir = ingest(&ws, file, &named).unwrap();
        for split in ["train", "validation", "test"] {
            assert_eq!(
                read_split(&dir, split),
                read_split(&tsv, split),
                "{file} {split}"
            );
        }
        let stats = read_json(&dir.join("stats.json"));
        assert_eq!(stats["rows_read"], 1000, "{file}");
        assert_eq!(stats["dropped"]["duplicate_text"], 10, "{file}");
        assert_eq!(
            read_json(&dir.join("labels.json")),
            read_json(&tsv.join("labels.json"))
        );
    }
    // Parquet columns by index too (`label` is column 0 in this file).
    let dir = ingest(
        &ws,
        "reviews.parquet",
        &format!("      text: 1\n      label: 0\n{extra}"),
    )
    .unwrap();
    assert_eq!(read_split(&dir, "test"), read_split(&tsv, "test"));
}

#[test]
fn given_splits_are_kept_whole_and_the_rest_is_split_off_train() {
    let ws = Ws::new();
    let rows = amazon_rows();
    let (train_rows, test_rows) = rows.split_at(800);
    ws.write("train.csv", csv_of(train_rows));
    ws.write("test.jsonl", jsonl_of(test_rows));
    let with = "      splits: {train: train.csv, test: test.jsonl}\n      text: text\n      label: label\n";
    let dir = ingest_with(&ws, with).unwrap();
    let (test, test_labels) = read_split(&dir, "test");
    let expected: Vec<String> = test_rows.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(test, expected, "the test file, whole and in order");
    let expected_labels: Vec<i64> = test_rows.iter().map(|(_, l)| l.parse().unwrap()).collect();
    assert_eq!(test_labels, expected_labels);
    let (train, _) = read_split(&dir, "train");
    let (validation, _) = read_split(&dir, "validation");
    assert_eq!(
        (train.len(), validation.len()),
        (720, 80),
        "10% of train, stratified"
    );
    assert!(
        validation
            .iter()
            .all(|t| train_rows.iter().any(|(r, _)| r == t))
    );
    let stats = read_json(&dir.join("stats.json"));
    assert_eq!(
        stats["sources"],
        serde_json::json!({"train": "train.csv", "test": "test.jsonl"})
    );

    // All three given: nothing is split off, and a test row that repeats a train row is
    // dropped as a duplicate (the leak `drop_duplicates` guards against), named by file.
    amazon_parquet(&ws, "validation.parquet", &rows[700..800]);
    ws.write("train.csv", csv_of(&rows[..700]));
    let mut leaky = test_rows.to_vec();
    leaky.push(rows[3].clone());
    ws.write("test.jsonl", jsonl_of(&leaky));
    let with = "      splits: {train: train.csv, validation: validation.parquet, test: test.jsonl}\n      text: text\n      label: label\n      drop_duplicates: true\n";
    let dir = ingest_with(&ws, with).unwrap();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut expected = [Vec::new(), Vec::new(), Vec::new()];
    for (split, rows) in [&rows[..700], &rows[700..800], &leaky[..]]
        .into_iter()
        .enumerate()
    {
        for (text, _) in rows {
            if seen.insert(text.as_str()) {
                expected[split].push(text.clone());
            }
        }
    }
    assert_eq!(read_split(&dir, "validation").0, expected[1]);
    assert_eq!(read_split(&dir, "test").0, expected[2]);
    assert!(
        !expected[2].contains(&rows[3].0),
        "the leaked train row is dropped from test"
    );
    assert_eq!(read_split(&dir, "train").0, expected[0]);
    // The drops are named by file once there are several: PROVENANCE.md's duplicate lines
    // 286, 408, 525, 544 are train.csv's 287, 409, 526, 545 (a header line first), and 745 is
    // the validation file's row 45.
    let out = ws.run(&["run", "t.yaml", "--force", "ingest"]);
    assert!(out.status.success());
    let places = "11 with a duplicate text (train.csv lines 287, 409, 526, 545; validation.parquet row 45, …)";
    assert!(stderr(&out).contains(places), "{}", stderr(&out));

    // Settings that contradict each other, or the files, are refused before anything runs.
    let refused: [(&str, [&str; 2]); 5] = [
        (
            "      path: train.csv\n      splits: {train: train.csv}\n      text: text\n      label: label\n",
            ["key `with.splits`", "not both"],
        ),
        (
            "      text: text\n      label: label\n",
            ["key `with.path`", "missing"],
        ),
        (
            "      splits: {train: train.csv, test: test.jsonl}\n      text: text\n      label: label\n      split: {test: 0.3}\n",
            ["key `with.split.test`", "test.jsonl"],
        ),
        (
            "      path: test.jsonl\n      text: 0\n      label: label\n",
            ["key `with.text`", "name the key"],
        ),
        (
            "      path: test.jsonl\n      text: text\n      label: label\n      header: true\n",
            ["key `with.header`", "csv and tsv"],
        ),
    ];
    for (with, fragments) in refused {
        let err = config_error(&ws, with);
        assert!(fragments.iter().all(|f| err.contains(f)), "{with}: {err}");
    }
    // A given split whose every row is dropped is an error, not an empty split.
    // (A fresh workspace: `ingest_with` checks that a failure leaves no cache entry.)
    let ws = Ws::new();
    ws.write("train.csv", csv_of(&rows[..700]));
    ws.write("dup.jsonl", jsonl_of(&rows[..5]));
    let err = ingest_with(&ws, "      splits: {train: train.csv, test: dup.jsonl}\n      text: text\n      label: label\n      drop_duplicates: true\n").unwrap_err();
    assert!(
        err.contains("the test split is empty: every row of dup.jsonl was dropped"),
        "{err}"
    );
}

#[test]
fn broken_json_lines_name_the_line_and_are_errors_or_counted_skips() {
    let ws = Ws::new();
    let good = "{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"awful\", \"label\": 0}\n";
    let cases: [(&str, &[u8], &str); 6] = [
        (
            "bad.jsonl",
            b"{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"oops\", \n",
            "bad.jsonl:2: not valid JSON",
        ),
        (
            "key.jsonl",
            b"{\"text\": \"fine\", \"label\": 1}\n{\"body\": \"x\", \"label\": 0}\n",
            "key.jsonl:2: no key `text`; the object has: body, label",
        ),
        (
            "type.jsonl",
            b"{\"text\": 5, \"label\": 1}\n",
            "type.jsonl:1: key `text` holds a number, not a text",
        ),
        (
            "array.jsonl",
            b"[1, 2]\n",
            "array.jsonl:1: a list, not a JSON object",
        ),
        (
            "utf8.jsonl",
            b"{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"bad \xff\", \"label\": 0}\n",
            "utf8.jsonl:2: invalid UTF-8 at byte offset 43 of the file",
        ),
        (
            "multi.jsonl",
            b"{\"text\": \"fine\", \"label\": [0, 1]}\n",
            "multi.jsonl:1: the label is a list of labels; for several labels per text set `problem_type: multi_label_classification`",
        ),
    ];
    let named = "      text: text\n      label: label\n";
    for (name, contents, expected) in cases {
        let mut contents = contents.to_vec();
        contents.extend_from_slice(good.as_bytes());
        ws.write(name, contents);
        let err = ingest(&ws, name, named).unwrap_err();
        assert!(err.contains(expected), "{name}: {err}");
    }
    // Malformed rows can be skipped and counted; blank lines are no rows; null is empty.
    let rows = format!(
        "{good}\n{{\"text\": \"oops\", \n{{\"text\": null, \"label\": 1}}\n{{\"text\": \"no label\", \"label\": null}}\n{}{}",
        "{\"text\": \"great\", \"label\": 1}\n{\"text\": \"bad\", \"label\": 0}\n",
        "{\"text\": \"superb\", \"label\": 1}\n{\"text\": \"dire\", \"label\": 0}\n"
    );
    ws.write("mixed.jsonl", rows);
    let extra =
        format!("{named}      on_bad_row: skip\n      split: {{validation: 0.0, test: 0.5}}\n");
    let stats = read_json(
        &ingest(&ws, "mixed.jsonl", &extra)
            .unwrap()
            .join("stats.json"),
    );
    assert_eq!(stats["rows_read"], 9, "{stats}");
    assert_eq!(stats["dropped"]["bad_row"], 1);
    assert_eq!(stats["dropped"]["empty_text"], 1);
    assert_eq!(stats["dropped"]["empty_label"], 1);
    assert_eq!(stats["rows_kept"], 6);
    let lossy =
        format!("{named}      encoding: lossy\n      split: {{validation: 0.0, test: 0.5}}\n");
    ws.write(
        "utf8.jsonl",
        [
            b"{\"text\": \"bad \xff\", \"label\": 0}\n".as_slice(),
            good.as_bytes(),
            b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"no\", \"label\": 0}\n",
        ]
        .concat(),
    );
    let dir = ingest(&ws, "utf8.jsonl", &lossy).unwrap();
    let all: Vec<String> = ["train", "test"]
        .iter()
        .flat_map(|s| read_split(&dir, s).0)
        .collect();
    assert!(all.contains(&"bad \u{fffd}".to_string()), "{all:?}");
}

#[test]
fn parquet_columns_of_the_wrong_type_or_name_and_broken_files_are_named() {
    use arrow::array::{ArrayRef, Float64Array};
    use std::sync::Arc;
    let ws = Ws::new();
    let texts: ArrayRef = Arc::new(StringArray::from(vec![
        Some("fine"),
        None,
        Some("awful"),
        Some("great"),
        Some("bad"),
        Some("superb"),
        Some("dire"),
    ]));
    let labels: ArrayRef = Arc::new(Int64Array::from(vec![1, 1, 0, 1, 0, 1, 0]));
    write_parquet(
        &ws.file("r.parquet"),
        vec![("review", texts.clone()), ("stars", labels.clone())],
    );
    let err = ingest(&ws, "r.parquet", "      text: text\n      label: stars\n").unwrap_err();
    assert!(
        err.contains(
            "r.parquet: no column named `text` for the text; its columns are: review, stars"
        ),
        "{err}"
    );
    let err = ingest(&ws, "r.parquet", "      text: review\n      label: 5\n").unwrap_err();
    assert!(
        err.contains("the label column is index 5, but rows have 2 fields"),
        "{err}"
    );
    let err = ingest(&ws, "r.parquet", "      text: stars\n      label: review\n").unwrap_err();
    assert!(
        err.contains("r.parquet: the text column `stars` holds Int64; it must hold strings"),
        "{err}"
    );
    let floats: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]));
    write_parquet(
        &ws.file("f.parquet"),
        vec![("review", texts.clone()), ("score", floats)],
    );
    let err = ingest(&ws, "f.parquet", "      text: review\n      label: score\n").unwrap_err();
    assert!(
        err.contains(
            "the label column `score` holds Float64; for single_label_classification it must hold strings, integers or booleans (lists are multi-label data, floats regression targets: set `problem_type`)"
        ),
        "{err}"
    );
    ws.write("broken.parquet", "text,label\nnot parquet,1\n");
    let err = ingest(
        &ws,
        "broken.parquet",
        "      text: text\n      label: label\n",
    )
    .unwrap_err();
    assert!(
        err.contains("cannot read broken.parquet as Parquet"),
        "{err}"
    );
    // A null text is an empty one, dropped and counted by row.
    let dir = ingest(
        &ws,
        "r.parquet",
        "      text: review\n      label: stars\n      split: {validation: 0.0, test: 0.34}\n",
    )
    .unwrap();
    let stats = read_json(&dir.join("stats.json"));
    assert_eq!(stats["dropped"]["empty_text"], 1, "{stats}");
    assert_eq!(stats["rows_kept"], 6);
}

/// Parquet as pandas and `datasets` write the other tasks' labels: a list<string> column of
/// labels (multi-label), a float64 column and a list<float64> column (regression, one or two
/// targets); each read into the split files' float vectors, and a float label refused for
/// single-label classification with the setting that reads it named.
#[test]
fn parquet_label_lists_and_float_targets() {
    use arrow::array::builder::Float64Builder;
    use arrow::array::{ArrayRef, Float64Array, ListBuilder, StringBuilder};
    use std::sync::Arc;
    let ws = Ws::new();
    let texts: Vec<String> = (0..10).map(|i| format!("review number {i}")).collect();
    let mut tags = ListBuilder::new(StringBuilder::new());
    let mut pairs = ListBuilder::new(Float64Builder::new());
    for i in 0..10 {
        for tag in ["fit", "price", "colour"].iter().take(i % 3 + 1) {
            tags.values().append_value(tag);
        }
        tags.append(true);
        pairs.values().append_slice(&[i as f64, 0.5 * i as f64]);
        pairs.append(true);
    }
    let stars: ArrayRef = Arc::new(Float64Array::from_iter_values(
        (0..10).map(|i| 1.0 + (i % 5) as f64),
    ));
    write_parquet(
        &ws.file("r.parquet"),
        vec![
            (
                "text",
                Arc::new(StringArray::from_iter_values(&texts)) as ArrayRef,
            ),
            ("tags", Arc::new(tags.finish())),
            ("stars", stars),
            ("pair", Arc::new(pairs.finish())),
            (
                "price",
                Arc::new(Float64Array::from_iter_values(
                    (0..10).map(|i| 10.0 * i as f64),
                )),
            ),
        ],
    );
    let split = "      split: { validation: 0.2, test: 0.2 }\n";
    let dir = ingest(&ws, "r.parquet", &format!("      text: text\n      label: tags\n      problem_type: multi_label_classification\n{split}")).unwrap();
    let labels = read_json(&dir.join("labels.json"));
    assert_eq!(
        labels["names"],
        serde_json::json!(["colour", "fit", "price"])
    );
    let all: Vec<Vec<f32>> = ["train", "validation", "test"]
        .iter()
        .flat_map(|s| float_lists(&dir.join(format!("{s}.parquet")), "label"))
        .collect();
    assert_eq!(all.len(), 10);
    // Rows hold 1, 2 or 3 of the labels: fit; fit, price; fit, price, colour.
    assert!(
        all.iter()
            .all(|row| row[1] == 1.0 && (1.0..=3.0).contains(&row.iter().sum::<f32>()))
    );
    let dir = ingest(
        &ws,
        "r.parquet",
        &format!("      text: text\n      label: stars\n      problem_type: regression\n{split}"),
    )
    .unwrap();
    let values = float_lists(&dir.join("train.parquet"), "label");
    assert!(
        values
            .iter()
            .all(|v| v.len() == 1 && (1.0..=5.0).contains(&v[0]))
    );
    let dir = ingest(
        &ws,
        "r.parquet",
        &format!("      text: text\n      label: pair\n      problem_type: regression\n{split}"),
    )
    .unwrap();
    let labels = read_json(&dir.join("labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["pair_0", "pair_1"]));
    let values = float_lists(&dir.join("train.parquet"), "label");
    assert!(values.iter().all(|v| v.len() == 2 && v[1] == 0.5 * v[0]));
    // Several columns, one target each, named by their columns.
    let several = |label: &str| {
        format!("      text: text\n      label: {label}\n      problem_type: regression\n{split}")
    };
    let dir = ingest(&ws, "r.parquet", &several("[price, stars]")).unwrap();
    let labels = read_json(&dir.join("labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["price", "stars"]));
    let values = float_lists(&dir.join("train.parquet"), "label");
    assert!(
        values
            .iter()
            .all(|v| v.len() == 2 && v[0] % 10.0 == 0.0 && v[1] == 1.0 + (v[0] / 10.0) % 5.0)
    );
    // A fresh workspace: `ingest_with` checks that a failure leaves no cache entry.
    let fresh = Ws::new();
    std::fs::copy(ws.file("r.parquet"), fresh.file("r.parquet")).unwrap();
    let err = ingest(&fresh, "r.parquet", "      text: text\n      label: tags\n").unwrap_err();
    assert!(
        err.contains("r.parquet: the label column `tags` holds List("),
        "{err}"
    );
    assert!(err.contains("set `problem_type`"), "{err}");
    let err = ingest(&fresh, "r.parquet", &several("[stars, pair]")).unwrap_err();
    assert!(
        err.contains("`label` lists 2 columns, but rows hold 3 targets"),
        "{err}"
    );
}
