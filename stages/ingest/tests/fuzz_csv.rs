//! Fuzzes the CSV/TSV reader through the `ingest_csv` stage: for any bytes and any reading
//! options, a run ends in outputs or an error naming the file (or the split that cannot be
//! made), never a panic. When it succeeds,
//! the outputs are consistent: every kept row in exactly one split, and the counts in
//! stats.json add up. Cases are bounded (set `PROPTEST_CASES` for a longer hunt); what a hunt
//! finds goes into tests/fuzz-corpus, which runs every time.

use std::path::{Path, PathBuf};

use finetune_core::{ConfigureContext, RunContext, SilentReporter, Stage};
use finetune_ingest::IngestCsv;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Runs ingest on `bytes` with `with` (its `path` set here); the error text, or the stats.
fn ingest(bytes: &[u8], mut with: Value) -> Result<Value, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.csv"), bytes).unwrap();
    with["path"] = json!("data.csv");
    let configure = ConfigureContext {
        workspace: dir.path().to_path_buf(),
        stage: "ingest".into(),
        upstream: vec![],
        key_variables: vec![],
    };
    let job = IngestCsv
        .configure(&with, &configure)
        .map_err(|e| format!("config: {e}"))?;
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let ctx = RunContext {
        workspace: dir.path().to_path_buf(),
        stage: "ingest".into(),
        cache_key: "fuzz".into(),
        out_dir: out.clone(),
        scratch_dir: dir.path().join("scratch"),
        upstream: vec![],
        reporter: &SilentReporter,
    };
    match job.run(&ctx) {
        Err(err) => {
            let text = format!("{err:#}");
            // A file problem names the file; a split that cannot be made names the split.
            assert!(
                text.contains("data.csv") || text.contains("split"),
                "the error names neither the file nor the split: {text}"
            );
            Err(text)
        }
        Ok(()) => Ok(consistent(&out)),
    }
}

/// The outputs of a successful run agree with each other; returns stats.json.
fn consistent(out: &Path) -> Value {
    for split in ["train", "validation", "test", "labels", "stats"] {
        let name = if ["labels", "stats"].contains(&split) {
            format!("{split}.json")
        } else {
            format!("{split}.parquet")
        };
        assert!(out.join(&name).is_file(), "no {name}");
    }
    let stats: Value =
        serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap();
    stats
}

/// Bytes that stress a CSV reader: delimiters, quotes, line ends, invalid UTF-8, text.
fn csv_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b",".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"0".to_vec()),
        Just(b"1".to_vec()),
        Just(b"text,label\n".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b"\xef\xbb\xbf".to_vec()),
        Just(vec![0u8]),
        "[a-z ]{1,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..6),
    ];
    proptest::collection::vec(piece, 0..60).prop_map(|pieces| pieces.concat())
}

fn options() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("csv"), Just("tsv")],
        prop_oneof![Just(json!(null)), Just(json!(true)), Just(json!(false))],
        prop_oneof![Just(json!(null)), Just(json!(true)), Just(json!(false))],
        prop_oneof![
            Just((json!(0), json!(1))),
            Just((json!("text"), json!("label")))
        ],
        prop_oneof![Just("error"), Just("skip")],
        prop_oneof![Just("utf8"), Just("lossy")],
        any::<bool>(),
        1usize..64,
    )
        .prop_map(
            |(format, header, quoting, (text, label), bad, encoding, dups, max)| {
                let mut with = json!({
                    "format": format, "text": text, "label": label, "on_bad_row": bad,
                    "encoding": encoding, "drop_duplicates": dups, "max_text_bytes": max,
                    "split": { "validation": 0.2, "test": 0.2, "seed": 1 },
                });
                if !header.is_null() {
                    with["header"] = header;
                }
                if !quoting.is_null() {
                    with["quoting"] = quoting;
                }
                with
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_ingest_or_fail_naming_the_file(bytes in csv_bytes(), with in options()) {
        let _ = ingest(&bytes, with);
    }
}

/// Files earlier hunts found, each with options and the outcome it must have: beside
/// `NAME.csv` lies `NAME.json`, `{"with": {...}, "expect": "ok" | "error containing TEXT"}`.
#[test]
fn the_corpus_ingests_as_recorded() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "the corpus is missing: {}", dir.display());
    for case in cases {
        let spec: Value = serde_json::from_slice(&std::fs::read(&case).unwrap()).unwrap();
        let bytes = std::fs::read(case.with_extension("csv")).unwrap();
        let expect = spec["expect"].as_str().unwrap();
        match (ingest(&bytes, spec["with"].clone()), expect) {
            (Ok(_), "ok") => {}
            (Err(err), expected) if expected != "ok" => {
                assert!(err.contains(expected), "{}: {err}", case.display());
            }
            (got, _) => panic!("{}: expected {expect}, got {got:?}", case.display()),
        }
    }
}
