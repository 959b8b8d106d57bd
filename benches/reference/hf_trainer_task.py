#!/usr/bin/env python3
"""Hugging Face Trainer on a finetune run's own split, for the task labels.json names: the
reference that pipelines/clothing-rating.yaml's numbers are compared with.

    python benches/reference/hf_trainer_task.py --run artifacts/runs/clothing-rating \
        --tokenize tokenize-stars --model models/all-MiniLM-L6-v2

It trains `AutoModelForSequenceClassification` (`problem_type` and labels from the tokenize
output's labels.json: cross-entropy, BCE with logits or MSE, as Trainer does) on the token ids
(and a sentence pair's token type ids) of the tokenize stage's train.parquet, with that
pipeline's settings (2 epochs and lr 5e-5 unless --epochs and --lr say otherwise, batch 32,
weight decay 0.01, 10% warmup, linear schedule, rows grouped by length, seed 42, 2
threads), and prints one JSON line of test metrics: accuracy and macro F1 (single-label),
micro F1 at 0.5 (multi-label), or RMSE, MAE, R² and Spearman (regression), and wall seconds.
Needs torch, transformers, accelerate, pyarrow and scipy.
"""
import argparse
import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from scipy.stats import spearmanr
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True)
ap.add_argument("--tokenize", default="tokenize")
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--epochs", type=float, default=2)
ap.add_argument("--lr", type=float, default=5e-5)
args = ap.parse_args()
torch.set_num_threads(args.threads)
start = time.time()

tokenized = Path(args.run) / args.tokenize
task = json.loads((tokenized / "labels.json").read_text())
problem = task.get("problem_type", "single_label_classification")
names = task["names"]


def rows(split):
    table = pq.read_table(tokenized / f"{split}.parquet").to_pydict()
    out = []
    for i, ids in enumerate(table["input_ids"]):
        label = table["label"][i]
        row = {"input_ids": ids, "labels": label if problem == "single_label_classification" else list(label)}
        if "token_type_ids" in table:  # a sentence pair's segments
            row["token_type_ids"] = table["token_type_ids"][i]
        out.append(row)
    return out


def collate(batch):
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    types = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
        if "token_type_ids" in b:
            types[i, : len(b["token_type_ids"])] = torch.tensor(b["token_type_ids"])
    dtype = torch.long if problem == "single_label_classification" else torch.float32
    labels = torch.tensor([b["labels"] for b in batch], dtype=dtype)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


train, test = rows("train"), rows("test")
model = AutoModelForSequenceClassification.from_pretrained(
    args.model,
    num_labels=len(names),
    problem_type=problem,
    id2label=dict(enumerate(names)),
    label2id={n: i for i, n in enumerate(names)},
)
training = TrainingArguments(
    output_dir="/tmp/hf_trainer_task",
    num_train_epochs=args.epochs,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    learning_rate=args.lr,
    weight_decay=0.01,
    warmup_steps=0.1,  # a float is a ratio of the steps in transformers 5
    lr_scheduler_type="linear",
    train_sampling_strategy="group_by_length",
    seed=42,
    eval_strategy="no",
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=training, train_dataset=train, data_collator=collate)
trainer.train()
# Not trainer.predict: in transformers 5 its eval sampler groups rows by length too
# (train_sampling_strategy applies to evaluation), so its outputs come back in another order
# than the rows'. Predict in row order instead.
model.eval()
with torch.no_grad():
    logits = torch.cat(
        [
            model(**{k: v for k, v in collate(test[i : i + 64]).items() if k != "labels"}).logits
            for i in range(0, len(test), 64)
        ]
    )
truth = torch.tensor([r["labels"] for r in test])
result = {"problem_type": problem, "test_rows": len(test), "seconds": round(time.time() - start, 1)}
if problem == "single_label_classification":
    predicted = logits.argmax(-1)
    result["accuracy"] = (predicted == truth).float().mean().item()
    f1s = []
    for c in range(len(names)):
        tp = ((predicted == c) & (truth == c)).sum().item()
        p, s = (predicted == c).sum().item(), (truth == c).sum().item()
        f1s.append(2 * tp / (p + s) if p + s else 0.0)
    result["f1_macro"] = sum(f1s) / len(f1s)
elif problem == "multi_label_classification":
    said, true = torch.sigmoid(logits) >= 0.5, truth >= 0.5
    tp = (said & true).sum().item()
    result["f1_micro"] = 2 * tp / (said.sum().item() + true.sum().item())
else:
    predicted, truth = logits.reshape(truth.shape).double(), truth.double()
    mse = ((predicted - truth) ** 2).mean().item()
    spread = ((truth - truth.mean()) ** 2).sum().item()
    result.update(
        rmse=math.sqrt(mse),
        mae=(predicted - truth).abs().mean().item(),
        r2=1 - mse * len(test) / spread,
        spearman=spearmanr(truth.flatten().tolist(), predicted.flatten().tolist()).statistic,
    )
print(json.dumps(result))
