//! The cache and the runner, driven through the binary on the shipped review data.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const FIVE: &str = "fixtures/five.yaml";
const ALL_FIVE: [&str; 5] = ["count", "ingest", "labels", "notes", "report"];

#[test]
fn a_second_run_executes_nothing_and_changes_no_byte() {
    let ws = Ws::new();
    let first = ws.run_ok(&[]);
    assert_eq!(
        stages_with(&first, "stage_finished"),
        ["evaluate", "fingerprint", "ingest", "tokenize", "train"]
    );
    let before = ws.snapshot();
    assert!(before.keys().any(|p| p.ends_with("reviews.lock")));
    let second = ws.run_ok(&[]);
    assert!(
        stages_with(&second, "stage_started").is_empty(),
        "{second:?}"
    );
    assert_eq!(
        stages_with(&second, "stage_cached"),
        ["evaluate", "fingerprint", "ingest", "tokenize", "train"]
    );
    assert_eq!(ws.snapshot(), before);
}

#[test]
fn a_param_change_reruns_that_stage_and_its_descendants_only() {
    let ws = Ws::new();
    assert_eq!(stages_with(&ws.run_ok(&[FIVE]), "stage_finished"), ALL_FIVE);
    let yaml = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write(FIVE, yaml.replace("wc -c <", "wc -w <"));
    let events = ws.run_ok(&[FIVE]);
    assert_eq!(stages_with(&events, "stage_started"), ["count", "report"]);
    assert_eq!(
        stages_with(&events, "stage_cached"),
        ["ingest", "labels", "notes"]
    );
}

#[test]
fn touching_a_file_reruns_nothing_but_new_bytes_rerun_its_readers() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    let notes = ws.file("notes.txt");
    let file = std::fs::File::options().write(true).open(&notes).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(file);
    assert!(stages_with(&ws.run_ok(&[FIVE]), "stage_started").is_empty());
    ws.write("notes.txt", "second notes\n");
    assert_eq!(
        stages_with(&ws.run_ok(&[FIVE]), "stage_started"),
        ["notes", "report"]
    );
}

#[test]
fn an_upstream_rerun_with_identical_output_stops_there() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    // A param that changes ingest's key but not a byte of its output.
    let yaml = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write(
        FIVE,
        yaml.replace(
            "      label: 1\n",
            "      label: 1\n      max_text_bytes: 999999\n",
        ),
    );
    let events = ws.run_ok(&[FIVE]);
    assert_eq!(stages_with(&events, "stage_started"), ["ingest"]);
    assert_eq!(
        stages_with(&events, "stage_cached"),
        ["count", "labels", "notes", "report"]
    );
}

#[test]
fn targets_force_and_dry_run() {
    let ws = Ws::new();
    let events = ws.run_ok(&[FIVE, "count"]);
    assert_eq!(stages_with(&events, "stage_finished"), ["count", "ingest"]);
    let events = ws.run_ok(&[FIVE, "--dry-run"]);
    assert_eq!(
        stages_with(&events, "stage_would_run"),
        ["labels", "notes", "report"]
    );
    assert!(
        !ws.file("artifacts/runs/five/report").exists(),
        "a dry run changed the workspace"
    );
    ws.run_ok(&[FIVE]);
    let events = ws.run_ok(&[FIVE, "--force", "labels"]);
    assert_eq!(stages_with(&events, "stage_started"), ["labels", "report"]);
    let started = events
        .iter()
        .find(|e| e["event"] == "stage_started")
        .unwrap();
    assert_eq!(started["reason"], "forced");
    let out = ws.run(&["run", FIVE, "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown target stage `nope`"));
}

#[test]
fn status_says_which_param_file_or_upstream_changed() {
    let ws = Ws::new();
    let out = ws.run(&["status", FIVE]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ingest  stale  never run"));
    ws.run_ok(&[FIVE]);
    let out = ws.run(&["status", FIVE]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.matches("fresh").count(), 5, "{text}");
    let yaml = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write(FIVE, yaml.replace("test: 0.2", "test: 0.25"));
    ws.write("notes.txt", "changed\n");
    let out = ws.run(&["status", FIVE, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = |id: &str| {
        report
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == id)
            .unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(reason("ingest"), "param `split.test` changed: 0.2 -> 0.25");
    assert_eq!(reason("notes"), "file `notes.txt` changed");
    assert_eq!(reason("count"), "upstream stale: ingest");
    assert_eq!(reason("report"), "upstream stale: count, labels, notes");
}

#[test]
fn a_sigkill_mid_stage_leaves_no_entry_and_the_next_run_recomputes() {
    let ws = Ws::new();
    ws.write(
        "slow.yaml",
        "name: slow\nstages:\n  slow:\n    uses: command\n    with:\n      run: [sh, -c, 'echo partial > {out}/a.txt; sleep \"$${SLEEP:-0}\"; echo done >> {out}/a.txt']\n      outs: [a.txt]\n",
    );
    let mut child = ws
        .command(&["run", "slow.yaml", "--json"])
        .env("SLEEP", "60")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let staged = loop {
        let tmp = std::fs::read_dir(ws.file("artifacts/tmp"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(dir) = tmp.filter(|d| d.join("a.txt").exists()) {
            break dir;
        }
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        staged.exists(),
        "the partial output is where the run left it"
    );
    let entries = std::fs::read_dir(ws.file("artifacts/cache"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "a killed stage published a cache entry");
    let events = ws.run_ok(&["slow.yaml"]);
    assert_eq!(stages_with(&events, "stage_finished"), ["slow"]);
    assert_eq!(
        std::fs::read_to_string(output_dir(&ws, "slow", "slow").join("a.txt")).unwrap(),
        "partial\ndone\n"
    );
    assert!(
        !staged.exists(),
        "the next run cleaned up the killed run's staging directory"
    );
}

#[test]
fn two_concurrent_runs_both_finish_with_a_valid_cache() {
    let ws = Ws::new();
    let spawn = || {
        ws.command(&["run", FIVE, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let ran = stages_with(&events(&a), "stage_finished").len()
        + stages_with(&events(&b), "stage_finished").len();
    assert_eq!(ran, 5, "each stage ran exactly once across both runs");
    let waited = events(&a)
        .iter()
        .chain(events(&b).iter())
        .any(|e| e["event"] == "waiting");
    assert!(waited, "the second run should have said it waits");
    for entry in std::fs::read_dir(ws.file("artifacts/cache")).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = read_json(&dir.join(".finetune-manifest.json"));
        for file in manifest["files"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(file["path"].as_str().unwrap())).unwrap();
            assert_eq!(bytes.len() as u64, file["size"].as_u64().unwrap());
            assert_eq!(
                finetune::cache::digest::sha256_bytes(&bytes),
                file["sha256"].as_str().unwrap()
            );
        }
    }
}

#[test]
fn a_failing_stage_exits_1_skips_its_descendants_and_keeps_the_last_good_lock() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    let lock_before = std::fs::read(ws.file("fixtures/five.lock")).unwrap();
    let yaml = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write(
        FIVE,
        yaml.replace("[cp, notes.txt,", "[sh, -c, 'echo broken >&2; exit 4', x,"),
    );
    let out = ws.run(&["run", FIVE, "--json", "--jobs", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let events = events(&out);
    let failed = events
        .iter()
        .find(|e| e["event"] == "stage_failed")
        .unwrap();
    assert_eq!(failed["stage"], "notes");
    assert!(failed["error"].as_str().unwrap().contains("broken"));
    assert_eq!(stages_with(&events, "stage_skipped"), ["report"]);
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.file("fixtures/five.lock")).unwrap()).unwrap();
    let old: serde_json::Value = serde_json::from_slice(&lock_before).unwrap();
    assert_eq!(
        lock["stages"]["notes"], old["stages"]["notes"],
        "the failed stage's last good record was overwritten"
    );
}

#[test]
fn gc_removes_only_unreferenced_entries() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    ws.write("notes.txt", "other\n");
    ws.run_ok(&[FIVE]); // notes and report now have new entries; the old two are unreferenced
    let out = ws.run(&["gc", FIVE]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("removed 2 entries"), "{text}");
    assert!(stages_with(&ws.run_ok(&[FIVE]), "stage_started").is_empty());
}

#[test]
fn dag_draws_text_dot_and_mermaid() {
    let ws = Ws::new();
    let text = String::from_utf8(ws.run(&["dag", FIVE]).stdout).unwrap();
    assert!(
        text.contains("report (command) <- count, labels, notes"),
        "{text}"
    );
    let dot = String::from_utf8(ws.run(&["dag", FIVE, "--format", "dot"]).stdout).unwrap();
    assert!(dot.starts_with("digraph \"five\"") && dot.contains("\"ingest\" -> \"count\";"));
    let mermaid = String::from_utf8(ws.run(&["dag", FIVE, "--format", "mermaid"]).stdout).unwrap();
    assert!(mermaid.contains("  labels --> report"));
}

/// A pipeline file saved with a UTF-8 byte-order mark (as Windows editors save it) reads as
/// the same pipeline; it was refused as `unknown key \u{feff}name`.
#[test]
fn a_pipeline_file_with_a_byte_order_mark_reads_as_without() {
    let ws = Ws::new();
    let plain = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write("fixtures/five-bom.yaml", format!("\u{feff}{plain}"));
    let out = ws.run(&["dag", "fixtures/five-bom.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let with_bom = String::from_utf8(out.stdout).unwrap();
    let without = String::from_utf8(ws.run(&["dag", FIVE]).stdout).unwrap();
    assert_eq!(with_bom, without);
}

/// The HMAC key stays out of what a pipeline writes: a `command` stage does not inherit it,
/// and `${env.FINETUNE_HMAC_KEY}` in params (which the lock file records) is refused.
#[test]
fn the_signing_key_reaches_no_command_and_no_param() {
    let ws = Ws::new();
    ws.write(
        "env.yaml",
        "name: env\nstages:\n  show:\n    uses: command\n    with:\n      run: [sh, -c, 'echo \"$${FINETUNE_HMAC_KEY:-unset}\" > {out}/env.txt']\n      outs: [env.txt]\n",
    );
    let out = ws
        .command(&["run", "env.yaml"])
        .env("FINETUNE_HMAC_KEY", "a-team-key-for-tests-0123456789")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = std::fs::read_to_string(ws.file("artifacts/runs/env/show/env.txt")).unwrap();
    assert_eq!(shown, "unset\n");

    ws.write(
        "key-param.yaml",
        "name: key-param\nparams:\n  key: ${env.FINETUNE_HMAC_KEY}\nstages:\n  show:\n    uses: command\n    with:\n      run: [echo, '${params.key}']\n",
    );
    let out = ws
        .command(&["run", "key-param.yaml"])
        .env("FINETUNE_HMAC_KEY", "a-team-key-for-tests-0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the HMAC key cannot be put into params"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("a-team-key-for-tests"),
        "{}",
        stderr(&out)
    );
}

/// A key variable of the user's own naming (`key_env: TEAM_KEY`) is as secret as the default:
/// no command gets it, in its environment or through `env:`, and no param interpolates it.
/// A variable whose value is no secret (`PATH`) or a value that is no random key is refused.
#[test]
fn a_custom_key_variable_is_as_secret_and_a_key_must_look_like_one() {
    let ws = Ws::new();
    let pipeline = |extra_with: &str, params: &str| {
        format!(
            "name: team\n{params}stages:\n  show:\n    uses: command\n    with:\n      \
             run: [sh, -c, 'echo \"$${{TEAM_KEY:-unset}}\" > {{out}}/env.txt']\n      \
             outs: [env.txt]\n{extra_with}  sign:\n    uses: fingerprint\n    needs: [show]\n    \
             with: {{ key_env: TEAM_KEY }}\n"
        )
    };
    let run = |yaml: String, key: &str| {
        ws.write("team.yaml", yaml);
        ws.command(&["run", "team.yaml"])
            .env("TEAM_KEY", key)
            .output()
            .unwrap()
    };
    let out = run(pipeline("", ""), "a-team-key-for-tests-0123456789");
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = std::fs::read_to_string(ws.file("artifacts/runs/team/show/env.txt")).unwrap();
    assert_eq!(shown, "unset\n");

    let refused = [
        (
            pipeline("", "params:\n  key: ${env.TEAM_KEY}\n"),
            "a-team-key-for-tests-0123456789",
            "the HMAC key cannot be put into params",
        ),
        (
            pipeline("      env: { TEAM_KEY: leaked }\n", ""),
            "a-team-key-for-tests-0123456789",
            "holds the pipeline's signing key, which no command receives",
        ),
        (
            pipeline("", "").replace("key_env: TEAM_KEY", "key_env: PATH"),
            "a-team-key-for-tests-0123456789",
            "`PATH` cannot hold an HMAC key: it is a well-known variable",
        ),
        (
            pipeline("", ""),
            "aaaaaaaaaaaaaaaaaaaaaaaa",
            "does not look random (only 1 different bytes)",
        ),
    ];
    for (yaml, key, expected) in refused {
        let out = run(yaml, key);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{expected}: {err}");
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(!err.contains(key), "the key is printed: {err}");
    }
}

/// `--set` changes a param for one run without editing the file (issue 28): typed as a YAML
/// scalar, seen by `${params.…}`, explained by `status`, recorded in the lock file; a key that
/// names nothing is an error naming the `--set`.
#[test]
fn set_overrides_params_for_a_run_and_the_lock_file_records_it() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    let reason = |args: &[&str], stage: &str| {
        let mut all = vec!["status", FIVE, "--json"];
        all.extend_from_slice(args);
        let out = ws.run(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let found = report
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .cloned();
        found.unwrap()["reason"].as_str().unwrap().to_string()
    };
    assert_eq!(
        reason(&["--set", "params.seed=7"], "ingest"),
        "param `split.seed` changed: 42 -> 7"
    );
    assert_eq!(
        reason(&["--set", "stages.ingest.with.split.test=0.25"], "ingest"),
        "param `split.test` changed: 0.2 -> 0.25"
    );

    let events = ws.run_ok(&[FIVE, "--set", "params.seed=7"]);
    assert!(stages_with(&events, "stage_started").contains(&"ingest".to_string()));
    let lock = read_json(&ws.file("fixtures/five.lock"));
    assert_eq!(lock["set"], serde_json::json!(["params.seed=7"]));
    assert_eq!(lock["stages"]["ingest"]["params"]["split"]["seed"], 7);
    assert!(
        stages_with(
            &ws.run_ok(&[FIVE, "--set", "params.seed=7"]),
            "stage_started"
        )
        .is_empty()
    );
    assert!(
        stages_with(&ws.run_ok(&[FIVE]), "stage_started").is_empty(),
        "the old entries are cached"
    );
    assert!(
        read_json(&ws.file("fixtures/five.lock"))
            .get("set")
            .is_none()
    );

    for (set, expected) in [
        (
            "params.sed=1",
            "--set params.sed=1: the pipeline has no param `sed`",
        ),
        (
            "stages.nope.with.x=1",
            "--set stages.nope.with.x=1: no stage `nope`; stages: ingest, count, labels, notes, report",
        ),
        ("stages.ingest.with.formt=csv", "formt"),
        (
            "seed=1",
            "the key must be `params.NAME` or `stages.ID.with.KEY`",
        ),
    ] {
        let out = ws.run(&["run", FIVE, "--set", set]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{set}: {}", stderr(&out));
    }
}

/// `matrix:` declares one stage per combination (issue 28), each cached on its own with
/// `${item.NAME}` bound; a need on the declared id fans in every combination; targets and
/// `--force` take the declared id or a `*` prefix.
#[test]
fn a_matrix_stage_runs_once_per_combination() {
    let ws = Ws::new();
    let five = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    let ingest = &five[five.find("  ingest:").unwrap()..five.find("  count:").unwrap()];
    ws.write(
        "sweep.yaml",
        format!(
            "name: sweep\nparams:\n  seed: 42\nstages:\n{ingest}  trial:\n    uses: command\n    needs: [ingest]\n    \
             matrix: {{ lr: [1e-5, 3e-5], seed: [1, 2] }}\n    with:\n      \
             run: [sh, -c, 'echo \"lr=$0 seed=$1\" > \"$FINETUNE_OUT/x.txt\"', '${{item.lr}}', '${{item.seed}}']\n      \
             outs: [x.txt]\n  report:\n    uses: command\n    needs: [trial]\n    with:\n      \
             run: [sh, -c, 'env | sed -n \"s/^FINETUNE_NEEDS_[^=]*=//p\" | while read d; do cat \"$d/x.txt\"; done | sort > \"$FINETUNE_OUT/all.txt\"']\n      \
             outs: [all.txt]\n"
        ),
    );
    let events = ws.run_ok(&["sweep.yaml"]);
    assert_eq!(
        stages_with(&events, "stage_started"),
        [
            "ingest",
            "report",
            "trial@lr=1e-5,seed=1",
            "trial@lr=1e-5,seed=2",
            "trial@lr=3e-5,seed=1",
            "trial@lr=3e-5,seed=2"
        ]
    );
    let all = std::fs::read_to_string(output_dir(&ws, "sweep", "report").join("all.txt")).unwrap();
    assert_eq!(
        all,
        "lr=0.00001 seed=1\nlr=0.00001 seed=2\nlr=0.00003 seed=1\nlr=0.00003 seed=2\n"
    );
    assert!(stages_with(&ws.run_ok(&["sweep.yaml"]), "stage_started").is_empty());
    let events = ws.run_ok(&["sweep.yaml", "trial", "--force", "trial@lr=3e-5*"]);
    assert_eq!(
        stages_with(&events, "stage_started"),
        ["trial@lr=3e-5,seed=1", "trial@lr=3e-5,seed=2"]
    );

    for (matrix, expected) in [
        (
            "{ lr: [] }",
            "key `matrix`: `lr`: the list of values is empty",
        ),
        ("{ lr: [1, 1] }", "`lr`: `1` is listed twice"),
        ("{ m: [a/b] }", "`a/b` cannot stand in a stage id"),
    ] {
        ws.write(
            "bad.yaml",
            format!("name: bad\nstages:\n  t:\n    uses: command\n    matrix: {matrix}\n    with: {{ run: [\"true\"] }}\n"),
        );
        let out = ws.run(&["run", "bad.yaml"]);
        assert_eq!(out.status.code(), Some(2), "{matrix}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{matrix}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn stages_lists_plugins_with_their_params() {
    let ws = Ws::new();
    let out = ws.run(&["stages"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("ingest_csv (version 1)"));
    assert!(text.contains("on_bad_row: \"error\" | \"skip\""), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&ws.run(&["stages", "--json"]).stdout).unwrap();
    assert!(json["command"]["params"]["properties"]["run"].is_object());
}
