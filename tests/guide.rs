//! The guide (docs/guide/*.md) as a test, so that it can never drift from the tool.
//!
//! In chapter order, in one workspace (a copy of the repository's pipelines and data, as a
//! reader's checkout would be):
//! - every ```yaml block is either a fragment (first line `# fragment...`) or a complete
//!   pipeline whose first line names its file (`# pipelines/first.yaml`); a complete one is
//!   written there and validated by the real loader and plugins (`finetune run --dry-run`);
//! - every ```console block's `$ command` lines run through bash in the workspace with
//!   `finetune` on the PATH, and their output (stdout and stderr, as a terminal shows them)
//!   must match the lines under them. Numbers and hex digests match any number or digest of the
//!   same shape (durations, keys and float metrics vary between machines); `[..]` matches any
//!   text within a line, a line `...` any lines; a last line `[exit: N]` expects that status;
//! - every ```python block runs with `FINETUNE_PYTHON` (default `python3`); it needs pandas,
//!   pyarrow and transformers (docs/guide/requirements.txt), which .ci/run installs. Outside
//!   CI a missing one skips those blocks with a warning; in CI it fails.
//!
//! `FINETUNE_GUIDE_BLESS=1` rewrites the expected output of every command that differs;
//! `FINETUNE_GUIDE_BLESS=all` also rewrites each output that matches only by the shape of its
//! numbers and elides nothing (no `...`, no `[..]`), so that every chapter's numbers come from
//! one run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use regex::Regex;

struct Block {
    chapter: PathBuf,
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    body: Vec<String>,
}

fn chapters() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/guide"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

fn blocks(chapter: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(chapter).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in text.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    chapter: chapter.to_path_buf(),
                    line: index + 1,
                    info: info.trim().to_string(),
                    body: Vec::new(),
                })
            }
            (Some(_), Some("")) => blocks.push(open.take().unwrap()),
            (Some(block), _) => block.body.push(line.to_string()),
            (None, None) => {}
        }
    }
    assert!(
        open.is_none(),
        "{}: an unclosed code block",
        chapter.display()
    );
    blocks
}

/// Where a block is, for messages: `docs/guide/02-training.md:40`.
fn place(block: &Block) -> String {
    let relative = block.chapter.strip_prefix(repo()).unwrap_or(&block.chapter);
    format!("{}:{}", relative.display(), block.line)
}

/// One `$ command` with the output the guide shows for it.
struct Shown {
    command: String,
    expected: Vec<String>,
    exit: i32,
    /// Line indexes in the block body of the expected output (for blessing).
    body_range: std::ops::Range<usize>,
}

fn commands(block: &Block) -> Vec<Shown> {
    let mut shown: Vec<Shown> = Vec::new();
    for (index, line) in block.body.iter().enumerate() {
        if let Some(command) = line.strip_prefix("$ ") {
            shown.push(Shown {
                command: command.to_string(),
                expected: Vec::new(),
                exit: 0,
                body_range: index + 1..index + 1,
            });
        } else {
            let current = shown
                .last_mut()
                .unwrap_or_else(|| panic!("{}: output before any `$ command`", place(block)));
            current.body_range.end = index + 1;
            match line
                .strip_prefix("[exit: ")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                Some(code) => current.exit = code.parse().unwrap(),
                None => current.expected.push(line.clone()),
            }
        }
    }
    shown
}

/// Numbers and hex digests as placeholders: what a line means, not what this machine measured.
fn shape(line: &str) -> String {
    let digest = Regex::new(r"\b[0-9a-f]*[a-f][0-9a-f]*[0-9][0-9a-f]*\b|\b[0-9a-f]{8,}\b").unwrap();
    let number = Regex::new(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?").unwrap();
    let line = digest.replace_all(line.trim_end(), "<hex>");
    number.replace_all(&line, "<n>").into_owned()
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let (expected, actual) = (shape(expected), shape(actual));
    let parts: Vec<String> = expected.split("[..]").map(regex::escape).collect();
    Regex::new(&format!("^{}$", parts.join(".*")))
        .unwrap()
        .is_match(&actual)
}

/// Whether `actual` is `expected`, with `...` lines matching any run of lines.
fn output_matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| output_matches(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual.split_first().is_some_and(|(line, others)| {
            line_matches(first, line) && output_matches(rest, others)
        }),
    }
}

struct Guide {
    ws: Ws,
    path_env: String,
    python: String,
    bless: bool,
    /// Bless matching outputs too (those that elide nothing: no `...`, no `[..]`).
    bless_all: bool,
    failures: Vec<String>,
}

impl Guide {
    fn bash(&self, command: &str) -> (i32, String) {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("exec 2>&1\n{command}"))
            .current_dir(self.ws.path())
            .env("PATH", &self.path_env)
            .env("FINETUNE_MODEL_DIR", model_dir())
            .env("FINETUNE_PYTHON", &self.python)
            .env_remove("FINETUNE_HMAC_KEY")
            .env("COLUMNS", "100")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn pipeline(&mut self, block: &Block) {
        let first = block.body.first().map(String::as_str).unwrap_or("");
        if first.starts_with("# fragment") {
            return;
        }
        let file = first
            .strip_prefix("# ")
            .filter(|f| f.ends_with(".yaml"))
            .unwrap_or_else(|| {
                panic!(
                    "{}: a yaml block starts with `# fragment` or `# <file>.yaml`",
                    place(block)
                )
            });
        self.ws.write(file, block.body.join("\n") + "\n");
        let (code, output) = self.bash(&format!("finetune run --dry-run {file}"));
        if code != 0 {
            self.failures
                .push(format!("{}: {file} does not load:\n{output}", place(block)));
        }
    }

    /// Runs the block's commands; returns the body rewritten with actual outputs (blessing).
    fn console(&mut self, block: &Block) -> Option<Vec<String>> {
        let mut body = block.body.clone();
        let mut changed = false;
        for shown in commands(block) {
            let (code, output) = self.bash(&shown.command);
            let actual: Vec<&str> = output.lines().collect();
            if code == shown.exit && output_matches(&shown.expected, &actual) {
                let elided =
                    (shown.expected.iter()).any(|line| line == "..." || line.contains("[..]"));
                if !self.bless_all || elided || shown.expected.iter().eq(&actual) {
                    continue;
                }
            } else {
                self.failures.push(format!(
                    "{}: `{}` exited {code} (expected {}) and printed:\n{output}\nthe guide shows:\n{}",
                    place(block),
                    shown.command,
                    shown.exit,
                    shown.expected.join("\n")
                ));
            }
            let mut fresh: Vec<String> = actual.iter().map(|l| l.trim_end().to_string()).collect();
            if code != 0 {
                fresh.push(format!("[exit: {code}]"));
            }
            let offset = body.len() - block.body.len();
            body.splice(
                shown.body_range.start + offset..shown.body_range.end + offset,
                fresh,
            );
            changed = true;
        }
        changed.then_some(body)
    }

    fn python(&mut self, block: &Block) {
        let (has_pandas, _) =
            self.bash("\"$FINETUNE_PYTHON\" -c 'import pandas, pyarrow, transformers'");
        if has_pandas != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "{}: CI must provide pandas, pyarrow and transformers for {} (see .ci/run)",
                place(block),
                self.python
            );
            eprintln!(
                "warning: {} not run: {} lacks pandas, pyarrow or transformers (set FINETUNE_PYTHON)",
                place(block),
                self.python
            );
            return;
        }
        let script = self.ws.file("guide_snippet.py");
        std::fs::write(&script, block.body.join("\n") + "\n").unwrap();
        let (code, output) = self.bash("\"$FINETUNE_PYTHON\" guide_snippet.py");
        if code != 0 {
            self.failures.push(format!(
                "{}: the Python example fails:\n{output}",
                place(block)
            ));
        }
    }
}

#[test]
fn every_pipeline_and_command_in_the_guide_works_as_shown() {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let mut guide = Guide {
        ws: Ws::new(),
        path_env: format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
        python: std::env::var("FINETUNE_PYTHON").unwrap_or_else(|_| "python3".into()),
        bless: std::env::var_os("FINETUNE_GUIDE_BLESS").is_some(),
        bless_all: std::env::var_os("FINETUNE_GUIDE_BLESS").is_some_and(|v| v == "all"),
        failures: Vec::new(),
    };
    let chapters = chapters();
    assert_eq!(chapters.len(), 9, "nine chapters: {chapters:?}");
    for chapter in &chapters {
        let mut text: Vec<String> = std::fs::read_to_string(chapter)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        // Later blocks first, so that blessing one does not move the next.
        let mut rewrites = Vec::new();
        for block in blocks(chapter) {
            match block.info.as_str() {
                "yaml" => guide.pipeline(&block),
                "console" => {
                    if let Some(body) = guide.console(&block) {
                        rewrites.push((block.line, block.body.len(), body));
                    }
                }
                "python" => guide.python(&block),
                _ => {}
            }
        }
        if guide.bless && !rewrites.is_empty() {
            for (line, old_len, body) in rewrites.into_iter().rev() {
                text.splice(line..line + old_len, body);
            }
            std::fs::write(chapter, text.join("\n") + "\n").unwrap();
        }
    }
    assert!(
        guide.failures.is_empty(),
        "{} differences between the guide and the tool{}:\n\n{}",
        guide.failures.len(),
        if guide.bless { " (blessed)" } else { "" },
        guide.failures.join("\n\n")
    );
}

#[test]
fn the_readme_links_the_guide_and_every_chapter_is_in_its_contents() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("docs/guide/README.md"));
    let contents = std::fs::read_to_string(repo().join("docs/guide/README.md")).unwrap();
    for chapter in chapters() {
        let name = chapter.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            contents.contains(&format!("({name})")),
            "{name} is not in the contents"
        );
    }
}

#[test]
fn output_matching_compares_shapes_and_honours_wildcards() {
    let lines = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
    assert!(output_matches(
        &lines("[train] done in 51.75s\nkey 34b63251eacc"),
        &["[train] done in 3.02s", "key 0f1e2d3c4b5a"]
    ));
    assert!(!output_matches(&lines("[train] done"), &["[train] FAILED"]));
    assert!(output_matches(
        &lines("first\n...\nlast"),
        &["first", "a", "b", "last"]
    ));
    assert!(!output_matches(
        &lines("first\nlast"),
        &["first", "a", "last"]
    ));
    assert!(output_matches(&lines("path [..]/x"), &["path /tmp/abc/x"]));
}
