//! Sentence pairs (`text_pair:`): the tokenizer's pair template and truncation as Python's
//! fast tokenizer gives them, and a pair model trained, evaluated and applied by `predict`.

mod common;

use arrow::array::{Array, Int32Array, ListArray, StringArray};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The golden rows' texts and Python's ids for each alone (`[CLS] … [SEP]`).
fn golden() -> Vec<(String, Vec<i32>)> {
    let path = repo().join("tests/fixtures/golden/tokenize_minilm.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = row["input_ids"].as_array().unwrap();
            let ids = ids.iter().map(|v| v.as_i64().unwrap() as i32).collect();
            (row["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// (text, text_pair, input_ids, token_type_ids) of every row of a tokenize split.
fn read_pairs(path: &std::path::Path) -> Vec<(String, String, Vec<i32>, Vec<i32>)> {
    let file = std::fs::File::open(path).unwrap();
    let mut rows = Vec::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
    {
        let batch = batch.unwrap();
        let strings = |name: &str| {
            let column = batch.column_by_name(name).unwrap();
            column
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let lists = |name: &str| {
            let column = batch.column_by_name(name).unwrap();
            column.as_any().downcast_ref::<ListArray>().unwrap().clone()
        };
        let (texts, pairs) = (strings("text"), strings("text_pair"));
        let (ids, types) = (lists("input_ids"), lists("token_type_ids"));
        let int32 = |list: &ListArray, i: usize| {
            let row = list.value(i);
            row.as_any()
                .downcast_ref::<Int32Array>()
                .unwrap()
                .values()
                .to_vec()
        };
        for i in 0..batch.num_rows() {
            rows.push((
                texts.value(i).to_string(),
                pairs.value(i).to_string(),
                int32(&ids, i),
                int32(&types, i),
            ));
        }
    }
    rows
}

/// Golden texts paired off (row 2k with row 2k+1; with `first_under`, only first texts of
/// fewer tokens), tokenized with MiniLM's tokenizer.json.
fn tokenized_pairs(
    max_length: usize,
    truncation: &str,
    first_under: Option<usize>,
) -> (Vec<(String, Vec<i32>)>, Ws) {
    let golden = golden();
    let ws = Ws::new();
    let tsv: String = golden
        .chunks_exact(2)
        .filter(|pair| first_under.is_none_or(|n| pair[0].1.len() < n))
        .enumerate()
        .map(|(i, pair)| format!("{}\t{}\t{}\n", pair[0].0, pair[1].0, i % 2))
        .collect();
    ws.write("pairs.tsv", tsv);
    ws.write(
        "tok.yaml",
        format!(
            "name: tok\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {{path: pairs.tsv, format: tsv, text: 0, text_pair: 1, label: 2, trim: false, split: {{validation: 0.0, test: 0.0}}}}\n  tokenize:\n    uses: tokenize\n    needs: [ingest]\n    with: {{tokenizer: {{from: \"{}\"}}, max_length: {max_length}, truncation: {truncation}}}\n",
            model_dir().display()
        ),
    );
    ws.run_ok(&["tok.yaml"]);
    (golden, ws)
}

/// Python's `tokenizer(a, b)` for BERT is `[CLS] a [SEP]` (type 0) then `b [SEP]` (type 1):
/// each golden single-text encoding, the second without its [CLS].
#[test]
fn pairs_follow_berts_template_with_token_types() {
    let (golden, ws) = tokenized_pairs(512, "longest_first", None);
    let single: std::collections::HashMap<&str, &Vec<i32>> =
        golden.iter().map(|(t, ids)| (t.as_str(), ids)).collect();
    let rows = read_pairs(&output_dir(&ws, "tok", "tokenize").join("train.parquet"));
    assert_eq!(rows.len(), golden.len() / 2);
    for (a, b, ids, types) in &rows {
        let (a_ids, b_ids) = (single[a.as_str()], single[b.as_str()]);
        let expected: Vec<i32> = a_ids.iter().chain(&b_ids[1..]).copied().collect();
        assert_eq!(ids, &expected, "ids of ({a:?}, {b:?})");
        let expected_types: Vec<i32> = std::iter::repeat_n(0, a_ids.len())
            .chain(std::iter::repeat_n(1, b_ids.len() - 1))
            .collect();
        assert_eq!(types, &expected_types, "types of ({a:?}, {b:?})");
    }
}

/// `only_second` cuts the second text only, keeping both [SEP]s, to exactly `max_length`.
#[test]
fn only_second_truncation_cuts_the_second_text() {
    let max = 24;
    let (golden, ws) = tokenized_pairs(max, "only_second", Some(max - 4));
    let single: std::collections::HashMap<&str, &Vec<i32>> =
        golden.iter().map(|(t, ids)| (t.as_str(), ids)).collect();
    let out = output_dir(&ws, "tok", "tokenize");
    let mut cut = 0;
    for (a, b, ids, _) in read_pairs(&out.join("train.parquet")) {
        let (a_ids, b_ids) = (single[a.as_str()], single[b.as_str()]);
        let room = max - a_ids.len() - 1;
        let kept = &b_ids[1..b_ids.len() - 1];
        let kept = &kept[..kept.len().min(room)];
        let expected: Vec<i32> = a_ids.iter().chain(kept).chain([&102]).copied().collect();
        assert_eq!(ids, expected, "({a:?}, {b:?})");
        cut += usize::from(a_ids.len() + b_ids.len() - 1 > max);
    }
    assert!(cut > 0, "no pair was long enough to cut");
    let stats = read_json(&out.join("stats.json"));
    assert_eq!(stats["splits"]["train"]["truncated"], cut);
}

/// The clothing reviews' title and text as a pair, labelled by whether the reviewer
/// recommends the item: trained, evaluated, and `predict --pairs` agrees with evaluate.
#[test]
fn a_pair_model_trains_and_predict_takes_pairs() {
    let ws = Ws::new();
    let data = ws.file("data/raw");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        repo().join("data/raw/womens_clothing_reviews.csv"),
        data.join("clothing.csv"),
    )
    .unwrap();
    ws.write(
        "pairs.yaml",
        r#"name: pairs
stages:
  ingest:
    uses: ingest_csv
    with:
      path: data/raw/clothing.csv
      text: Title
      text_pair: Review Text
      label: Recommended IND
      label_names: { "0": not recommended, "1": recommended }
      split: { validation: 0.1, test: 0.2, sample: 400 }
  tokenize:
    uses: tokenize
    needs: [ingest]
    with: { tokenizer: { train: wordpiece, vocab_size: 2000 }, max_length: 48 }
  train:
    uses: train
    needs: [tokenize]
    with:
      model: { scratch: { layers: 1, hidden: 32, heads: 2 } }
      training: { epochs: 1, batch_size: 16, lr: 1.0e-3 }
  evaluate:
    uses: evaluate
    needs: [tokenize, train]
"#,
    );
    ws.run_ok(&["pairs.yaml"]);
    let tokenized = read_pairs(&output_dir(&ws, "pairs", "tokenize").join("test.parquet"));
    assert!(tokenized.iter().all(|(_, _, _, types)| types.contains(&1)));
    let file =
        std::fs::File::open(output_dir(&ws, "pairs", "evaluate").join("predictions.parquet"))
            .unwrap();
    let batch = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let strings = |name: &str| {
        let column = batch.column_by_name(name).unwrap();
        column
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone()
    };
    let (texts, pairs, predicted) = (strings("text"), strings("text_pair"), strings("prediction"));
    let probabilities = batch.column_by_name("probabilities").unwrap();
    let probabilities = probabilities.as_any().downcast_ref::<ListArray>().unwrap();
    let rows = texts.len().min(30);
    // Pair texts hold no tabs or newlines once trimmed in these rows; skip any that do.
    let usable: Vec<usize> = (0..rows)
        .filter(|&i| !format!("{}{}", texts.value(i), pairs.value(i)).contains(['\t', '\n', '\r']))
        .collect();
    assert!(usable.len() >= 10);
    let input: String = usable
        .iter()
        .map(|&i| format!("{}\t{}\n", texts.value(i), pairs.value(i)))
        .collect();
    let predict = [
        "predict",
        "--model",
        "artifacts/runs/pairs/train",
        "--pairs",
    ];
    let out = ws.run_with_stdin(&[&predict[..], &["--json"]].concat(), &input);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), usable.len());
    for (line, &i) in lines.iter().zip(&usable) {
        assert_eq!(line["text_pair"], pairs.value(i));
        assert_eq!(line["label"], predicted.value(i));
        let expected = probabilities.value(i);
        let expected = expected
            .as_any()
            .downcast_ref::<arrow::array::Float32Array>()
            .unwrap();
        let recommended = line["probabilities"]["recommended"].as_f64().unwrap();
        assert!((recommended - f64::from(expected.value(1))).abs() < 1e-5);
    }
    // A --pairs line without a tab is a usage error naming the line; so is no input at all.
    let out = ws.run_with_stdin(&predict, "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = ws.run_with_stdin(&predict, "a\tb\nno tab here\n");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("stdin line 2"), "{}", stderr(&out));
}
