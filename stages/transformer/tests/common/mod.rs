//! Where the transformer tests find the repository, the shared data and the real model.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// ../shared beside the repository (or `FINETUNE_SHARED`): golden values and data.
pub fn shared() -> PathBuf {
    std::env::var_os("FINETUNE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
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
