#!/usr/bin/env python3
"""PyTorch's training step on the step bench's batch, for `cargo bench -p finetune-trainer
--bench step` (run it with HF_PYTHON set) or by hand:

    python torch_step.py --model DIR --golden FILE --tokens 64 --runs 5

The batch: the first 16 rows of the golden token ids (the same rows as the Rust bench), cut to
`--tokens` and padded to it, labels alternating 0/1. The step, as Trainer makes it: train mode
(dropout on), forward, cross-entropy, backward, clip to norm 1.0, torch AdamW (lr 5e-5, wd 0.01),
zero_grad. Two threads like the reference benchmark. Prints one JSON line with the median of
`--runs` steps after one warm-up step. `--device cuda` runs it on the GPU (each step timed to
its end with torch.cuda.synchronize).
"""
import argparse
import json
import os
import statistics
import time

for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--golden", required=True)
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(42)
with open(args.golden) as f:
    rows = [json.loads(line)["input_ids"][: args.tokens] for _, line in zip(range(args.batch), f)]
ids = torch.zeros((args.batch, args.tokens), dtype=torch.long)
mask = torch.zeros((args.batch, args.tokens), dtype=torch.long)
for r, row in enumerate(rows):
    ids[r, : len(row)] = torch.tensor(row)
    mask[r, : len(row)] = 1
labels = torch.arange(args.batch) % 2
ids, mask, labels = (t.to(args.device) for t in (ids, mask, labels))

model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2).to(args.device)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, eps=1e-8)


def step():
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


step()
times = []
for _ in range(args.runs):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"tokens": args.tokens, "batch": args.batch, "step_median_s": statistics.median(times),
                  "steps_s": times, "torch": torch.__version__, "device": args.device}))
