//! The `tokenize` stage's output as the stages after it read it: the split files' schema
//! (written by this crate, read by train and evaluate), token-id rows (with their segments,
//! for sentence pairs) and labels, the label names, the tokenizer's padding id and vocabulary
//! size.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{Array, Float32Array, Int32Array, Int64Array, ListArray, StringArray};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use finetune_task::ProblemType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The column of a split's texts (as ingest wrote them).
pub const TEXT: &str = "text";
/// The column of a split's second texts, for sentence pairs (as ingest wrote them).
pub const TEXT_PAIR: &str = "text_pair";
/// The column of a split's token ids: list<int32>.
pub const INPUT_IDS: &str = "input_ids";
/// The column of a pair split's token segments (0: first text, 1: second): list<int32>.
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// The column of a split's labels: int64 label ids (single-label), or list<float32> per row
/// (multi-label: 1 for each label the text has, else 0; regression: the targets' values).
pub const LABEL: &str = "label";

/// A tokenized split's schema (with the pair columns or not, its labels of type `label`), and
/// the item field of its list columns. One-text splits keep the columns they had before pairs
/// existed.
pub fn split_schema(pairs: bool, label: DataType) -> (SchemaRef, FieldRef) {
    let item = Arc::new(Field::new_list_field(DataType::Int32, false));
    let list = |name| Field::new(name, DataType::List(item.clone()), false);
    let mut fields = vec![Field::new(TEXT, DataType::Utf8, false)];
    if pairs {
        fields.push(Field::new(TEXT_PAIR, DataType::Utf8, false));
    }
    fields.push(list(INPUT_IDS));
    if pairs {
        fields.push(list(TOKEN_TYPE_IDS));
    }
    fields.push(Field::new(LABEL, label, false));
    (Arc::new(Schema::new(fields)), item)
}

/// The record batches of a Parquet split, each read error naming the file.
pub(crate) fn batches(path: &Path) -> Result<impl Iterator<Item = Result<RecordBatch>> + '_> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a Parquet file", path.display()))?
        .build()?;
    Ok(reader.map(move |batch| batch.with_context(|| format!("cannot read {}", path.display()))))
}

/// Column `name` of `batch` (read from `path`) as array type `T`.
pub(crate) fn column<'b, T: 'static>(
    batch: &'b RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'b T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            anyhow!(
                "{} has no `{name}` column of the expected type",
                path.display()
            )
        })
}

/// One row of a tokenize split as train and evaluate read it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub ids: Vec<i32>,
    /// Each token's segment, for a sentence pair; empty for one text (all segment 0).
    pub type_ids: Vec<i32>,
    /// The label's id (single-label classification; 0 otherwise).
    pub label: i64,
    /// One value per output: 1 or 0 per label (multi-label), the targets (regression); empty
    /// for single-label classification.
    pub targets: Vec<f32>,
}

/// What a split's labels are: the task, and its outputs' names in id order (labels.json).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub problem_type: ProblemType,
    pub names: Vec<String>,
}

/// The `input_ids`, `token_type_ids` (pairs only) and `label` columns of a tokenize split,
/// each row made into an `E` by `example`. A label that does not fit `task` (an id out of
/// range, a vector of the wrong length, a multi-label value other than 0 or 1, a target that is
/// not finite) is an error naming the row: the file may have been tampered with.
pub fn read_examples<E>(
    path: &Path,
    task: &Task,
    mut example: impl FnMut(TokenRow) -> E,
) -> Result<Vec<E>> {
    let mut examples = Vec::new();
    let int32 = |list: &ListArray, row: usize, name: &str| -> Result<Vec<i32>> {
        let values = list.value(row);
        let values = values
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| anyhow!("{}: `{name}` is not int32", path.display()))?;
        Ok(values.values().to_vec())
    };
    for batch in batches(path)? {
        let batch = batch?;
        let ids: &ListArray = column(&batch, INPUT_IDS, path)?;
        let types: Option<&ListArray> = match batch.column_by_name(TOKEN_TYPE_IDS) {
            Some(_) => Some(column(&batch, TOKEN_TYPE_IDS, path)?),
            None => None,
        };
        let labels = Labels::of(&batch, task, path)?;
        for row in 0..batch.num_rows() {
            let ids = int32(ids, row, INPUT_IDS)?;
            let type_ids = match types {
                Some(types) => int32(types, row, TOKEN_TYPE_IDS)?,
                None => Vec::new(),
            };
            if type_ids.iter().any(|&t| !(0..=1).contains(&t)) {
                anyhow::bail!(
                    "{}: row {} has a token type id other than 0 or 1",
                    path.display(),
                    examples.len() + 1
                );
            }
            if !type_ids.is_empty() && type_ids.len() != ids.len() {
                anyhow::bail!(
                    "{}: row {} has {} token ids but {} token type ids",
                    path.display(),
                    examples.len() + 1,
                    ids.len(),
                    type_ids.len()
                );
            }
            let (label, targets) = labels
                .row(row, task)
                .map_err(|why| anyhow!("{}: row {}: {why}", path.display(), examples.len() + 1))?;
            examples.push(example(TokenRow {
                ids,
                type_ids,
                label,
                targets,
            }));
        }
    }
    Ok(examples)
}

/// A record batch's `label` column, of the type its task writes.
enum Labels<'b> {
    Ids(&'b Int64Array),
    Vectors(&'b ListArray),
}

impl<'b> Labels<'b> {
    fn of(batch: &'b RecordBatch, task: &Task, path: &Path) -> Result<Labels<'b>> {
        Ok(match task.problem_type {
            ProblemType::SingleLabelClassification => Labels::Ids(column(batch, LABEL, path)?),
            _ => Labels::Vectors(column(batch, LABEL, path)?),
        })
    }

    /// Row `row`'s (label id, target vector), checked against `task`.
    fn row(&self, row: usize, task: &Task) -> std::result::Result<(i64, Vec<f32>), String> {
        let outputs = task.names.len();
        match self {
            Labels::Ids(ids) => {
                let id = ids.value(row);
                if usize::try_from(id).map_or(true, |id| id >= outputs) {
                    return Err(format!("label id {id} is not one of the {outputs} labels"));
                }
                Ok((id, Vec::new()))
            }
            Labels::Vectors(lists) => {
                let values = lists.value(row);
                let values = values
                    .as_any()
                    .downcast_ref::<Float32Array>()
                    .ok_or("the label is not a list of float32")?;
                let targets: Vec<f32> = values.iter().map(|v| v.unwrap_or(f32::NAN)).collect();
                if targets.len() != outputs {
                    return Err(format!(
                        "{} label values, for {outputs} outputs ({})",
                        targets.len(),
                        task.names.join(", ")
                    ));
                }
                let fits = |v: &f32| match task.problem_type {
                    ProblemType::MultiLabelClassification => *v == 0.0 || *v == 1.0,
                    _ => v.is_finite(),
                };
                if let Some(bad) = targets.iter().find(|v| !fits(v)) {
                    return Err(format!(
                        "label value {bad} does not fit {}",
                        task.problem_type
                    ));
                }
                Ok((0, targets))
            }
        }
    }
}

/// A split's texts: the `text` column, and for sentence pairs the `text_pair` column.
#[derive(Debug, Default)]
pub struct Texts {
    pub texts: Vec<String>,
    pub pairs: Option<Vec<String>>,
}

impl Texts {
    /// Appends one record batch's texts (of a split read from `path`).
    pub(crate) fn extend_from(&mut self, batch: &RecordBatch, path: &Path) -> Result<()> {
        let owned = |array: &StringArray| -> Vec<String> {
            let strings = array.iter().map(|t| t.unwrap_or_default().to_string());
            strings.collect()
        };
        self.texts.extend(owned(column(batch, TEXT, path)?));
        if batch.column_by_name(TEXT_PAIR).is_some() {
            let pairs = owned(column(batch, TEXT_PAIR, path)?);
            self.pairs.get_or_insert_default().extend(pairs);
        }
        if self
            .pairs
            .as_ref()
            .is_some_and(|p| p.len() != self.texts.len())
        {
            anyhow::bail!("{}: a row group without `{TEXT_PAIR}`", path.display());
        }
        Ok(())
    }
}

/// The `text` (and, for pairs, `text_pair`) columns of a split, in one read.
pub fn read_texts(path: &Path) -> Result<Texts> {
    let mut texts = Texts::default();
    for batch in batches(path)? {
        texts.extend_from(&batch?, path)?;
    }
    Ok(texts)
}

/// The task and output names of labels.json (no `problem_type`: single-label, as every
/// labels.json was before other tasks existed).
pub fn read_task(path: &Path) -> Result<Task> {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let names: Vec<String> = json["names"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| anyhow!("{} has no `names` list", path.display()))?;
    if names.is_empty() {
        anyhow::bail!("{}: `names` is empty", path.display());
    }
    let problem_type = match json.get("problem_type") {
        None => ProblemType::default(),
        Some(name) => name
            .as_str()
            .and_then(ProblemType::from_name)
            .ok_or_else(|| anyhow!("{}: `problem_type` {name} is not a task", path.display()))?,
    };
    Ok(Task {
        problem_type,
        names,
    })
}

/// (ids the tokenizer.json can give: its largest id + 1, id of [PAD] or <pad>), for every
/// model kind tokenizers reads (WordPiece, BPE, WordLevel, Unigram), added tokens included.
pub fn tokenizer_facts(path: &Path) -> Result<(usize, usize)> {
    let tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: not a tokenizer: {e}", path.display()))?;
    let ids = tokenizer
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |largest| largest as usize + 1);
    let pad = ["[PAD]", "<pad>"]
        .iter()
        .find_map(|token| tokenizer.token_to_id(token))
        .unwrap_or(0) as usize;
    Ok((ids, pad))
}

#[cfg(test)]
mod tests {
    use super::tokenizer_facts;
    use tokenizers::models::unigram::Unigram;
    use tokenizers::{AddedToken, Tokenizer};

    /// Unigram (SentencePiece: DeBERTa-v3, XLM-RoBERTa) lists its vocabulary as pieces with
    /// scores, where WordPiece and BPE map tokens to ids; added tokens may sit past both.
    #[test]
    fn unigram_vocabularies_and_added_tokens_are_counted() {
        let pieces = ["<pad>", "<unk>", "▁a", "▁b", "c"]
            .iter()
            .map(|p| (p.to_string(), -1.0))
            .collect();
        let unigram = Unigram::from(pieces, Some(1), false).unwrap();
        let mut tokenizer = Tokenizer::new(unigram);
        tokenizer
            .add_special_tokens([AddedToken::from("[MASK]", true)])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tokenizer.save(&path, false).unwrap();
        assert_eq!(tokenizer_facts(&path).unwrap(), (6, 0));
    }
}
