use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use finetune_core::ConfigError;
use finetune_core::schemars::{self, JsonSchema};
use serde::Deserialize;

/// `with:` of an `ingest_csv` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The file to read, relative to the workspace.
    pub path: PathBuf,
    /// `csv` (comma, quoted fields, header row) or `tsv` (tab, no quoting, no header).
    #[serde(default)]
    pub format: Format,
    /// The field separator, overriding the format's (one ASCII character).
    pub delimiter: Option<char>,
    /// Whether the first row names the columns (default: csv yes, tsv no).
    pub header: Option<bool>,
    /// Whether `"` quotes fields (default: csv yes, tsv no, so a TSV of sentences with
    /// unbalanced quotes reads one row per line).
    pub quoting: Option<bool>,
    /// The text column: a header name or a 0-based index.
    pub text: Column,
    /// The label column: a header name or a 0-based index.
    pub label: Column,
    /// Labels in id order. Default: the labels found, sorted (numerically if all are integers).
    /// A label not in this list is an error.
    pub labels: Option<Vec<String>>,
    /// Names for the labels as the file writes them (`{ 0: negative, 1: positive }`): what
    /// labels.json, the trained model's `id2label` and `predict` show. Every label the data
    /// holds needs one; no two labels may share a name.
    pub label_names: Option<BTreeMap<String, String>>,
    /// Trim surrounding whitespace from texts and labels.
    #[serde(default = "yes")]
    pub trim: bool,
    /// Drop rows whose text is empty (after trimming); counted in stats.json.
    #[serde(default = "yes")]
    pub drop_empty: bool,
    /// Drop rows whose text repeats an earlier row's exactly (the first is kept); counted.
    #[serde(default)]
    pub drop_duplicates: bool,
    /// `utf8`: invalid UTF-8 is an error naming line and byte; `lossy`: replaced by U+FFFD.
    #[serde(default)]
    pub encoding: Encoding,
    /// A row with the wrong number of fields or an oversized text: `error` (naming the line)
    /// or `skip` (counted in stats.json).
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// Texts longer than this many bytes are bad rows (guards against a broken file read as
    /// one giant field).
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: usize,
    #[serde(default)]
    pub split: SplitParams,
}

/// How the rows are divided.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// Fraction of rows for validation.
    #[serde(default = "default_validation")]
    pub validation: f64,
    /// Fraction of rows for test.
    #[serde(default = "default_test")]
    pub test: f64,
    /// Seed of the shuffle; the same seed gives the same split in every finetune version.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Keep each label's share the same in every split (default: yes, unless `like` is set).
    pub stratify: Option<bool>,
    /// Use only this many rows, a seeded sample (stratified when the split is), before
    /// splitting: a smaller experiment on the same distribution.
    pub sample: Option<usize>,
    /// `datasets`: the exact rows of Hugging Face datasets' `train_test_split(test_size=test,
    /// seed=seed)` (NumPy's PCG64 permutation; no validation split, no stratification), for
    /// results comparable row for row with a Python experiment.
    pub like: Option<SplitLike>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SplitLike {
    Datasets,
}

impl SplitParams {
    pub fn stratified(&self) -> bool {
        self.stratify.unwrap_or(self.like.is_none())
    }
}

impl Default for SplitParams {
    fn default() -> Self {
        SplitParams {
            validation: default_validation(),
            test: default_test(),
            seed: default_seed(),
            stratify: None,
            sample: None,
            like: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "a column name (string) or a 0-based column index (integer)"
)]
pub enum Column {
    Index(usize),
    Name(String),
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Column::Index(i) => write!(f, "column {i}"),
            Column::Name(name) => write!(f, "column `{name}`"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Csv,
    Tsv,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Lossy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    #[default]
    Error,
    Skip,
}

fn yes() -> bool {
    true
}
fn default_validation() -> f64 {
    0.1
}
fn default_test() -> f64 {
    0.2
}
fn default_seed() -> u64 {
    42
}
fn default_max_text_bytes() -> usize {
    1 << 20
}

impl Params {
    pub fn delimiter_byte(&self) -> u8 {
        match (self.delimiter, self.format) {
            (Some(c), _) => c as u8,
            (None, Format::Csv) => b',',
            (None, Format::Tsv) => b'\t',
        }
    }

    pub fn has_header(&self) -> bool {
        self.header.unwrap_or(self.format == Format::Csv)
    }

    pub fn uses_quotes(&self) -> bool {
        self.quoting.unwrap_or(self.format == Format::Csv)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(names) = &self.label_names {
            let mut seen = BTreeSet::new();
            for (label, name) in names {
                if name.trim().is_empty() || !seen.insert(name) {
                    return Err(ConfigError::at(
                        format!("label_names.{label}"),
                        format!("`{name}` is empty or names another label too"),
                    ));
                }
            }
        }
        if let Some(c) = self.delimiter
            && (!c.is_ascii() || c == '"' || c == '\n' || c == '\r')
        {
            return Err(ConfigError::at(
                "delimiter",
                format!(
                    "`{c}` cannot separate fields; use one ASCII character other than a quote or newline"
                ),
            ));
        }
        let (validation, test) = (self.split.validation, self.split.test);
        for (key, value) in [("split.validation", validation), ("split.test", test)] {
            if !(0.0..1.0).contains(&value) {
                return Err(ConfigError::at(
                    key,
                    format!("{value} is not a fraction in [0, 1)"),
                ));
            }
        }
        if self.split.like == Some(SplitLike::Datasets) {
            if validation > 0.0 {
                return Err(ConfigError::at(
                    "split.validation",
                    "must be 0 with `like: datasets` (train_test_split makes two splits)",
                ));
            }
            if self.split.stratify == Some(true) {
                return Err(ConfigError::at(
                    "split.stratify",
                    "`like: datasets` reproduces the unstratified train_test_split",
                ));
            }
            if self.split.sample.is_some() {
                return Err(ConfigError::at(
                    "split.sample",
                    "`like: datasets` splits every row, as train_test_split does",
                ));
            }
        }
        if validation + test >= 1.0 {
            return Err(ConfigError::at(
                "split",
                format!("validation ({validation}) + test ({test}) leave no rows for training"),
            ));
        }
        if let Some(labels) = &self.labels {
            if labels.len() < 2 {
                return Err(ConfigError::at(
                    "labels",
                    "a classifier needs at least two labels",
                ));
            }
            if let Some(dup) = labels
                .iter()
                .enumerate()
                .find(|(i, l)| labels[..*i].contains(l))
            {
                return Err(ConfigError::at(
                    "labels",
                    format!("label `{}` is listed twice", dup.1),
                ));
            }
        }
        if self.max_text_bytes == 0 {
            return Err(ConfigError::at("max_text_bytes", "must be at least 1"));
        }
        Ok(())
    }
}
