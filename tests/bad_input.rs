//! The bad-input suite: every way a user's data or pipeline can be wrong, run through the
//! embedded default pipeline as a user would meet it. Each case names its expected exit code
//! and message, and after each the cache must hold nothing half-written: no staging leftovers,
//! only complete entries (manifest present, every listed file there with its size), and nothing
//! published for the stage that failed.

mod common;

use std::path::Path;

use common::*;

/// The shipped data file the default pipeline ingests.
const DATA: &str = "data/raw/product_reviews.tsv";

struct Case {
    name: &'static str,
    /// Replaces the data file's contents.
    data: Option<Vec<u8>>,
    /// (from, to) replacements in pipelines/reviews.yaml.
    edits: &'static [(&'static str, &'static str)],
    /// Replaces pipelines/reviews.yaml whole.
    pipeline: Option<String>,
    /// Stages to run (empty: all).
    targets: &'static [&'static str],
    exit_code: i32,
    /// The stage that fails (None: the pipeline is refused before anything runs).
    failing_stage: Option<&'static str>,
    message: String,
}

fn cases() -> Vec<Case> {
    let amazon = std::fs::read_to_string(repo().join(DATA)).unwrap();
    let giant_line = {
        let mut text = "word ".repeat(1_000_000).into_bytes();
        text.extend_from_slice(b"\t1\n");
        text.extend_from_slice(amazon.as_bytes());
        text
    };
    let alias_bomb = {
        let mut yaml =
            String::from("name: reviews\nparams:\n  z: &z [x, x, x, x, x, x, x, x, x, x]\n");
        let mut previous = 'z';
        for level in 0..9u8 {
            let name = (b'a' + level) as char;
            yaml.push_str(&format!(
                "  {name}: &{name} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
            ));
            previous = name;
        }
        yaml
    };
    let run_failure = |stage, message: &str| (1, Some(stage), message.to_string());
    let refused = |message: &str| (2, None, message.to_string());
    let case =
        |name, data: Option<Vec<u8>>, edits, outcome: (i32, Option<&'static str>, String)| Case {
            name,
            data,
            edits,
            pipeline: None,
            targets: &[],
            exit_code: outcome.0,
            failing_stage: outcome.1,
            message: outcome.2,
        };
    vec![
        case(
            "an empty file",
            Some(Vec::new()),
            &[],
            run_failure("ingest", "data/raw/product_reviews.tsv has no data rows"),
        ),
        case(
            "a header and no rows",
            Some(b"sentence\tlabel\n".to_vec()),
            &[("format: tsv", "format: tsv\n      header: true")],
            run_failure(
                "ingest",
                "data/raw/product_reviews.tsv has no data rows (only a header, or nothing)",
            ),
        ),
        case(
            "one class only",
            Some(
                amazon
                    .lines()
                    .filter(|line| line.ends_with("\t1"))
                    .map(|line| format!("{line}\n"))
                    .collect::<String>()
                    .into_bytes(),
            ),
            &[(
                "      labels: [\"0\", \"1\"]   # 0 = negative, 1 = positive\n",
                "",
            )],
            run_failure("ingest", "only one label (1) in the data"),
        ),
        case(
            "a label missing from the label map",
            Some(format!("{amazon}A fine toaster.\t2\n").into_bytes()),
            &[],
            run_failure(
                "ingest",
                "data/raw/product_reviews.tsv:1001: label `2` is not in `labels` (0, 1)",
            ),
        ),
        case(
            "a validation split left empty by stratification",
            Some(b"good\t1\nbad\t0\nfine\t1\nawful\t0\n".to_vec()),
            &[],
            run_failure(
                "ingest",
                "the validation split is empty: 4 rows split per label are too few for a validation fraction of 0.1",
            ),
        ),
        case(
            "bytes that are not UTF-8",
            Some([amazon.as_bytes(), b"caf\xe9\t1\n"].concat()), // Latin-1 é
            &[],
            run_failure(
                "ingest",
                "data/raw/product_reviews.tsv:1001: invalid UTF-8 in the text field at byte offset 58229 of the file (set `encoding: lossy` to replace bad bytes)",
            ),
        ),
        case(
            "a 5 MB single line",
            Some(giant_line),
            &[],
            run_failure(
                "ingest",
                "data/raw/product_reviews.tsv:1: the text is 4999999 bytes, over `max_text_bytes` (1048576) (set `on_bad_row: skip` to skip such rows)",
            ),
        ),
        Case {
            targets: &["ingest"],
            ..case(
                "a text that is only whitespace (dropped, counted and reported, not an error)",
                Some(format!("Works well.\t1\n   \t0\n{amazon}").into_bytes()),
                &[],
                (
                    0,
                    None,
                    "dropped 1 of 1002 rows: 1 with an empty or whitespace-only text (line 2)"
                        .into(),
                ),
            )
        },
        case(
            "a pipeline name that escapes the workspace",
            None,
            &[("name: reviews", "name: ../../reviews")],
            refused(
                "pipelines/reviews.yaml:3:7: key `name`: `../../reviews` would leave the workspace",
            ),
        ),
        Case {
            pipeline: Some(alias_bomb),
            ..case(
                "a YAML alias bomb",
                None,
                &[],
                refused(
                    "pipelines/reviews.yaml:6:9: the document expands to more than 100000 values (an alias bomb?); refusing it",
                ),
            )
        },
        case(
            "a negative learning rate",
            None,
            &[("lr: 1.0e-3", "lr: -1.0e-3")],
            refused(
                "pipelines/reviews.yaml:35:9: stage `train`, key `with.training.lr`: -0.001 is not a positive learning rate",
            ),
        ),
        case(
            "batch size 0",
            None,
            &[("batch_size: 16", "batch_size: 0")],
            refused(
                "pipelines/reviews.yaml:34:9: stage `train`, key `with.training.batch_size`: must be at least 1",
            ),
        ),
        case(
            "max_length 100000",
            None,
            &[("max_length: 64", "max_length: 100000")],
            refused(
                "pipelines/reviews.yaml:26:7: stage `tokenize`, key `with.max_length`: 100000 is above the limit of 8192 tokens",
            ),
        ),
        case(
            "a memory budget smaller than one sample",
            None,
            &[(
                "        epochs: 8\n",
                "        epochs: 8\n        max_memory: 1MiB\n",
            )],
            run_failure(
                "train",
                "out of memory with a micro-batch of 1 at sequence length 42 (max_memory: 1MiB)",
            ),
        ),
    ]
}

#[test]
fn every_bad_input_gets_its_message_and_exit_code_and_leaves_the_cache_whole() {
    let mut failures = Vec::new();
    for case in cases() {
        let ws = Ws::new();
        if let Some(data) = &case.data {
            ws.write(DATA, data);
        }
        let mut yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
        for (from, to) in case.edits {
            assert!(
                yaml.contains(from),
                "{}: the pipeline has no {from:?}",
                case.name
            );
            yaml = yaml.replace(from, to);
        }
        if let Some(whole) = &case.pipeline {
            yaml = whole.clone();
        }
        ws.write("pipelines/reviews.yaml", yaml);

        let mut args = vec!["run"];
        args.extend_from_slice(case.targets);
        let out = ws.run(&args);
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        if out.status.code() != Some(case.exit_code) || !printed.contains(&case.message) {
            failures.push(format!(
                "{}: expected exit {} and {:?}, got exit {:?}:\n{printed}",
                case.name,
                case.exit_code,
                case.message,
                out.status.code()
            ));
            continue;
        }
        if let Err(why) = cache_is_whole(&ws, case.failing_stage) {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// No staging leftovers, only complete entries, nothing published for `failed`.
fn cache_is_whole(ws: &Ws, failed: Option<&str>) -> Result<(), String> {
    let artifacts = ws.file("artifacts");
    let leftovers = list(&artifacts.join("tmp"));
    if !leftovers.is_empty() {
        return Err(format!("staging leftovers: {leftovers:?}"));
    }
    for entry in list(&artifacts.join("cache")) {
        let manifest = entry.join(".finetune-manifest.json");
        let text = std::fs::read_to_string(&manifest)
            .map_err(|e| format!("{} has no manifest: {e}", entry.display()))?;
        let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        for file in manifest["files"].as_array().into_iter().flatten() {
            let path = entry.join(file["path"].as_str().unwrap_or_default());
            let size = std::fs::metadata(&path).map(|m| m.len()).ok();
            if size != file["size"].as_u64() {
                return Err(format!("{} is not as its manifest says", path.display()));
            }
        }
    }
    if let Some(stage) = failed
        && artifacts.join("runs/reviews").join(stage).exists()
    {
        return Err(format!("the failed stage `{stage}` has a published output"));
    }
    Ok(())
}

fn list(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}
