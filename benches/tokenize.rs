//! Tokenize-stage benchmark (`cargo bench --bench tokenize`): the 23,486 clothing reviews with
//! the real all-MiniLM-L6-v2 tokenizer (max_length 128), the whole stage (Parquet in, Parquet
//! out) against a bare `encode_batch` loop over the same texts. Reads the reviews shipped in
//! data/raw and the model from `FINETUNE_MODEL_DIR`, else models/all-MiniLM-L6-v2 (what
//! scripts/fetch-model.sh fills).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use arrow::array::{Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokenizers::{Tokenizer, TruncationParams};

const BIN: &str = env!("CARGO_BIN_EXE_finetune");
const RUNS: usize = 5;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("FINETUNE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("models/all-MiniLM-L6-v2"));
    let csv = repo.join("data/raw/womens_clothing_reviews.csv");
    let ws = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "name: clothing\nstages:\n  ingest:\n    uses: ingest_csv\n    with: {{path: \"{}\", text: Review Text, label: Rating}}\n  tokenize:\n    uses: tokenize\n    needs: [ingest]\n    with: {{tokenizer: {{from: \"{}\"}}, max_length: 128}}\n",
        csv.display(),
        model.display()
    );
    std::fs::write(ws.path().join("clothing.yaml"), pipeline).expect("pipeline");
    run_stage(&ws, &[]);

    let ingest = std::fs::canonicalize(ws.path().join("artifacts/runs/clothing/ingest"))
        .expect("ingest output");
    let texts: Vec<String> = ["train", "validation", "test"]
        .iter()
        .flat_map(|s| read_texts(&ingest.join(format!("{s}.parquet"))))
        .collect();
    let mut tokenizer = Tokenizer::from_file(model.join("tokenizer.json")).expect("tokenizer");
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: 128,
            ..Default::default()
        }))
        .expect("truncation");
    tokenizer.with_padding(None);

    let mut tokens = 0usize;
    let bare = median((0..RUNS).map(|_| {
        let start = Instant::now();
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = tokenizer.encode_batch(inputs, true).expect("encode");
        tokens = encodings.iter().map(|e| e.get_ids().len()).sum();
        start.elapsed()
    }));
    let stage = median((0..RUNS).map(|_| run_stage(&ws, &["--force", "tokenize"])));
    println!(
        "tokenize {} texts, {tokens} tokens: bare encode_batch {:.0} ms ({:.2} M tokens/s) | tokenize stage {:.0} ms ({:.2} M tokens/s, Parquet read and write included) | stage/bare = {:.3} (target <= 1.10)",
        texts.len(),
        bare.as_secs_f64() * 1e3,
        tokens as f64 / bare.as_secs_f64() / 1e6,
        stage.as_secs_f64() * 1e3,
        tokens as f64 / stage.as_secs_f64() / 1e6,
        stage.as_secs_f64() / bare.as_secs_f64()
    );
}

/// Runs the pipeline and returns the tokenize stage's own duration, from the JSON events.
fn run_stage(ws: &tempfile::TempDir, extra: &[&str]) -> Duration {
    let out = Command::new(BIN)
        .args(["run", "clothing.yaml", "--json"])
        .args(extra)
        .current_dir(ws.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seconds = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "stage_finished" && e["stage"] == "tokenize")
        .and_then(|e| e["duration_s"].as_f64())
        .unwrap_or(0.0);
    Duration::from_secs_f64(seconds)
}

fn read_texts(path: &std::path::Path) -> Vec<String> {
    let file = std::fs::File::open(path).expect("split");
    let mut texts = Vec::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader")
    {
        let batch = batch.expect("batch");
        let column = batch
            .column_by_name("text")
            .expect("text")
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8")
            .clone();
        texts.extend((0..column.len()).map(|i| column.value(i).to_string()));
    }
    texts
}

fn median(samples: impl Iterator<Item = Duration>) -> Duration {
    let mut all: Vec<Duration> = samples.collect();
    all.sort();
    all[all.len() / 2]
}
