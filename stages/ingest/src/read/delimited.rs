//! Reading and cleaning: from the raw file to labelled rows, with every drop counted.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result, bail};
use finetune_core::Reporter;
use serde::Serialize;

use crate::params::{Column, Encoding, OnBadRow, Params};

pub struct Row {
    pub text: String,
    pub label: u32,
}

/// Why rows were left out, by count, with the first few line numbers of each reason so that a
/// user can find them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Dropped {
    pub empty_text: u64,
    pub duplicate_text: u64,
    pub empty_label: u64,
    pub bad_row: u64,
    #[serde(skip)]
    first_lines: BTreeMap<&'static str, Vec<u64>>,
}

/// How many line numbers per reason a message lists.
const LINES_SHOWN: usize = 5;

impl Dropped {
    fn drop_row(&mut self, reason: &'static str, line: u64) {
        let count = match reason {
            EMPTY_TEXT => &mut self.empty_text,
            DUPLICATE_TEXT => &mut self.duplicate_text,
            EMPTY_LABEL => &mut self.empty_label,
            _ => &mut self.bad_row,
        };
        *count += 1;
        let lines = self.first_lines.entry(reason).or_default();
        if lines.len() < LINES_SHOWN {
            lines.push(line);
        }
    }

    pub fn total(&self) -> u64 {
        self.empty_text + self.duplicate_text + self.empty_label + self.bad_row
    }
}

const EMPTY_TEXT: &str = "an empty or whitespace-only text";
const DUPLICATE_TEXT: &str = "a duplicate text";
const EMPTY_LABEL: &str = "an empty label";
const BAD_ROW: &str = "a malformed row";

/// `3 with an empty or whitespace-only text (lines 2, 4, 9), 1 with a duplicate text (line 7)`.
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = [
            (EMPTY_TEXT, self.empty_text),
            (DUPLICATE_TEXT, self.duplicate_text),
            (EMPTY_LABEL, self.empty_label),
            (BAD_ROW, self.bad_row),
        ];
        let mut first = true;
        for (reason, count) in counts.into_iter().filter(|(_, count)| *count > 0) {
            let lines = self.first_lines.get(reason).cloned().unwrap_or_default();
            let listed: Vec<String> = lines.iter().map(u64::to_string).collect();
            let more = if count > lines.len() as u64 {
                ", …"
            } else {
                ""
            };
            let noun = if lines.len() == 1 { "line" } else { "lines" };
            write!(
                f,
                "{}{count} with {reason} ({noun} {}{more})",
                if first { "" } else { ", " },
                listed.join(", ")
            )?;
            first = false;
        }
        Ok(())
    }
}

pub struct Table {
    pub rows: Vec<Row>,
    /// Label names in id order.
    pub labels: Vec<String>,
    pub rows_read: u64,
    pub dropped: Dropped,
}

/// Reads `path` (named `shown` in messages) into rows with label ids.
pub fn read_table(
    path: &Path,
    shown: &Path,
    params: &Params,
    reporter: &dyn Reporter,
) -> Result<Table> {
    let total_bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", shown.display()))?
        .len();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(params.delimiter_byte())
        .quoting(params.uses_quotes())
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", shown.display()))?;
    let mut record = csv::ByteRecord::new();
    let mut fields_expected = None;
    let mut columns = None;
    let mut raw_rows: Vec<(String, String)> = Vec::new();
    let mut seen_texts = HashSet::new();
    let mut dropped = Dropped::default();
    let mut rows_read = 0u64;
    let bad_row = |dropped: &mut Dropped, line: u64, message: String| -> Result<()> {
        match params.on_bad_row {
            OnBadRow::Error => bail!("{message} (set `on_bad_row: skip` to skip such rows)"),
            OnBadRow::Skip => {
                dropped.drop_row(BAD_ROW, line);
                Ok(())
            }
        }
    };
    loop {
        let more = reader
            .read_byte_record(&mut record)
            .map_err(|err| describe_csv_error(err, shown))?;
        if !more {
            break;
        }
        let position = record
            .position()
            .cloned()
            .unwrap_or_else(csv::Position::new);
        let line = position.line();
        let (text_col, label_col) = match columns {
            Some(columns) => columns,
            None => {
                let header = params.has_header().then(|| decode_header(&record));
                let resolved = (
                    resolve_column(&params.text, header.as_deref(), record.len(), shown, "text")?,
                    resolve_column(
                        &params.label,
                        header.as_deref(),
                        record.len(),
                        shown,
                        "label",
                    )?,
                );
                columns = Some(resolved);
                fields_expected = Some(record.len());
                if header.is_some() {
                    continue;
                }
                resolved
            }
        };
        rows_read += 1;
        if rows_read.is_multiple_of(4096) {
            reporter.progress(position.byte(), total_bytes);
        }
        if Some(record.len()) != fields_expected {
            bad_row(
                &mut dropped,
                line,
                format!(
                    "{}:{line}: expected {} fields, found {}",
                    shown.display(),
                    fields_expected.unwrap_or(0),
                    record.len()
                ),
            )?;
            continue;
        }
        let text = decode_field(&record, text_col, params.encoding, shown, &position, "text")?;
        let label = decode_field(
            &record,
            label_col,
            params.encoding,
            shown,
            &position,
            "label",
        )?;
        let (text, label) = if params.trim {
            (text.trim().to_string(), label.trim().to_string())
        } else {
            (text, label)
        };
        if text.len() > params.max_text_bytes {
            bad_row(
                &mut dropped,
                line,
                format!(
                    "{}:{line}: the text is {} bytes, over `max_text_bytes` ({})",
                    shown.display(),
                    text.len(),
                    params.max_text_bytes
                ),
            )?;
            continue;
        }
        if params.drop_empty && text.trim().is_empty() {
            dropped.drop_row(EMPTY_TEXT, line);
            continue;
        }
        if label.is_empty() {
            dropped.drop_row(EMPTY_LABEL, line);
            continue;
        }
        if params.drop_duplicates && !seen_texts.insert(text.clone()) {
            dropped.drop_row(DUPLICATE_TEXT, line);
            continue;
        }
        if let Some(allowed) = &params.labels
            && !allowed.contains(&label)
        {
            bail!(
                "{}:{line}: label `{label}` is not in `labels` ({})",
                shown.display(),
                allowed.join(", ")
            );
        }
        raw_rows.push((text, label));
    }
    if rows_read == 0 {
        bail!(
            "{} has no data rows{}",
            shown.display(),
            if params.has_header() {
                " (only a header, or nothing)"
            } else {
                ""
            }
        );
    }
    if raw_rows.is_empty() {
        bail!(
            "{}: all {rows_read} rows were dropped: {}",
            shown.display(),
            dropped
        );
    }
    let labels = label_names(&raw_rows, params, shown)?;
    let ids: BTreeMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let rows = raw_rows
        .iter()
        .map(|(text, label)| Row {
            text: text.clone(),
            label: ids[label.as_str()],
        })
        .collect();
    reporter.progress(total_bytes, total_bytes);
    Ok(Table {
        rows,
        labels,
        rows_read,
        dropped,
    })
}

fn describe_csv_error(err: csv::Error, shown: &Path) -> anyhow::Error {
    let at = err
        .position()
        .map(|p| format!(":{}", p.line()))
        .unwrap_or_default();
    anyhow::anyhow!("{}{at}: {err}", shown.display())
}

fn decode_header(record: &csv::ByteRecord) -> Vec<String> {
    record
        .iter()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim()
                .trim_start_matches('\u{feff}')
                .to_string()
        })
        .collect()
}

fn resolve_column(
    column: &Column,
    header: Option<&[String]>,
    fields: usize,
    shown: &Path,
    role: &str,
) -> Result<usize> {
    match (column, header) {
        (Column::Index(i), _) if *i < fields => Ok(*i),
        (Column::Index(i), _) => bail!(
            "{}: the {role} column is index {i}, but rows have {fields} fields",
            shown.display()
        ),
        (Column::Name(name), Some(header)) => {
            header.iter().position(|h| h == name).with_context(|| {
                format!(
                    "{}: no column named `{name}` for the {role}; the header has: {}",
                    shown.display(),
                    header.join(", ")
                )
            })
        }
        (Column::Name(name), None) => {
            bail!(
                "{}: the {role} column is named `{name}`, but the file has no header row (`header: false`); use an index",
                shown.display()
            )
        }
    }
}

fn decode_field(
    record: &csv::ByteRecord,
    index: usize,
    encoding: Encoding,
    shown: &Path,
    position: &csv::Position,
    role: &str,
) -> Result<String> {
    let bytes = &record[index];
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_string()),
        Err(_) if encoding == Encoding::Lossy => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Err(err) => {
            // Exact for unquoted fields; for quoted ones it is the offset in the unquoted text.
            let field_start = record.range(index).map_or(0, |r| r.start) as u64 + index as u64;
            let offset = position.byte() + field_start + err.valid_up_to() as u64;
            bail!(
                "{}:{}: invalid UTF-8 in the {role} field at byte offset {offset} of the file (set `encoding: lossy` to replace bad bytes)",
                shown.display(),
                position.line()
            )
        }
    }
}

fn label_names(rows: &[(String, String)], params: &Params, shown: &Path) -> Result<Vec<String>> {
    if let Some(labels) = &params.labels {
        return Ok(labels.clone());
    }
    let mut names: Vec<String> = rows
        .iter()
        .map(|(_, l)| l.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    } else {
        names.sort();
    }
    if names.len() < 2 {
        bail!(
            "{}: only one label ({}) in the data; a classifier needs at least two",
            shown.display(),
            names.join(", ")
        );
    }
    Ok(names)
}
