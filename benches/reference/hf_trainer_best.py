#!/usr/bin/env python3
"""Hugging Face Trainer with its best CPU settings for the Amazon protocol, for `cargo bench
--bench train`: the split, model, seed and hyper-parameters of ../shared/bench/hf_trainer
(batch 16, lr 5e-5, 3 epochs, AdamW wd 0.01 eps 1e-8, linear schedule, 10% warmup,
max_grad_norm 1.0, max 64 tokens, eval each epoch, 2 threads), but each batch padded only to its
longest row (DataCollatorWithPadding) and rows grouped by length (`group_by_length`, spelled
`train_sampling_strategy="group_by_length"` in transformers 5).

Prints one JSON line: wall seconds from process start to the trained model (imports, data,
tokenizer, model load, training with its evaluations), the training loop alone, peak RSS, and
the final test accuracy.
"""
import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(key, "1")

import torch  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

texts, labels = [], []
with open(args.data, encoding="utf-8") as f:
    for line in f:
        line = line.rstrip("\r\n")
        if line.strip():
            text, label = line.rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
split = datasets.Dataset.from_dict({"text": texts, "label": labels}).train_test_split(
    test_size=0.2, seed=42
)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def tokenize(batch):
    return tokenizer(batch["text"], max_length=64, truncation=True)


train = split["train"].map(tokenize, batched=True, remove_columns=["text"])
test = split["test"].map(tokenize, batched=True, remove_columns=["text"])
transformers.set_seed(42)
model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)


def accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}


training = TrainingArguments(
    output_dir="hf_trainer_best_out",
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    learning_rate=5e-5,
    num_train_epochs=3,
    weight_decay=0.01,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    lr_scheduler_type="linear",
    warmup_steps=0.1,
    seed=42,
    eval_strategy="epoch",
    save_strategy="no",
    logging_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
    train_sampling_strategy="group_by_length",  # transformers 5: group_by_length=True before
)
trainer = Trainer(
    model=model,
    args=training,
    train_dataset=train,
    eval_dataset=test,
    data_collator=DataCollatorWithPadding(tokenizer),
    compute_metrics=accuracy,
)
t_train = time.time()
trainer.train()
t_trained = time.time()
final = trainer.evaluate()
print(
    json.dumps(
        {
            "wall_to_trained_model_s": t_trained - T_START,
            "train_loop_s": t_trained - t_train,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "test_accuracy": final["eval_accuracy"],
        }
    )
)
