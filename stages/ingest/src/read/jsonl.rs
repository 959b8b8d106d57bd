//! JSON Lines: one JSON object per line, the text and label under the keys the pipeline
//! names. Blank lines are skipped, as `datasets` and pandas skip them.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Cleaner, Place};
use crate::params::{Column, Encoding};

pub fn read(path: &Path, cleaner: &mut Cleaner) -> Result<()> {
    let shown = cleaner.shown;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", shown.display()))?;
    let total_bytes = file
        .metadata()
        .with_context(|| format!("cannot read {}", shown.display()))?
        .len();
    let mut reader = std::io::BufReader::new(file);
    let (text_key, label_key) = (key(&cleaner.params.text), key(&cleaner.params.label));
    let mut bytes = Vec::new();
    let (mut line, mut offset) = (0u64, 0u64);
    loop {
        bytes.clear();
        let read = reader
            .read_until(b'\n', &mut bytes)
            .with_context(|| format!("cannot read {}", shown.display()))?;
        if read == 0 {
            break;
        }
        line += 1;
        let line_start = offset;
        offset += read as u64;
        if line.is_multiple_of(4096) {
            cleaner.progress(offset, total_bytes);
        }
        let text = decode_line(&bytes, cleaner.params.encoding, shown, line, line_start)?;
        if text.trim().is_empty() {
            continue;
        }
        let place = Place::Line(line);
        match fields(&text, text_key, label_key, &place.at(shown))? {
            Ok((text, label)) => cleaner.take(place, text, label)?,
            Err(message) => cleaner.bad_row(place, message)?,
        }
    }
    cleaner.progress(total_bytes, total_bytes);
    Ok(())
}

/// The key a column names; an index was refused when the pipeline was checked.
fn key(column: &Column) -> &str {
    match column {
        Column::Name(name) => name,
        Column::Index(_) => "",
    }
}

fn decode_line(
    bytes: &[u8],
    encoding: Encoding,
    shown: &Path,
    line: u64,
    line_start: u64,
) -> Result<String> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_string()),
        Err(_) if encoding == Encoding::Lossy => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Err(err) => bail!(
            "{}:{line}: invalid UTF-8 at byte offset {} of the file (set `encoding: lossy` to replace bad bytes)",
            shown.display(),
            line_start + err.valid_up_to() as u64
        ),
    }
}

/// The text and label of one line; the inner error is a malformed row (`on_bad_row` decides),
/// the outer one a row no setting makes readable.
fn fields(
    line: &str,
    text_key: &str,
    label_key: &str,
    at: &str,
) -> Result<std::result::Result<(String, String), String>> {
    let object = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => object,
        Ok(other) => return Ok(Err(format!("{at}: a {}, not a JSON object", kind(&other)))),
        Err(err) => return Ok(Err(format!("{at}: not valid JSON: {err}"))),
    };
    let missing = |key: &str| {
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        format!("{at}: no key `{key}`; the object has: {}", keys.join(", "))
    };
    let Some(text) = object.get(text_key) else {
        return Ok(Err(missing(text_key)));
    };
    let Some(label) = object.get(label_key) else {
        return Ok(Err(missing(label_key)));
    };
    let text = match text {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => {
            return Ok(Err(format!(
                "{at}: key `{text_key}` holds a {}, not a text",
                kind(other)
            )));
        }
    };
    let label = match label {
        Value::String(label) => label.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Null => String::new(),
        Value::Array(_) => bail!(
            "{at}: key `{label_key}` holds a list of labels; this stage reads one label per row (multi-label data is not supported)"
        ),
        Value::Object(_) => {
            return Ok(Err(format!(
                "{at}: key `{label_key}` holds an object, not a label"
            )));
        }
    };
    Ok(Ok((text, label)))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}
