"""CoLA: is it the *sharing* of PABEE's pooler that costs the jointly trained final layer, or the pooler itself?

Reads saved per-layer dev logits ([N, L, 2] ``final_dev_logits.npy`` + labels) of
  * the study's runs (``results/runs/CoLA/<variant>/seed<k>``): single exit (DeeBERT two-stage's stage 1 is a plain
    fine-tune; its last layer) and the weighted joint loss, with the shared pooler and with the linear head;
  * the experiment's runs (``results/exit_heads/runs/CoLA/weighted-pooler/seed<k>``): the same weighted joint
    training, same recipe and seeds, with ``--exit_head_type pooler``: every exit has its own copy of the pretrained
    pooler (dense + tanh, copied at load as DeeBERT's ``init_highway_pooler`` does), so nothing but the sharing
    differs from ``shared_pooler``.
Prints markdown: the last layer's MCC and ROC AUC per seed (AUC: the ranking, free of the decision threshold), the
paired difference to the single-exit model with the same pooler, and the median MCC of every layer.

usage: python results/exit_heads/cola_pooler_sharing.py [--study_runs results/runs]
       [--experiment_runs results/exit_heads/runs]
"""
import argparse
import statistics
from pathlib import Path

import numpy as np
from sklearn.metrics import matthews_corrcoef, roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (1, 2, 3)


def load(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    logits, labels = folder / "layer_logits" / "final_dev_logits.npy", folder / "layer_logits" / "final_dev_labels.npy"
    if not logits.exists():
        return None
    return np.load(logits), np.load(labels)


def layer_scores(logits: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """(MCC ×100, AUC ×100) of every layer's argmax / logit margin."""
    scores = []
    for layer in range(logits.shape[1]):
        margin = logits[:, layer, 1] - logits[:, layer, 0]
        mcc = matthews_corrcoef(labels, logits[:, layer].argmax(-1))
        scores.append((100 * mcc, 100 * roc_auc_score(labels, margin)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study_runs", type=Path, default=ROOT / "results" / "runs")
    parser.add_argument("--experiment_runs", type=Path, default=ROOT / "results" / "exit_heads" / "runs")
    args = parser.parse_args()
    variants = {  # name: (folder, the single-exit model it is paired with)
        "single exit, shared pooler": (args.study_runs / "CoLA" / "deebert2-shared_pooler", None),
        "weighted joint, shared pooler (one for all exits)": (args.study_runs / "CoLA" / "weighted-shared_pooler",
                                                               "single exit, shared pooler"),
        "weighted joint, a pooler copy per exit": (args.experiment_runs / "CoLA" / "weighted-pooler",
                                                   "single exit, shared pooler"),
        "single exit, linear": (args.study_runs / "CoLA" / "deebert2-linear", None),
        "weighted joint, linear": (args.study_runs / "CoLA" / "weighted-linear", "single exit, linear"),
    }
    scores = {name: {seed: layer_scores(*run) for seed in SEEDS if (run := load(folder / f"seed{seed}")) is not None}
              for name, (folder, _) in variants.items()}

    print("| model | seed | last-layer MCC | last-layer AUC | MCC − single exit (same pooler) |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, single) in variants.items():
        for seed, per_layer in scores[name].items():
            mcc, auc = per_layer[-1]
            paired = ""
            if single is not None and seed in scores[single]:
                paired = f"{mcc - scores[single][seed][-1][0]:+.1f}"
            print(f"| {name} | {seed} | {mcc:.1f} | {auc:.1f} | {paired} |")

    print("\nMedian MCC ×100 over the seeds that ran, per layer (the single-exit rows are DeeBERT two-stage runs: layer 6 "
          "is the single-exit model, layers 1-5 its off-ramps trained on the frozen backbone):\n")
    num_layers = max(len(per_layer) for runs in scores.values() for per_layer in runs.values())
    print("| model | seeds | " + " | ".join(f"layer {layer}" for layer in range(1, num_layers + 1)) + " |")
    print("|---|---:|" + "---:|" * num_layers)
    for name, runs in scores.items():
        if not runs:
            continue
        medians = [statistics.median(per_layer[layer][0] for per_layer in runs.values()) for layer in range(num_layers)]
        print(f"| {name} | {len(runs)} | " + " | ".join(f"{value:.1f}" for value in medians) + " |")


if __name__ == "__main__":
    main()
