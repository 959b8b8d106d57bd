#!/usr/bin/env python3
"""Loads a model directory that `finetune` saved in Python `transformers` and checks it.

    python scripts/check-with-transformers.py MODEL_DIR [FINETUNE_BINARY]

Needs torch and transformers (5.24 here: `pip install torch transformers==5.24.0`); too large a
download for CI, so this is the check a release note quotes. It asserts that
`AutoModelForSequenceClassification` finds every key it expects and no other, that
`AutoTokenizer` loads, and prints how far Python's probabilities and log-probabilities are from
`finetune predict --json`'s on the same texts (exit 1 past 1e-4).
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXTS = [
    "The battery died within a week.",
    "Great sound and a solid build, I love it!",
    "ok",
    "Would not buy again; the seller never answered my emails about the broken case.",
]


def main() -> int:
    model_dir = sys.argv[1]
    finetune = sys.argv[2] if len(sys.argv) > 2 else "finetune"
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        print(f"{model_dir}: {problems}")
        return 1
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        encoded = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
        theirs = torch.softmax(model(**encoded).logits, -1)
    predicted = subprocess.run(
        [finetune, "predict", "--json", "--model", model_dir, *TEXTS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = [json.loads(line)["probabilities"] for line in predicted.splitlines()]
    ours = torch.tensor([[row[label] for label in labels] for row in rows])
    probability = (ours - theirs).abs().max().item()
    log_probability = (ours.log() - theirs.log()).abs().max().item()
    print(f"{model.config.architectures[0]}: no missing or unexpected keys; labels {labels}")
    print(f"max |probability diff| {probability:.2e}, max |log-probability diff| {log_probability:.2e}")
    return 0 if log_probability <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
