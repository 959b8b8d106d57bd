//! Fuzzes the pipeline loader (YAML reader, interpolation, schema checks of every plugin,
//! the DAG): whatever the bytes, loading ends in a pipeline or an error that names the file
//! and a line inside it, never a panic, a hang or an abort. Inputs are random text over
//! YAML's punctuation and mutations of the shipped pipelines. Cases are bounded (set
//! `PROPTEST_CASES` for a longer hunt); what a hunt finds goes into tests/fuzz-corpus/pipeline,
//! which runs every time.

use std::path::{Path, PathBuf};

use finetune::pipeline::Pipeline;
use finetune::plan::Plan;
use finetune::workspace::Workspace;
use proptest::prelude::*;

/// The binary's own registry: a new plugin is fuzzed as soon as it is installed.
#[path = "../src/main.rs"]
#[allow(dead_code)]
mod binary;

fn env(name: &str) -> Option<String> {
    match name {
        "EP" => Some("3".into()),
        "TEXT" => Some("a b; c".into()),
        _ => None,
    }
}

/// Loads `source` as far as `finetune dag` would; returns the error text, if any.
fn load(source: &str) -> Option<String> {
    let file = Path::new("fuzz.yaml");
    let pipeline = match Pipeline::parse(file, source, &env) {
        Ok(pipeline) => pipeline,
        Err(err) => return Some(checked(err.to_string(), source)),
    };
    static ROOT: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let workspace = Workspace::new(root.path()).expect("a workspace");
    match Plan::build(pipeline, &binary::plugins(), &workspace) {
        Ok(_) => None,
        Err(err) => Some(checked(err.to_string(), source)),
    }
}

/// An error must say `fuzz.yaml:LINE:COL:` with the line inside the file.
fn checked(error: String, source: &str) -> String {
    let place = error
        .strip_prefix("fuzz.yaml:")
        .unwrap_or_else(|| panic!("the error does not name the file: {error}"));
    let line: usize = place
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("the error names no line: {error}"));
    assert!(
        line <= source.lines().count() + 1,
        "line {line} is past the end of the file: {error}"
    );
    error
}

fn shipped() -> Vec<String> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        "pipelines/reviews.yaml",
        "pipelines/reviews-minilm.yaml",
        "tests/fixtures/five.yaml",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(repo.join(p)).unwrap())
    .collect()
}

/// One edit of a text: bytes `at..at+len` replaced by `with` (on char boundaries).
fn mutate(text: &str, at: usize, len: usize, with: &str) -> String {
    let floor = |i: usize| {
        (0..=i.min(text.len()))
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0)
    };
    let start = floor(at % (text.len() + 1));
    let end = floor(start + len);
    format!("{}{with}{}", &text[..start], &text[end..])
}

const PUNCTUATION: &str = "[a-z0-9:{}\\[\\],&*!<>|'\"#%@` \n\t.$_-]{0,80}";

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_text_loads_or_is_located(text in "[a-z0-9:{}\\[\\],&*!<>|'\"#%@` \n\t.$_-]{0,300}") {
        load(&text);
    }

    #[test]
    fn a_mutated_pipeline_loads_or_is_located(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), 0usize..20, PUNCTUATION), 1..4),
    ) {
        let mut text = shipped()[which].clone();
        for (at, len, with) in &edits {
            text = mutate(&text, *at, *len, with);
        }
        load(&text);
    }
}

/// Inputs earlier hunts (and issue 24) found, each with the error it must give or `ok`:
/// the first line of each file is `# expect: ok` or `# expect: TEXT`.
#[test]
fn the_corpus_loads_as_recorded() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus/pipeline");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the corpus is missing: {}", dir.display());
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        let expect = source
            .trim_start_matches('\u{feff}')
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", file.display()));
        match (load(&source), expect) {
            (None, "ok") => {}
            (Some(err), expected) if expected != "ok" => {
                assert!(err.contains(expected), "{}: {err}", file.display());
            }
            (got, _) => panic!("{}: expected {expect}, got {got:?}", file.display()),
        }
    }
}
