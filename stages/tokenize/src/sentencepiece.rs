//! DeBERTa-v2/v3 tokenizers from the SentencePiece model their checkpoints ship.
//!
//! microsoft/deberta-v3-* ship `spm.model` and `tokenizer_config.json`, no tokenizer.json.
//! Python's transformers (5.x) builds the fast tokenizer from them in `DebertaV2Tokenizer`:
//! the Unigram pieces and scores of the model file, then its own pipeline (whitespace runs,
//! tabs and newlines to one space, NFC, right strip; Metaspace; `[CLS] A [SEP] B [SEP]`). The
//! model file's own normalization rules (its precompiled charsmap) are not used, so they are
//! not used here either. This module builds that same tokenizer, so that such a directory
//! tokenizes exactly as `AutoTokenizer.from_pretrained` does.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, NormalizerWrapper, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The slow tokenizer classes whose SentencePiece model this module can build from.
pub const CLASSES: [&str; 2] = ["DebertaV2Tokenizer", "DebertaV2TokenizerFast"];

/// The parts of sentencepiece_model.proto read here (field numbers as in that file).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<Piece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Piece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
        #[prost(int32, optional, tag = "3")]
        pub kind: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        /// UNIGRAM 1, BPE 2, WORD 3, CHAR 4.
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
    }

    pub const UNIGRAM: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// `tokenizer_config.json` settings of `DebertaV2Tokenizer`, with its defaults.
struct Settings {
    do_lower_case: bool,
    split_by_punct: bool,
    add_prefix_space: bool,
    cls: String,
    sep: String,
    /// bos, eos, unk, sep, pad, cls, mask: the order Python registers them in, which decides
    /// the ids of those the model file lacks.
    named: Vec<String>,
}

impl Settings {
    fn of(config: &Value, config_path: &Path) -> Result<Settings> {
        let flag = |key: &str, default: bool| match config.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(anyhow!(
                "{}: `{key}` must be true or false, not {other}",
                config_path.display()
            )),
        };
        let token = |key: &str, default: &str| -> Result<String> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: `{key}` has no `content`", config_path.display())),
                Some(other) => Err(anyhow!(
                    "{}: `{key}` must be a token, not {other}",
                    config_path.display()
                )),
            }
        };
        let (cls, sep) = (token("cls_token", "[CLS]")?, token("sep_token", "[SEP]")?);
        let named = vec![
            token("bos_token", "[CLS]")?,
            token("eos_token", "[SEP]")?,
            token("unk_token", "[UNK]")?,
            sep.clone(),
            token("pad_token", "[PAD]")?,
            cls.clone(),
            token("mask_token", "[MASK]")?,
        ];
        Ok(Settings {
            do_lower_case: flag("do_lower_case", false)?,
            split_by_punct: flag("split_by_punct", false)?,
            add_prefix_space: flag("add_prefix_space", true)?,
            cls,
            sep,
            named,
        })
    }
}

/// The tokenizer `DebertaV2Tokenizer` builds from `spm_model` and `tokenizer_config` (its
/// parsed `tokenizer_config.json`, or `{}` where there is none).
pub fn deberta_v2(
    spm_model: &Path,
    tokenizer_config: &Value,
    config_path: &Path,
) -> Result<Tokenizer> {
    let settings = Settings::of(tokenizer_config, config_path)?;
    let (unigram, pieces) = read_unigram(spm_model)?;
    let mut tokenizer = Tokenizer::new(unigram);
    tokenizer
        .with_normalizer(Some(normalizer(&settings)?))
        .map_err(|e| anyhow!("cannot set the normalizer: {e}"))?
        .with_pre_tokenizer(Some(pre_tokenizer(&settings)))
        .with_decoder(Some(DecoderWrapper::Metaspace(metaspace(&settings))));
    add_tokens(&mut tokenizer, &pieces, &settings)?;
    let template = template(&tokenizer, &settings, config_path)?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(template)));
    check_declared_ids(&tokenizer, tokenizer_config, config_path)?;
    Ok(tokenizer)
}

/// The Unigram model of a SentencePiece model file, and the file's pieces.
fn read_unigram(spm_model: &Path) -> Result<(Unigram, Vec<proto::Piece>)> {
    let bytes =
        std::fs::read(spm_model).with_context(|| format!("cannot read {}", spm_model.display()))?;
    let model: proto::ModelProto = prost::Message::decode(bytes.as_slice())
        .map_err(|e| anyhow!("{} is not a SentencePiece model: {e}", spm_model.display()))?;
    let trainer = model.trainer_spec.unwrap_or_default();
    if trainer.model_type.unwrap_or(proto::UNIGRAM) != proto::UNIGRAM {
        bail!(
            "{} is a SentencePiece model of type {} where DeBERTa's is Unigram (1)",
            spm_model.display(),
            trainer.model_type.unwrap_or_default()
        );
    }
    let vocab: Vec<(String, f64)> = model
        .pieces
        .iter()
        .map(|p| {
            let score = f64::from(p.score.unwrap_or(0.0));
            (p.piece.clone().unwrap_or_default(), score)
        })
        .collect();
    let unk_id = usize::try_from(trainer.unk_id.unwrap_or(0))
        .ok()
        .filter(|&id| id < vocab.len())
        .ok_or_else(|| {
            anyhow!(
                "{}: its unknown-piece id is outside its {} pieces",
                spm_model.display(),
                vocab.len()
            )
        })?;
    let unigram = Unigram::from(vocab, Some(unk_id), false)
        .map_err(|e| anyhow!("{}: {e}", spm_model.display()))?;
    Ok((unigram, model.pieces))
}

/// `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`, B and its separator of type 1.
fn template(
    tokenizer: &Tokenizer,
    settings: &Settings,
    config_path: &Path,
) -> Result<TemplateProcessing> {
    let (cls, sep) = (&settings.cls, &settings.sep);
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| anyhow!("{}: no {token} token", config_path.display()))
    };
    TemplateProcessing::builder()
        .try_single(format!("{cls}:0 $A:0 {sep}:0"))
        .and_then(|b| b.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
        .map_err(|e| anyhow!("{}: bad cls or sep token: {e}", config_path.display()))?
        .special_tokens(vec![(cls.clone(), id(cls)?), (sep.clone(), id(sep)?)])
        .build()
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))
}

fn normalizer(settings: &Settings) -> Result<NormalizerWrapper> {
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s{2,}|[\n\r\t]".into()), " ")
        .map_err(|e| anyhow!("the whitespace rule does not compile: {e}"))?;
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if settings.do_lower_case {
        steps.push(Lowercase.into());
    }
    steps.extend([
        whitespace.into(),
        NFC.into(),
        Strip::new(false, true).into(),
    ]);
    Ok(Sequence::new(steps).into())
}

fn metaspace(settings: &Settings) -> Metaspace {
    let scheme = if settings.add_prefix_space {
        PrependScheme::Always
    } else {
        PrependScheme::First
    };
    Metaspace::new('▁', scheme, true)
}

fn pre_tokenizer(settings: &Settings) -> PreTokenizerWrapper {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    if settings.split_by_punct {
        steps.push(Punctuation::new(SplitDelimiterBehavior::Isolated).into());
    }
    steps.push(metaspace(settings).into());
    PreTokenizerSequence::new(steps).into()
}

/// The model file's control pieces and the named special tokens as special tokens, its
/// user-defined pieces as plain added tokens, all matched on the raw text, as Python adds them.
fn add_tokens(
    tokenizer: &mut Tokenizer,
    pieces: &[proto::Piece],
    settings: &Settings,
) -> Result<()> {
    let of_kind = |kind: i32| {
        pieces
            .iter()
            .filter(move |p| p.kind == Some(kind))
            .filter_map(|p| p.piece.clone())
    };
    let mut special: Vec<AddedToken> = of_kind(proto::CONTROL)
        .map(|p| AddedToken::from(p, true))
        .collect();
    special.extend(
        settings
            .named
            .iter()
            .map(|t| AddedToken::from(t.clone(), true)),
    );
    let user_defined: Vec<AddedToken> = of_kind(proto::USER_DEFINED)
        .map(|p| AddedToken::from(p, false).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| anyhow!("cannot add the special tokens: {e}"))?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| anyhow!("cannot add the user-defined pieces: {e}"))?;
    Ok(())
}

/// Ids that tokenizer_config.json's `added_tokens_decoder` fixes must be the ids built here:
/// a token placed elsewhere (an id beyond the model file's pieces) cannot be reproduced.
fn check_declared_ids(tokenizer: &Tokenizer, config: &Value, config_path: &Path) -> Result<()> {
    let Some(declared) = config
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
    else {
        return Ok(());
    };
    for (id, token) in declared {
        let content = token
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let built = tokenizer.token_to_id(content);
        if built.map(|b| b.to_string()).as_deref() != Some(id.as_str()) {
            bail!(
                "{}: added_tokens_decoder puts {content:?} at id {id}, but the tokenizer built from spm.model has it at {}; save the tokenizer as tokenizer.json with Python `transformers`' `save_pretrained` and point `from:` at that",
                config_path.display(),
                built.map_or("no id".to_string(), |b| b.to_string())
            );
        }
    }
    Ok(())
}
