//! The files Python's tokenizer loaders read beside tokenizer.json: `tokenizer_config.json`
//! (the class, `model_max_length`, the special tokens) and `special_tokens_map.json`. Both
//! are derived from the tokenizer.json itself and the model's config, whatever made the
//! tokenizer (a pretrained model's, or one trained here), so that `AutoTokenizer` truncates at
//! what the model can take and serving tools know the special tokens.

use serde_json::{Map, Value, json};

use crate::config::{Family, ModelConfig};

/// The special tokens of a tokenizer.json, by the role Python's tokenizers give them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub cls: Option<String>,
    pub sep: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    pub mask: Option<String>,
}

impl SpecialTokens {
    /// cls and sep from the post-processor (the template that frames a sequence), pad by the
    /// model's `pad_token_id`, unk from the tokenizer model, mask by its name (`[MASK]`,
    /// `<mask>`).
    pub fn of(tokenizer: &Value, pad_token_id: usize) -> SpecialTokens {
        let (cls, sep) = framing(&tokenizer["post_processor"]);
        let added = tokenizer["added_tokens"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let content = |token: &Value| token["content"].as_str().map(str::to_string);
        let pad = added
            .iter()
            .find(|t| t["id"].as_u64() == Some(pad_token_id as u64))
            .and_then(content);
        let mask = added
            .iter()
            .filter(|t| t["special"].as_bool() == Some(true))
            .find(|t| content(t).is_some_and(|c| c.to_lowercase().contains("mask")))
            .and_then(content);
        SpecialTokens {
            cls,
            sep,
            pad,
            unk: unknown_token(&tokenizer["model"]),
            mask,
        }
    }

    /// `(role, token)` in the order the files list them; RoBERTa's `<s>`/`</s>` are its
    /// bos/eos tokens as well.
    fn roles(&self, family: Family) -> Vec<(&'static str, &str)> {
        let mut roles = vec![
            ("cls_token", &self.cls),
            ("sep_token", &self.sep),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
            ("mask_token", &self.mask),
        ];
        if family == Family::Roberta {
            roles.extend([("bos_token", &self.cls), ("eos_token", &self.sep)]);
        }
        roles
            .into_iter()
            .filter_map(|(role, token)| token.as_deref().map(|t| (role, t)))
            .collect()
    }
}

/// The first special token before the sequence and the first after it.
fn framing(processor: &Value) -> (Option<String>, Option<String>) {
    let name = |pair: &Value| pair[0].as_str().map(str::to_string);
    match processor["type"].as_str() {
        Some("BertProcessing" | "RobertaProcessing") => {
            (name(&processor["cls"]), name(&processor["sep"]))
        }
        Some("TemplateProcessing") => {
            let single = processor["single"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            let sequence = single
                .iter()
                .position(|piece| piece.get("Sequence").is_some());
            let special = |piece: &Value| piece["SpecialToken"]["id"].as_str().map(str::to_string);
            match sequence {
                Some(at) => (
                    single[..at].iter().find_map(special),
                    single[at + 1..].iter().find_map(special),
                ),
                None => (None, None),
            }
        }
        Some("Sequence") => processor["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(framing)
            .find(|found| found.0.is_some() || found.1.is_some())
            .unwrap_or_default(),
        _ => (None, None),
    }
}

/// WordPiece and BPE name it; Unigram gives its index in the vocabulary.
fn unknown_token(model: &Value) -> Option<String> {
    if let Some(unk) = model["unk_token"].as_str() {
        return Some(unk.to_string());
    }
    let index = usize::try_from(model["unk_id"].as_u64()?).ok()?;
    model["vocab"][index][0].as_str().map(str::to_string)
}

/// `(tokenizer_config.json, special_tokens_map.json)` for a model with `config` and this
/// tokenizer.json.
pub fn tokenizer_files(config: &ModelConfig, tokenizer: &Value) -> (Value, Value) {
    let special = SpecialTokens::of(tokenizer, config.pad_token_id);
    let inputs = match config.family {
        Family::Bert | Family::Electra => {
            json!(["input_ids", "token_type_ids", "attention_mask"])
        }
        Family::DebertaV2 if config.type_vocab_size > 0 => {
            json!(["input_ids", "token_type_ids", "attention_mask"])
        }
        Family::DistilBert | Family::Roberta | Family::DebertaV2 | Family::ModernBert => {
            json!(["input_ids", "attention_mask"])
        }
    };
    let mut tokenizer_config = Map::new();
    // The generic fast tokenizer: everything it needs is in tokenizer.json, whichever
    // tokenizer (a pretrained model's or one trained here) that is.
    tokenizer_config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tokenizer_config.insert("model_max_length".into(), json!(config.usable_positions()));
    tokenizer_config.insert("padding_side".into(), json!("right"));
    tokenizer_config.insert("truncation_side".into(), json!("right"));
    tokenizer_config.insert("model_input_names".into(), inputs);
    tokenizer_config.insert("clean_up_tokenization_spaces".into(), json!(false));
    let mut map = Map::new();
    for (role, token) in special.roles(config.family) {
        tokenizer_config.insert(role.into(), json!(token));
        map.insert(role.into(), json!(token));
    }
    (Value::Object(tokenizer_config), Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_unigram_tokenizers_give_their_roles() {
        let tokenizer = json!({
            "added_tokens": [
                {"id": 0, "content": "[PAD]", "special": true},
                {"id": 1, "content": "[CLS]", "special": true},
                {"id": 2, "content": "[SEP]", "special": true},
                {"id": 128000, "content": "[MASK]", "special": true}
            ],
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel"},
                {"type": "TemplateProcessing", "single": [
                    {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
                ]}
            ]},
            "model": {"type": "Unigram", "unk_id": 3, "vocab": [["[PAD]", 0.0], ["[CLS]", 0.0], ["[SEP]", 0.0], ["[UNK]", 0.0]]}
        });
        let found = SpecialTokens::of(&tokenizer, 0);
        let expected = SpecialTokens {
            cls: Some("[CLS]".into()),
            sep: Some("[SEP]".into()),
            pad: Some("[PAD]".into()),
            unk: Some("[UNK]".into()),
            mask: Some("[MASK]".into()),
        };
        assert_eq!(found, expected);
    }

    #[test]
    fn a_tokenizer_without_a_template_names_no_cls_or_sep() {
        let tokenizer = json!({"added_tokens": [], "post_processor": null, "model": {"type": "BPE", "unk_token": null}});
        assert_eq!(SpecialTokens::of(&tokenizer, 1), SpecialTokens::default());
    }
}
