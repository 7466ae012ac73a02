#!/usr/bin/env python
"""Why the STS-B single-exit models stop at Pearson 0.85 on dev while the held-out 10 % of train reaches 0.87-0.90:
dev's genre mix against train's, and each model's Pearson per genre and on dev re-weighted to train's mix.

STS-B's TSV files name each pair's genre (image captions, news, forum posts). The held-out part of the search is a
random 10 % of train, so it has train's mix; dev has another. Reads the study's saved dev predictions (the last
layer of each single-exit model: DeeBERT two-stage's stage 1) and the genre column of the GLUE TSV files:

    python scripts/stsb_by_genre.py --data_dir ../shared/data/glue/STS-B [--runs_dir results/runs] \
        [--output results/stsb_by_genre.md]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter

import numpy as np
from scipy.stats import pearsonr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE_EXIT_VARIANTS = ("deebert2-linear", "deebert2-shared_pooler")  # stage 1's final layer is a plain fine-tune
GENRE_ALIASES = {"main-forums": "main-forum"}
DRAWS = 2000  # genre-stratified resamples of dev at train's mix


def read_genres(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE))
    # "main-forum" in train, "main-forums" in dev: one genre
    genres = [GENRE_ALIASES.get(row["genre"], row["genre"]) for row in rows]
    return genres, np.array([float(row["score"]) for row in rows])


def mix(genres: list[str]) -> dict[str, float]:
    counts = Counter(genres)
    return {genre: counts[genre] / len(genres) for genre in sorted(counts)}


def reweighted_pearson(predictions: np.ndarray, labels: np.ndarray, genres: np.ndarray, target: dict[str, float],
                       rng: np.random.Generator) -> tuple[float, float, float]:
    """Median [5th–95th percentile] Pearson over resamples of dev (with replacement) whose genre shares are
    ``target``'s, each the size of dev."""
    pools = {genre: np.flatnonzero(genres == genre) for genre in target}
    sizes = {genre: round(share * len(labels)) for genre, share in target.items()}
    scores = []
    for _ in range(DRAWS):
        rows = np.concatenate([rng.choice(pools[genre], sizes[genre]) for genre in target])
        scores.append(pearsonr(predictions[rows], labels[rows])[0])
    low, median, high = np.percentile(scores, [5, 50, 95])
    return float(median), float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="the STS-B folder with train.tsv and dev.tsv (with genres)")
    parser.add_argument("--runs_dir", default=os.path.join(ROOT, "results", "runs"))
    parser.add_argument("--output", default=os.path.join(ROOT, "results", "stsb_by_genre.md"))
    args = parser.parse_args(argv)

    train_genres, _ = read_genres(os.path.join(args.data_dir, "train.tsv"))
    dev_genres, dev_scores = read_genres(os.path.join(args.data_dir, "dev.tsv"))
    train_mix, dev_mix = mix(train_genres), mix(dev_genres)
    genres = np.array(dev_genres)
    names = sorted(train_mix)
    lines = [
        "# STS-B: dev's genre mix and the single-exit models' Pearson per genre",
        "",
        f"*Written by `python scripts/stsb_by_genre.py --data_dir <STS-B folder>` from the saved dev predictions under "
        f"`{os.path.relpath(args.runs_dir, ROOT)}` (last layer of each single-exit model). Re-weighted: median "
        f"[5th–95th percentile] Pearson over {DRAWS} resamples of dev, each dev-sized with train's genre shares.*",
        "",
        "| genre | train pairs | train share | dev pairs | dev share |",
        "|---|---:|---:|---:|---:|",
    ]
    train_counts, dev_counts = Counter(train_genres), Counter(dev_genres)
    for genre in names:
        lines.append(f"| {genre} | {train_counts[genre]} | {train_mix[genre] * 100:.0f} % | {dev_counts[genre]} | "
                     f"{dev_mix.get(genre, 0.0) * 100:.0f} % |")
    lines += ["", "| model | seed | dev Pearson | " + " | ".join(names) + " | dev at train's mix |",
              "|---|---:|---:|" + "---:|" * len(names) + "---:|"]
    rng = np.random.default_rng(0)
    found = 0
    for variant in SINGLE_EXIT_VARIANTS:
        folder = os.path.join(args.runs_dir, "STS-B", variant)
        for seed in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            saved = os.path.join(folder, seed, "layer_logits")
            if not os.path.isfile(os.path.join(saved, "final_dev_logits.npy")):  # a log, a lock, an unfinished run
                continue
            predictions = np.load(os.path.join(saved, "final_dev_logits.npy"))[:, -1, 0].astype(np.float64)
            labels = np.load(os.path.join(saved, "final_dev_labels.npy")).astype(np.float64)
            if not np.allclose(labels, dev_scores, atol=1e-4):
                raise SystemExit(f"{saved}: the saved labels are not dev.tsv's scores in its order")
            per_genre = [pearsonr(predictions[genres == g], labels[genres == g])[0] for g in names]
            median, low, high = reweighted_pearson(predictions, labels, genres, train_mix, rng)
            lines.append(f"| single exit, {variant.split('-', 1)[1]} head | {seed.removeprefix('seed')} | "
                         f"{pearsonr(predictions, labels)[0]:.3f} | "
                         + " | ".join(f"{value:.3f}" for value in per_genre)
                         + f" | {median:.3f} [{low:.3f}–{high:.3f}] |")
            found += 1
    if not found:
        raise SystemExit(f"no single-exit STS-B run under {args.runs_dir}")
    with open(args.output, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
