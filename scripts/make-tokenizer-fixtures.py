"""Makes tests/fixtures/tokenizers: DeBERTa-v3 and ModernBERT tokenizers in the formats their
Hugging Face checkpoints ship, and the ids Python's fast tokenizer gives for them.

- deberta-v3/: a SentencePiece Unigram `spm.model` with `tokenizer_config.json`, as
  microsoft/deberta-v3-* ship them (no tokenizer.json), so the tokenize stage must build the
  tokenizer as transformers does.
- deberta-v3-json/: the same tokenizer after `save_pretrained` (tokenizer.json).
- modernbert/: a byte-level BPE tokenizer.json laid out as answerdotai/ModernBERT-* ship it:
  NFC, byte-level pre-tokenizer, the special tokens after the vocabulary ([MASK] strips its
  left space), the [CLS] A [SEP] B [SEP] template.
- electra/: an uncased WordPiece tokenizer.json as google/electra-*-discriminator ship it.
- expected.jsonl: per family, texts (single, and pairs at a short max_length) and the ids and
  token type ids `AutoTokenizer.from_pretrained(dir)(text, text_pair, truncation=...,
  max_length=...)` gives.

Each has 1,000 ids in all, the vocabulary of the tiny checkpoints in tests/fixtures/golden,
so that a tiny checkpoint with one of these beside it is a directory shaped like the Hub's.

Needs transformers 5.24, tokenizers, sentencepiece and protobuf (no torch). A rerun makes
equivalent, not byte-identical, files (spm.model records its temporary input path; the
trainers break ties in parallel counts), so the fixtures are committed, not remade in tests.

    python scripts/make-tokenizer-fixtures.py
"""

import json
import pathlib
import shutil
import tempfile

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import AddedToken
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/tokenizers"
SINGLE_MAX_LENGTH = 512
PAIR_MAX_LENGTH = 24

# Text the review data lacks but real input has: runs of spaces, tabs and newlines (DeBERTa's
# normalizer folds them), trailing spaces (stripped), a decomposed accent (NFC composes it),
# full-width letters (NFKC would fold them; these tokenizers must not), special-token text.
EXTRA_TEXTS = [
    "two  spaces   and\ttab\nnewline",
    "trailing spaces   ",
    "   leading spaces",
    "cafe\u0301 and café",
    "ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ １２３",
    "a [MASK] in the text and [CLS] too",
    "price: $19.99 (50% off!!) -- see https://example.com/x?y=1",
]


def corpus_texts():
    golden = ROOT / "tests/fixtures/golden/tokenize_minilm.jsonl"
    return [json.loads(line)["text"] for line in golden.read_text().splitlines()]


def train_spm(texts, work):
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(t for t in texts if t.strip()) + "\n")
    prefix = work / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=999,  # + [MASK]
        character_coverage=1.0,
        pad_id=0,
        pad_piece="[PAD]",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        unk_id=3,
        unk_piece="[UNK]",
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def make_deberta(texts, work):
    spm_dir = OUT / "deberta-v3"
    spm_dir.mkdir(parents=True)
    shutil.copy(train_spm(texts, work), spm_dir / "spm.model")
    (spm_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"do_lower_case": False, "vocab_type": "spm", "tokenizer_class": "DebertaV2Tokenizer"},
            indent=2,
        )
        + "\n"
    )
    json_dir = OUT / "deberta-v3-json"
    AutoTokenizer.from_pretrained(spm_dir).save_pretrained(json_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (json_dir / name).unlink(missing_ok=True)
    return [spm_dir, json_dir]


def save_framed(tokenizer, name, tokenizer_config):
    """Adds BERT's template ([CLS] A [SEP] B [SEP], B of type 1), saves tokenizer.json and
    tokenizer_config.json under OUT/name, and returns that directory."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    out = OUT / name
    out.mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def make_modernbert(texts):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=995,  # + the 5 special tokens after it
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["|||IP_ADDRESS|||", "<|padding|>", "<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(
        [
            AddedToken("[UNK]", special=True),
            AddedToken("[CLS]", special=True),
            AddedToken("[SEP]", special=True),
            AddedToken("[PAD]", special=True),
            AddedToken("[MASK]", special=True, lstrip=True),
        ]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
    return [save_framed(tokenizer, "modernbert", config)]


def make_electra(texts):
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=1000,
        min_frequency=2,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": True}
    return [save_framed(tokenizer, "electra", config)]


def expected_rows(family_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(family_dir)
    family = family_dir.name
    for text in texts:
        encoded = tokenizer(
            text, truncation=True, max_length=SINGLE_MAX_LENGTH, return_token_type_ids=True
        )
        yield {
            "family": family,
            "max_length": SINGLE_MAX_LENGTH,
            "text": text,
            "input_ids": encoded["input_ids"],
            "token_type_ids": encoded["token_type_ids"],
        }
    for a, b in zip(texts[0::2], texts[1::2]):
        encoded = tokenizer(
            a, b, truncation="longest_first", max_length=PAIR_MAX_LENGTH, return_token_type_ids=True
        )
        yield {
            "family": family,
            "max_length": PAIR_MAX_LENGTH,
            "text": a,
            "text_pair": b,
            "input_ids": encoded["input_ids"],
            "token_type_ids": encoded["token_type_ids"],
        }


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    corpus = corpus_texts()
    # The tokenizers learn from the review sentences; the checks cover those, the seven hard
    # strings at the end of the golden file, and the extra texts above.
    texts = corpus[:200] + corpus[-7:] + EXTRA_TEXTS
    with tempfile.TemporaryDirectory() as work:
        dirs = (
            make_deberta(corpus, pathlib.Path(work))
            + make_modernbert(corpus)
            + make_electra(corpus)
        )
    with open(OUT / "expected.jsonl", "w") as out:
        for family_dir in dirs:
            for row in expected_rows(family_dir, texts):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
