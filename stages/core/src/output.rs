//! Writing results durably and the same way everywhere: a stage's small JSON files, and the
//! file-tree walks and fsyncs that the cache and the checkpoints rely on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// The engine's own manifest inside every cache entry; stages may not write a file by this
/// name, and fingerprints leave it out (the engine writes it after the stage has run).
pub const ENGINE_MANIFEST: &str = ".finetune-manifest.json";

/// `value` as pretty-printed JSON with a final newline (stable, diff-friendly bytes), written
/// atomically: a crash leaves the previous file or the new one, never half of one.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    finetune_atomic::write(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Every regular file under `dir`, relative to it, sorted; symlinks are followed.
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(walk(dir, Links::Follow)?
        .into_iter()
        .map(|(path, _)| path)
        .collect())
}

/// Every entry under `dir` that is not a directory (regular files, symlinks, anything else),
/// relative to it, sorted, with its type; symlinks are not followed. What the cache uses to
/// see exactly what a stage left behind.
pub fn list_tree(dir: &Path) -> Result<Vec<(PathBuf, std::fs::FileType)>> {
    walk(dir, Links::Keep)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Links {
    Follow,
    Keep,
}

/// The non-directories under `dir` with their types, sorted by path.
fn walk(dir: &Path, links: Links) -> Result<Vec<(PathBuf, std::fs::FileType)>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let entries = std::fs::read_dir(dir.join(&relative))
            .with_context(|| format!("cannot list {}", dir.join(&relative).display()))?;
        for entry in entries {
            let entry = entry?;
            let child = relative.join(entry.file_name());
            let kind = match links {
                Links::Follow => std::fs::metadata(entry.path()).map(|m| m.file_type()),
                Links::Keep => entry.file_type(),
            }
            .with_context(|| format!("cannot read {}", entry.path().display()))?;
            if kind.is_dir() {
                pending.push(child);
            } else {
                found.push((child, kind));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// Flushes every file under `dir`, then `dir` itself, so that a rename that publishes it
/// can never expose data still in the page cache (or a write error a full disk reports late).
pub fn sync_tree(dir: &Path) -> Result<()> {
    for relative in list_files(dir)? {
        let path = dir.join(&relative);
        std::fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot sync {}", path.display()))?;
    }
    sync_dir(dir)
}

/// Flushes a directory's entries (the names a rename created or removed).
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
