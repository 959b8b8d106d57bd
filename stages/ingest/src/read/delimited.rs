//! CSV and TSV files, through the csv crate: a header row or not, quoting or not, and errors
//! that name the line (and for bad UTF-8, the byte offset in the file).

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{Cleaner, Fields, LabelField, Place, resolve_column};
use crate::params::{Encoding, Format};

pub fn read(path: &Path, format: Format, cleaner: &mut Cleaner) -> Result<()> {
    let (params, shown) = (cleaner.params, cleaner.shown);
    let total_bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", shown.display()))?
        .len();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(params.delimiter_byte(format))
        .quoting(params.uses_quotes(format))
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", shown.display()))?;
    let mut record = csv::ByteRecord::new();
    let mut fields_expected = None;
    let mut columns = None;
    let mut rows = 0u64;
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
        let (text_col, pair_col, label_cols) = match &columns {
            Some(columns) => columns,
            None => {
                let header = params.has_header(format).then(|| decode_header(&record));
                let resolve = |column, role| {
                    let names = header.as_deref();
                    resolve_column(column, names, "the header has", record.len(), shown, role)
                };
                let resolved = (
                    resolve(&params.text, "text")?,
                    match &params.text_pair {
                        Some(column) => Some(resolve(column, "text pair")?),
                        None => None,
                    },
                    params
                        .label
                        .columns()
                        .iter()
                        .map(|column| resolve(column, "label"))
                        .collect::<Result<Vec<_>>>()?,
                );
                fields_expected = Some(record.len());
                let header_row = header.is_some();
                let resolved = columns.insert(resolved);
                if header_row {
                    continue;
                }
                resolved
            }
        };
        rows += 1;
        if rows.is_multiple_of(4096) {
            cleaner.progress(position.byte(), total_bytes);
        }
        if Some(record.len()) != fields_expected {
            let message = format!(
                "{}: expected {} fields, found {}",
                Place::Line(line).at(shown),
                fields_expected.unwrap_or(0),
                record.len()
            );
            cleaner.bad_row(Place::Line(line), message)?;
            continue;
        }
        let field =
            |index, role| decode_field(&record, index, params.encoding, shown, &position, role);
        let fields = Fields {
            text: field(*text_col, "text")?,
            text_pair: match pair_col {
                Some(column) => Some(field(*column, "text pair")?),
                None => None,
            },
            label: {
                let mut values = label_cols
                    .iter()
                    .map(|&column| field(column, "label"))
                    .collect::<Result<Vec<_>>>()?;
                match params.label.is_several() {
                    true => LabelField::List(values),
                    false => LabelField::One(values.remove(0)),
                }
            },
        };
        cleaner.take(Place::Line(line), fields)?;
    }
    cleaner.progress(total_bytes, total_bytes);
    Ok(())
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
