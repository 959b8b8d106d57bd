//! The cache takes nothing on disk on trust (issue 24's recipes, through the binary): a flipped
//! bit, a deleted file or four changed bytes in a cached entry, even with its mtime put back,
//! is caught on the next lookup, set aside and recomputed; `status` calls it stale; `verify
//! --cache` rehashes what the lock files reference; a corrupt manifest or a stray file breaks
//! neither `run`, `status` nor `gc`; a symlink in a stage's output is refused; a full disk at
//! publish names the file it could not write.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const FIVE: &str = "fixtures/five.yaml";

/// Changes `path` in place with `edit`, keeping its size, inode and mtime: only the content
/// (and the ctime, which no user call can set back) differs.
fn tamper(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let size = bytes.len();
    edit(&mut bytes);
    assert_eq!(bytes.len(), size);
    std::fs::write(path, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// The `notice` texts a run printed.
fn notices(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "notice")
        .map(|e| format!("[{}] {}", e["stage"], e["text"].as_str().unwrap()))
        .collect()
}

fn damaged_entries(ws: &Ws) -> Vec<PathBuf> {
    std::fs::read_dir(ws.file("artifacts/damaged"))
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

fn status_of(ws: &Ws, pipeline: &str, stage: &str) -> String {
    let out = ws.run(&["status", pipeline, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = report
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap();
    if status["fresh"] == true {
        "fresh".into()
    } else {
        status["reason"].as_str().unwrap().to_string()
    }
}

/// `finetune verify --cache`: (passed, stdout).
fn verify_cache(ws: &Ws, pipeline: &[&str]) -> (bool, String) {
    let mut args = vec!["verify", "--cache"];
    args.extend_from_slice(pipeline);
    let out = ws.run(&args);
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "{}",
        stderr(&out)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Issue 24's recipe on the default pipeline: a flipped bit in the cached
/// `ingest/train.parquet` (mtime put back), then `run --force tokenize`, which trained on the
/// changed text before; a deleted file; four changed bytes of the cached model.safetensors.
#[test]
fn a_damaged_entry_is_never_used_but_set_aside_and_recomputed() {
    let ws = Ws::new();
    short_run(&ws);
    ws.run_ok(&[]);
    let split = output_dir(&ws, "reviews", "ingest").join("train.parquet");
    let model = output_dir(&ws, "reviews", "train").join("model/model.safetensors");
    let (good_split, good_model) = (
        std::fs::read(&split).unwrap(),
        std::fs::read(&model).unwrap(),
    );
    let (passed, text) = verify_cache(&ws, &[]);
    assert!(passed, "{text}");
    assert_eq!(text.matches("ok ").count(), 5, "{text}");

    tamper(&split, |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
    });
    let reason = status_of(&ws, "pipelines/reviews.yaml", "ingest");
    assert!(
        reason.contains("damaged") && reason.contains("`train.parquet`"),
        "{reason}"
    );
    assert_eq!(
        status_of(&ws, "pipelines/reviews.yaml", "train"),
        "upstream stale: tokenize"
    );
    let events = ws.run_ok(&["--force", "tokenize"]);
    let said = notices(&events).join("\n");
    assert!(
        said.contains("[\"ingest\"] cache entry")
            && said.contains("is damaged: `train.parquet` does not match its SHA-256")
            && said.contains("moved it to artifacts/damaged/"),
        "{said}"
    );
    // `--force tokenize` reruns tokenize and what follows; ingest runs because it is damaged.
    assert_eq!(
        stages_with(&events, "stage_started"),
        ["evaluate", "fingerprint", "ingest", "tokenize", "train"]
    );
    assert_eq!(
        std::fs::read(output_dir(&ws, "reviews", "ingest").join("train.parquet")).unwrap(),
        good_split,
        "the recomputed split is not the original"
    );
    let set_aside = damaged_entries(&ws);
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    assert_ne!(
        std::fs::read(set_aside[0].join("train.parquet")).unwrap(),
        good_split,
        "the damaged copy kept for a look is not the damaged one"
    );

    let stats = output_dir(&ws, "reviews", "ingest").join("stats.json");
    std::fs::remove_file(&stats).unwrap();
    assert!(status_of(&ws, "pipelines/reviews.yaml", "ingest").contains("`stats.json` is missing"));
    let events = ws.run_ok(&[]);
    assert_eq!(stages_with(&events, "stage_started"), ["ingest"]);
    assert!(stats.exists());

    tamper(&model, |bytes| {
        let at = bytes.len() - 64;
        bytes[at..at + 4].copy_from_slice(b"\x00\x01\x02\x03");
    });
    let events = ws.run_ok(&[]);
    let said = notices(&events).join("\n");
    assert!(
        said.contains("[\"train\"] cache entry")
            && said.contains("`model/model.safetensors` does not match its SHA-256"),
        "{said}"
    );
    // The same model and log, so evaluate is cached; fingerprint signs train's new timings.
    assert_eq!(
        stages_with(&events, "stage_started"),
        ["fingerprint", "train"]
    );
    assert_eq!(
        std::fs::read(output_dir(&ws, "reviews", "train").join("model/model.safetensors")).unwrap(),
        good_model,
        "the retrained model is not the original"
    );
    assert!(stages_with(&ws.run_ok(&[]), "stage_started").is_empty());
}

/// Rewrites the digest memo so that it vouches for `file` as it is now with the digest it had
/// when it was published: what an attacker who can write the cache can do too.
fn vouch_in_memo(ws: &Ws, file: &Path) {
    use std::os::unix::fs::MetadataExt;
    let memo_path = ws.file("artifacts/digests.json");
    let mut memo = read_json(&memo_path);
    let absolute = std::fs::canonicalize(file).unwrap();
    let stamp = &mut memo[absolute.to_str().unwrap()];
    assert!(stamp.is_object(), "{absolute:?} is not in the memo");
    let meta = std::fs::metadata(file).unwrap();
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    stamp["size"] = meta.size().into();
    stamp["mtime_ns"] = serde_json::json!(ns(meta.mtime(), meta.mtime_nsec()));
    stamp["ctime_ns"] = serde_json::json!(ns(meta.ctime(), meta.ctime_nsec()));
    stamp["inode"] = meta.ino().into();
    std::fs::write(&memo_path, serde_json::to_vec(&memo).unwrap()).unwrap();
}

/// `verify --cache` ignores the digest memo (an attacker can rewrite it too) and fails on an
/// entry whose bytes changed, moving it aside; the next run recomputes it.
#[test]
fn verify_cache_rehashes_every_referenced_entry() {
    let ws = Ws::new();
    let out = ws.run(&["verify", "--cache"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no lock file"), "{}", stderr(&out));

    ws.run_ok(&[FIVE]);
    let (passed, text) = verify_cache(&ws, &[FIVE]);
    assert!(passed, "{text}");
    assert!(text.contains("(fixtures/five.lock: ingest)"), "{text}");
    let labels = output_dir(&ws, "five", "labels").join("labels.json");
    tamper(&labels, |bytes| bytes[2] ^= 1);
    vouch_in_memo(&ws, &labels);
    assert_eq!(
        status_of(&ws, FIVE, "labels"),
        "fresh",
        "the forged memo is not a forgery"
    );
    let (passed, text) = verify_cache(&ws, &[FIVE]);
    assert!(!passed, "{text}");
    assert!(
        text.contains("FAILED") && text.contains("(fixtures/five.lock: labels)"),
        "{text}"
    );
    assert!(
        text.contains("`labels.json` does not match its SHA-256"),
        "{text}"
    );
    assert_eq!(damaged_entries(&ws).len(), 1);
    let events = ws.run_ok(&[FIVE]);
    assert_eq!(stages_with(&events, "stage_started"), ["labels"]);
    assert!(verify_cache(&ws, &[FIVE]).0);
}

/// A manifest that is not JSON aborted `run` and `status`; a file dropped into artifacts/cache
/// made `gc` fail.
#[test]
fn a_corrupt_manifest_or_a_stray_file_breaks_nothing() {
    let ws = Ws::new();
    ws.run_ok(&[FIVE]);
    let manifest = output_dir(&ws, "five", "notes").join(".finetune-manifest.json");
    std::fs::write(&manifest, "{\"files\": [trunc").unwrap();
    let reason = status_of(&ws, FIVE, "notes");
    assert!(
        reason.contains("damaged") && reason.contains(".finetune-manifest.json is not valid"),
        "{reason}"
    );
    let events = ws.run_ok(&[FIVE]);
    assert_eq!(stages_with(&events, "stage_started"), ["notes"]);
    assert_eq!(status_of(&ws, FIVE, "notes"), "fresh");

    ws.write("artifacts/cache/copied-by-hand.txt", "not an entry");
    let out = ws.run(&["gc", FIVE]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("removed artifacts/cache/copied-by-hand.txt (not a cache entry)"),
        "{text}"
    );
    assert!(text.contains("removed 1 damaged entries"), "{text}");
    assert!(!ws.file("artifacts/cache/copied-by-hand.txt").exists());
    assert!(!ws.file("artifacts/damaged").exists());
    assert!(stages_with(&ws.run_ok(&[FIVE]), "stage_started").is_empty());
}

/// A command stage that declares a symlink as its output would publish (and hash) a file
/// outside the workspace.
#[test]
fn a_symlink_in_a_stage_output_is_refused() {
    let ws = Ws::new();
    ws.write(
        "pipelines/link.yaml",
        "name: link\nstages:\n  leak:\n    uses: command\n    with:\n      \
         run: [ln, -s, /etc/hostname, \"{out}/host\"]\n      outs: [host]\n",
    );
    let out = ws.run(&["run", "pipelines/link.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("the stage's output `host` is a symlink (to /etc/hostname)"),
        "{err}"
    );
    let cache: Vec<_> = std::fs::read_dir(ws.file("artifacts/cache"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "a refused output was published");
}

/// A disk that fills while a stage's entry is sealed: the error names the file it could not
/// write, and nothing half-written is published.
#[test]
fn a_full_disk_at_publish_names_the_file() {
    let ws = Ws::new();
    ws.write(
        "pipelines/fill.yaml",
        "name: fill\nstages:\n  fill:\n    uses: command\n    with:\n      \
         run: [sh, -c, 'head -c 4000000 /dev/zero > \"$FINETUNE_OUT/big\" || true']\n      \
         outs: [big]\n",
    );
    std::fs::create_dir_all(ws.file("artifacts")).unwrap();
    let script = "mount -t tmpfs -o size=1m finetune-test artifacts || exit 99; \
                  \"$0\" run pipelines/fill.yaml; status=$?; ls -A artifacts/cache; exit $status";
    let out = in_own_namespace(&ws, script);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".finetune-manifest.json") && err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "something was published: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `{out}` and `{needs.X}` in a `sh -c` script (as fixtures/five.yaml writes them, unquoted)
/// were pasted in as text: a workspace path with a space broke the script, and one with
/// `;touch INJECTED;` ran `touch`. In a shell's script they are now quoted variables.
#[test]
fn a_workspace_path_is_never_run_as_shell_code() {
    let ws = Ws::new();
    let root = ws.file("a dir;touch INJECTED;");
    for part in ["pipelines", "data", "fixtures"] {
        copy_dir(&ws.file(part), &root.join(part));
    }
    std::fs::copy(ws.file("notes.txt"), root.join("notes.txt")).unwrap();
    std::fs::write(
        root.join("fixtures/quoted.yaml"),
        "name: quoted\nstages:\n  a:\n    uses: command\n    with:\n      \
         run: [bash, -euc, \"printf '%s' 'in {out}' > \\\"{out}/x y\\\"\"]\n      \
         outs: [x y]\n",
    )
    .unwrap();
    for pipeline in [FIVE, "fixtures/quoted.yaml"] {
        let out = Command::new(BIN)
            .args(["run", pipeline])
            .current_dir(&root)
            .env_remove("FINETUNE_HMAC_KEY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{pipeline}: {}", stderr(&out));
    }
    let mut everywhere = Vec::new();
    walk_names(ws.path(), &mut everywhere);
    assert!(
        !everywhere.iter().any(|name| name == "INJECTED"),
        "the path ran as code"
    );
    let report =
        std::fs::read_to_string(root.join("artifacts/runs/five/report/report.txt")).unwrap();
    assert!(report.contains("first notes"), "{report}");
    let quoted = std::fs::read_to_string(root.join("artifacts/runs/quoted/a/x y")).unwrap();
    assert!(
        quoted.starts_with("in ") && quoted.contains("a dir;touch INJECTED;/artifacts/tmp/"),
        "{quoted}"
    );
}

fn walk_names(dir: &Path, names: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        names.push(entry.file_name().to_string_lossy().into_owned());
        if entry.file_type().unwrap().is_dir() {
            walk_names(&entry.path(), names);
        }
    }
}
