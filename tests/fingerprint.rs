//! Fingerprints through the binary: the default pipeline signs its outputs, `finetune verify`
//! passes on them and names every change (a flipped byte in a checkpoint, a truncated log, an
//! added file, a deleted file), a wrong key and a missing key; the key is never written or
//! printed. Also `predict` and `metrics` on the same run.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};

use common::*;
use serde_json::Value;

const KEY: &str = "a-team-key-for-tests-0123456789";
const OTHER_KEY: &str = "somebody-elses-key-9876543210";

fn with_key(ws: &Ws, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = ws.command(args);
    if let Some(key) = key {
        command.env("FINETUNE_HMAC_KEY", key);
    }
    command.output().expect("run finetune")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `finetune verify` with `key`; returns (passed, stdout).
fn verify(ws: &Ws, key: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = with_key(ws, key, &all);
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "{}",
        stderr(&out)
    );
    (out.status.success(), stdout(&out) + &stderr(&out))
}

/// Lets the test change a published (read-only) output file; returns its bytes to restore.
fn writable(path: &Path) -> Vec<u8> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::read(path).unwrap()
}

/// Every file under `dir`, with its bytes.
fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
}

fn assert_secret_absent(ws: &Ws, secret: &str, outputs: &[&str]) {
    let mut files = Vec::new();
    all_files(&ws.file("artifacts"), &mut files);
    all_files(&ws.file("pipelines"), &mut files);
    assert!(files.len() > 30, "{} files", files.len());
    for (path, bytes) in &files {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the key is written in {path}"
        );
    }
    for text in outputs {
        assert!(!text.contains(secret), "the key is printed: {text}");
    }
}

#[test]
fn verify_passes_on_a_signed_run_and_names_every_change_and_key_problem() {
    let ws = Ws::new();
    short_run(&ws);
    let run = with_key(&ws, Some(KEY), &["run"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let train = output_dir(&ws, "reviews", "train");
    let evaluate = output_dir(&ws, "reviews", "evaluate");

    // The train stage signs each checkpoint and its whole output; the fingerprint stage signs
    // train's and evaluate's outputs together.
    assert!(train.join("fingerprint.json").is_file());
    assert!(
        train
            .join("checkpoints/checkpoint-60/fingerprint.json")
            .is_file()
    );
    let fingerprint =
        read_json(&output_dir(&ws, "reviews", "fingerprint").join("fingerprint.json"));
    let manifest = &fingerprint["manifest"];
    let paths: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for expected in [
        "train/checkpoints/checkpoint-60/model.safetensors",
        "train/logs/train.jsonl",
        "train/metrics.json",
        "evaluate/metrics.json",
        "evaluate/confusion_matrix.svg",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} not covered: {paths:?}"
        );
    }
    assert_eq!(fingerprint["key_source"]["name"], "FINETUNE_HMAC_KEY");
    let context = &manifest["context"];
    assert_eq!(context["upstream"][0]["stage"], "train");
    assert_eq!(
        context["upstream"][0]["params"]["training"]["max_steps"],
        60
    );
    assert_eq!(
        context["upstream"][0]["fingerprint"]["mac"],
        read_json(&train.join("fingerprint.json"))["mac"]
    );
    assert!(context["environment"]["cpu"].is_string());
    assert_eq!(
        context["environment"]["finetune_version"],
        env!("CARGO_PKG_VERSION")
    );

    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(passed, "{report}");
    assert!(
        report.contains("ok      artifacts/runs/reviews/train:"),
        "{report}"
    );
    assert!(
        report.contains("ok      artifacts/runs/reviews/fingerprint:"),
        "{report}"
    );
    let checkpoint = "artifacts/runs/reviews/train/checkpoints/checkpoint-30";
    let (passed, report) = verify(&ws, Some(KEY), &[checkpoint]);
    assert!(passed && report.contains("ok "), "{report}");

    // Each change, then put back: verify fails naming the file.
    let flip = train.join("checkpoints/checkpoint-60/optimizer.bpk");
    let original = writable(&flip);
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x01;
    std::fs::write(&flip, &flipped).unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(!passed);
    assert!(
        report.contains(
            "changed  train/checkpoints/checkpoint-60/optimizer.bpk (same size, other content)"
        ),
        "{report}"
    );
    assert!(
        report.contains("changed  checkpoints/checkpoint-60/optimizer.bpk"),
        "train's own fingerprint catches it too: {report}"
    );
    std::fs::write(&flip, &original).unwrap();

    let log = train.join("logs/train.jsonl");
    let original = writable(&log);
    std::fs::write(&log, &original[..original.len() / 2]).unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(!passed);
    let truncated = format!(
        "changed  train/logs/train.jsonl (size {} -> {})",
        original.len(),
        original.len() / 2
    );
    assert!(report.contains(&truncated), "{report}");
    std::fs::write(&log, &original).unwrap();

    std::fs::set_permissions(&evaluate, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(evaluate.join("notes.txt"), "added").unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(
        !passed && report.contains("extra    evaluate/notes.txt"),
        "{report}"
    );
    std::fs::remove_file(evaluate.join("notes.txt")).unwrap();

    let report_md = evaluate.join("report.md");
    let original = writable(&report_md);
    std::fs::remove_file(&report_md).unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(
        !passed && report.contains("missing  evaluate/report.md"),
        "{report}"
    );
    std::fs::write(&report_md, &original).unwrap();

    let (passed, report) = verify(&ws, Some(KEY), &[]);
    assert!(passed, "everything put back verifies again: {report}");

    let (passed, other) = verify(&ws, Some(OTHER_KEY), &[]);
    assert!(!passed);
    assert!(
        other.contains("wrong key") && other.contains(manifest["key_id"].as_str().unwrap()),
        "{other}"
    );
    let (passed, unset) = verify(&ws, None, &[]);
    assert!(!passed);
    assert!(
        unset.contains("no HMAC key: environment variable FINETUNE_HMAC_KEY is not set"),
        "{unset}"
    );

    let texts = [stdout(&run), stderr(&run), report, other, unset];
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_secret_absent(&ws, KEY, &texts);

    predict_agrees_with_evaluate(&ws, &evaluate);
    metrics_show_and_diff_the_runs(&ws);
}

/// `finetune predict` on the trained model labels texts as the evaluate stage did.
fn predict_agrees_with_evaluate(ws: &Ws, evaluate: &Path) {
    let file = std::fs::File::open(evaluate.join("predictions.parquet")).unwrap();
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let strings = |name: &str| {
        batch
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone()
    };
    let (texts, predicted) = (strings("text"), strings("prediction"));
    let rows = 40;
    let input: String = (0..rows).map(|i| format!("{}\n", texts.value(i))).collect();
    let predict = [
        "predict",
        "--model",
        "artifacts/runs/reviews/train",
        "--json",
    ];
    let out = ws.run_with_stdin(&predict, &input);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["text"], texts.value(i));
        assert_eq!(line["label"], predicted.value(i), "row {i}: {line}");
        let p = &line["probabilities"];
        let sum = p["0"].as_f64().unwrap() + p["1"].as_f64().unwrap();
        assert!((sum - 1.0).abs() < 1e-5, "{line}");
    }

    let out = ws.run(&[
        "predict",
        "--model",
        "artifacts/runs/reviews/train/model",
        texts.value(0),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    let fields: Vec<&str> = line.trim_end().split('\t').collect();
    assert_eq!(fields[0], predicted.value(0), "{line}");
    assert_eq!(fields[2], texts.value(0));

    let out = ws.run(&["predict", "--model", "data", "text"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("data holds no model (no config.json)"),
        "{}",
        stderr(&out)
    );
}

/// `finetune metrics` shows evaluate's numbers; `--diff HEAD` compares with the run whose
/// lock file is committed.
fn metrics_show_and_diff_the_runs(ws: &Ws) {
    let out = ws.run(&["metrics", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let evaluate = read_json(&output_dir(ws, "reviews", "evaluate").join("metrics.json"));
    assert_eq!(shown["evaluate"]["accuracy"], evaluate["accuracy"]);
    assert_eq!(shown["evaluate"]["examples"].as_f64(), Some(200.0));

    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(ws.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(&["init", "-q"]);
    git(&["add", "pipelines"]);
    git(&["commit", "-q", "-m", "the run on the test split"]);
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    ws.write(
        "pipelines/reviews.yaml",
        yaml.replace("with: { split: test }", "with: { split: validation }"),
    );
    let run = with_key(ws, Some(KEY), &["run"]);
    assert!(run.status.success(), "{}", stderr(&run));

    let out = ws.run(&["metrics", "--diff", "HEAD"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let examples = table
        .lines()
        .find(|l| l.starts_with("evaluate") && l.contains(" examples "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = examples.split_whitespace().collect();
    assert_eq!(
        cells,
        ["evaluate", "examples", "200", "100", "-100"],
        "{table}"
    );
    assert!(
        !table.lines().any(|l| l.starts_with("train ")),
        "train did not change: {table}"
    );

    // Markdown for a pull-request comment; two revisions compare without the workspace.
    let out = ws.run(&["metrics", "--diff", "HEAD", "--md"]);
    let markdown = stdout(&out);
    let lines: Vec<&str> = markdown.lines().collect();
    assert_eq!(
        lines[0], "| stage | metric | HEAD | workspace | change |",
        "{markdown}"
    );
    assert_eq!(lines[1], "|---|---|---:|---:|---:|");
    assert!(
        lines.contains(&"| evaluate | examples | 200 | 100 | -100 |"),
        "{markdown}"
    );
    git(&["add", "pipelines"]);
    git(&["commit", "-q", "-m", "the run on the validation split"]);
    let out = ws.run(&["metrics", "--diff", "HEAD~1", "HEAD", "--md"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("| evaluate | examples | 200 | 100 | -100 |"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).starts_with("| stage | metric | HEAD~1 | HEAD | change |"));

    let out = ws.run(&["metrics", "--diff", "no-such-rev"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("at git revision no-such-rev"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_first_run_without_a_key_creates_a_workspace_key_once_and_verify_uses_it() {
    let ws = Ws::new();
    short_run(&ws);
    let first = ws.run(&["run"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let said = stderr(&first) + &stdout(&first);
    assert!(
        said.contains("no HMAC key configured (FINETUNE_HMAC_KEY is not set): created the workspace key .finetune/hmac.key"),
        "{said}"
    );
    let key_file = ws.file(".finetune/hmac.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secret = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(secret.len(), 64);
    assert!(
        !output_dir(&ws, "reviews", "train")
            .join("fingerprint.json")
            .exists(),
        "train signs only with a configured key"
    );

    let again = ws.run_ok(&[]);
    assert!(
        stages_with(&again, "stage_started").is_empty(),
        "a second run reruns nothing: {again:?}"
    );
    let (passed, report) = verify(&ws, None, &[]);
    assert!(passed, "{report}");
    assert_secret_absent(&ws, &secret, &[&said, &report]);

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (passed, report) = verify(&ws, None, &[]);
    assert!(!passed);
    assert!(
        report.contains("is readable by group or others (mode 644); run `chmod 600"),
        "{report}"
    );
    std::fs::remove_file(&key_file).unwrap();
    let (passed, report) = verify(&ws, None, &[]);
    assert!(!passed);
    assert!(
        report.contains("no HMAC key: workspace key .finetune/hmac.key does not exist"),
        "{report}"
    );
}

#[test]
fn a_resume_refuses_a_signed_checkpoint_that_was_changed() {
    let ws = Ws::new();
    short_run(&ws);
    let mut child = ws
        .command(&["run", "--json"])
        .env("FINETUNE_HMAC_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fingerprint_20 = kill_once_scratch_has(
        &ws,
        &mut child,
        "checkpoints/checkpoint-20/fingerprint.json",
    );
    let checkpoint = fingerprint_20.parent().unwrap();
    // Whichever checkpoint is newest now is the one a resume starts from: change that one.
    let newest = std::fs::read_dir(checkpoint.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("fingerprint.json").is_file())
        .max_by_key(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.trim_start_matches("checkpoint-")
                .parse::<usize>()
                .unwrap_or(0)
        })
        .unwrap();
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x80;
    std::fs::write(&weights, bytes).unwrap();

    let out = with_key(&ws, Some(KEY), &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out) + &stdout(&out);
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.contains(&format!("{name} does not match its fingerprint"))
            && err.contains("changed  model.safetensors (same size, other content)"),
        "{err}"
    );
}

/// The forgery of issue 24: metrics.json changed, a key file of the forger's own (0600, outside
/// the workspace), `key_source` pointed at it and the key id, manifest and MAC recomputed with
/// it. `verify` refuses a key the fingerprint names for itself, with or without the team key in
/// the environment, and with the team key given it reports the wrong key.
#[test]
fn a_fingerprint_that_names_its_own_key_file_does_not_verify() {
    use finetune_core::integrity::{self, Fingerprint, KeySource};

    let ws = Ws::new();
    let out = with_key(&ws, Some(KEY), &["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let signed = output_dir(&ws, "reviews", "fingerprint");
    let metrics = output_dir(&ws, "reviews", "evaluate").join("metrics.json");
    let mut forged_metrics = read_json(&metrics);
    forged_metrics["accuracy"] = serde_json::json!(0.99);
    std::fs::write(&metrics, forged_metrics.to_string()).unwrap();

    let forger = tempfile::tempdir().unwrap();
    let key_path = forger.path().join("forged.key");
    std::fs::write(&key_path, "a-key-of-the-forgers-own-0123456789").unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let forged_key = integrity::load(
        &KeySource::File {
            path: key_path.clone(),
        },
        ws.dir.path(),
    )
    .unwrap();
    let fingerprint_file = signed.join("fingerprint.json");
    let genuine: Fingerprint =
        serde_json::from_slice(&std::fs::read(&fingerprint_file).unwrap()).unwrap();
    let covers = genuine
        .manifest
        .covers
        .iter()
        .map(|covered| (covered.clone(), signed.join(&covered.dir)))
        .collect();
    let forged = integrity::sign(covers, genuine.manifest.context.clone(), &forged_key).unwrap();
    assert_ne!(forged.manifest.key_id, genuine.manifest.key_id);
    std::fs::write(&fingerprint_file, serde_json::to_vec(&forged).unwrap()).unwrap();

    for key in [None, Some(KEY)] {
        let (passed, report) = verify(&ws, key, &[]);
        assert!(!passed, "the forgery verified: {report}");
        assert!(
            report.contains("names its own key (key file") && report.contains("--key-file"),
            "{report}"
        );
    }
    let (passed, report) = verify(&ws, Some(KEY), &["--key-env", "FINETUNE_HMAC_KEY"]);
    assert!(!passed, "the forgery verified: {report}");
    assert!(report.contains("wrong key"), "{report}");
}

/// `covers[].dir` says where `verify` reads. An altered fingerprint pointing it at /etc/ssl
/// was followed and hashed; now nothing in an altered file is followed, and even a correctly
/// signed one that covers a directory outside the workspace is refused.
#[test]
fn verify_never_reads_outside_the_workspace() {
    use finetune_core::integrity::{self, Fingerprint, KeySource};

    let ws = Ws::new();
    let out = with_key(&ws, Some(KEY), &["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let signed = output_dir(&ws, "reviews", "fingerprint");
    let fingerprint_file = signed.join("fingerprint.json");
    let genuine = std::fs::read(&fingerprint_file).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.pem"), "not the workspace's").unwrap();

    let mut altered: serde_json::Value = serde_json::from_slice(&genuine).unwrap();
    altered["manifest"]["covers"][0]["dir"] = outside.path().display().to_string().into();
    std::fs::write(&fingerprint_file, altered.to_string()).unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &["--key-env", "FINETUNE_HMAC_KEY"]);
    assert!(!passed);
    assert!(report.contains("altered  fingerprint.json"), "{report}");
    assert!(!report.contains("secret.pem"), "it read outside: {report}");

    let key_file = ws.file("team.key");
    std::fs::write(&key_file, KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = integrity::load(&KeySource::File { path: key_file }, ws.path()).unwrap();
    let genuine: Fingerprint = serde_json::from_slice(&genuine).unwrap();
    let mut covers: Vec<_> = genuine
        .manifest
        .covers
        .iter()
        .map(|covered| (covered.clone(), signed.join(&covered.dir)))
        .collect();
    covers[0].0.dir = outside.path().display().to_string();
    covers[0].1 = outside.path().to_path_buf();
    let signed_outside = integrity::sign(covers, genuine.manifest.context, &key).unwrap();
    std::fs::write(
        &fingerprint_file,
        serde_json::to_vec(&signed_outside).unwrap(),
    )
    .unwrap();
    let (passed, report) = verify(&ws, Some(KEY), &["--key-env", "FINETUNE_HMAC_KEY"]);
    assert!(!passed);
    assert!(
        report.contains("outside the workspace; refusing to read it"),
        "{report}"
    );
}

/// `finetune verify | head` closed the pipe and the next print panicked; a reporting command
/// now ends quietly, as `cat` does.
#[test]
fn a_closed_pipe_ends_a_report_quietly() {
    let ws = Ws::new();
    let out = with_key(&ws, Some(KEY), &["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = ws
        .command(&["verify"])
        .env("FINETUNE_HMAC_KEY", KEY)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}
