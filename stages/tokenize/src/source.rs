//! Where the tokenizer comes from: a Hugging Face file, or training on the train split.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use finetune_core::{ConfigError, RunContext};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::bpe::BPEDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::params::{Algorithm, Params, TokenizerSource, Trainable, Truncation};

/// Longest `max_length` for a trained tokenizer, whose model does not exist yet.
pub const TRAINED_MAX_LENGTH: usize = 8192;

/// BERT's special tokens, in the id order a trained vocabulary gets them.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

pub enum Source {
    File {
        /// tokenizer.json, as the pipeline names it (relative to the workspace, or absolute).
        tokenizer_json: PathBuf,
        /// config.json beside it, when there is one (it bounds `max_length`).
        config_json: Option<PathBuf>,
    },
    /// A DeBERTa-v2/v3 directory as the Hub ships it: `spm.model`, no tokenizer.json.
    SentencePiece {
        spm_model: PathBuf,
        /// tokenizer_config.json beside it, when there is one (its flags and token names).
        tokenizer_config: Option<PathBuf>,
        config_json: Option<PathBuf>,
    },
    Train(Trainable),
}

impl Source {
    pub fn configure(params: &Params, workspace: &Path) -> Result<Source, ConfigError> {
        if params.max_length < 3 {
            return Err(ConfigError::at(
                "max_length",
                format!(
                    "{} is too short: [CLS] and [SEP] alone take 2 tokens; use at least 3",
                    params.max_length
                ),
            ));
        }
        match &params.tokenizer {
            TokenizerSource::Train(trainable) => {
                if params.max_length > TRAINED_MAX_LENGTH {
                    return Err(ConfigError::at(
                        "max_length",
                        format!(
                            "{} is above the limit of {TRAINED_MAX_LENGTH} tokens",
                            params.max_length
                        ),
                    ));
                }
                if trainable.vocab_size <= SPECIAL_TOKENS.len() {
                    return Err(ConfigError::at(
                        "tokenizer.vocab_size",
                        format!(
                            "{} leaves no room beside the {} special tokens",
                            trainable.vocab_size,
                            SPECIAL_TOKENS.len()
                        ),
                    ));
                }
                Ok(Source::Train(trainable.clone()))
            }
            TokenizerSource::From { from } => configure_file(from, params.max_length, workspace),
        }
    }

    pub fn reads(&self) -> Vec<PathBuf> {
        match self {
            Source::File {
                tokenizer_json,
                config_json,
            } => std::iter::once(tokenizer_json.clone())
                .chain(config_json.clone())
                .collect(),
            Source::SentencePiece {
                spm_model,
                tokenizer_config,
                config_json,
            } => std::iter::once(spm_model.clone())
                .chain(tokenizer_config.clone())
                .chain(config_json.clone())
                .collect(),
            Source::Train(_) => Vec::new(),
        }
    }

    /// The tokenizer, truncating to `max_length` and never padding. `train_split` is read only
    /// when a tokenizer is trained.
    pub fn load(&self, params: &Params, train_split: &Path, ctx: &RunContext) -> Result<Tokenizer> {
        let mut tokenizer = match self {
            Source::File { tokenizer_json, .. } => {
                let path = ctx.resolve(tokenizer_json);
                Tokenizer::from_file(&path).map_err(|e| {
                    anyhow!(
                        "{} is not a valid tokenizer.json: {e}",
                        tokenizer_json.display()
                    )
                })?
            }
            Source::SentencePiece {
                spm_model,
                tokenizer_config,
                ..
            } => {
                let config = match tokenizer_config {
                    Some(path) => read_json(&ctx.resolve(path))?,
                    None => serde_json::Value::Object(Default::default()),
                };
                let config_path = tokenizer_config
                    .clone()
                    .unwrap_or_else(|| spm_model.with_file_name("tokenizer_config.json"));
                crate::sentencepiece::deberta_v2(&ctx.resolve(spm_model), &config, &config_path)?
            }
            Source::Train(trainable) => {
                let split = crate::tokenized::read_texts(train_split)?;
                let train_texts: Vec<String> = split
                    .texts
                    .into_iter()
                    .chain(split.pairs.into_iter().flatten())
                    .collect();
                ctx.reporter.message(&format!(
                    "training {:?} (vocab {}) on {} train texts",
                    trainable.train,
                    trainable.vocab_size,
                    train_texts.len()
                ));
                train(trainable, &train_texts)?
            }
        };
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: params.max_length,
                strategy: match params.truncation {
                    Truncation::LongestFirst => TruncationStrategy::LongestFirst,
                    Truncation::OnlyFirst => TruncationStrategy::OnlyFirst,
                    Truncation::OnlySecond => TruncationStrategy::OnlySecond,
                },
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| anyhow!("cannot truncate to {}: {e}", params.max_length))?;
        tokenizer.with_padding(None);
        Ok(tokenizer)
    }
}

/// `tokenizer: { from: PATH }`: a tokenizer.json, or a model directory holding one (or, for
/// DeBERTa-v2/v3, its `spm.model`), with the model's positions bounding `max_length`.
fn configure_file(from: &Path, max_length: usize, workspace: &Path) -> Result<Source, ConfigError> {
    let resolved = workspace.join(from);
    let (tokenizer_json, dir) = if resolved.is_dir() {
        (from.join("tokenizer.json"), from.to_path_buf())
    } else {
        (
            from.to_path_buf(),
            from.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    };
    let beside = |name: &str| {
        let path = dir.join(name);
        workspace.join(&path).is_file().then_some(path)
    };
    let config_json = beside("config.json");
    if let Some(config) = &config_json {
        let positions = usable_positions(&workspace.join(config))
            .map_err(|e| ConfigError::at("tokenizer.from", format!("{e:#}")))?;
        if let Some(positions) = positions.filter(|&p| max_length > p) {
            return Err(ConfigError::at(
                "max_length",
                format!(
                    "{max_length} is above the model's {positions} positions ({})",
                    config.display()
                ),
            ));
        }
    }
    if workspace.join(&tokenizer_json).is_file() {
        return Ok(Source::File {
            tokenizer_json,
            config_json,
        });
    }
    if !resolved.is_dir() {
        let why = format!("`{}` does not exist", from.display());
        return Err(ConfigError::at("tokenizer.from", why));
    }
    let no_tokenizer_json = |detail: &str| {
        ConfigError::at(
            "tokenizer.from",
            format!(
                "the model directory `{}` has no tokenizer.json{detail} (a fast tokenizer is required; convert a slow one with Python `transformers`' `save_pretrained`)",
                from.display()
            ),
        )
    };
    let Some(spm_model) = beside("spm.model") else {
        return Err(no_tokenizer_json(""));
    };
    let tokenizer_config = beside("tokenizer_config.json");
    let class = tokenizer_class(
        workspace,
        tokenizer_config.as_deref(),
        config_json.as_deref(),
    )
    .map_err(|e| ConfigError::at("tokenizer.from", format!("{e:#}")))?;
    if !class
        .as_deref()
        .is_some_and(|c| crate::sentencepiece::CLASSES.contains(&c))
    {
        let class = class.unwrap_or_else(|| "not named".to_string());
        return Err(no_tokenizer_json(&format!(
            ", and its spm.model is built here only for DeBERTa-v2/v3 (tokenizer class: {class})"
        )));
    }
    Ok(Source::SentencePiece {
        spm_model,
        tokenizer_config,
        config_json,
    })
}

/// The tokenizer class `AutoTokenizer` would pick: tokenizer_config.json's `tokenizer_class`,
/// else DeBERTa-v2's for a config.json of `model_type` deberta-v2.
fn tokenizer_class(
    workspace: &Path,
    tokenizer_config: Option<&Path>,
    config_json: Option<&Path>,
) -> Result<Option<String>> {
    if let Some(path) = tokenizer_config {
        let json = read_json(&workspace.join(path))?;
        if let Some(class) = json.get("tokenizer_class").and_then(|v| v.as_str()) {
            return Ok(Some(class.to_string()));
        }
    }
    let Some(path) = config_json else {
        return Ok(None);
    };
    let json = read_json(&workspace.join(path))?;
    let model_type = json.get("model_type").and_then(|v| v.as_str());
    Ok((model_type == Some("deberta-v2")).then(|| "DebertaV2Tokenizer".to_string()))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Positions a model can use from its config.json: `max_position_embeddings`, less RoBERTa's
/// offset (its positions start after the padding index).
fn usable_positions(config: &Path) -> Result<Option<usize>> {
    let json = read_json(config)?;
    let Some(positions) = json.get("max_position_embeddings").and_then(|v| v.as_u64()) else {
        return Ok(None);
    };
    let roberta_like = matches!(
        json.get("model_type").and_then(|v| v.as_str()),
        Some("roberta" | "xlm-roberta" | "camembert")
    );
    let offset = if roberta_like {
        json.get("pad_token_id")
            .and_then(|v| v.as_u64())
            .unwrap_or(1)
            + 1
    } else {
        0
    };
    Ok(Some(positions.saturating_sub(offset) as usize))
}

/// Trains a BERT-style tokenizer (BERT normalizer and pre-tokenizer, [CLS] … [SEP]) with the
/// deterministic trainer of `train.rs`.
fn train(params: &Trainable, texts: &[String]) -> Result<Tokenizer> {
    let normalizer = BertNormalizer::new(true, true, Some(params.lowercase), params.lowercase);
    let words = crate::train::count_words(texts, &normalizer, &BertPreTokenizer)?;
    let trained = crate::train::train(
        &words,
        params.train,
        &SPECIAL_TOKENS,
        params.vocab_size,
        params.min_frequency,
    );
    let decoder = match params.train {
        Algorithm::Wordpiece => DecoderWrapper::WordPiece(WordPieceDecoder::default()),
        Algorithm::Bpe => DecoderWrapper::BPE(BPEDecoder::default()),
    };
    let mut tokenizer = Tokenizer::new(trained.into_model(params.train)?);
    tokenizer
        .with_normalizer(Some(NormalizerWrapper::BertNormalizer(normalizer)))
        .map_err(|e| anyhow!("cannot set the normalizer: {e}"))?
        .with_pre_tokenizer(Some(PreTokenizerWrapper::BertPreTokenizer(
            BertPreTokenizer,
        )))
        .with_decoder(Some(decoder));
    // The special tokens are whole tokens in any text, as in a BERT tokenizer.json.
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| anyhow!("cannot add the special tokens: {e}"))?;
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| anyhow!("the trained vocabulary lacks {token}"))
    };
    let processor = BertProcessing::new(
        ("[SEP]".into(), id("[SEP]")?),
        ("[CLS]".into(), id("[CLS]")?),
    );
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Bert(processor)));
    Ok(tokenizer)
}
