//! The remote cache, through the binary: push from one workspace, `run --pull` in fresh ones,
//! over a directory and over S3 (moto's server, started here on localhost), tampered remote
//! objects, concurrent pushes, `status`, `gc --remote`, `--shard` and the config file.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FIVE: &str = "fixtures/five.yaml";
const DEFAULT_STAGES: [&str; 5] = ["evaluate", "fingerprint", "ingest", "tokenize", "train"];

/// moto's S3 server on a free localhost port, with one bucket `ci-cache`; stopped on drop. Found at
/// FINETUNE_S3_SERVER, else installed by scripts/install-s3-server.sh (as .ci/run does).
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> S3Server {
        let bin = std::env::var_os("FINETUNE_S3_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(install_s3_server);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.create_bucket("ci-cache", port);
        server
    }

    /// moto accepts an unsigned CreateBucket.
    fn create_bucket(&self, bucket: &str, port: u16) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    /// A `finetune` command in `ws` that reaches this server as AWS tools would.
    fn command(&self, ws: &Ws, args: &[&str]) -> Command {
        let mut command = ws.command(args);
        command
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
        command
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn install_s3_server() -> PathBuf {
    let out = Command::new(repo().join("scripts/install-s3-server.sh"))
        .output()
        .expect("run scripts/install-s3-server.sh");
    assert!(out.status.success(), "{}", stderr(&out));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn ok(out: std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", stderr(&out));
    events(&out)
}

/// Asserts a non-`run` command succeeded; returns what it printed.
fn said(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_pull(ws: &Ws, pipeline: &str, remote: &str) -> Vec<serde_json::Value> {
    ok(ws.run(&["run", "--json", pipeline, "--pull", "--remote", remote]))
}

/// Every file of every stage output the last run of `pipeline` linked, with its bytes.
fn outputs(ws: &Ws, pipeline: &str, stages: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for stage in stages {
        let dir = output_dir(ws, pipeline, stage);
        walk(&dir, &mut |path| {
            let name = path.strip_prefix(&dir).unwrap().display().to_string();
            files.push((format!("{stage}/{name}"), std::fs::read(path).unwrap()));
        });
    }
    files.sort();
    files
}

/// The remote blob holding file `name` of `stage`'s latest output in `ws`.
fn blob_of(ws: &Ws, pipeline: &str, stage: &str, name: &str, remote: &Path) -> PathBuf {
    let manifest = read_json(&output_dir(ws, pipeline, stage).join(".finetune-manifest.json"));
    let file = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == name)
        .unwrap_or_else(|| panic!("{stage} has no {name}: {manifest}"));
    let sha = file["sha256"].as_str().unwrap();
    remote.join(format!("v1/blobs/{}/{sha}", &sha[..2]))
}

#[test]
fn the_default_pipeline_travels_through_directory_and_s3_remotes_byte_for_byte() {
    let first = Ws::new();
    first.run_ok(&[]);
    let expected = outputs(&first, "reviews", &DEFAULT_STAGES);
    let dir = tempfile::tempdir().unwrap();
    let dir_remote = dir.path().to_str().unwrap();
    let s3 = S3Server::start();
    let s3_remote = "s3://ci-cache/team";

    said(first.run(&["push", "--remote", dir_remote]));
    said(
        s3.command(&first, &["push", "--remote", s3_remote])
            .output()
            .unwrap(),
    );

    for (remote, via_s3) in [(dir_remote, false), (s3_remote, true)] {
        let fresh = Ws::new();
        let args = ["run", "--json", "--pull", "--remote", remote];
        let out = if via_s3 {
            s3.command(&fresh, &args).output().unwrap()
        } else {
            fresh.run(&args)
        };
        let events = ok(out);
        assert!(
            stages_with(&events, "stage_started").is_empty(),
            "{remote}: {events:?}"
        );
        assert_eq!(
            stages_with(&events, "stage_pulled"),
            DEFAULT_STAGES,
            "{remote}"
        );
        assert_eq!(
            outputs(&fresh, "reviews", &DEFAULT_STAGES),
            expected,
            "{remote}"
        );
        // Pulled entries are ordinary cache entries: the next run finds them cached.
        let again = fresh.run_ok(&[]);
        assert_eq!(stages_with(&again, "stage_cached"), DEFAULT_STAGES);
    }

    // A flipped byte in a remote object: that entry is refused and its stage computed here;
    // everything else still comes from the remote, and the outputs are the same.
    let blob = blob_of(&first, "reviews", "ingest", "train.parquet", dir.path());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&blob, bytes).unwrap();
    let tampered = Ws::new();
    let out = tampered.run(&["run", "--json", "--pull", "--remote", dir_remote]);
    let events = ok(out);
    assert_eq!(stages_with(&events, "stage_started"), ["ingest"]);
    assert_eq!(
        stages_with(&events, "stage_pulled"),
        ["evaluate", "fingerprint", "tokenize", "train"]
    );
    let refused = events
        .iter()
        .find(|e| e["event"] == "notice" && e["stage"] == "ingest")
        .unwrap_or_else(|| panic!("no notice: {events:?}"));
    assert!(
        refused["text"]
            .as_str()
            .unwrap()
            .contains("is not what its name says"),
        "{refused}"
    );
    assert_eq!(outputs(&tampered, "reviews", &DEFAULT_STAGES), expected);
    // The corrupt blob was removed with its entry, so a push puts the right bytes back.
    assert!(!blob.exists());
    assert_eq!(
        stages_with(
            &run_pull(&Ws::new(), "pipelines/reviews.yaml", dir_remote),
            "stage_started"
        ),
        ["ingest"]
    );
    said(tampered.run(&["push", "--remote", dir_remote]));
    assert_eq!(std::fs::read(&blob).unwrap(), {
        let file = output_dir(&first, "reviews", "ingest").join("train.parquet");
        std::fs::read(file).unwrap()
    });

    // Two workspaces push the same pipeline to one remote at once: both succeed, and the
    // remote serves a full pull.
    let shared = tempfile::tempdir().unwrap();
    let shared_remote = shared.path().to_str().unwrap();
    let pushes: Vec<Child> = [&first, &tampered]
        .iter()
        .map(|ws| {
            ws.command(&["push", "--remote", shared_remote])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for push in pushes {
        let out = push.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let last = Ws::new();
    let events = run_pull(&last, "pipelines/reviews.yaml", shared_remote);
    assert_eq!(stages_with(&events, "stage_pulled"), DEFAULT_STAGES);
    assert_eq!(outputs(&last, "reviews", &DEFAULT_STAGES), expected);
}

const FIVE_STAGES: [&str; 5] = ["count", "ingest", "labels", "notes", "report"];

#[test]
fn the_config_file_names_the_default_remote_and_status_says_what_it_can_serve() {
    let remote = tempfile::tempdir().unwrap();
    let first = Ws::new();
    first.write(
        ".finetune/config.toml",
        format!(
            "default_remote = \"team\"\n\n[remotes]\nteam = \"{}\"\nother = \"/nonexistent\"\n",
            remote.path().display()
        ),
    );
    first.run_ok(&[FIVE]);
    let out = first.run(&["push", FIVE]);
    assert!(
        stderr(&out).is_empty() && out.status.success(),
        "{}",
        stderr(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pushed 5 entries"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let second = Ws::new();
    std::fs::create_dir_all(second.file(".finetune")).unwrap();
    std::fs::copy(
        first.file(".finetune/config.toml"),
        second.file(".finetune/config.toml"),
    )
    .unwrap();
    let status = second.run(&["status", FIVE]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        text.matches("the remote has it").count(),
        5,
        "every stage, the downstream ones judged as if pulled:\n{text}"
    );
    // `pull` fills the cache; the run then finds everything cached.
    // Without a lock file there is nothing to name the entries by: `pull` says so.
    let nothing = said(second.run(&["pull", FIVE]));
    assert!(
        nothing.starts_with("nothing to pull: no lock file"),
        "{nothing}"
    );
    // The lock file, committed in a real repository, names the entries to pull.
    std::fs::copy(
        first.file("fixtures/five.lock"),
        second.file("fixtures/five.lock"),
    )
    .unwrap();
    let pulled = said(second.run(&["pull", FIVE]));
    assert!(pulled.contains("pulled 5 entries"), "{pulled}");
    assert_eq!(
        stages_with(&second.run_ok(&[FIVE]), "stage_cached"),
        FIVE_STAGES
    );
    // FINETUNE_REMOTE picks a remote by name; --remote wins over it.
    let out = second
        .command(&["pull", FIVE])
        .env("FINETUNE_REMOTE", "other")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent is not a directory"),
        "{}",
        stderr(&out)
    );
    let out = second
        .command(&["pull", FIVE, "--remote", "team"])
        .env("FINETUNE_REMOTE", "other")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Mistakes name the file, the line and the key, or the URL.
    let out = second.run(&["push", FIVE, "--remote", "gs://bucket/x"]);
    assert!(
        stderr(&out).contains("remote `gs://bucket/x`: unsupported scheme"),
        "{}",
        stderr(&out)
    );
    second.write(
        ".finetune/config.toml",
        "# team cache\ndefault = \"team\"\n[remotes]\nteam = \"/tmp\"\n",
    );
    let out = second.run(&["push", FIVE]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(".finetune/config.toml")
            && err.contains("line 2")
            && err.contains("unknown field `default`"),
        "{err}"
    );
    let out = Ws::new().run(&["push", FIVE]);
    assert!(
        stderr(&out).contains("no remote: give --remote URL"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gc_remote_keeps_what_the_lock_files_reference_here_and_at_git_revisions() {
    let remote = tempfile::tempdir().unwrap();
    let url = remote.path().to_str().unwrap();
    let ws = Ws::new();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
            .arg(ws.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(&["init", "-q"]);
    ws.run_ok(&[FIVE]);
    said(ws.run(&["push", FIVE, "--remote", url]));
    git(&["add", "fixtures/five.lock"]);
    git(&["commit", "-q", "-m", "first run"]);
    let yaml = std::fs::read_to_string(ws.file(FIVE)).unwrap();
    ws.write(FIVE, yaml.replace("wc -c <", "wc -w <"));
    ws.run_ok(&[FIVE]);
    said(ws.run(&["push", FIVE, "--remote", url]));
    let entries = |dir: &Path| std::fs::read_dir(dir.join("v1/entries")).unwrap().count();
    assert_eq!(entries(remote.path()), 7);

    // The committed lock file keeps the first run's count and report alive.
    let gc = format!("--remote={url}");
    let out = ws.run(&["gc", FIVE, &gc, "--rev", "HEAD", "--min-age", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(entries(remote.path()), 7);
    // Without it they go, with the files only they listed.
    let blobs_before = count_files(&remote.path().join("v1/blobs"));
    let out = ws.run(&["gc", FIVE, &gc, "--dry-run", "--min-age", "0"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("would remove 2 entries"));
    assert_eq!(entries(remote.path()), 7);
    let out = ws.run(&["gc", FIVE, &gc, "--min-age", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(entries(remote.path()), 5);
    assert_eq!(
        count_files(&remote.path().join("v1/blobs")),
        blobs_before - 2
    );
    // A young unreferenced file is kept: a push in flight may be about to name it.
    let young = remote.path().join("v1/blobs/00").join("0".repeat(64));
    std::fs::create_dir_all(young.parent().unwrap()).unwrap();
    std::fs::write(&young, b"x").unwrap();
    let out = ws.run(&["gc", FIVE, &gc]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("kept 1 unreferenced files younger than 3600 s"),
        "{said}"
    );
    assert!(young.exists());
    // What is left serves the current pipeline whole.
    let fresh = Ws::new();
    fresh.write(FIVE, std::fs::read(ws.file(FIVE)).unwrap());
    let events = run_pull(&fresh, FIVE, url);
    assert_eq!(stages_with(&events, "stage_pulled").len(), 5, "{events:?}");
    assert!(
        std::fs::read_to_string(output_dir(&fresh, "five", "count").join("bytes.txt"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .is_ok()
    );
}

fn count_files(dir: &Path) -> usize {
    let mut count = 0;
    walk(dir, &mut |_| count += 1);
    count
}

#[test]
fn a_sweep_split_by_shard_fills_one_remote_that_serves_the_whole_sweep() {
    let remote = tempfile::tempdir().unwrap();
    let url = remote.path().to_str().unwrap();
    let sweep = "name: sweep\nstages:\n  trial:\n    uses: command\n    \
                 matrix: { lr: [1, 2, 3], seed: [1, 2] }\n    with:\n      \
                 run: [sh, -c, 'echo \"$0 $1\" > \"$FINETUNE_OUT/x.txt\"; \
                 echo \"{\\\"loss\\\": $0.$1}\" > \"$FINETUNE_OUT/metrics.json\"', '${item.lr}', '${item.seed}']\n      \
                 outs: [x.txt, metrics.json]\n";
    let mut ran = Vec::new();
    for shard in ["1/4", "2/4", "3/4", "4/4"] {
        let job = Ws::new();
        job.write("sweep.yaml", sweep);
        let events = ok(job.run(&[
            "run",
            "--json",
            "sweep.yaml",
            "trial@*",
            "--shard",
            shard,
            "--pull",
            "--remote",
            url,
        ]));
        let started = stages_with(&events, "stage_started");
        assert!(
            !started.is_empty() && started.len() <= 2,
            "{shard}: {started:?}"
        );
        ran.extend(started);
        said(job.run(&["push", "sweep.yaml", "--remote", url]));
    }
    ran.sort();
    assert_eq!(
        ran.len(),
        6,
        "each combination in exactly one shard: {ran:?}"
    );
    ran.dedup();
    assert_eq!(ran.len(), 6, "{ran:?}");
    let all = Ws::new();
    all.write("sweep.yaml", sweep);
    let events = run_pull(&all, "sweep.yaml", url);
    assert!(
        stages_with(&events, "stage_started").is_empty(),
        "{events:?}"
    );
    assert_eq!(stages_with(&events, "stage_pulled").len(), 6);

    // `metrics` shows the sweep as one table: a row per combination.
    let table = said(all.run(&["metrics", "sweep.yaml"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "trial (matrix, 6 combinations):", "{table}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["lr", "seed", "loss"]
    );
    assert_eq!(
        lines[7].split_whitespace().collect::<Vec<_>>(),
        ["3", "2", "3.2000"],
        "{table}"
    );

    for bad in ["0/4", "5/4", "x"] {
        let out = all.run(&["run", "sweep.yaml", "--shard", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains("is not a shard"), "{}", stderr(&out));
    }
}

#[test]
fn an_unreachable_remote_is_a_notice_and_the_stages_run() {
    let ws = Ws::new();
    let out = ws
        .command(&["run", "--json", FIVE, "--pull", "--remote", "s3://ci/x"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let events = ok(out);
    assert_eq!(stages_with(&events, "stage_finished"), FIVE_STAGES);
    let notices: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "notice").collect();
    assert_eq!(notices.len(), 1, "asked once, then no more: {notices:?}");
    let text = notices[0]["text"].as_str().unwrap();
    assert!(
        text.contains("cannot pull from s3://ci/x") && text.contains("127.0.0.1:9"),
        "{text}"
    );
}
