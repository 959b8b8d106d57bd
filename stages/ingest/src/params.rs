use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use finetune_core::ConfigError;
use finetune_core::schemars::{self, JsonSchema};
use finetune_task::ProblemType;
use serde::Deserialize;

/// `with:` of an `ingest_csv` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The file to read, relative to the workspace; ingest splits it. Or give `splits`.
    pub path: Option<PathBuf>,
    /// Splits given as files (`{train: a.csv, validation: b.csv, test: c.csv}`), instead of
    /// `path`: the train file is required, a split not given is split off it as with `path`.
    pub splits: Option<GivenSplits>,
    /// `csv` (comma, quoted fields, header row), `tsv` (tab, no quoting, no header), `jsonl`
    /// (one JSON object per line) or `parquet`. Default: from each file's extension
    /// (`.jsonl`/`.ndjson`, `.parquet`/`.pq`), otherwise csv.
    pub format: Option<Format>,
    /// The field separator of csv/tsv, overriding the format's (one ASCII character).
    pub delimiter: Option<char>,
    /// Whether the first row names the columns (default: csv yes, tsv no).
    pub header: Option<bool>,
    /// Whether `"` quotes fields (default: csv yes, tsv no, so a TSV of sentences with
    /// unbalanced quotes reads one row per line).
    pub quoting: Option<bool>,
    /// The text column: a header name or a 0-based index (a key, for JSON Lines).
    pub text: Column,
    /// The second text of a sentence pair (NLI, duplicate questions, query and document): a
    /// header name or a 0-based index (a key, for JSON Lines). The tokenizer encodes the two
    /// with its pair template (`[CLS] a [SEP] b [SEP]`).
    pub text_pair: Option<Column>,
    /// The label column: a header name or a 0-based index (a key, for JSON Lines). For
    /// multi-label data it holds several labels (a list in JSON Lines and Parquet, or text
    /// split at `label_delimiter`); for regression a number, or a list of numbers. Multi-label
    /// and regression data may also spread over several columns (`label: [Department, Class]`:
    /// each column's value is one of the row's labels, or one target).
    pub label: LabelColumns,
    /// What is predicted, by Hugging Face's names: `single_label_classification` (default),
    /// `multi_label_classification` or `regression`.
    pub problem_type: Option<ProblemType>,
    /// Multi-label text fields: what separates a row's labels (`"|"` in `sports|politics`).
    pub label_delimiter: Option<String>,
    /// Labels in id order. Default: the labels found, sorted (numerically if all are integers).
    /// A label not in this list is an error. For regression: the targets' names (default: the
    /// label column's name, numbered when the column holds several).
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

/// Splits given as files.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GivenSplits {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub test: Option<PathBuf>,
}

/// The three splits, in the order ingest reads and writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitName {
    Train,
    Validation,
    Test,
}

impl SplitName {
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Validation, SplitName::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
            SplitName::Test => "test",
        }
    }
}

/// One file to read, and the split it is (None: `path`, to be split).
#[derive(Debug, Clone)]
pub struct Source {
    pub split: Option<SplitName>,
    pub path: PathBuf,
    pub format: Format,
}

/// How the rows are divided.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// Fraction of rows for validation (default 0.1; 0 when `splits.validation` is given).
    validation: Option<f64>,
    /// Fraction of rows for test (default 0.2; 0 when `splits.test` is given).
    test: Option<f64>,
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

    /// The fraction split off for validation, as written or by default.
    pub fn validation(&self) -> f64 {
        self.validation.unwrap_or(DEFAULT_VALIDATION)
    }

    /// The fraction split off for test, as written or by default.
    pub fn test(&self) -> f64 {
        self.test.unwrap_or(DEFAULT_TEST)
    }

    /// These parameters with nothing split off for the splits given as files.
    pub fn without_given(&self, given: Option<&GivenSplits>) -> SplitParams {
        let none_if_given = |split| given_path(given, split).is_some().then_some(0.0);
        SplitParams {
            validation: none_if_given(SplitName::Validation).or(self.validation),
            test: none_if_given(SplitName::Test).or(self.test),
            ..self.clone()
        }
    }
}

fn given_path(given: Option<&GivenSplits>, split: SplitName) -> Option<&PathBuf> {
    let given = given?;
    match split {
        SplitName::Train => Some(&given.train),
        SplitName::Validation => given.validation.as_ref(),
        SplitName::Test => given.test.as_ref(),
    }
}

impl Default for SplitParams {
    fn default() -> Self {
        SplitParams {
            validation: None,
            test: None,
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

/// The label's column, or (multi-label, regression) several.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "a column name or 0-based index, or a list of them (multi-label, regression)"
)]
pub enum LabelColumns {
    One(Column),
    Several(Vec<Column>),
}

impl LabelColumns {
    pub fn columns(&self) -> &[Column] {
        match self {
            LabelColumns::One(column) => std::slice::from_ref(column),
            LabelColumns::Several(columns) => columns,
        }
    }

    /// Whether each row's label is read from several columns, as a list.
    pub fn is_several(&self) -> bool {
        matches!(self, LabelColumns::Several(_))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Csv,
    Tsv,
    Jsonl,
    Parquet,
}

impl Format {
    /// The format a file's extension implies: JSON Lines and Parquet by name, else CSV (a
    /// `.tsv` stays CSV unless `format: tsv` says so, as before these formats existed).
    pub fn of(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => Format::Jsonl,
            Some("parquet" | "pq") => Format::Parquet,
            _ => Format::Csv,
        }
    }

    pub fn is_delimited(self) -> bool {
        matches!(self, Format::Csv | Format::Tsv)
    }
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
const DEFAULT_VALIDATION: f64 = 0.1;
const DEFAULT_TEST: f64 = 0.2;
fn default_seed() -> u64 {
    42
}
fn default_max_text_bytes() -> usize {
    1 << 20
}

impl Params {
    /// The files to read, train (or `path`) first.
    pub fn sources(&self) -> Vec<Source> {
        let source = |split, path: &PathBuf| Source {
            split,
            path: path.clone(),
            format: self.format.unwrap_or_else(|| Format::of(path)),
        };
        match (&self.path, &self.splits) {
            (Some(path), _) => vec![source(None, path)],
            (None, given) => SplitName::ALL
                .into_iter()
                .filter_map(|split| {
                    given_path(given.as_ref(), split).map(|p| source(Some(split), p))
                })
                .collect(),
        }
    }

    /// The split fractions, with nothing split off for the splits given as files; a split of
    /// multi-label or regression data is not stratified (it has no one label per row).
    pub fn split_fractions(&self) -> SplitParams {
        let mut split = self.split.without_given(self.splits.as_ref());
        if self.problem_type() != ProblemType::SingleLabelClassification {
            split.stratify = Some(false);
        }
        split
    }

    pub fn problem_type(&self) -> ProblemType {
        self.problem_type.unwrap_or_default()
    }

    /// A regression's names for its `targets` outputs: `labels`; or the label columns' names
    /// when there are several (`target_i` for an index); or the one label column's name
    /// (`target` for an index), numbered `name_0, name_1, …` when it holds several targets.
    pub fn target_names(&self, targets: usize) -> anyhow::Result<Vec<String>> {
        if let Some(names) = &self.labels {
            if names.len() != targets {
                anyhow::bail!(
                    "`labels` names {} targets, but the label column holds {targets} per row",
                    names.len()
                );
            }
            return Ok(names.clone());
        }
        let name = |column: &Column, index: Option<usize>| match (column, index) {
            (Column::Name(name), _) => name.clone(),
            (Column::Index(_), Some(i)) => format!("target_{i}"),
            (Column::Index(_), None) => "target".to_string(),
        };
        let base = match &self.label {
            LabelColumns::Several(columns) if columns.len() != targets => {
                anyhow::bail!(
                    "`label` lists {} columns, but rows hold {targets} targets: one of the columns holds a list, and each must hold one number",
                    columns.len()
                );
            }
            LabelColumns::Several(columns) => {
                return Ok(columns
                    .iter()
                    .enumerate()
                    .map(|(i, column)| name(column, Some(i)))
                    .collect());
            }
            LabelColumns::One(column) => name(column, None),
        };
        Ok(match targets {
            1 => vec![base],
            n => (0..n).map(|i| format!("{base}_{i}")).collect(),
        })
    }

    pub fn delimiter_byte(&self, format: Format) -> u8 {
        match (self.delimiter, format) {
            (Some(c), _) => c as u8,
            (None, Format::Tsv) => b'\t',
            (None, _) => b',',
        }
    }

    pub fn has_header(&self, format: Format) -> bool {
        self.header.unwrap_or(format == Format::Csv)
    }

    pub fn uses_quotes(&self, format: Format) -> bool {
        self.quoting.unwrap_or(format == Format::Csv)
    }

    /// `path` or `splits`, not both; csv-only options only where a file is csv or tsv.
    fn validate_sources(&self) -> Result<(), ConfigError> {
        match (&self.path, &self.splits) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    "splits",
                    "give `path` (one file, split here) or `splits` (the splits as files), not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::at(
                    "path",
                    "missing: give `path` (one file) or `splits: {train: ..., validation: ..., test: ...}`",
                ));
            }
            _ => {}
        }
        for (split, fraction) in [
            (SplitName::Validation, self.split.validation),
            (SplitName::Test, self.split.test),
        ] {
            if let (Some(file), Some(fraction)) =
                (given_path(self.splits.as_ref(), split), fraction)
            {
                return Err(ConfigError::at(
                    format!("split.{}", split.as_str()),
                    format!(
                        "{fraction} would split a {0} set off train, but `splits.{0}` gives it ({1}); drop one",
                        split.as_str(),
                        file.display()
                    ),
                ));
            }
        }
        let sources = self.sources();
        if !sources.iter().any(|s| s.format.is_delimited()) {
            for (key, set) in [
                ("delimiter", self.delimiter.is_some()),
                ("header", self.header.is_some()),
                ("quoting", self.quoting.is_some()),
            ] {
                if set {
                    return Err(ConfigError::at(
                        key,
                        "applies to csv and tsv files only, and none is read here",
                    ));
                }
            }
        }
        if let Some(jsonl) = sources.iter().find(|s| s.format == Format::Jsonl) {
            let columns = [
                ("text", Some(&self.text)),
                ("text_pair", self.text_pair.as_ref()),
            ]
            .into_iter()
            .chain(self.label.columns().iter().map(|c| ("label", Some(c))));
            for (key, column) in columns {
                if let Some(Column::Index(i)) = column {
                    return Err(ConfigError::at(
                        key,
                        format!(
                            "{i} is a column index, but {} is JSON Lines, whose rows are objects: name the key",
                            jsonl.path.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sources()?;
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
        let fractions = self.split_fractions();
        let (validation, test) = (fractions.validation(), fractions.test());
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
        self.validate_task()?;
        if let Some(labels) = &self.labels {
            if labels.len() < 2 && self.problem_type() == ProblemType::SingleLabelClassification {
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

    /// The keys that only some problem types read.
    fn validate_task(&self) -> Result<(), ConfigError> {
        let problem = self.problem_type();
        match &self.label_delimiter {
            Some(_) if problem != ProblemType::MultiLabelClassification => {
                return Err(ConfigError::at(
                    "label_delimiter",
                    format!(
                        "splits a row's labels, and `problem_type` is {problem}: set `problem_type: multi_label_classification`"
                    ),
                ));
            }
            Some(delimiter) if delimiter.is_empty() => {
                return Err(ConfigError::at("label_delimiter", "is empty"));
            }
            _ => {}
        }
        self.validate_label_columns(problem)?;
        if problem == ProblemType::SingleLabelClassification {
            return Ok(());
        }
        if self.split.stratify == Some(true) {
            return Err(ConfigError::at(
                "split.stratify",
                format!("{problem} data has no one label per row to stratify by"),
            ));
        }
        if problem == ProblemType::Regression && self.label_names.is_some() {
            return Err(ConfigError::at(
                "label_names",
                "names labels, and a regression has none: name its targets with `labels`",
            ));
        }
        if let Some(labels) = &self.labels
            && labels.is_empty()
        {
            return Err(ConfigError::at("labels", "is empty"));
        }
        Ok(())
    }

    /// Several label columns: a multi-label row's labels or a regression's targets, each
    /// column named once.
    fn validate_label_columns(&self, problem: ProblemType) -> Result<(), ConfigError> {
        let LabelColumns::Several(columns) = &self.label else {
            return Ok(());
        };
        if problem == ProblemType::SingleLabelClassification {
            return Err(ConfigError::at(
                "label",
                "names several columns, and a single-label row has one label: set `problem_type: multi_label_classification` (each column one of the row's labels) or `regression` (each column a target)",
            ));
        }
        if columns.is_empty() {
            return Err(ConfigError::at("label", "is an empty list of columns"));
        }
        let shown: Vec<String> = columns.iter().map(Column::to_string).collect();
        if let Some(twice) = shown
            .iter()
            .enumerate()
            .find(|(i, c)| shown[..*i].contains(c))
        {
            return Err(ConfigError::at("label", format!("lists {} twice", twice.1)));
        }
        if problem == ProblemType::Regression
            && let Some(names) = &self.labels
            && names.len() != columns.len()
        {
            return Err(ConfigError::at(
                "labels",
                format!(
                    "names {} targets, but `label` lists {} columns",
                    names.len(),
                    columns.len()
                ),
            ));
        }
        Ok(())
    }
}
