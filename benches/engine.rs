//! Engine benchmarks (`cargo bench --bench engine`), each printed with its ratio:
//!
//! 1. a no-op rerun of a 5-stage pipeline (the whole process: start, parse, hash check, exit),
//!    against the 20 ms target and the figures measured for dvc, snakemake and make;
//! 2. SHA-256 of a 1 GiB file by the cache's hasher against `openssl dgst -sha256`;
//! 3. a rerun after `touch` of a large input without a content change;
//! 4. what checking cache entries against their manifests (presence, type, size, digest
//!    through the memo) adds to a no-op rerun of the default pipeline, against its 5 ms
//!    target: every entry looked up with its checks, less reading the manifests alone.
//!
//! `FINETUNE_BENCH_MIB` sets the size of the large file (default 1024).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{BIN, finetune, median, ms, timed};

use finetune::cache::digest::{DigestMemo, sha256_file};
use finetune::cache::store::{Lookup, Store};
const RUNS: usize = 21;

fn main() {
    let mib: u64 = std::env::var("FINETUNE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let ws = tempfile::tempdir().expect("temp dir");
    setup_workspace(ws.path(), mib);

    let noop = median(RUNS, || time_run(ws.path(), "five.yaml"));
    println!(
        "no-op rerun, 5 stages: median {:.2} ms over {RUNS} runs | target 20 ms: ratio {:.3} | dvc 0.41 s: {:.0}x faster | snakemake 0.52 s: {:.0}x faster | make 1.3 ms: ratio {:.2}",
        ms(noop),
        ms(noop) / 20.0,
        410.0 / ms(noop),
        520.0 / ms(noop),
        ms(noop) / 1.3
    );

    let big = ws.path().join("big.bin");
    let ours = median(3, || timed(|| drop(sha256_file(&big).expect("hash"))));
    let openssl = median(3, || {
        timed(|| {
            let status = Command::new("openssl")
                .args(["dgst", "-sha256"])
                .arg(&big)
                .output()
                .expect("openssl");
            assert!(status.status.success());
        })
    });
    let gbps = |d: Duration| (mib as f64 / 1024.0) * 1.073_741_824 / d.as_secs_f64();
    println!(
        "sha256 of {mib} MiB: finetune {:.2} GB/s, openssl {:.2} GB/s | ratio {:.2} (target >= 0.9)",
        gbps(ours),
        gbps(openssl),
        openssl.as_secs_f64() / ours.as_secs_f64()
    );

    let touched = median(3, || {
        let file = std::fs::File::options()
            .write(true)
            .open(&big)
            .expect("open");
        file.set_modified(std::time::SystemTime::now())
            .expect("touch");
        drop(file);
        time_run(ws.path(), "big.yaml")
    });
    let untouched = median(RUNS, || time_run(ws.path(), "big.yaml"));
    println!(
        "rerun after touch of a {mib} MiB input (content unchanged, nothing reruns): {:.0} ms (one rehash at {:.2} GB/s) | rerun without touch: {:.2} ms",
        ms(touched),
        gbps(touched),
        ms(untouched)
    );

    entry_checks();
}

/// Benchmark 4, on a workspace that ran the default pipeline (a few seconds of training).
fn entry_checks() {
    let ws = tempfile::tempdir().expect("temp dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["data", "pipelines"] {
        copy_tree(&repo.join(dir), &ws.path().join(dir));
    }
    let _ = std::fs::remove_file(ws.path().join("pipelines/reviews.lock"));
    let first = Command::new(BIN)
        .args(["run", "--json"])
        .current_dir(ws.path())
        .env_remove("FINETUNE_HMAC_KEY")
        .output()
        .expect("first run");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    time_run(ws.path(), "pipelines/reviews.yaml"); // the memo now stamps every entry's files
    let lock: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.path().join("pipelines/reviews.lock")).expect("lock file"),
    )
    .expect("lock JSON");
    let keys: Vec<String> = lock["stages"]
        .as_object()
        .expect("stages")
        .values()
        .map(|s| s["key"].as_str().expect("key").to_string())
        .collect();
    let store = Store::new(&ws.path().join("artifacts"));
    let memo_file = ws.path().join("artifacts/digests.json");
    let mut files = 0;
    let checked = median(RUNS, || {
        let mut memo = DigestMemo::load(&memo_file);
        timed(|| {
            files = 0;
            for key in &keys {
                let Ok(Lookup::Hit(entry)) = store.lookup(key, &mut memo) else {
                    panic!("entry {key} is not a clean hit");
                };
                files += entry.manifest.files.len();
            }
        })
    });
    let manifests_only = median(RUNS, || {
        timed(|| {
            for key in &keys {
                let bytes = std::fs::read(store.entry_dir(key).join(".finetune-manifest.json"));
                drop(bytes.expect("manifest"));
            }
        })
    });
    let added = checked.saturating_sub(manifests_only);
    println!(
        "entry checks on a no-op rerun of reviews.yaml ({} entries, {files} files): {:.3} ms \
         (lookups with checks {:.3} ms, reading the manifests alone {:.3} ms) | target 5 ms: ratio {:.3}",
        keys.len(),
        ms(added),
        ms(checked),
        ms(manifests_only),
        ms(added) / 5.0
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn setup_workspace(root: &Path, mib: u64) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(root.join("data/raw")).expect("mkdir");
    std::fs::copy(
        repo.join("data/raw/product_reviews.tsv"),
        root.join("data/raw/product_reviews.tsv"),
    )
    .expect("copy data");
    std::fs::copy(
        repo.join("tests/fixtures/five.yaml"),
        root.join("five.yaml"),
    )
    .expect("copy pipeline");
    std::fs::write(root.join("notes.txt"), "notes\n").expect("notes");
    write_big_file(&root.join("big.bin"), mib);
    std::fs::write(
        root.join("big.yaml"),
        "name: big\nstages:\n  size:\n    uses: command\n    with:\n      run: [sh, -c, 'wc -c < big.bin > {out}/size.txt']\n      deps: [big.bin]\n",
    )
    .expect("pipeline");
    for pipeline in ["five.yaml", "big.yaml"] {
        finetune(root, &["run", pipeline, "--json"]);
    }
}

/// Pseudo-random bytes (xorshift), so neither the disk nor the hasher sees a trivial pattern.
fn write_big_file(path: &Path, mib: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
}

fn time_run(root: &Path, pipeline: &str) -> Duration {
    timed(|| {
        let text = finetune(root, &["run", pipeline, "--json"]);
        assert!(
            !text.contains("stage_started"),
            "the rerun was not a no-op:\n{text}"
        );
    })
}
