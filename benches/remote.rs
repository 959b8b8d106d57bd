//! Remote cache benchmark (`cargo bench --bench remote`), each figure printed with its ratio:
//!
//! 1. `finetune push` of a MiniLM-sized entry (the all-MiniLM-L6-v2 directory as a stage's
//!    output, ~90 MB: what the Amazon MiniLM run's train stage holds) to an empty directory
//!    remote, against `cp -r` of the same entry (goal: throughput >= 0.8x of cp's);
//! 2. `finetune pull` of it into an empty cache (every file hashed and checked, the entry
//!    flushed to disk before it is published), against the same `cp -r`;
//! 3. a no-op `finetune run --pull` when nothing is stale (goal <= 50 ms).
//!
//! Whole processes are timed (start, lock, lookups, transfer, exit), medians of several runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{finetune, median, ms};
const PIPELINE: &str = "name: minilm\nstages:\n  model:\n    uses: command\n    with:\n      \
    run: [sh, -c, 'cp model/* {out}/']\n      deps: [model]\n";

fn main() {
    let model = finetune_fixtures::minilm();
    let ws = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(ws.path().join("model")).expect("mkdir");
    for entry in std::fs::read_dir(&model).expect("model dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(
                &path,
                ws.path().join("model").join(path.file_name().unwrap()),
            )
            .expect("copy model");
        }
    }
    std::fs::write(ws.path().join("minilm.yaml"), PIPELINE).expect("pipeline");
    finetune(ws.path(), &["run", "minilm.yaml"]);
    let entry =
        std::fs::canonicalize(ws.path().join("artifacts/runs/minilm/model")).expect("entry");
    let bytes = dir_bytes(&entry);
    let mb = bytes as f64 / 1e6;

    let scratch = tempfile::tempdir().expect("temp dir");
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        scratch.path().join(format!("{n}"))
    };
    let cp = median(5, || {
        let to = fresh();
        timed(|| {
            let status = Command::new("cp").arg("-r").arg(&entry).arg(&to).status();
            assert!(status.expect("cp").success());
        })
    });
    // cp -r, then flushed to disk as our pull flushes an entry before publishing it.
    let cp_sync = median(5, || {
        let to = fresh();
        timed(|| {
            let status = Command::new("cp").arg("-r").arg(&entry).arg(&to).status();
            assert!(status.expect("cp").success());
            let status = Command::new("sync").arg("-f").arg(&to).status();
            assert!(status.expect("sync").success());
        })
    });
    let remote = fresh();
    let push = median(5, || {
        let to = fresh();
        timed(|| {
            finetune(
                ws.path(),
                &["push", "minilm.yaml", "--remote", to.to_str().unwrap()],
            );
        })
    });
    finetune(
        ws.path(),
        &["push", "minilm.yaml", "--remote", remote.to_str().unwrap()],
    );

    let puller = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        ws.path().join("minilm.yaml"),
        puller.path().join("minilm.yaml"),
    )
    .expect("copy");
    std::fs::copy(
        ws.path().join("minilm.lock"),
        puller.path().join("minilm.lock"),
    )
    .expect("copy");
    let pull = median(5, || {
        let _ = std::fs::remove_dir_all(puller.path().join("artifacts"));
        timed(|| {
            finetune(
                puller.path(),
                &["pull", "minilm.yaml", "--remote", remote.to_str().unwrap()],
            );
        })
    });
    let rate = |d: Duration| mb / d.as_secs_f64();
    println!(
        "push {mb:.1} MB to a directory remote: median {:.0} ms, {:.0} MB/s | cp -r {:.0} ms, {:.0} MB/s | ratio {:.2} (goal >= 0.8)",
        ms(push),
        rate(push),
        ms(cp),
        rate(cp),
        cp.as_secs_f64() / push.as_secs_f64()
    );
    println!(
        "pull {mb:.1} MB from a directory remote (hashed, checked, synced): median {:.0} ms, {:.0} MB/s | cp -r {:.0} ms: ratio {:.2} (goal >= 0.8) | cp -r + sync {:.0} ms: ratio {:.2}",
        ms(pull),
        rate(pull),
        ms(cp),
        cp.as_secs_f64() / pull.as_secs_f64(),
        ms(cp_sync),
        cp_sync.as_secs_f64() / pull.as_secs_f64()
    );

    let noop = median(21, || {
        timed(|| {
            let out = finetune(
                ws.path(),
                &[
                    "run",
                    "--json",
                    "minilm.yaml",
                    "--pull",
                    "--remote",
                    remote.to_str().unwrap(),
                ],
            );
            assert!(out.contains("stage_cached"), "not a no-op: {out}");
        })
    });
    println!(
        "no-op run --pull, nothing stale: median {:.1} ms over 21 runs | goal 50 ms: ratio {:.2}",
        ms(noop),
        ms(noop) / 50.0
    );
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("entry")
        .map(|e| e.expect("file").metadata().expect("stat").len())
        .sum()
}

/// Each sample starts with no dirty pages left from the last one, whose writeback would
/// otherwise land on whichever command runs next.
fn timed(work: impl FnOnce()) -> Duration {
    let _ = Command::new("sync").status();
    common::timed(work)
}
