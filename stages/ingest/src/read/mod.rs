//! Reading and cleaning: from the raw files to labelled rows, with every drop counted. One
//! reader per format (delimited, JSON Lines, Parquet) turns its file into text and label
//! strings; the [`Cleaner`] they all hand rows to trims, drops and checks them alike.

mod delimited;
mod jsonl;
mod parquet;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use finetune_core::Reporter;
use serde::Serialize;

use crate::params::{Format, OnBadRow, Params, Source};

pub struct Row {
    pub text: String,
    /// The second text of a pair (`text_pair:`), else `None`.
    pub text_pair: Option<String>,
    pub label: u32,
    /// The index of the file it came from, in [`Params::sources`] order.
    pub source: usize,
}

/// The fields of one row as its file holds them: every reader hands these to the [`Cleaner`].
pub struct Fields {
    pub text: String,
    /// Read when the pipeline names a `text_pair` column.
    pub text_pair: Option<String>,
    pub label: String,
}

impl Fields {
    fn trimmed(self) -> Fields {
        Fields {
            text: self.text.trim().to_string(),
            text_pair: self.text_pair.map(|t| t.trim().to_string()),
            label: self.label.trim().to_string(),
        }
    }

    /// What duplicates are judged by: the text, or both texts of a pair.
    fn identity(&self) -> String {
        match &self.text_pair {
            Some(pair) => format!("{}\u{0}{pair}", self.text),
            None => self.text.clone(),
        }
    }
}

/// Where a row is in its file: a line of a text file, or a row of a Parquet file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Line(u64),
    Row(u64),
}

impl Place {
    /// `data/a.csv:7` or `data/a.parquet: row 7`: the prefix of a message about this row.
    pub fn at(self, shown: &Path) -> String {
        match self {
            Place::Line(line) => format!("{}:{line}", shown.display()),
            Place::Row(row) => format!("{}: row {row}", shown.display()),
        }
    }

    fn number(self) -> u64 {
        match self {
            Place::Line(n) | Place::Row(n) => n,
        }
    }

    fn noun(self, plural: bool) -> &'static str {
        match (self, plural) {
            (Place::Line(_), false) => "line",
            (Place::Line(_), true) => "lines",
            (Place::Row(_), false) => "row",
            (Place::Row(_), true) => "rows",
        }
    }
}

/// Why rows were left out, by count, with the first few places of each reason so that a user
/// can find them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Dropped {
    pub empty_text: u64,
    pub duplicate_text: u64,
    pub empty_label: u64,
    pub bad_row: u64,
    /// Per reason, the first places: (file index, place).
    #[serde(skip)]
    first_places: BTreeMap<&'static str, Vec<(usize, Place)>>,
    /// The files read, as the pipeline names them; named in messages only when there are two
    /// or more.
    #[serde(skip)]
    files: Vec<PathBuf>,
}

/// How many places per reason a message lists.
const PLACES_SHOWN: usize = 5;

impl Dropped {
    fn drop_row(&mut self, reason: &'static str, source: usize, place: Place) {
        let count = match reason {
            EMPTY_TEXT => &mut self.empty_text,
            DUPLICATE_TEXT => &mut self.duplicate_text,
            EMPTY_LABEL => &mut self.empty_label,
            _ => &mut self.bad_row,
        };
        *count += 1;
        let places = self.first_places.entry(reason).or_default();
        if places.len() < PLACES_SHOWN {
            places.push((source, place));
        }
    }

    pub fn total(&self) -> u64 {
        self.empty_text + self.duplicate_text + self.empty_label + self.bad_row
    }

    /// `lines 2, 4, 9`, or with several files `train.csv lines 2, 4; dev.jsonl line 3`.
    fn places(&self, places: &[(usize, Place)]) -> String {
        let mut groups: Vec<(usize, Place, Vec<u64>)> = Vec::new();
        for &(source, place) in places {
            match groups.last_mut() {
                Some((s, p, numbers)) if *s == source && p.noun(false) == place.noun(false) => {
                    numbers.push(place.number());
                }
                _ => groups.push((source, place, vec![place.number()])),
            }
        }
        let named = self.files.len() > 1;
        let described: Vec<String> = groups
            .iter()
            .map(|(source, place, numbers)| {
                let listed: Vec<String> = numbers.iter().map(u64::to_string).collect();
                let file = match (named, self.files.get(*source)) {
                    (true, Some(file)) => format!("{} ", file.display()),
                    _ => String::new(),
                };
                format!(
                    "{file}{} {}",
                    place.noun(numbers.len() > 1),
                    listed.join(", ")
                )
            })
            .collect();
        described.join("; ")
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
            let places = self.first_places.get(reason).cloned().unwrap_or_default();
            let more = if count > places.len() as u64 {
                ", …"
            } else {
                ""
            };
            write!(
                f,
                "{}{count} with {reason} ({}{more})",
                if first { "" } else { ", " },
                self.places(&places)
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

/// What every reader hands its rows to: trims, drops (counted) and checks them the same way
/// whatever the format, and keeps the rest with their file.
pub struct Cleaner<'a> {
    params: &'a Params,
    /// The file being read, as the pipeline names it (for messages), and its index.
    shown: &'a Path,
    source: usize,
    reporter: &'a dyn Reporter,
    seen_texts: HashSet<String>,
    dropped: Dropped,
    /// The rows kept, each with the index of its file.
    kept: Vec<(Fields, usize)>,
    rows_read: u64,
}

impl Cleaner<'_> {
    /// One data row as its file holds it.
    pub fn take(&mut self, place: Place, fields: Fields) -> Result<()> {
        self.rows_read += 1;
        let params = self.params;
        let fields = if params.trim {
            fields.trimmed()
        } else {
            fields
        };
        let longest = fields
            .text
            .len()
            .max(fields.text_pair.as_ref().map_or(0, String::len));
        if longest > params.max_text_bytes {
            let message = format!(
                "{}: the text is {longest} bytes, over `max_text_bytes` ({})",
                place.at(self.shown),
                params.max_text_bytes
            );
            return self.malformed(place, message);
        }
        let empty = |text: &str| text.trim().is_empty();
        let reason = if params.drop_empty
            && (empty(&fields.text) || fields.text_pair.as_deref().is_some_and(empty))
        {
            Some(EMPTY_TEXT)
        } else if fields.label.is_empty() {
            Some(EMPTY_LABEL)
        } else if params.drop_duplicates && !self.seen_texts.insert(fields.identity()) {
            Some(DUPLICATE_TEXT)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.dropped.drop_row(reason, self.source, place);
            return Ok(());
        }
        if let Some(allowed) = &params.labels
            && !allowed.contains(&fields.label)
        {
            bail!(
                "{}: label `{}` is not in `labels` ({})",
                place.at(self.shown),
                fields.label,
                allowed.join(", ")
            );
        }
        self.kept.push((fields, self.source));
        Ok(())
    }

    /// A row the reader could not make sense of: an error, or with `on_bad_row: skip` a
    /// counted drop. `message` names the file and place.
    pub fn bad_row(&mut self, place: Place, message: String) -> Result<()> {
        self.rows_read += 1;
        self.malformed(place, message)
    }

    fn malformed(&mut self, place: Place, message: String) -> Result<()> {
        match self.params.on_bad_row {
            OnBadRow::Error => bail!("{message} (set `on_bad_row: skip` to skip such rows)"),
            OnBadRow::Skip => {
                self.dropped.drop_row(BAD_ROW, self.source, place);
                Ok(())
            }
        }
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.reporter.progress(done, total);
    }
}

/// Reads every source (`(source, its path on disk)`, train first) into one table: rows with
/// label ids shared by all files, and the file each came from.
pub fn read_table(
    sources: &[(Source, PathBuf)],
    params: &Params,
    reporter: &dyn Reporter,
) -> Result<Table> {
    let mut cleaner = Cleaner {
        params,
        shown: Path::new(""),
        source: 0,
        reporter,
        seen_texts: HashSet::new(),
        dropped: Dropped {
            files: sources.iter().map(|(s, _)| s.path.clone()).collect(),
            ..Dropped::default()
        },
        kept: Vec::new(),
        rows_read: 0,
    };
    for (index, (source, path)) in sources.iter().enumerate() {
        let before = cleaner.rows_read;
        cleaner.shown = &source.path;
        cleaner.source = index;
        match source.format {
            Format::Csv | Format::Tsv => delimited::read(path, source.format, &mut cleaner)?,
            Format::Jsonl => jsonl::read(path, &mut cleaner)?,
            Format::Parquet => parquet::read(path, &mut cleaner)?,
        }
        if cleaner.rows_read == before {
            let header_only = source.format.is_delimited() && params.has_header(source.format);
            bail!(
                "{} has no data rows{}",
                source.path.display(),
                if header_only {
                    " (only a header, or nothing)"
                } else {
                    ""
                }
            );
        }
    }
    let Cleaner {
        kept,
        dropped,
        rows_read,
        ..
    } = cleaner;
    let shown = sources
        .iter()
        .map(|(s, _)| s.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if kept.is_empty() {
        bail!("{shown}: all {rows_read} rows were dropped: {dropped}");
    }
    let labels = label_names(&kept, params, &shown)?;
    let ids: BTreeMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let rows = kept
        .into_iter()
        .map(|(fields, source)| Row {
            label: ids[fields.label.as_str()],
            text: fields.text,
            text_pair: fields.text_pair,
            source,
        })
        .collect();
    Ok(Table {
        rows,
        labels,
        rows_read,
        dropped,
    })
}

fn label_names(rows: &[(Fields, usize)], params: &Params, shown: &str) -> Result<Vec<String>> {
    if let Some(labels) = &params.labels {
        return Ok(labels.clone());
    }
    let mut names: Vec<String> = rows
        .iter()
        .map(|(fields, _)| fields.label.clone())
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
            "{shown}: only one label ({}) in the data; a classifier needs at least two",
            names.join(", ")
        );
    }
    Ok(names)
}

/// A column of `role` (text, text pair, label) by name or index among `names`, the file's columns, which
/// a message lists after `listed` ("the header has").
fn resolve_column(
    column: &crate::params::Column,
    names: Option<&[String]>,
    listed: &str,
    fields: usize,
    shown: &Path,
    role: &str,
) -> Result<usize> {
    use crate::params::Column;
    match (column, names) {
        (Column::Index(i), _) if *i < fields => Ok(*i),
        (Column::Index(i), _) => bail!(
            "{}: the {role} column is index {i}, but rows have {fields} fields",
            shown.display()
        ),
        (Column::Name(name), Some(names)) => match names.iter().position(|h| h == name) {
            Some(i) => Ok(i),
            None => bail!(
                "{}: no column named `{name}` for the {role}; {listed}: {}",
                shown.display(),
                names.join(", ")
            ),
        },
        (Column::Name(name), None) => {
            bail!(
                "{}: the {role} column is named `{name}`, but the file has no header row (`header: false`); use an index",
                shown.display()
            )
        }
    }
}
