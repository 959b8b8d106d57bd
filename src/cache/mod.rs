//! The content-addressed cache: file digests, cache entries with manifests, the lock file.

pub mod digest;
pub mod lockfile;
pub mod store;

use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a
/// half-written one ([`finetune_atomic::write`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    finetune_atomic::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

pub use finetune_core::digest::canonical_json;
