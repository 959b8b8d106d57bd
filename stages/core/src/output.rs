//! Writing a stage's small result files the same way in every plugin.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// `value` as pretty-printed JSON with a final newline (stable, diff-friendly bytes).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
