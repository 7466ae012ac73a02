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
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]


def _analyze_results():  # noqa: ANN202 - the study's script, loaded from its file (scripts/ is not a package)
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyze_results", ROOT / "scripts" / "analyze_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


_STUDY = _analyze_results()
Task, load = _STUDY.Task, _STUDY.load  # the study's own loader and metric

SEEDS = (1, 2, 3)


def layer_scores(task: Task, logits: torch.Tensor, labels: np.ndarray) -> list[tuple[float, float]]:
    """(MCC ×100, AUC ×100) of every layer's argmax / logit margin."""
    scores = []
    for layer in range(logits.shape[1]):
        mcc = task.metric_fn(logits[:, layer].argmax(-1).numpy(), labels)["mcc"]
        margin = (logits[:, layer, 1] - logits[:, layer, 0]).numpy()
        scores.append((100 * mcc, 100 * roc_auc_score(labels, margin)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study_runs", type=Path, default=ROOT / "results" / "runs")
    parser.add_argument("--experiment_runs", type=Path, default=ROOT / "results" / "exit_heads" / "runs")
    args = parser.parse_args()
    study, experiment = load(str(args.study_runs))["CoLA"], load(str(args.experiment_runs))["CoLA"]
    variants = {  # name: (the runs, their variant folder, the single-exit model it is paired with)
        "single exit, shared pooler": (study, "deebert2-shared_pooler", None),
        "weighted joint, shared pooler (one for all exits)": (study, "weighted-shared_pooler",
                                                               "single exit, shared pooler"),
        "weighted joint, a pooler copy per exit": (experiment, "weighted-pooler", "single exit, shared pooler"),
        "single exit, linear": (study, "deebert2-linear", None),
        "weighted joint, linear": (study, "weighted-linear", "single exit, linear"),
    }
    scores = {name: {seed: layer_scores(runs, *runs.runs[variant][seed])
                     for seed in SEEDS if seed in runs.runs.get(variant, {})}
              for name, (runs, variant, _) in variants.items()}

    print("| model | seed | last-layer MCC | last-layer AUC | MCC − single exit (same pooler) |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, single) in variants.items():
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
