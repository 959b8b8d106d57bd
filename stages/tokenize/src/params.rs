use std::path::PathBuf;

use finetune_core::schemars::{self, JsonSchema};
use serde::Deserialize;

/// `with:` of a `tokenize` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Where the tokenizer comes from.
    pub tokenizer: TokenizerSource,
    /// Longest sequence in tokens, special tokens included; longer texts are truncated (and
    /// counted). At least 3, and at most the model's positions.
    pub max_length: usize,
    /// How a sentence pair over `max_length` is cut, as Python's tokenizers name it:
    /// `longest_first` (a token at a time from the longer text), `only_first` or `only_second`.
    /// A pair whose other text alone is too long for `only_*` is an error.
    #[serde(default)]
    pub truncation: Truncation,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    LongestFirst,
    OnlyFirst,
    OnlySecond,
}

/// `{ from: PATH }` or `{ train: wordpiece | bpe, ... }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "either `{ from: PATH }` or `{ train: wordpiece | bpe, vocab_size: N, ... }`"
)]
pub enum TokenizerSource {
    From {
        /// A Hugging Face model directory (with tokenizer.json) or a tokenizer.json file.
        from: PathBuf,
    },
    Train(Trainable),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trainable {
    /// The subword model to train on the train split.
    pub train: Algorithm,
    /// Vocabulary size, special tokens included.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// A pair (or word piece) must occur this often to be merged.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// Lower-case (and strip accents) before splitting, as uncased BERT does.
    #[serde(default = "yes")]
    pub lowercase: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Wordpiece,
    Bpe,
}

fn default_vocab_size() -> usize {
    8000
}
fn default_min_frequency() -> u64 {
    2
}
fn yes() -> bool {
    true
}
