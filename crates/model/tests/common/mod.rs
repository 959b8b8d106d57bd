//! Where the transformer tests find the repository, its fixtures and data, and the real model.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The reference values shipped in the repository (tests/fixtures, provenance in its README).
pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// The real model, found as a user finds it: FINETUNE_MODEL_DIR, else models/ in the repo.
pub fn minilm() -> PathBuf {
    let dir = std::env::var_os("FINETUNE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is needed at {}: run scripts/fetch-model.sh or set FINETUNE_MODEL_DIR",
        dir.display()
    );
    dir
}

/// The first `n` Amazon review sentences shipped in data/raw, tokenized with the real model's
/// tokenizer (at most 32 tokens): real data for training tests.
pub fn amazon_examples(n: usize) -> Vec<finetune_model::Example> {
    let path = repo().join("data/raw/product_reviews.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tokenizer = tokenizers::Tokenizer::from_file(minilm().join("tokenizer.json")).unwrap();
    text.lines()
        .filter_map(|line| line.rsplit_once('\t'))
        .take(n)
        .map(|(sentence, label)| {
            let encoding = tokenizer.encode(sentence, true).unwrap();
            let mut ids: Vec<i32> = encoding.get_ids().iter().map(|&i| i as i32).collect();
            ids.truncate(32);
            finetune_model::Example {
                ids,
                label: label.trim().parse().unwrap(),
            }
        })
        .collect()
}
