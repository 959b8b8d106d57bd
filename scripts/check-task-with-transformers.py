#!/usr/bin/env python3
"""Checks a finetune run's loss and predictions, for its task, in Python `transformers`.

    python scripts/check-task-with-transformers.py artifacts/runs/NAME [TOKENIZE TRAIN EVALUATE]

NAME is a pipeline; its tokenize, train and evaluate stages (evaluating the test split) have
those ids unless given. Needs torch, transformers (5.24 here) and pyarrow: too large a download for CI,
so this is the check a release note quotes. It loads train/model with
`AutoModelForSequenceClassification`, which picks its loss by the saved config.json's
`problem_type` (cross-entropy, BCE with logits, or MSE), feeds it the token ids of
tokenize/test.parquet with their labels, and compares its loss and outputs (softmax, sigmoid
or the values) with evaluate/metrics.json and evaluate/predictions.parquet. Exit 1 when the
loss differs by more than 1e-4 relatively or an output by more than 1e-4.
"""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForSequenceClassification


def padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def main() -> int:
    run = Path(sys.argv[1])
    tokenize, train, evaluate = sys.argv[2:5] if len(sys.argv) >= 5 else ("tokenize", "train", "evaluate")
    model = AutoModelForSequenceClassification.from_pretrained(run / train / "model")
    model.eval()
    problem = model.config.problem_type
    test = pq.read_table(run / tokenize / "test.parquet").to_pydict()
    ids, mask = padded(test["input_ids"], model.config.pad_token_id or 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in test:
        inputs["token_type_ids"], _ = padded(test["token_type_ids"], 0)
    if problem == "single_label_classification":
        labels = torch.tensor(test["label"], dtype=torch.long)
    else:
        labels = torch.tensor(test["label"], dtype=torch.float32)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    if problem == "single_label_classification":
        theirs = torch.softmax(out.logits, -1)
    elif problem == "multi_label_classification":
        theirs = torch.sigmoid(out.logits)
    else:
        theirs = out.logits
    metrics = json.loads((run / evaluate / "metrics.json").read_text())
    predictions = pq.read_table(run / evaluate / "predictions.parquet").to_pydict()
    column = "prediction" if problem == "regression" else "probabilities"
    ours = torch.tensor(predictions[column], dtype=torch.float32)
    output_diff = (ours - theirs).abs().max().item()
    loss_diff = abs(metrics["loss"] - out.loss.item()) / max(abs(out.loss.item()), 1e-12)
    print(
        f"{problem}: {len(labels)} test rows; Python's loss {out.loss.item():.6f}, ours "
        f"{metrics['loss']:.6f} (relative diff {loss_diff:.1e}); max |output diff| {output_diff:.1e}"
    )
    return 0 if loss_diff <= 1e-4 and output_diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
