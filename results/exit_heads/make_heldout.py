"""Held-out splits for model selection without touching the official dev sets.

For each task, runs/heldout/<TASK>/train.tsv = 90% of the original train.tsv and dev.tsv = the other 10%.
Rows are split by a deterministic shuffle (random.Random(0).shuffle over the data-row indices; the first
round(0.1 * n) shuffled rows are dev); both files keep the original row order and the original train.tsv's header
line byte for byte (CoLA's train.tsv has no header, so neither output has one). Bytes are copied unchanged (BOM,
quotes, trailing spaces).
"""
import os
import random
from pathlib import Path

SRC = Path(os.environ.get("MULTIEXIT_SHARED_DIR", "../shared")) / "data" / "glue"
DST = Path("runs/heldout")
HAS_HEADER = {"STS-B": True, "CoLA": False, "MRPC": True, "RTE": True, "SST-2": True}

for task, has_header in HAS_HEADER.items():
    lines = (SRC / task / "train.tsv").read_bytes().splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if has_header else ([], lines)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    n_dev = round(0.1 * len(rows))
    dev_idx = set(order[:n_dev])
    out = DST / task
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_bytes(b"".join(header + [r for i, r in enumerate(rows) if i not in dev_idx]))
    (out / "dev.tsv").write_bytes(b"".join(header + [r for i, r in enumerate(rows) if i in dev_idx]))
    print(f"{task}: {len(rows)} rows -> train {len(rows) - n_dev}, dev {n_dev}")
