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

use finetune_task::ProblemType;

use crate::params::{Format, OnBadRow, Params, Source};

pub struct Row {
    pub text: String,
    /// The second text of a pair (`text_pair:`), else `None`.
    pub text_pair: Option<String>,
    pub target: Target,
    /// The index of the file it came from, in [`Params::sources`] order.
    pub source: usize,
}

/// What a row is labelled with, by the pipeline's `problem_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A label's id (single-label classification).
    Class(u32),
    /// The ids of the labels the row has, ascending (multi-label; possibly none).
    Classes(Vec<u32>),
    /// The targets' values (regression), as many for every row.
    Values(Vec<f32>),
}

/// A label field as a file holds it: one value, or a list (JSON Lines, Parquet).
#[derive(Debug, Clone, PartialEq)]
pub enum LabelField {
    One(String),
    List(Vec<String>),
}

impl LabelField {
    /// The values, as a list however the file held them.
    pub fn into_list(self) -> Vec<String> {
        match self {
            LabelField::One(label) => vec![label],
            LabelField::List(labels) => labels,
        }
    }

    fn trimmed(self) -> LabelField {
        match self {
            LabelField::One(label) => LabelField::One(label.trim().to_string()),
            LabelField::List(labels) => {
                LabelField::List(labels.iter().map(|l| l.trim().to_string()).collect())
            }
        }
    }
}

/// The fields of one row as its file holds them: every reader hands these to the [`Cleaner`].
pub struct Fields {
    pub text: String,
    /// Read when the pipeline names a `text_pair` column.
    pub text_pair: Option<String>,
    pub label: LabelField,
}

/// A kept row's label before ids are given: the names, or the numbers of a regression.
enum Labelled {
    Names(Vec<String>),
    Values(Vec<f32>),
}

impl Fields {
    fn trimmed(self) -> Fields {
        Fields {
            text: self.text.trim().to_string(),
            text_pair: self.text_pair.map(|t| t.trim().to_string()),
            label: self.label.trimmed(),
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
    kept: Vec<(Kept, usize)>,
    /// A regression's number of targets, from the first row read.
    targets: Option<usize>,
    rows_read: u64,
}

/// A row the [`Cleaner`] kept, its label not yet an id.
struct Kept {
    text: String,
    text_pair: Option<String>,
    labelled: Labelled,
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
        if params.drop_empty
            && (empty(&fields.text) || fields.text_pair.as_deref().is_some_and(empty))
        {
            self.dropped.drop_row(EMPTY_TEXT, self.source, place);
            return Ok(());
        }
        let identity = fields.identity();
        let labelled = match self.labelled(place, fields.label)? {
            Ok(Some(labelled)) => labelled,
            Ok(None) => {
                self.dropped.drop_row(EMPTY_LABEL, self.source, place);
                return Ok(());
            }
            Err(message) => return self.malformed(place, message),
        };
        if params.drop_duplicates && !self.seen_texts.insert(identity) {
            self.dropped.drop_row(DUPLICATE_TEXT, self.source, place);
            return Ok(());
        }
        if let (Some(allowed), Labelled::Names(names)) = (&params.labels, &labelled)
            && let Some(name) = names.iter().find(|name| !allowed.contains(name))
        {
            bail!(
                "{}: label `{name}` is not in `labels` ({})",
                place.at(self.shown),
                allowed.join(", ")
            );
        }
        let row = Kept {
            text: fields.text,
            text_pair: fields.text_pair,
            labelled,
        };
        self.kept.push((row, self.source));
        Ok(())
    }

    /// The label field read as the pipeline's `problem_type` says: `Ok(None)` when it is empty
    /// (a dropped row), the inner error for a malformed row (`on_bad_row` decides), the outer
    /// one for data no setting makes readable.
    fn labelled(
        &mut self,
        place: Place,
        label: LabelField,
    ) -> Result<std::result::Result<Option<Labelled>, String>> {
        let at = place.at(self.shown);
        Ok(match (self.params.problem_type(), label) {
            (ProblemType::SingleLabelClassification, LabelField::One(label)) => {
                Ok((!label.is_empty()).then(|| Labelled::Names(vec![label])))
            }
            (ProblemType::SingleLabelClassification, LabelField::List(_)) => bail!(
                "{at}: the label is a list of labels; for several labels per text set `problem_type: multi_label_classification`"
            ),
            (ProblemType::MultiLabelClassification, label) => {
                // A delimiter splits every value, so that several label columns may each
                // hold several labels too.
                let names = match &self.params.label_delimiter {
                    Some(delimiter) => label
                        .into_list()
                        .iter()
                        .flat_map(|value| value.split(delimiter.as_str()))
                        .map(str::to_string)
                        .collect(),
                    None => label.into_list(),
                };
                let mut names: Vec<String> = names
                    .into_iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                names.sort();
                names.dedup();
                Ok(Some(Labelled::Names(names)))
            }
            (ProblemType::Regression, label) => {
                let texts = match label {
                    LabelField::One(label) if label.is_empty() => return Ok(Ok(None)),
                    LabelField::One(label) => vec![label],
                    // No targets, or (several label columns) every one empty.
                    LabelField::List(labels) if labels.iter().all(|l| l.trim().is_empty()) => {
                        return Ok(Ok(None));
                    }
                    LabelField::List(labels) => labels,
                };
                self.values(&at, &texts)
            }
        })
    }

    /// A regression row's targets: finite numbers, as many as the first row had.
    fn values(
        &mut self,
        at: &str,
        texts: &[String],
    ) -> std::result::Result<Option<Labelled>, String> {
        let mut values = Vec::with_capacity(texts.len());
        for text in texts {
            match text.trim().parse::<f32>() {
                Ok(value) if value.is_finite() => values.push(value),
                _ => {
                    return Err(format!(
                        "{at}: the target `{text}` is not a finite number (`problem_type: regression`)"
                    ));
                }
            }
        }
        match self.targets {
            Some(expected) if expected != values.len() => Err(format!(
                "{at}: {} targets, but the first row has {expected}",
                values.len()
            )),
            _ => {
                self.targets = Some(values.len());
                Ok(Some(Labelled::Values(values)))
            }
        }
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
        targets: None,
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
    let labels = output_names(&kept, params, &shown)?;
    let ids: BTreeMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let rows = kept
        .into_iter()
        .map(|(row, source)| Row {
            target: match (params.problem_type(), row.labelled) {
                (_, Labelled::Values(values)) => Target::Values(values),
                (ProblemType::MultiLabelClassification, Labelled::Names(names)) => {
                    let mut classes: Vec<u32> = names.iter().map(|n| ids[n.as_str()]).collect();
                    classes.sort_unstable();
                    Target::Classes(classes)
                }
                (_, Labelled::Names(names)) => Target::Class(ids[names[0].as_str()]),
            },
            text: row.text,
            text_pair: row.text_pair,
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

/// The names of the model's outputs: the labels (given, or those found, sorted numerically if
/// all are integers), or a regression's targets.
fn output_names(rows: &[(Kept, usize)], params: &Params, shown: &str) -> Result<Vec<String>> {
    if params.problem_type() == ProblemType::Regression {
        let targets = match rows.first().map(|(row, _)| &row.labelled) {
            Some(Labelled::Values(values)) => values.len(),
            _ => 0,
        };
        return params.target_names(targets);
    }
    if let Some(labels) = &params.labels {
        return Ok(labels.clone());
    }
    let mut names: Vec<String> = rows
        .iter()
        .flat_map(|(row, _)| match &row.labelled {
            Labelled::Names(names) => names.clone(),
            Labelled::Values(_) => Vec::new(),
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    } else {
        names.sort();
    }
    if names.is_empty() {
        bail!("{shown}: no row has a label");
    }
    if names.len() < 2 && params.problem_type() == ProblemType::SingleLabelClassification {
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
