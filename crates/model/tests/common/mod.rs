//! Where the transformer tests find the repository, its fixtures and data, and the real model.
#![allow(dead_code)]

#[allow(unused_imports)] // each test binary uses its own share of them
pub use finetune_fixtures::{fixtures, minilm, repo};

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
                type_ids: Vec::new(),
                label: label.trim().parse().unwrap(),
                targets: Vec::new(),
            }
        })
        .collect()
}
