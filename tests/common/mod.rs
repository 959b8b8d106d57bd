//! Helpers for tests that drive the built `finetune` binary in a throwaway workspace.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_finetune");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real all-MiniLM-L6-v2, found the way a user's pipeline finds it: `FINETUNE_MODEL_DIR`,
/// else `models/all-MiniLM-L6-v2` in the repository, fetched there by scripts/fetch-model.sh
/// when absent ([`finetune_fixtures::minilm`]).
pub fn model_dir() -> PathBuf {
    finetune_fixtures::minilm()
}

/// A temporary workspace holding copies of the repo's pipelines and shipped data.
pub struct Ws {
    pub dir: tempfile::TempDir,
}

impl Ws {
    pub fn new() -> Ws {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repo().join("pipelines"), &dir.path().join("pipelines"));
        copy_dir(&repo().join("data"), &dir.path().join("data"));
        copy_dir(&repo().join("tests/fixtures"), &dir.path().join("fixtures"));
        std::fs::write(dir.path().join("notes.txt"), "first notes\n").unwrap();
        Ws { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) {
        let path = self.file(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .current_dir(self.path())
            .env_remove("FINETUNE_HMAC_KEY");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run finetune")
    }

    /// `finetune ARGS` with `input` on its stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run finetune");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("wait for finetune")
    }

    /// `finetune run --json ARGS`, asserting success; returns the events.
    pub fn run_ok(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["run", "--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "finetune {all:?} failed:\n{}",
            stderr(&out)
        );
        events(&out)
    }

    /// Every file under `artifacts/` and the lock files, with their bytes.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        for root in ["artifacts", "pipelines", "fixtures"] {
            walk(&self.file(root), &mut |path| {
                if path.file_name().is_some_and(|n| n == ".lock") {
                    return; // the workspace lock holds the last pid
                }
                files.insert(
                    path.strip_prefix(self.path()).unwrap().to_path_buf(),
                    std::fs::read(path).unwrap(),
                );
            });
        }
        files
    }
}

/// Calls `visit` with every file under `dir` (none if it is not there).
pub fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, visit);
        } else {
            visit(&path);
        }
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.path().extension().is_none_or(|e| e != "lock") {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The model directory for child processes; a path that does not exist when there is no model,
/// so that pipelines needing it fail with their own clear error.
fn model_dir_if_present() -> PathBuf {
    finetune_fixtures::model_location()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON event: {line}: {e}"))
        })
        .collect()
}

/// Stage ids with an event of this kind, sorted.
pub fn stages_with(events: &[Value], kind: &str) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter(|e| e["event"] == kind)
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The output directory the last run linked for `stage`.
pub fn output_dir(ws: &Ws, pipeline: &str, stage: &str) -> PathBuf {
    std::fs::canonicalize(ws.file(&format!("artifacts/runs/{pipeline}/{stage}"))).unwrap()
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The default pipeline cut to 60 updates with a checkpoint every 10.
pub fn short_run(ws: &Ws) {
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    let yaml = yaml
        .replace("        epochs: 8\n", "        epochs: 8\n        max_steps: 60\n        save_strategy: steps\n        save_steps: 10\n        eval_strategy: steps\n        eval_steps: 10\n")
        .replace("        save_total_limit: 1\n", "");
    assert!(yaml.contains("max_steps: 60"));
    ws.write("pipelines/reviews.yaml", yaml);
}

/// Waits until the running `child` has written `relative` (e.g.
/// `checkpoints/checkpoint-20/trainer_state.json`) in its scratch directory, then kills it.
/// Returns that file's path. Fails if the run ends first or takes over two minutes.
pub fn kill_once_scratch_has(ws: &Ws, child: &mut std::process::Child, relative: &str) -> PathBuf {
    let scratch = ws.file("artifacts/scratch");
    let started = std::time::Instant::now();
    let found = loop {
        let found = std::fs::read_dir(&scratch).ok().and_then(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.path().join(relative)))
                .find(|p| p.exists())
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it wrote {relative}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no {relative} after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    found
}

/// Runs `script` with `sh -c` in `ws`, as root of a user and mount namespace of its own (so it
/// may mount a tmpfs: a small disk), with `$0` the finetune binary. Fails if the machine does
/// not allow such namespaces (the script should `exit 99` when its mount fails).
pub fn in_own_namespace(ws: &Ws, script: &str) -> Output {
    let out = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            BIN,
        ])
        .current_dir(ws.path())
        .env_remove("FINETUNE_HMAC_KEY")
        .output()
        .expect("this test needs util-linux's unshare");
    assert_ne!(
        out.status.code(),
        Some(99),
        "cannot mount a tmpfs in a user namespace here: {}",
        stderr(&out)
    );
    out
}

/// The default pipeline cut to 12 updates, without dropout (so that micro-batches of
/// different sizes draw no different masks), with `extra` training settings.
pub fn dropout_free_run(ws: &Ws, extra: &str) {
    let yaml = std::fs::read_to_string(ws.file("pipelines/reviews.yaml")).unwrap();
    let yaml = yaml
        .replace(
            "{ layers: 2, hidden: 128, heads: 4 }",
            "{ layers: 2, hidden: 128, heads: 4, dropout: 0.0 }",
        )
        .replace(
            "        epochs: 8\n",
            &format!("        epochs: 8\n        max_steps: 12\n{extra}"),
        );
    assert!(yaml.contains("dropout: 0.0") && yaml.contains("max_steps: 12"));
    ws.write("pipelines/reviews.yaml", yaml);
}

/// Two dropout-free runs of the default pipeline, each first edited by `prepare`: one with an
/// out-of-memory fault injected at update 5, one at micro-batch 8 × 2 from the start, which
/// must end alike.
pub struct HalfBatchRuns {
    /// The faulty run's output (its events).
    pub out: Output,
    pub faulty_train: PathBuf,
    pub small_train: PathBuf,
    /// The workspaces the train outputs are in.
    _workspaces: (Ws, Ws),
}

impl HalfBatchRuns {
    pub fn run(prepare: impl Fn(&Ws)) -> HalfBatchRuns {
        let (faulty, small) = (Ws::new(), Ws::new());
        for ws in [&faulty, &small] {
            dropout_free_run(ws, "");
            prepare(ws);
        }
        let yaml = std::fs::read_to_string(small.file("pipelines/reviews.yaml")).unwrap();
        small.write(
            "pipelines/reviews.yaml",
            yaml.replace("batch_size: 16\n", "batch_size: 8\n        grad_accum: 2\n"),
        );
        let out = faulty
            .command(&["run", "--json"])
            .env("FINETUNE_FAULT_OOM_AT_STEP", "5")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        small.run_ok(&[]);
        HalfBatchRuns {
            out,
            faulty_train: output_dir(&faulty, "reviews", "train"),
            small_train: output_dir(&small, "reviews", "train"),
            _workspaces: (faulty, small),
        }
    }
}

/// Every tensor of the model a train output saved, by name.
pub fn model_tensors(out: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let device = finetune_model::device("cpu").unwrap().device().clone();
    let (model, _) = finetune_model::hf::load(&out.join("model"), None, 0, &device).unwrap();
    finetune_model::hf::named_tensors(&model)
}

/// Asserts that two train outputs saved the same weights to within `tolerance`.
pub fn assert_same_weights(a: &Path, b: &Path, tolerance: f32) {
    for ((name, _, x), (_, _, y)) in model_tensors(a).iter().zip(&model_tensors(b)) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(worst < tolerance, "{name}: weights differ by {worst}");
    }
}

/// Column `name` of every row of a Parquet file, as arrow array type `T` (one per record
/// batch, in order).
pub fn parquet_column<T: Clone + 'static>(path: &Path, name: &str) -> Vec<T> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|batch| {
            let batch = batch.unwrap();
            let column = batch
                .column_by_name(name)
                .unwrap_or_else(|| panic!("{}: no column `{name}`", path.display()));
            column
                .as_any()
                .downcast_ref::<T>()
                .unwrap_or_else(|| {
                    panic!(
                        "{}: `{name}` is not {}",
                        path.display(),
                        std::any::type_name::<T>()
                    )
                })
                .clone()
        })
        .collect()
}

/// Each row of a list<float32> column of a Parquet file.
pub fn float_lists(path: &Path, name: &str) -> Vec<Vec<f32>> {
    use arrow::array::Array;
    let mut rows = Vec::new();
    for lists in parquet_column::<arrow::array::ListArray>(path, name) {
        for i in 0..lists.len() {
            let values = lists.value(i);
            let values = values
                .as_any()
                .downcast_ref::<arrow::array::Float32Array>()
                .unwrap_or_else(|| panic!("{}: `{name}` holds no float32 lists", path.display()));
            rows.push(values.values().to_vec());
        }
    }
    rows
}

/// Each row of a list<int32> column of a Parquet file (token ids, token type ids).
pub fn int32_lists(path: &Path, name: &str) -> Vec<Vec<i32>> {
    use arrow::array::Array;
    let mut rows = Vec::new();
    for lists in parquet_column::<arrow::array::ListArray>(path, name) {
        for i in 0..lists.len() {
            let values = lists.value(i);
            let values = values
                .as_any()
                .downcast_ref::<arrow::array::Int32Array>()
                .unwrap_or_else(|| panic!("{}: `{name}` holds no int32 lists", path.display()));
            rows.push(values.values().to_vec());
        }
    }
    rows
}

/// Each row of a string column of a Parquet file.
pub fn strings(path: &Path, name: &str) -> Vec<String> {
    parquet_column::<arrow::array::StringArray>(path, name)
        .iter()
        .flat_map(|column| {
            column
                .iter()
                .map(|s| s.unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}
