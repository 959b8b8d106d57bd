//! The `tokenize` stage: turns the Parquet splits of `ingest_csv` into token ids.
//!
//! The tokenizer is either loaded from a Hugging Face `tokenizer.json` (a file or a model
//! directory), applying its post-processor's special tokens exactly as the Python fast
//! tokenizer does; built from a DeBERTa-v2/v3 directory's SentencePiece `spm.model` as
//! transformers' `DebertaV2Tokenizer` builds it, where the directory has no tokenizer.json; or
//! trained with the `tokenizers` crate on the **train split only** (WordPiece
//! or BPE, BERT-style special tokens) and saved as `tokenizer.json` for later stages and for
//! Python. Texts are encoded in parallel and truncated to `max_length`; nothing is padded
//! (padding belongs to batching at train time).
//!
//! Sentence pairs (ingest's `text_pair`) are encoded with the tokenizer's pair template
//! (`[CLS] a [SEP] b [SEP]`, `<s> a </s></s> b </s>`), cut by `truncation` as Python's
//! `longest_first` / `only_first` / `only_second` cut them.
//!
//! Output: `{train,validation,test}.parquet` (`text`, `input_ids` list<int32>, `label`; for
//! pairs also `text_pair` and `token_type_ids` list<int32>), `tokenizer.json`, `labels.json`
//! (from ingest) and `stats.json` (per split: rows, tokens, length mean/p50/p95/max, truncated
//! count). One text's token type ids are not stored: they are all zero, and the model fills
//! them in.

mod encode;
mod params;
mod sentencepiece;
mod source;
pub mod tokenized;
mod train;

use std::path::PathBuf;

use anyhow::Context;
use finetune_core::{
    ConfigError, ConfigureContext, Job, RunContext, Stage, Value, parse_params, schema_for,
};

pub use encode::PairEncoder;
pub use params::{Params, TokenizerSource, Trainable};

/// The `tokenize` plugin.
pub struct Tokenize;

/// The splits `ingest_csv` writes, in the order they are encoded.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

impl Stage for Tokenize {
    fn name(&self) -> &'static str {
        "tokenize"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "Encode the ingested splits to token ids (Parquet) with a Hugging Face tokenizer.json or one trained on the train split"
    }

    fn params_schema(&self) -> finetune_core::schemars::Schema {
        schema_for::<Params>()
    }

    fn configure(&self, with: &Value, ctx: &ConfigureContext) -> Result<Box<dyn Job>, ConfigError> {
        let params: Params = parse_params(with)?;
        ctx.upstream_using("ingest_csv")?;
        let source = source::Source::configure(&params, &ctx.workspace)?;
        Ok(Box::new(TokenizeJob { params, source }))
    }
}

struct TokenizeJob {
    params: Params,
    source: source::Source,
}

impl Job for TokenizeJob {
    fn reads(&self) -> Vec<PathBuf> {
        self.source.reads()
    }

    fn run(&self, ctx: &RunContext) -> anyhow::Result<()> {
        let ingest = ctx.upstream_using("ingest_csv")?;
        let tokenizer = self
            .source
            .load(&self.params, &ingest.dir.join("train.parquet"), ctx)?;
        tokenizer
            .save(ctx.out_dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("cannot save tokenizer.json: {e}"))?;
        std::fs::copy(
            ingest.dir.join("labels.json"),
            ctx.out_dir.join("labels.json"),
        )
        .context("cannot copy labels.json from the ingest output")?;
        let stats = encode::encode_splits(
            &tokenizer,
            &ingest.dir,
            &ctx.out_dir,
            self.params.max_length,
            ctx.reporter,
        )?;
        finetune_core::output::write_json(&ctx.out_dir.join("stats.json"), &stats)
    }
}
