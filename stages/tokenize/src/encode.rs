//! Encoding the splits and writing them as Parquet.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{Array, ArrayRef, Int32Array, Int64Array, ListArray, RecordBatch, StringArray};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use finetune_core::Reporter;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Serialize;
use tokenizers::{EncodeInput, Encoding, Tokenizer};

use crate::SPLITS;
use crate::tokenized::{self, Texts};

/// Texts encoded per call of `encode_batch`: large enough to keep every core busy, small
/// enough to report progress.
const CHUNK: usize = 8192;

pub struct SplitData {
    pub texts: Texts,
    /// The `label` column as ingest wrote it (label ids, or a vector per row), copied as is.
    pub labels: ArrayRef,
}

/// Reads the `text`, `text_pair` (where present) and `label` columns of an ingest split.
pub fn read_split(path: &Path) -> Result<SplitData> {
    let mut texts = Texts::default();
    let mut labels: Vec<ArrayRef> = Vec::new();
    for batch in tokenized::batches(path)? {
        let batch = batch?;
        texts.extend_from(&batch, path)?;
        let column = batch
            .column_by_name(tokenized::LABEL)
            .ok_or_else(|| anyhow!("{} has no `{}` column", path.display(), tokenized::LABEL))?;
        labels.push(column.clone());
    }
    let labels = match labels.as_slice() {
        [] => Arc::new(Int64Array::from(Vec::<i64>::new())) as ArrayRef,
        parts => {
            let parts: Vec<&dyn Array> = parts.iter().map(AsRef::as_ref).collect();
            arrow::compute::concat(&parts)
                .with_context(|| format!("{}: row groups with different labels", path.display()))?
        }
    };
    Ok(SplitData { texts, labels })
}

#[derive(Debug, Serialize)]
pub struct LengthStats {
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
}

#[derive(Debug, Serialize)]
pub struct SplitStats {
    pub rows: usize,
    pub tokens: usize,
    pub length: LengthStats,
    /// Texts cut to `max_length`.
    pub truncated: usize,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub vocab_size: usize,
    pub max_length: usize,
    pub splits: serde_json::Map<String, serde_json::Value>,
}

/// Encodes each split of `ingest_dir` into `out_dir/<split>.parquet`.
pub fn encode_splits(
    tokenizer: &Tokenizer,
    ingest_dir: &Path,
    out_dir: &Path,
    max_length: usize,
    reporter: &dyn Reporter,
) -> Result<Stats> {
    let mut stats = Stats {
        vocab_size: tokenizer.get_vocab_size(true),
        max_length,
        splits: serde_json::Map::new(),
    };
    for split in SPLITS {
        reporter.message(&format!("encoding {split}"));
        let data = read_split(&ingest_dir.join(format!("{split}.parquet")))?;
        let encoded = encode(
            tokenizer,
            &data.texts.texts,
            data.texts.pairs.as_deref(),
            reporter,
        )
        .with_context(|| format!("encoding the {split} split"))?;
        write_split(&out_dir.join(format!("{split}.parquet")), &data, &encoded)?;
        stats
            .splits
            .insert(split.to_string(), serde_json::to_value(encoded.stats())?);
    }
    Ok(stats)
}

/// Token ids of many texts, flattened Arrow-style: text `i` is `ids[offsets[i]..offsets[i+1]]`.
pub struct Encoded {
    pub offsets: Vec<i32>,
    pub ids: Vec<i32>,
    /// For sentence pairs, each token's segment (0: first text, 1: second) as the tokenizer's
    /// template gives it, aligned with `ids`.
    pub type_ids: Option<Vec<i32>>,
    pub truncated: usize,
}

impl Encoded {
    fn stats(&self) -> SplitStats {
        let mut lengths: Vec<usize> = self
            .offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect();
        lengths.sort_unstable();
        let rank = |q: f64| {
            lengths
                .get(((q * lengths.len() as f64).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0)
        };
        SplitStats {
            rows: lengths.len(),
            tokens: self.ids.len(),
            length: LengthStats {
                mean: if lengths.is_empty() {
                    0.0
                } else {
                    self.ids.len() as f64 / lengths.len() as f64
                },
                p50: rank(0.5),
                p95: rank(0.95),
                max: lengths.last().copied().unwrap_or(0),
            },
            truncated: self.truncated,
        }
    }
}

/// Encodes `texts` (with `pairs`, their second texts, as pairs) with the tokenizer's template.
pub fn encode(
    tokenizer: &Tokenizer,
    texts: &[String],
    pairs: Option<&[String]>,
    reporter: &dyn Reporter,
) -> Result<Encoded> {
    let mut encoded = Encoded {
        offsets: Vec::with_capacity(texts.len() + 1),
        ids: Vec::new(),
        type_ids: pairs.map(|_| Vec::new()),
        truncated: 0,
    };
    encoded.offsets.push(0);
    let pair_encoder = pairs.map(|_| PairEncoder::new(tokenizer)).transpose()?;
    for (n, chunk) in texts.chunks(CHUNK).enumerate() {
        let start = n * CHUNK;
        let encodings = match (pairs, &pair_encoder) {
            (Some(pairs), Some(encoder)) => {
                encoder.encode(chunk, &pairs[start..start + chunk.len()])?
            }
            _ => {
                let inputs: Vec<EncodeInput> = chunk
                    .iter()
                    .map(|t| EncodeInput::from(t.as_str()))
                    .collect();
                // The `_fast` variant skips character offsets, which nothing downstream uses.
                tokenizer
                    .encode_batch_fast(inputs, true)
                    .map_err(|e| anyhow!("tokenizing failed: {e}"))?
            }
        };
        for encoding in &encodings {
            encoded
                .ids
                .extend(encoding.get_ids().iter().map(|&id| id as i32));
            if let Some(types) = &mut encoded.type_ids {
                types.extend(encoding.get_type_ids().iter().map(|&t| t as i32));
            }
            encoded.offsets.push(
                i32::try_from(encoded.ids.len()).context("more than 2^31 tokens in one split")?,
            );
            encoded.truncated += usize::from(!encoding.get_overflowing().is_empty());
        }
        reporter.progress((start + chunk.len()) as u64, texts.len() as u64);
    }
    Ok(encoded)
}

/// Encodes sentence pairs as Python's fast tokenizer does: each text in full, then cut and
/// framed by the tokenizer's truncation and post-processor. (`Tokenizer::encode` on a pair
/// differs: tokenizers 0.23.2 stops tokenizing each text at `max_length` tokens before
/// `longest_first` compares their lengths, so two texts over it tie and the first gets the
/// smaller share even when it is the longer; Python's gives the longer one the odd token.)
pub struct PairEncoder<'t> {
    tokenizer: &'t Tokenizer,
    /// `tokenizer` without truncation.
    whole: Tokenizer,
}

impl<'t> PairEncoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Result<PairEncoder<'t>> {
        let mut whole = tokenizer.clone();
        whole
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot turn truncation off: {e}"))?;
        Ok(PairEncoder { tokenizer, whole })
    }

    /// The pairs `(firsts[i], seconds[i])`, with special tokens. The second text gets type
    /// id 1 before post-processing, as `encode` gives it.
    pub fn encode(&self, firsts: &[String], seconds: &[String]) -> Result<Vec<Encoding>> {
        let encode = |texts: &[String]| {
            let inputs: Vec<EncodeInput> = texts
                .iter()
                .map(|t| EncodeInput::from(t.as_str()))
                .collect();
            self.whole
                .encode_batch_fast(inputs, false)
                .map_err(|e| anyhow!("tokenizing failed: {e}"))
        };
        let (firsts, seconds) = (encode(firsts)?, encode(seconds)?);
        firsts
            .into_iter()
            .zip(seconds)
            .map(|(first, mut second)| {
                second.set_type_ids(vec![1; second.len()]);
                self.tokenizer
                    .post_process(first, Some(second), true)
                    .map_err(|e| anyhow!("tokenizing failed: {e}"))
            })
            .collect()
    }
}

fn write_split(path: &Path, data: &SplitData, encoded: &Encoded) -> Result<()> {
    let label_type = data.labels.data_type().clone();
    let (schema, item) = tokenized::split_schema(data.texts.pairs.is_some(), label_type);
    let offsets = OffsetBuffer::new(ScalarBuffer::from(encoded.offsets.clone()));
    let list = |values: &[i32]| {
        ListArray::try_new(
            item.clone(),
            offsets.clone(),
            Arc::new(Int32Array::from(values.to_vec())),
            None,
        )
    };
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
        data.texts.texts.iter(),
    ))];
    if let Some(pairs) = &data.texts.pairs {
        columns.push(Arc::new(StringArray::from_iter_values(pairs.iter())));
    }
    columns.push(Arc::new(list(&encoded.ids)?));
    if let Some(types) = &encoded.type_ids {
        columns.push(Arc::new(list(types)?));
    }
    columns.push(data.labels.clone());
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
