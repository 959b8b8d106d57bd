//! Loads a Hugging Face model directory, saves it back with our writer, and prints the logits
//! of the saved model for token-id rows read from stdin (one JSON array a line), so that the
//! same rows can be fed to Python `transformers` for a side-by-side check:
//!
//!     cargo run --release -p finetune-model --example export -- IN_DIR OUT_DIR [LABELS...]

use std::io::BufRead;
use std::path::PathBuf;

use finetune_model::Batch;
use finetune_model::hf::{load, save, save_with_tokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, labels @ ..] = args.as_slice() else {
        anyhow::bail!("usage: export IN_DIR OUT_DIR [LABELS...]");
    };
    let device = finetune_model::device("cpu")?.device().clone();
    let labels = (!labels.is_empty()).then_some(labels);
    let (model, report) = load(&PathBuf::from(input), labels, 42, &device)?;
    eprintln!(
        "loaded {input}: newly initialised {:?}, unexpected {:?}",
        report.newly_initialized, report.unexpected
    );
    let tokenizer = PathBuf::from(input).join("tokenizer.json");
    if tokenizer.is_file() {
        save_with_tokenizer(&model, &PathBuf::from(output), &tokenizer)?;
    } else {
        save(&model, &PathBuf::from(output))?;
    }
    let (saved, _) = load(&PathBuf::from(output), None, 0, &device)?;
    let rows: Vec<Vec<i32>> = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(&l))
        .collect::<Result<_, _>>()?;
    let logits = saved
        .forward(&Batch::from_rows(&rows, &saved.config, None, &device))
        .logits;
    let [n, k] = logits.dims();
    let values: Vec<f32> = logits
        .into_data()
        .try_to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let table: Vec<&[f32]> = values.chunks(k).take(n).collect();
    println!("{}", serde_json::to_string(&table)?);
    Ok(())
}
