//! JSON Lines: one JSON object per line, the text and label under the keys the pipeline
//! names. Blank lines are skipped, as `datasets` and pandas skip them.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Cleaner, Fields, LabelField, Place};
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
    let keys = Keys {
        text: key(&cleaner.params.text),
        text_pair: cleaner.params.text_pair.as_ref().map(key),
        label: cleaner.params.label.columns().iter().map(key).collect(),
        several_labels: cleaner.params.label.is_several(),
    };
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
        match fields(&text, &keys, &place.at(shown))? {
            Ok(fields) => cleaner.take(place, fields)?,
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

/// The keys of the fields this stage reads.
struct Keys<'a> {
    text: &'a str,
    text_pair: Option<&'a str>,
    label: Vec<&'a str>,
    /// Whether the label is read from several keys, as one list.
    several_labels: bool,
}

/// The fields of one line; the inner error is a malformed row (`on_bad_row` decides), the
/// outer one a row no setting makes readable.
fn fields(line: &str, keys: &Keys, at: &str) -> Result<std::result::Result<Fields, String>> {
    let object = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => object,
        Ok(other) => return Ok(Err(format!("{at}: a {}, not a JSON object", kind(&other)))),
        Err(err) => return Ok(Err(format!("{at}: not valid JSON: {err}"))),
    };
    let get = |key: &str| {
        object.get(key).ok_or_else(|| {
            let present: Vec<&str> = object.keys().map(String::as_str).collect();
            format!(
                "{at}: no key `{key}`; the object has: {}",
                present.join(", ")
            )
        })
    };
    let text_of = |key: &str| -> std::result::Result<String, String> {
        match get(key)? {
            Value::String(text) => Ok(text.clone()),
            Value::Null => Ok(String::new()),
            other => Err(format!(
                "{at}: key `{key}` holds a {}, not a text",
                kind(other)
            )),
        }
    };
    let text = match text_of(keys.text) {
        Ok(text) => text,
        Err(message) => return Ok(Err(message)),
    };
    let text_pair = match keys.text_pair.map(text_of).transpose() {
        Ok(pair) => pair,
        Err(message) => return Ok(Err(message)),
    };
    let label_of = |key: &str| label_field(get(key)?, key, at);
    let label = match keys.several_labels {
        false => label_of(keys.label[0]),
        true => keys
            .label
            .iter()
            .map(|key| label_of(key))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(|fields| {
                LabelField::List(fields.into_iter().flat_map(LabelField::into_list).collect())
            }),
    };
    let label = match label {
        Ok(label) => label,
        Err(message) => return Ok(Err(message)),
    };
    Ok(Ok(Fields {
        text,
        text_pair,
        label,
    }))
}

/// A label value: a string, number or boolean, or a list of them (multi-label labels, or a
/// regression's targets); null is an empty label.
fn label_field(value: &Value, key: &str, at: &str) -> std::result::Result<LabelField, String> {
    let scalar = |value: &Value| match value {
        Value::String(label) => Ok(label.clone()),
        Value::Number(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(format!("{at}: key `{key}` holds an object, not a label")),
    };
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Array(_) => Err(format!("{at}: key `{key}` holds a list of lists")),
                item => scalar(item),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(LabelField::List),
        value => scalar(value).map(LabelField::One),
    }
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
