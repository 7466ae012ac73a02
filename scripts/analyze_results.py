#!/usr/bin/env python
"""Every table, plot and claim verdict of results/, from the saved per-layer dev logits of scripts/study.py.

    python scripts/analyze_results.py [--runs_dir runs/study] [--results_dir results]

Works purely from ``<runs_dir>/<TASK>/<variant>/seed<k>/layer_logits/final_dev_{logits,labels}.npy`` (any depth, any
number of seeds) with the library's replay, calibration and plot (:mod:`multiexit.replay`); no model is loaded. Writes

* ``results/claims.md``: the papers' claims, a verdict (held / refuted / untestable) per task with the numbers behind
  it, and the rules that decide each verdict;
* ``results/tables.md``: the single-exit baselines against the backbone's expected level, the final-layer cost of each
  training scheme and head, per-layer scores, matched speed-ups in PCEE-BERT's Table 2 layout, PABEE's README layout,
  STS-B regression thresholds, overthinking, reachability;
* ``results/calibration.md``: certified calibration (:func:`multiexit.replay.certify`) against the point estimate on
  random calibration/test halvings of each seed's dev set: how often each breaks its drop, and the speed-up;
* ``results/summary.json`` (the same numbers, per seed) and ``results/plots/*.png``.

Matched speed-ups (speed-up = L / mean exit layer): each seed's dev set is split in halves; a setting is chosen on the
first half (:func:`multiexit.replay.calibrate_held_out`: the least aggressive setting reaching the target; for PCEE and
ELBERT among their patience / window templates) and scored on the second. A cell is marked † when the achieved
speed-up misses the target by more than 5 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from multiexit.data import TaskSpec, compute_metrics, get_task
from multiexit.policies import POLICIES, BudgetExit, PatienceExit
from multiexit.replay import (
    PER_EXAMPLE_METRICS,
    POINT_ESTIMATE,
    calibrate_held_out,
    certification_sequences,
    default_grid,
    example_losses,
    fixed_sequence_end,
    most_aggressive,
    plot_score_vs_speedup,
    risk_upper_bound,
    score_policy,
    sweep,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))  # the repository

warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation

TASK_ORDER = ["SST-2", "MRPC", "RTE", "CoLA", "STS-B"]
# what a single-exit fine-tune of all-MiniLM-L6-v2 should reach (the issue's floors; ×100, Pearson ×100)
FLOORS = {"SST-2": 88.0, "MRPC": 85.0, "RTE": 58.0, "CoLA": 25.0, "STS-B": 87.0}
TARGETS = [1.33, 2.0, 3.0, 4.0]
REACH_TARGETS = [1.33, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]
STSB_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
OFF = 0.05  # a matched speed-up misses its target when it is more than 5 % off
ITERATIONS = 16  # bisection steps of the calibration
SCALE = 100.0
MAIN_HEAD = "linear"  # the head of the headline model; PABEE's shared pooler is the other design
NO_COST = 1.0  # points: "no cost" / "negligible loss" means within this of the reference
DEEBERT_SPEEDUP = 1 / (1 - 0.4)  # DeeBERT's "~40 % time saved"


def variant_info() -> dict:
    """Labels, schemes and heads of the study's variants (scripts/study.py), when it is importable."""
    try:
        import study

        return {name: {"label": v.label, "scheme": v.scheme, "head": v.head} for name, v in study.VARIANTS.items()}
    except ImportError:
        return {}


# ====================================================================================================================
# Loading and aggregating
# ====================================================================================================================


@dataclass
class Task:
    name: str
    spec: TaskSpec
    runs: dict[str, dict[int, tuple[torch.Tensor, np.ndarray]]] = field(default_factory=dict)  # variant -> seed -> run

    @property
    def main(self) -> str:
        return self.spec.main_metric

    def metric_fn(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return compute_metrics(self.spec, predictions, labels)

    def score(self, policy: object, logits: torch.Tensor, labels: np.ndarray) -> float:
        return score_policy(policy, logits, labels, self.metric_fn).metrics[self.main]


def load(runs_dir: str) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    names = [t for t in TASK_ORDER if os.path.isdir(os.path.join(runs_dir, t))]
    names += sorted(t for t in os.listdir(runs_dir) if t not in names and t not in ("search", "logs")
                    and os.path.isdir(os.path.join(runs_dir, t))) if os.path.isdir(runs_dir) else []
    for name in names:
        try:
            spec = get_task(name)
        except ValueError:
            continue
        task = Task(name, spec)
        for variant in sorted(os.listdir(os.path.join(runs_dir, name))):
            folder = os.path.join(runs_dir, name, variant)
            for seed_dir in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                path = os.path.join(folder, seed_dir, "layer_logits", "final_dev_logits.npy")
                if seed_dir.startswith("seed") and os.path.exists(path):
                    logits = torch.as_tensor(np.load(path))
                    labels = np.load(path.replace("_logits.npy", "_labels.npy"))
                    task.runs.setdefault(variant, {})[int(seed_dir.removeprefix("seed"))] = (logits, labels)
        if task.runs:
            tasks[name] = task
    return tasks


def agg(values: list[float | None]) -> dict:
    clean = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0, "values": values}
    return {"median": float(np.median(clean)), "min": min(clean), "max": max(clean), "n": len(clean),
            "values": [None if v is None else float(v) for v in values]}


def fmt(a: dict | None, scale: float = SCALE, digits: int = 1) -> str:
    if not a or a.get("median") is None:
        return "–"
    m, lo, hi = (a[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]" if a["n"] > 1 else f"{m:.{digits}f}"


def halves(logits: torch.Tensor, labels: np.ndarray) -> tuple:
    half = logits.shape[0] // 2
    return (logits[:half], labels[:half]), (logits[half:], labels[half:])


def policies_for(task: Task) -> list[str]:
    return [name for name in POLICIES if task.spec.num_labels > 1 or POLICIES[name].supports_regression]


# ====================================================================================================================
# Measurements
# ====================================================================================================================


def per_layer(task: Task, variant: str) -> dict:
    """{layer: agg over seeds} of each exit's score on the whole dev set."""
    seeds = task.runs[variant]
    depth = next(iter(seeds.values()))[0].shape[1]
    return {k: agg([task.score(BudgetExit(layer=k), logits, labels) for logits, labels in seeds.values()])
            for k in range(1, depth + 1)}


def baseline_variant(task: Task, head: str) -> str | None:
    """The single-exit model with ``head``: DeeBERT two-stage's stage 1 (its final layer, frozen in stage 2)."""
    name = f"deebert2-{head}"
    return name if name in task.runs else None


def final_layer_cost(task: Task, variant: str, baseline: str) -> dict:
    """(variant − baseline) final-layer score, paired by seed."""
    common = sorted(set(task.runs[variant]) & set(task.runs[baseline]))
    deltas = []
    for seed in common:
        joint, single = task.runs[variant][seed], task.runs[baseline][seed]
        deltas.append(task.score(BudgetExit(layer=joint[0].shape[1]), *joint)
                      - task.score(BudgetExit(layer=single[0].shape[1]), *single))
    return {"seeds": common, **agg(deltas)}


def matched(task: Task, variant: str, policies: list[str], targets: list[float]) -> dict:
    """{policy: {target: score, speed-up, settings}} on the report halves, and full depth there."""
    out: dict = {"full_depth": [], "policies": {p: {str(t): {"score": [], "speedup": [], "reached": [],
                                                           "setting": []} for t in targets} for p in policies}}
    for logits, labels in task.runs[variant].values():
        (_, _), (report, report_labels) = halves(logits, labels)
        depth, classes = logits.shape[1], logits.shape[2]
        out["full_depth"].append(task.score(BudgetExit(layer=depth), report, report_labels))
        for name in policies:
            templates = POLICIES[name].calibration_templates(depth, classes)
            for target in targets:
                result = calibrate_held_out(templates, logits, labels, task.metric_fn, task.main,
                                            target_speedup=target, iterations=ITERATIONS)
                cell = out["policies"][name][str(target)]
                cell["score"].append(result.held_out.metrics[task.main])
                cell["speedup"].append(result.held_out.speedup)
                cell["reached"].append(result.calibration.reached_target)
                cell["setting"].append(result.calibration.policy.label())
    out["full_depth"] = agg(out["full_depth"])
    for name in policies:
        for target in targets:
            cell = out["policies"][name][str(target)]
            cell["score"], cell["speedup"] = agg(cell["score"]), agg(cell["speedup"])
            cell["off_target"] = abs(cell["speedup"]["median"] / target - 1) > OFF
    return out


def pcee_at_pabee_speedups(task: Task, variant: str) -> dict:
    """PCEE-BERT's own comparison protocol (its Table 2: PABEE cannot be tuned to a speed-up, so "we adjust the
    thresholds ... of our PCEE-BERT ... to achieve similar speedups with PABEE"): for every patience p, PABEE(p)'s
    speed-up on the first half is PCEE's calibration target there; both are scored on the second half.

    {patience: {pabee, pcee: score agg; pabee_speedup, pcee_speedup: speed-up agg; seeds; comparable}}; a patience
    whose PABEE runs (nearly) full depth (< 1.05× on the first half) has nothing to compare and is left out."""
    cells: dict[int, dict[str, list]] = {}
    for seed, (logits, labels) in task.runs[variant].items():
        (calib, calib_labels), (report, report_labels) = halves(logits, labels)
        depth, classes = logits.shape[1], logits.shape[2]
        templates = POLICIES["pcee"].calibration_templates(depth, classes)
        for patience in range(1, depth):
            pabee = PatienceExit(patience=patience)
            target = score_policy(pabee, calib, calib_labels, task.metric_fn).speedup
            if target < 1 + OFF:
                continue
            pabee_held = score_policy(pabee, report, report_labels, task.metric_fn)
            pcee = calibrate_held_out(templates, logits, labels, task.metric_fn, task.main, target_speedup=target,
                                      iterations=ITERATIONS)
            cell = cells.setdefault(patience, {"pabee": [], "pcee": [], "pabee_speedup": [], "pcee_speedup": [],
                                               "seeds": [], "pcee_setting": []})
            cell["pabee"].append(pabee_held.metrics[task.main])
            cell["pabee_speedup"].append(pabee_held.speedup)
            cell["pcee"].append(pcee.held_out.metrics[task.main])
            cell["pcee_speedup"].append(pcee.held_out.speedup)
            cell["pcee_setting"].append(pcee.calibration.policy.label())
            cell["seeds"].append(seed)
    out = {}
    for patience, cell in sorted(cells.items()):
        row = {key: agg(cell[key]) for key in ("pabee", "pcee", "pabee_speedup", "pcee_speedup")}
        row.update(seeds=cell["seeds"], pcee_setting=cell["pcee_setting"],
                   delta=agg([c - b for c, b in zip(cell["pcee"], cell["pabee"])]))
        row["comparable"] = abs(row["pcee_speedup"]["median"] / row["pabee_speedup"]["median"] - 1) <= OFF
        out[patience] = row
    return out


def best_patience(task: Task, variant: str) -> dict:
    """PABEE at its best patience (chosen on the first half: best score, then the faster), on the second half."""
    scores, speeds, full, settings = [], [], [], []
    for logits, labels in task.runs[variant].values():
        (calib, calib_labels), (report, report_labels) = halves(logits, labels)
        depth = logits.shape[1]
        grid = default_grid("pabee", depth, logits.shape[2])
        chosen = max(sweep(grid, calib, calib_labels, task.metric_fn, progress=False),
                     key=lambda s: (round(s.metrics[task.main], 6), s.speedup))
        held = score_policy(chosen.policy, report, report_labels, task.metric_fn)
        scores.append(held.metrics[task.main])
        speeds.append(held.speedup)
        full.append(task.score(BudgetExit(layer=depth), report, report_labels))
        settings.append(chosen.policy.label())
    return {"score": agg(scores), "speedup": agg(speeds), "full_depth": agg(full), "settings": settings,
            "delta": agg([s - f for s, f in zip(scores, full)])}


def at_speedup(task: Task, variant: str, policy: str, target: float, templates: list | None = None) -> dict:
    """One policy calibrated to ``target`` on the first halves, its loss against full depth on the second."""
    deltas, speeds, settings = [], [], []
    for logits, labels in task.runs[variant].values():
        (_, _), (report, report_labels) = halves(logits, labels)
        chosen = templates or POLICIES[policy].calibration_templates(logits.shape[1], logits.shape[2])
        result = calibrate_held_out(chosen, logits, labels, task.metric_fn, task.main, target_speedup=target,
                                    iterations=ITERATIONS)
        full = task.score(BudgetExit(layer=logits.shape[1]), report, report_labels)
        deltas.append(result.held_out.metrics[task.main] - full)
        speeds.append(result.held_out.speedup)
        settings.append(result.calibration.policy.label())
    return {"target": target, "delta": agg(deltas), "speedup": agg(speeds), "settings": settings,
            "reached": abs(np.median(speeds) / target - 1) <= OFF}


def no_loss(task: Task, variant: str, policy: str) -> dict:
    """The fastest setting with no score loss on the first half, scored on the second (overthinking)."""
    speeds, deltas, found = [], [], 0
    for logits, labels in task.runs[variant].values():
        (_, _), (report, report_labels) = halves(logits, labels)
        templates = POLICIES[policy].calibration_templates(logits.shape[1], logits.shape[2])
        result = calibrate_held_out(templates, logits, labels, task.metric_fn, task.main, max_metric_drop=0.0,
                                    iterations=ITERATIONS, risk=POINT_ESTIMATE)
        ok = result.calibration.reached_target
        held = result.held_out if ok else score_policy(BudgetExit(layer=logits.shape[1]), report, report_labels,
                                                        task.metric_fn)
        found += int(ok)
        speeds.append(held.speedup)
        deltas.append(held.metrics[task.main] - task.score(BudgetExit(layer=logits.shape[1]), report, report_labels))
    return {"speedup": agg(speeds), "delta": agg(deltas), "seeds_with_a_no_loss_setting": found, "seeds": len(speeds)}


def curves(task: Task, variant: str, policies: list[str]) -> dict[str, list[tuple[float, float]]]:
    """{policy: [(median speed-up, median score ×100)]} over each policy's default grid on the whole dev set."""
    rows: dict[str, dict[str, list]] = {}
    for logits, labels in task.runs[variant].values():
        depth, classes = logits.shape[1], logits.shape[2]
        grid = [p for name in policies for p in default_grid(name, depth, classes)]
        for score in sweep(grid, logits, labels, task.metric_fn, progress=False):
            row = rows.setdefault(score.policy.name, {}).setdefault(score.policy.label(), [[], []])
            row[0].append(score.speedup)
            row[1].append(score.metrics[task.main])
    return {name: [(float(np.median(s)), float(np.median(v)) * SCALE) for s, v in settings.values()]
            for name, settings in rows.items()}


def majority_score(task: Task) -> float | None:
    if task.spec.is_regression:
        return None
    labels = next(iter(next(iter(task.runs.values())).values()))[1]
    constant = np.full_like(labels, np.bincount(labels.astype(int)).argmax())
    return task.metric_fn(constant, labels)[task.main]


def learned_anything(task: Task, score: float | None) -> bool:
    """Above the constant prediction by more than half a point (regression: Pearson > 0.1)."""
    if score is None:
        return False
    return score > 0.1 if task.spec.is_regression else score > (majority_score(task) or 0.0) + 0.005


# ====================================================================================================================
# Certified calibration against the point estimate (results/calibration.md)
# ====================================================================================================================

RISK_EPSILONS = [0.005, 0.01, 0.02]
RISK_DELTA = 0.1
BATCH_SAMPLINGS = ("iid", "split")  # the batch certificates measured, for a batch of the test half's size
SAMPLING_TITLES = {"iid": "i.i.d.", "split": "split"}


def fewest_allowed(calibration_size: int, batch_size: int) -> int:
    """The fewest batch losses a (= ⌊ε m⌋) with which a setting without loss on the calibration examples can be
    certified for a batch (both tests, one sequence at δ = RISK_DELTA): P(the first a + 1 losses all in the batch)."""
    from scipy.stats import hypergeom

    allowed = np.arange(batch_size)
    passing = hypergeom.pmf(0, calibration_size + batch_size, calibration_size, allowed + 1) <= RISK_DELTA
    return int(allowed[passing][0]) if passing.any() else batch_size


def batch_method(risk: str, sampling: str) -> str:
    """The key of a batch certificate's cells in summary.json's ``risk_control``."""
    return f"{risk}_batch_{sampling}"

HALVINGS = 200  # random calibration/test halvings of each seed's dev set
STSB_TOLERANCE = 0.5  # STS-B answers (0-5) "disagree" when they differ by more than this
# a violation rate is within binomial slack of δ when the count is at most this quantile of Binomial(splits, δ)
SLACK_QUANTILE = 0.999


def subset_scores(task: Task, predictions: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The main metric of every setting (rows of ``predictions`` [G, N]) on every subset of the examples (rows of
    ``masks`` [S, N]): [S, G]. The same numbers as :func:`multiexit.data.compute_metrics` (tests/test_analyze_results.py
    checks it), from per-subset sums (one matrix product each) instead of thousands of calls: accuracy, F1 and MCC of
    a binary task (0 where undefined, as sklearn), Pearson (nan for a constant answer)."""
    weights = masks.astype(np.float64)
    labels = np.asarray(labels)
    if task.spec.is_regression:
        x, y = predictions.astype(np.float64), labels.astype(np.float64)
        n = weights.sum(axis=1)[:, None]
        sum_x, sum_y = weights @ x.T, (weights @ y)[:, None]
        covariance = n * (weights @ (x * y).T) - sum_x * sum_y
        variance_x, variance_y = n * (weights @ (x * x).T) - sum_x ** 2, n * (weights @ (y * y))[:, None] - sum_y ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((variance_x > 0) & (variance_y > 0), covariance / np.sqrt(variance_x * variance_y), np.nan)
    if task.main == "acc":
        return weights @ (predictions == labels).T / weights.sum(axis=1)[:, None]
    if task.spec.num_labels != 2:
        raise NotImplementedError(f"{task.main} of a {task.spec.num_labels}-class task from subset sums")
    tp, fp = weights @ ((predictions == 1) & (labels == 1)).T, weights @ ((predictions == 1) & (labels == 0)).T
    fn, tn = weights @ ((predictions == 0) & (labels == 1)).T, weights @ ((predictions == 0) & (labels == 0)).T
    with np.errstate(invalid="ignore", divide="ignore"):
        if task.main == "f1":
            return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        if task.main == "mcc":
            denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            return np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
    raise NotImplementedError(f"{task.main} from subset sums")


def random_halvings(num_examples: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random (calibration, test) halvings as boolean masks [count, N]: N // 2 calibration examples (as
    :func:`multiexit.replay.calibrate_held_out`'s first half), the rest for the test."""
    order = np.argsort(rng.random((count, num_examples)), axis=1)
    calibration = np.zeros((count, num_examples), dtype=bool)
    np.put_along_axis(calibration, order[:, :num_examples // 2], True, axis=1)
    return calibration, ~calibration


def picked(values: list[np.ndarray], sequence: np.ndarray, setting: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per split, ``values[sequence][split, setting]`` (each [S, G_k]), or ``fallback`` where nothing was chosen."""
    out = np.array(fallback, dtype=np.float64, copy=True)
    for index, value in enumerate(values):
        rows = np.flatnonzero(sequence == index)
        out[rows] = value[rows, setting[rows]]
    return out


def bounds_of_counts(risk: str, worse: np.ndarray, better: np.ndarray, num_examples: int, level: float,
                     batch_size: int | None = None, batch_sampling: str = "iid") -> np.ndarray:
    """:func:`multiexit.replay.risk_upper_bound` of many splits' counts, computed once per distinct pair of counts (a
    batch certificate's bound reads only ``worse``)."""
    if batch_size is not None:
        better = np.zeros_like(better)
    codes, inverse = np.unique(worse.astype(np.int64) * (num_examples + 1) + better.astype(np.int64),
                               return_inverse=True)
    return risk_upper_bound(risk, codes // (num_examples + 1), codes % (num_examples + 1), num_examples,
                            level, batch_size, batch_sampling)[inverse].reshape(worse.shape)


def point_estimate_choice(calibration_scores: list[np.ndarray], full_scores: np.ndarray,
                          calibration_speedups: list[np.ndarray], integer_knob: list[bool],
                          drop: float) -> tuple[np.ndarray, np.ndarray]:
    """Today's uncertified rule (``calibrate(..., risk="empirical")`` and ``choose_setting``), on the certification
    sequences' settings instead of a finer bisection: per sequence, a bisection for the crossing of "calibration
    metric >= full depth's − drop" (an integer knob: the fastest setting that meets it, else the best-scoring); across
    sequences the best calibration metric among those meeting it (then the faster), else the best metric. Per split
    (sequence, setting)."""
    rows = np.arange(full_scores.shape[0])
    choices = []  # per sequence: (setting, meets, metric, speed-up) per split
    for scores, speedups, integer in zip(calibration_scores, calibration_speedups, integer_knob):
        meets = scores >= (full_scores - drop - 1e-12)[:, None]
        if integer:
            fastest = np.where(meets, speedups, -np.inf).max(axis=1, keepdims=True)
            best = np.where(meets & (speedups == fastest), scores, -np.inf).argmax(axis=1)
            setting = np.where(meets.any(axis=1), best, np.nan_to_num(scores, nan=-np.inf).argmax(axis=1))
        else:
            last = scores.shape[1] - 1
            low, high = np.zeros_like(rows), np.full_like(rows, last)
            while np.any(high - low > 1):
                middle = (low + high) // 2
                meets_middle = meets[rows, middle]
                low, high = np.where(meets_middle, middle, low), np.where(meets_middle, high, middle)
            setting = np.where(meets[:, last], last, low)
        choices.append((setting, meets[rows, setting], scores[rows, setting], speedups[rows, setting]))
    setting = np.stack([c[0] for c in choices], axis=1)
    meets = np.stack([c[1] for c in choices], axis=1)
    metric = np.nan_to_num(np.stack([c[2] for c in choices], axis=1), nan=-np.inf)
    speed = np.stack([c[3] for c in choices], axis=1)
    # the largest (metric, speed-up) among the sequences meeting the drop, else the largest metric; first on a tie
    meeting_metric = np.where(meets, metric, -np.inf)
    best_meeting = np.where(meeting_metric == meeting_metric.max(axis=1, keepdims=True), speed, -np.inf).argmax(axis=1)
    sequence = np.where(meets.any(axis=1), best_meeting, metric.argmax(axis=1))
    return sequence, setting[rows, sequence]


def tally(cells: dict, method: str, drop: float, outcomes: dict[str, np.ndarray], speedup: np.ndarray) -> None:
    """Adds one seed's splits to the cell of (method, ε): how often each outcome (a risk or a metric drop, on the
    test half or on the whole dev set) broke ε, and the test half's speed-ups."""
    cell = cells.setdefault(method, {}).setdefault(str(drop), {"splits": 0, "faster": 0, "speedups": []})
    for name, values in outcomes.items():
        cell[name] = cell.get(name, 0) + int((values > drop + 1e-12).sum())
    cell["splits"] += len(speedup)
    cell["faster"] += int((speedup > 1 + 1e-9).sum())
    cell["speedups"] += speedup.tolist()


def risk_control(task: Task, variant: str, halvings: int, policies: list[str] | None = None) -> dict:
    """Over ``halvings`` random halvings of each seed's dev set: each policy calibrated on one half for a drop ε, by
    the point estimate and by certification (δ = RISK_DELTA) for each risk, the population certificate (methods
    named by the risk) and the batch certificates for a batch of the test half's size (:func:`batch_method`: new
    i.i.d. examples, and the rest of the dev set, which is what the test half is), and scored on the other half. Each
    setting is replayed once on all examples; every split's statistics come from masks.

    {policy: {method: {ε: {"splits", "faster" (splits faster than full depth), "speedup_median", "speedup_mean" (the
    test half's), and how many splits broke ε: "metric_test", "metric_dev" (the main metric's drop on the test half,
    on the whole dev set) and, certified, "risk_test", "risk_dev" (the certified risk: the disagreement, or the
    accuracy drop)}}}}"""
    risks = ["disagreement"] + (["metric"] if task.main in PER_EXAMPLE_METRICS else [])
    tolerance = STSB_TOLERANCE if task.spec.is_regression else None
    cells: dict = {}
    for seed, (logits, labels) in sorted(task.runs[variant].items()):
        depth, classes = logits.shape[1], logits.shape[2]
        half = len(labels) // 2
        calibration, test = random_halvings(len(labels), halvings, np.random.default_rng(seed))
        calibration_weights, test_weights = calibration.astype(np.float64), test.astype(np.float64)
        test_sizes = test_weights.sum(axis=1)[:, None]
        full = score_policy(BudgetExit(layer=depth), logits, None, None).predictions
        full_calibration = subset_scores(task, full[None], labels, calibration)[:, 0]
        full_test = subset_scores(task, full[None], labels, test)[:, 0]
        full_dev = float(subset_scores(task, full[None], labels, np.ones((1, len(labels)), bool))[0, 0])
        for name in policies or policies_for(task):
            sequences = certification_sequences(POLICIES[name].calibration_templates(depth, classes), depth, classes)
            replays = [[score_policy(policy, logits, None, None) for policy in sequence] for sequence in sequences]
            predictions = [np.stack([score.predictions for score in scores]) for scores in replays]
            exit_layers = [np.stack([score.exit_layers for score in scores]).astype(np.float64) for scores in replays]
            calibration_exits = [calibration_weights @ layers.T / half for layers in exit_layers]
            test_speedups = [depth / (test_weights @ layers.T / test_sizes) for layers in exit_layers]
            test_scores = [subset_scores(task, p, labels, test) for p in predictions]
            calibration_scores = [subset_scores(task, p, labels, calibration) for p in predictions]
            integer = [bool(getattr(sequence[0].knob(depth, classes), "integer", False)) for sequence in sequences]
            choices = []  # (method, ε, chosen sequence and setting per split, the certified risk on the test half)
            for drop in RISK_EPSILONS:
                choices.append((POINT_ESTIMATE, drop, *point_estimate_choice(
                    calibration_scores, full_calibration, [depth / e for e in calibration_exits], integer, drop), {}))
            level = RISK_DELTA / len(sequences)
            test_size = len(labels) - half
            for risk in risks:
                losses = [example_losses(risk, p, full, labels, tolerance) for p in predictions]
                counts = [(calibration_weights @ (loss > 0).T, calibration_weights @ (loss < 0).T) for loss in losses]
                test_risks = [test_weights @ loss.T / test_sizes for loss in losses]
                dev_risks = [np.broadcast_to(loss.mean(axis=1), (halvings, len(loss))) for loss in losses]
                tests = [(risk, {})] + [(batch_method(risk, sampling), {"batch_size": test_size,
                                                                        "batch_sampling": sampling})
                                        for sampling in BATCH_SAMPLINGS]
                for method, batch in tests:
                    bounds = [bounds_of_counts(risk, worse, better, half, level, **batch) for worse, better in counts]
                    for drop in RISK_EPSILONS:
                        ends = np.stack([fixed_sequence_end(bound, drop) for bound in bounds], axis=-1)
                        sequence, setting = most_aggressive(ends, calibration_exits)
                        no_risk = np.zeros(halvings)
                        choices.append((method, drop, sequence, setting,
                                        {"risk_test": picked(test_risks, sequence, setting, no_risk),
                                         "risk_dev": picked(dev_risks, sequence, setting, no_risk)}))
            dev_scores = [np.broadcast_to(subset_scores(task, p, labels, np.ones((1, len(labels)), bool)),
                                          (halvings, len(p))) for p in predictions]
            for method, drop, sequence, setting, outcomes in choices:
                outcomes["metric_test"] = full_test - picked(test_scores, sequence, setting, full_test)
                outcomes["metric_dev"] = full_dev - picked(dev_scores, sequence, setting, np.full(halvings, full_dev))
                speedup = picked(test_speedups, sequence, setting, np.ones(halvings))
                tally(cells.setdefault(name, {}), method, drop, outcomes, speedup)
    for methods in cells.values():
        for by_drop in methods.values():
            for cell in by_drop.values():
                speedups = cell.pop("speedups")
                cell["speedup_median"], cell["speedup_mean"] = float(np.median(speedups)), float(np.mean(speedups))
    return cells

# ====================================================================================================================
# The report
# ====================================================================================================================


class Report:
    """Markdown lines and the machine-readable summary, filled section by section."""

    def __init__(self, tasks: dict[str, Task], info: dict, results_dir: str) -> None:
        self.tasks, self.info, self.results_dir = tasks, info, results_dir
        self.tables: list[str] = []
        self.summary: dict = {"tasks": {}, "targets": TARGETS, "off_target_tolerance": OFF, "claims": {}}
        self.plots = os.path.join(results_dir, "plots")
        os.makedirs(self.plots, exist_ok=True)

    def label(self, variant: str) -> str:
        return self.info.get(variant, {}).get("label", variant)

    def head(self, variant: str) -> str:
        return self.info.get(variant, {}).get("head", variant.split("-", 1)[-1])

    def scheme(self, variant: str) -> str:
        return self.info.get(variant, {}).get("scheme", variant.split("-", 1)[0])

    def main_variant(self, task: Task) -> str | None:
        for name in (f"weighted-{MAIN_HEAD}", "weighted"):
            if name in task.runs:
                return name
        joint = [v for v in task.runs if self.scheme(v) != "deebert2"]
        return joint[0] if joint else None

    # ---- sections ----------------------------------------------------------------------------------------------
    def baselines(self) -> None:
        self.tables += ["## Single-exit baselines against the backbone's level", "",
                        "The single-exit model is DeeBERT two-stage's stage 1 (the backbone fine-tuned with the last "
                        "exit only; stage 2 freezes it), one per exit head. Expected level: what a single-exit "
                        "fine-tune of all-MiniLM-L6-v2 should reach (SST-2 acc 88, MRPC F1 85, RTE acc 58, CoLA MCC "
                        "25, STS-B Pearson 87).", "",
                        "| task | metric | expected | " + " | ".join(f"single exit, {h} head" for h in ("linear",
                                                                                                    "shared_pooler"))
                        + " | met |", "|---|---|---:|---:|---:|---|"]
        for task in self.tasks.values():
            cells, met = [], []
            for head in ("linear", "shared_pooler"):
                base = baseline_variant(task, head)
                value = per_layer(task, base)[max(per_layer(task, base))] if base else None
                cells.append(fmt(value))
                if value and value["median"] is not None:
                    met.append(value["median"] * SCALE >= FLOORS.get(task.name, -math.inf))
                    self.summary["tasks"].setdefault(task.name, {}).setdefault("single_exit", {})[head] = value
            self.tables.append(f"| {task.name} | {task.main} | {FLOORS.get(task.name, '–')} | {' | '.join(cells)} | "
                               f"{'yes' if met and all(met) else 'partly' if any(met) else 'no'} |")
        self.tables.append("")

    def costs(self) -> None:
        self.tables += ["## Does multi-exit training cost final-layer quality?", "",
                        "Final-layer score of each jointly trained model minus the single-exit model with the same "
                        "head (DeeBERT stage 1), paired by seed: median [min–max] over seeds, points ×100.", "",
                        "| task | training | head | joint − single exit | seeds |", "|---|---|---|---:|---|"]
        for task in self.tasks.values():
            out = self.summary["tasks"].setdefault(task.name, {}).setdefault("final_layer_cost", {})
            for variant in sorted(task.runs):
                base = baseline_variant(task, self.head(variant))
                if self.scheme(variant) == "deebert2" or base is None:
                    continue
                cost = final_layer_cost(task, variant, base)
                out[variant] = cost
                self.tables.append(f"| {task.name} | {SCHEME_NAMES.get(self.scheme(variant), self.scheme(variant))} "
                                   f"| {self.head(variant)} | {fmt(cost)} | {cost['seeds']} |")
        self.tables.append("")

    def layers(self) -> None:
        self.tables += ["## Per-layer scores (each exit alone, whole dev set)", ""]
        for task in self.tasks.values():
            variants = sorted(task.runs)
            tables = {v: per_layer(task, v) for v in variants}
            self.summary["tasks"].setdefault(task.name, {})["per_layer"] = tables
            depth = max(max(t) for t in tables.values())
            majority = majority_score(task)
            self.tables += [f"### {task.name} ({task.main} ×100; majority class "
                            f"{'–' if majority is None else f'{majority * SCALE:.1f}'})", "",
                            "| layer | " + " | ".join(self.label(v) for v in variants) + " |",
                            "|---|" + "---:|" * len(variants)]
            for k in range(1, depth + 1):
                self.tables.append(f"| {k} | " + " | ".join(fmt(tables[v].get(k)) for v in variants) + " |")
            self.tables.append("")

    def speedups(self) -> None:
        self.tables += ["## Matched speed-ups (PCEE-BERT's Table 2 layout)", "",
                        "Setting chosen on the first half of dev, score on the second half, median [min–max] over "
                        "seeds; in parentheses the achieved speed-up (L / mean exit layer); † = more than 5 % off the "
                        "target.", ""]
        for task in self.tasks.values():
            variant = self.main_variant(task)
            if variant is None:
                continue
            table = matched(task, variant, policies_for(task), sorted(set(TARGETS) | set(REACH_TARGETS)))
            self.summary["tasks"][task.name]["matched"] = {"variant": variant, **table}
            self.tables += [f"### {task.name}: {self.label(variant)}", "",
                            "| method | " + " | ".join(f"~{t:g}×" for t in TARGETS) + " |",
                            "|---|" + "---:|" * len(TARGETS),
                            "| Full depth (1.00×) | " + " | ".join(fmt(table["full_depth"]) for _ in TARGETS) + " |"]
            for name in policies_for(task):
                cells = []
                for target in TARGETS:
                    cell = table["policies"][name][str(target)]
                    cells.append(f"{fmt(cell['score'])} ({cell['speedup']['median']:.2f}×)"
                                 f"{'†' if cell['off_target'] else ''}")
                self.tables.append(f"| {POLICIES[name].title} | " + " | ".join(cells) + " |")
            self.tables.append("")

    def pcee_vs_pabee(self) -> None:
        """PCEE-BERT's protocol: PCEE tuned to the speed-up PABEE reaches at each patience."""
        self.tables += ["## PCEE-BERT against PABEE at PABEE's own speed-ups (PCEE-BERT's protocol)", "",
                        "PCEE's τ (and patience, among its templates) calibrated on the first half of dev to the "
                        "speed-up PABEE reaches there at each patience; both scored on the second half. Median "
                        "[min–max] over seeds, achieved speed-ups in parentheses; † = PCEE's speed-up more than 5 % "
                        "off PABEE's. Patiences at which PABEE runs (nearly) full depth are left out.", ""]
        for task in self.tasks.values():
            variant = self.main_variant(task)
            if variant is None or task.spec.is_regression:
                continue
            table = pcee_at_pabee_speedups(task, variant)
            self.summary["tasks"][task.name]["pcee_vs_pabee"] = {"variant": variant, "patiences": table}
            self.tables += [f"### {task.name}: {self.label(variant)}", "",
                            "| PABEE patience | PABEE | PCEE-BERT | PCEE − PABEE | seeds |",
                            "|---:|---:|---:|---:|---|"]
            for patience, row in table.items():
                self.tables.append(
                    f"| {patience} | {fmt(row['pabee'])} ({row['pabee_speedup']['median']:.2f}×) | {fmt(row['pcee'])} "
                    f"({row['pcee_speedup']['median']:.2f}×){'' if row['comparable'] else '†'} | {fmt(row['delta'])} "
                    f"| {row['seeds']} |")
            if not table:
                self.tables.append("| – | PABEE runs full depth at every patience | | | |")
            self.tables.append("")

    def pabee_layout(self) -> None:
        """PABEE's README table: each model at full depth and with PABEE at its best patience."""
        names = list(self.tasks)
        self.tables += ["## PABEE's README layout", "",
                        "Scores ×100 on the second half of dev (median over seeds); +PABEE at the patience with the "
                        "best first-half score, its speed-up in parentheses.", "",
                        "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows: dict[str, list[str]] = {}
        for task in self.tasks.values():
            out = self.summary["tasks"][task.name].setdefault("pabee", {})
            for head in ("linear", "shared_pooler"):
                base, joint = baseline_variant(task, head), f"weighted-{head}"
                if base:
                    result = best_patience(task, base)
                    rows.setdefault(f"single exit, {head} head", {})[task.name] = fmt(result["full_depth"])
                if joint in task.runs:
                    result = best_patience(task, joint)
                    out[head] = result
                    rows.setdefault(f"multi-exit (PABEE loss), {head} head", {})[task.name] = fmt(
                        result["full_depth"])
                    rows.setdefault(f"+PABEE, {head} head", {})[task.name] = (
                        f"{fmt(result['score'])} ({result['speedup']['median']:.2f}×)")
        for label, cells in rows.items():
            self.tables.append(f"| {label} | " + " | ".join(cells.get(n, "–") for n in names) + " |")
        self.tables.append("")

    def thresholds(self) -> None:
        for task in self.tasks.values():
            if not task.spec.is_regression:
                continue
            for variant in [v for v in sorted(task.runs) if self.scheme(v) == "weighted"]:
                seeds = task.runs[variant]
                depth = next(iter(seeds.values()))[0].shape[1]
                self.tables += [f"## {task.name}: PABEE with regression thresholds ({self.label(variant)})", "",
                                "Whole dev set; cells: Pearson ×100 median [min–max] (speed-up, median).", "",
                                "| threshold | " + " | ".join(f"patience {p}" for p in range(1, depth)) + " |",
                                "|---|" + "---:|" * (depth - 1)]
                for threshold in STSB_THRESHOLDS:
                    cells = []
                    for patience in range(1, depth):
                        policy = PatienceExit(patience=patience, regression_threshold=threshold)
                        scores = [score_policy(policy, lg, lb, task.metric_fn) for lg, lb in seeds.values()]
                        cells.append(f"{fmt(agg([s.metrics[task.main] for s in scores]))} "
                                     f"({np.median([s.speedup for s in scores]):.2f}×)")
                    self.tables.append(f"| {threshold} | " + " | ".join(cells) + " |")
                self.tables.append("")

    def overthinking_and_reach(self) -> None:
        self.tables += ["## Overthinking: the fastest setting with no loss on the first half, on the second", "",
                        "| task | policy | seeds with a no-loss setting | speed-up | score − full depth |",
                        "|---|---|---:|---:|---:|"]
        for task in self.tasks.values():
            variant = self.main_variant(task)
            if variant is None:
                continue
            out = self.summary["tasks"][task.name]["overthinking"] = {}
            for name in policies_for(task):
                if name == "budget":
                    continue
                result = out[name] = no_loss(task, variant, name)
                self.tables.append(f"| {task.name} | {POLICIES[name].title} | {result['seeds_with_a_no_loss_setting']}"
                                   f"/{result['seeds']} | {fmt(result['speedup'], 1, 2)} | {fmt(result['delta'])} |")
        self.tables += ["", "## Which target speed-ups can each policy hit? (second half, median; ✓ within 5 %)", "",
                        "| task | policy | " + " | ".join(f"{t:g}×" for t in REACH_TARGETS) + " |",
                        "|---|---|" + "---|" * len(REACH_TARGETS)]
        for task in self.tasks.values():
            matched_table = self.summary["tasks"][task.name].get("matched")
            if not matched_table:
                continue
            for name in policies_for(task):
                cells = [f"{'✓' if not matched_table['policies'][name][str(t)]['off_target'] else '✗'} "
                         f"{matched_table['policies'][name][str(t)]['speedup']['median']:.2f}" for t in REACH_TARGETS]
                self.tables.append(f"| {task.name} | {POLICIES[name].title} | " + " | ".join(cells) + " |")
        self.tables.append("")

    def plots_section(self) -> None:
        self.tables += ["## Plots", ""]
        for task in self.tasks.values():
            variant = self.main_variant(task)
            if variant is None:
                continue
            reference = []
            full = per_layer(task, variant)
            reference.append(("full depth (this model)", full[max(full)]["median"] * SCALE, "gray"))
            base = baseline_variant(task, self.head(variant))
            if base:
                single = per_layer(task, base)
                reference.append(("single-exit fine-tune", single[max(single)]["median"] * SCALE, "red"))
            path = os.path.join(self.plots, f"{task.name}_score_vs_speedup.png")
            plot_score_vs_speedup(curves(task, variant, policies_for(task)), path, f"{task.main} ×100 (median)",
                                  title=f"{task.name}: every policy, {self.label(variant)}, "
                                        f"{len(task.runs[variant])} seeds", reference_lines=reference)
            self.tables.append(f"![{task.name}](plots/{os.path.basename(path)})\n")
            # the training schemes and heads compared with one policy (PCEE; PABEE on regression)
            policy = "pabee" if task.spec.is_regression else "pcee"
            compared = {self.label(v): curves(task, v, [policy]).get(policy, []) for v in sorted(task.runs)}
            path = os.path.join(self.plots, f"{task.name}_training_schemes.png")
            plot_score_vs_speedup(compared, path, f"{task.main} ×100 (median)",
                                  title=f"{task.name}: {POLICIES[policy].title} on each training scheme and head")
            self.tables.append(f"![{task.name} training schemes](plots/{os.path.basename(path)})\n")

    def risk_control_section(self, halvings: int) -> None:
        """results/calibration.md: certified calibration (Learn then Test) against today's point estimate, on random
        calibration/test halvings of every seed's dev set: the population certificate and the batch certificates
        for a batch of the test half's size, what each promised and how often the promise broke."""
        from scipy.stats import binom

        epsilons = ", ".join(f"{drop * SCALE:g}" for drop in RISK_EPSILONS)
        issue_case = "deebert2-linear"  # the case issue 32 measured: DeeBERT two-stage, linear head, its entropy rule
        certified_rates, dev_rates, estimate_rates, uncovered = [], [], [], {}
        beyond_slack: list[str] = []
        batch_rates: dict[str, list[float]] = {sampling: [] for sampling in BATCH_SAMPLINGS}
        batch_beyond: dict[str, list[str]] = {sampling: [] for sampling in BATCH_SAMPLINGS}
        body: list[str] = []
        cost = ["| task | calibration examples | ε (points) | fastest point estimate (its drop > ε on the test "
                "half) | fastest certified, disagreement | fastest certified, accuracy drop |",
                "|---|---:|---:|---|---|---|"]
        batch_cost = ["| task | batch (test half) | ε (points) | losses the batch may have: ⌊ε m⌋ (a certificate needs "
                      "≥) | population certificate, disagreement | batch, i.i.d., disagreement | batch, split, "
                      "disagreement | population certificate, accuracy drop | batch, i.i.d., lost examples | batch, "
                      "split, lost examples |", "|---|---:|---:|---:|---|---|---|---|---|---|"]
        promises = ["| task | certificate | what the user is promised, with probability ≥ 1 − δ | population "
                    "certificate: broke on the test half (dev set) | batch certificate, i.i.d. | batch certificate, "
                    "split |", "|---|---|---|---|---|---|"]

        def rate(cell: dict, key: str) -> str:
            return f"{100 * cell[key] / cell['splits']:.1f}"

        def beyond(cell: dict, key: str = "risk_test") -> bool:
            return cell[key] > binom.ppf(SLACK_QUANTILE, cell["splits"], RISK_DELTA)

        def certified_text(where: str, cell: dict) -> str:
            certified_rates.append(cell["risk_test"] / cell["splits"])
            dev_rates.append(cell["risk_dev"] / cell["splits"])
            if beyond(cell):
                beyond_slack.append(where)
                return f"{rate(cell, 'risk_test')} ✗ ({rate(cell, 'risk_dev')})"
            return f"{rate(cell, 'risk_test')} ({rate(cell, 'risk_dev')})"

        def batch_text(where: str, cell: dict, sampling: str) -> str:
            batch_rates[sampling].append(cell["risk_test"] / cell["splits"])
            if beyond(cell):
                batch_beyond[sampling].append(where)
                return f"{rate(cell, 'risk_test')} ✗"
            return rate(cell, "risk_test")

        def fastest(rows: list[tuple[str, dict]], method: str, drop: float, with_rate: bool = False) -> str:
            candidates = [(methods[method][str(drop)], title) for title, methods in rows if method in methods]
            if not candidates:
                return "–"
            cell, title = max(candidates, key=lambda item: item[0]["speedup_median"])
            if cell["speedup_median"] <= 1 + 1e-9:
                return "none faster than full depth"
            return f"{cell['speedup_median']:.2f}× ({title}" + (f", {rate(cell, 'metric_test')} %)" if with_rate
                                                                else ")")

        def worst(rows: list[tuple[str, dict]], method: str, key: str, dev_key: str | None = None) -> str:
            """The highest rate of ``key`` over the task's policies and ε (✗: cells beyond binomial slack)."""
            cells = [by_drop[str(drop)] for _, methods in rows if method in methods
                     for by_drop in [methods[method]] for drop in RISK_EPSILONS]
            text = f"{100 * max(cell[key] / cell['splits'] for cell in cells):.1f} %"
            if dev_key:
                text += f" ({100 * max(cell[dev_key] / cell['splits'] for cell in cells):.1f} %)"
            flagged = sum(beyond(cell, key) for cell in cells)
            return text + (f" ✗ in {flagged} of {len(cells)} cells" if flagged else "")

        def promise_row(task: Task, rows: list[tuple[str, dict]], risk: str) -> str:
            """What a certificate of ``risk`` promised on ``task`` and how often it broke on the test half: the
            certified loss, and for accuracy tasks the accuracy drop it bounds; beside it, what it does not promise."""
            main = task.main
            if risk == "metric":
                certificate = "accuracy drop (a batch: its lost examples)"
                promise = ("accuracy drop ≤ ε: the expected one (population), or the batch's own (batch: its "
                           "fraction of lost examples ≤ ε, which bounds it)")
            else:
                certificate = "disagreement" + (f" (answers more than {STSB_TOLERANCE:g} apart)"
                                                if task.spec.is_regression else "")
                promise = {"acc": "accuracy drop ≤ ε, through changed answers ≤ ε (the expected fraction, or the "
                                  "batch's own), which bound it",
                           "f1": "changed answers ≤ ε, and through them F1 drop ≤ ε (2 − F1) / (s − ε) "
                                 "(docs/calibration.md); **not** F1 drop ≤ ε",
                           }.get(main, f"changed answers ≤ ε; **nothing** about the drop of {main}")
                if task.spec.is_regression:
                    promise = (f"answers more than {STSB_TOLERANCE:g} from full depth's (changed answers) ≤ ε; "
                               f"**nothing** about the drop of {main}")
            texts = []
            for method in (risk, batch_method(risk, "iid"), batch_method(risk, "split")):
                dev = "risk_dev" if method == risk else None
                certified_loss = "accuracy drop" if risk == "metric" else "changed answers"
                text = f"{certified_loss} > ε: {worst(rows, method, 'risk_test', dev)}"
                if risk == "disagreement":
                    text += (f"; {main} drop > ε: {worst(rows, method, 'metric_test')}"
                             + ("" if main in PER_EXAMPLE_METRICS else " (not promised)"))
                texts.append(text)
            return f"| {task.name} | {certificate} | {promise} | " + " | ".join(texts) + " |"

        for task in self.tasks.values():
            variant = self.main_variant(task)
            if variant is None:
                continue
            cells = risk_control(task, variant, halvings)
            summary = {"variant": variant, "halvings_per_seed": halvings, "seeds": sorted(task.runs[variant]),
                       "delta": RISK_DELTA, "epsilons": RISK_EPSILONS, "policies": cells}
            if task.spec.is_regression:
                summary["tolerance"] = STSB_TOLERANCE
            rows = [(POLICIES[name].title, cells[name]) for name in cells]
            if issue_case in task.runs and not task.spec.is_regression:
                summary[issue_case] = risk_control(task, issue_case, halvings, ["deebert"])
                rows.append((f"{POLICIES['deebert'].title}, {self.label(issue_case)}", summary[issue_case]["deebert"]))
            self.summary["tasks"][task.name]["risk_control"] = summary
            accuracy = task.main in PER_EXAMPLE_METRICS
            splits = rows[0][1][POINT_ESTIMATE][str(RISK_EPSILONS[0])]["splits"]
            covered = "implied by the certificate" if accuracy else "not guaranteed"
            body += [f"### {task.name} ({task.main}; {self.label(variant)}; {splits} halvings per cell)", "",
                     f"| policy | ε (points) | point estimate: {task.main} drop > ε | speed-up | disagreement "
                     f"certified: disagreement > ε, test half (dev set) | {task.main} drop > ε ({covered}) | speed-up "
                     f"| faster than full depth | accuracy drop certified: drop > ε, test half (dev set) | speed-up |",
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            examples = len(next(iter(task.runs[variant].values()))[1])
            half = examples // 2
            batch_body = [f"Batch certificates of {task.name} (the batch: the test half, {examples - half} "
                          "examples; i.i.d.: the test for new examples; split: the test for the rest of the dev set, "
                          "which the test half is). Cells: % of halvings whose test half broke ε, and the test half's "
                          "median speed-up.", "",
                          "| policy | ε (points) | " + " | ".join(
                              f"disagreement, batch {SAMPLING_TITLES[sampling]}: disagreement > ε | {task.main} drop "
                              f"> ε{'' if accuracy else ' (not guaranteed)'} | speed-up"
                              for sampling in BATCH_SAMPLINGS)
                          + " | " + " | ".join(f"lost examples, batch {SAMPLING_TITLES[sampling]}: accuracy drop > ε | "
                                               "speed-up"
                                               for sampling in BATCH_SAMPLINGS) + " |",
                          "|---|---:|" + "---:|" * 10]
            for title, methods in rows:
                for drop in RISK_EPSILONS:
                    where = f"{task.name}, {title}, ε {drop * SCALE:g}"
                    estimate, disagreement = methods[POINT_ESTIMATE][str(drop)], methods["disagreement"][str(drop)]
                    estimate_rates.append(estimate["metric_test"] / estimate["splits"])
                    if not accuracy:
                        uncovered.setdefault(f"{task.name} {task.main}", []).append(
                            disagreement["metric_test"] / disagreement["splits"])
                    texts = [rate(estimate, "metric_test"), f"{estimate['speedup_median']:.2f}×",
                             certified_text(where, disagreement), rate(disagreement, "metric_test"),
                             f"{disagreement['speedup_median']:.2f}×", rate(disagreement, "faster")]
                    if "metric" in methods:
                        metric = methods["metric"][str(drop)]
                        texts += [certified_text(f"{where} (accuracy drop)", metric),
                                  f"{metric['speedup_median']:.2f}×"]
                    else:
                        texts += ["–", "–"]
                    body.append(f"| {title} | {drop * SCALE:g} | " + " | ".join(texts) + " |")
                    texts = []
                    for sampling in BATCH_SAMPLINGS:
                        batch = methods[batch_method("disagreement", sampling)][str(drop)]
                        texts += [batch_text(f"{where} ({sampling})", batch, sampling), rate(batch, "metric_test"),
                                  f"{batch['speedup_median']:.2f}×"]
                    for sampling in BATCH_SAMPLINGS:
                        batch = methods.get(batch_method("metric", sampling), {}).get(str(drop))
                        texts += ([batch_text(f"{where} (lost examples, {sampling})", batch, sampling),
                                   f"{batch['speedup_median']:.2f}×"] if batch else ["–", "–"])
                    batch_body.append(f"| {title} | {drop * SCALE:g} | " + " | ".join(texts) + " |")
            body += ["", *batch_body, ""]
            for drop in RISK_EPSILONS:
                cost.append(f"| {task.name} | {half} | {drop * SCALE:g} | {fastest(rows, POINT_ESTIMATE, drop, True)} "
                            f"| {fastest(rows, 'disagreement', drop)} | {fastest(rows, 'metric', drop)} |")
                allowed = math.floor(drop * (examples - half) + 1e-9)
                batch_cost.append(f"| {task.name} | {examples - half} | {drop * SCALE:g} | {allowed} "
                                  f"({fewest_allowed(half, examples - half)}) | " + " | ".join(
                    fastest(rows, method, drop) for risk in ("disagreement", "metric")
                    for method in (risk, batch_method(risk, "iid"), batch_method(risk, "split"))) + " |")
            promises += [promise_row(task, rows, risk) for risk in ("disagreement", "metric")
                         if risk == "disagreement" or accuracy]

        def slack(flagged: list[str], total: int) -> str:
            return ("every cell within binomial slack of δ" if not flagged else
                    f"{len(flagged)} of {total} cells beyond binomial slack of δ: " + "; ".join(flagged))

        headline = [
            f"What each certificate promised (δ = {RISK_DELTA:g}), and how often the promise broke on the test half: "
            "the highest % of halvings over the task's policies and ε (✗: cells beyond binomial slack of δ). The "
            "**population certificate** promises the expected loss on new examples; the test half is a finite sample, "
            "so its loss may exceed ε more often than δ (in parentheses: the whole dev set's loss, what the "
            "certificate bounds). A **batch certificate** promises the loss of the batch itself, here the test half: "
            "**i.i.d.** is the test for a batch of new examples, **split** the test for the rest of a fixed set of "
            "which the calibration examples are a random part, which is what the test half is (docs/calibration.md "
            "proves each).", "",
            *promises, "",
            f"* **Population certificate**: the certified risk exceeded ε on the whole dev set (the population the "
            f"halves are drawn from, which is what the certificate bounds) in at most {100 * max(dev_rates):.1f} % of "
            f"the halvings of any cell (task × policy × ε), and on the test half in at most "
            f"{100 * max(certified_rates):.1f} % ({slack(beyond_slack, len(certified_rates))}).",
            *[f"* **Batch certificate, {SAMPLING_TITLES[sampling]}** (m = the test half): the certified loss of the "
              f"test half exceeded ε in at most {100 * max(batch_rates[sampling]):.1f} % of the halvings of any cell "
              f"({slack(batch_beyond[sampling], len(batch_rates[sampling]))})." for sampling in BATCH_SAMPLINGS],
            f"* **Point estimate** (today's rule): the main metric dropped by more than ε on the test half in "
            f"{100 * np.median(estimate_rates):.0f} % of the halvings (median over cells; up to "
            f"{100 * max(estimate_rates):.0f} %).",
            "* **Not covered**: a disagreement certificate bounds the fraction of changed answers, and through it the "
            "accuracy drop; it does not bound the drop of MCC or Pearson, and bounds F1's only through the relation in "
            "docs/calibration.md. Measured, the main metric's drop exceeded ε on the test half under the disagreement "
            "certificate in up to " + ", ".join(f"{100 * max(values):.0f} % ({name})" for name, values in
                                                uncovered.items()) + " of the halvings.",
            "* **What it costs** (the test half's median speed-up of the fastest policy; a certificate needs at least "
            "ln(1/δ) / ε calibration examples even when no answer changes, about 230 at ε = 1 point):"]
        batch_costs = ["* **What a batch certificate costs** (the test half's median speed-up of the fastest policy "
                       "under each certificate; for the accuracy drop, a batch certificate certifies the examples "
                       "lost). Even with no loss on the calibration half, a batch certificate needs the batch to be "
                       "allowed some losses: the chance that the first a + 1 losses of the n + m examples all fall "
                       "in the batch must be at most δ (in parentheses: the fewest, for one sequence):", "",
                       *batch_cost]
        lines = ["# Certified calibration against the point estimate (generated by scripts/analyze_results.py: do not "
                 "edit)", "",
                 f"Each seed's dev set is halved at random {halvings} times (the same halvings for every policy); a "
                 f"setting is calibrated on one half for a drop ε ∈ {{{epsilons}}} points and scored on the other. "
                 "**Point estimate**: today's rule, the fastest setting whose main metric on the calibration half is "
                 "within ε of full depth's (`risk=\"empirical\"`, here on the certification sequences' settings). "
                 f"**Certified**: `multiexit.replay.certify` (Learn then Test, fixed-sequence testing, δ = "
                 f"{RISK_DELTA:g}) for the disagreement with full depth (STS-B: answers more than {STSB_TOLERANCE:g} "
                 "apart) and, where the main metric is accuracy, for the accuracy drop; the population certificate "
                 "(the risk), and the batch certificates (`batch_size` = the test half) for a batch of new i.i.d. "
                 "examples and for the rest of the dev set (`batch_sampling=\"iid\"`, `\"split\"`). "
                 "Cells: % of halvings whose test half broke ε (in parentheses: whose whole dev set did), the test "
                 "half's median speed-up (L / mean exit layer), and the % of halvings faster than full depth. ✗: more "
                 f"violations than the {100 * SLACK_QUANTILE:g} % quantile of Binomial(halvings, δ). The population "
                 "guarantee is about the risk on new examples; a test half is a finite sample of them, and its risk "
                 "moves against the calibration half's, so a setting whose risk is just under ε can break ε on up to "
                 "~18 % of the test halves at δ = 0.1 (docs/calibration.md).", "",
                 "## Headline", "", *headline, "", *cost, "", *batch_costs, "", "## Per task and policy", "", *body]
        with open(os.path.join(self.results_dir, "calibration.md"), "w", encoding="utf-8") as stream:
            stream.write("\n".join(lines) + "\n")

    # ---- claims ------------------------------------------------------------------------------------------------
    def claims(self) -> list[str]:
        rows: dict[str, dict[str, str]] = {}
        verdicts: dict[str, dict[str, dict]] = {}

        def put(claim: str, task: Task, verdict: str, numbers: str, data: dict) -> None:
            rows.setdefault(claim, {})[task.name] = f"**{verdict}**: {numbers}"
            verdicts.setdefault(claim, {})[task.name] = {"verdict": verdict, "numbers": numbers, **data}

        for task in self.tasks.values():
            summary = self.summary["tasks"][task.name]
            costs = summary.get("final_layer_cost", {})
            single = summary.get("single_exit", {}).get(MAIN_HEAD)
            baseline_learned = learned_anything(task, single["median"] if single else None)
            # PABEE: joint training costs the final layer nothing (per head)
            for head in ("linear", "shared_pooler"):
                cost = costs.get(f"weighted-{head}")
                claim = f"PABEE: exits at every layer cost the final layer nothing ({head} head)"
                if not cost or cost["median"] is None:
                    continue
                if not baseline_learned:
                    put(claim, task, "untestable", "the single-exit model learned nothing", {"cost": cost})
                else:
                    put(claim, task, "held" if cost["median"] * SCALE >= -NO_COST else "refuted",
                        f"{fmt(cost)} points", {"cost": cost})
            # PABEE: +PABEE keeps the score at a speed-up
            for head in ("linear", "shared_pooler"):
                result = summary.get("pabee", {}).get(head)
                if not result:
                    continue
                claim = f"PABEE: patience keeps the full model's score at a speed-up ({head} head)"
                speed = result["speedup"]["median"]
                numbers = f"{fmt(result['delta'])} points at {speed:.2f}×"
                if not baseline_learned:
                    put(claim, task, "untestable", "the single-exit model learned nothing", result)
                else:
                    held = result["delta"]["median"] * SCALE >= -0.5 and speed >= 1.3
                    put(claim, task, "held" if held else "refuted", numbers, result)
            main = self.main_variant(task)
            # DeeBERT: ~40 % of the layers saved with minimal loss
            for head in ("linear", "shared_pooler"):
                variant = f"deebert2-{head}"
                if variant not in task.runs or task.spec.is_regression:
                    continue
                result = at_speedup(task, variant, "deebert", DEEBERT_SPEEDUP)
                summary.setdefault("deebert_40", {})[head] = result
                claim = f"DeeBERT: ~40 % of the layers saved with minimal loss ({head} head)"
                numbers = f"{fmt(result['delta'])} points at {result['speedup']['median']:.2f}×"
                if not result["reached"]:
                    put(claim, task, "refuted", numbers + " (1.67× not reached)", result)
                else:
                    put(claim, task, "held" if result["delta"]["median"] * SCALE >= -NO_COST else "refuted",
                        numbers, result)
            # ELBERT: >= 2x with negligible loss, on ELBERT's training (learned weights)
            elbert_variant = f"learned-{MAIN_HEAD}" if f"learned-{MAIN_HEAD}" in task.runs else main
            if elbert_variant and not task.spec.is_regression:
                result = at_speedup(task, elbert_variant, "elbert", 2.0)
                summary["elbert_2x"] = {"variant": elbert_variant, **result}
                claim = "ELBERT: at least 2× with negligible loss"
                numbers = (f"{fmt(result['delta'])} points at {result['speedup']['median']:.2f}× "
                           f"({self.label(elbert_variant)})")
                if not result["reached"]:
                    put(claim, task, "refuted", numbers + " (2× not reached)", result)
                else:
                    put(claim, task, "held" if result["delta"]["median"] * SCALE >= -NO_COST else "refuted",
                        numbers, result)
            # PCEE: PCEE >= PABEE at matched speed-ups; PCEE reaches any target
            table = summary.get("matched")
            against = summary.get("pcee_vs_pabee", {}).get("patiences")
            if against is not None:
                comparable = {p: row for p, row in against.items() if row["comparable"]}
                wins = [p for p, row in comparable.items() if row["delta"]["median"] >= -1e-9]
                claim = "PCEE-BERT: PCEE ≥ PABEE at PABEE's speed-ups"
                numbers = (f"{len(wins)} of {len(comparable)} patiences "
                           + ", ".join(f"(p{p} {comparable[p]['pabee_speedup']['median']:.2f}×: "
                                       f"{fmt(comparable[p]['delta'])})" for p in comparable))
                if not comparable:
                    numbers = "PABEE runs full depth, or PCEE misses its speed-up by > 5 %, at every patience"
                put(claim, task, "untestable" if not comparable else "held" if len(wins) == len(comparable)
                    else "refuted", numbers, {"wins": wins, "compared": list(comparable)})
                reached = {name: [t for t in REACH_TARGETS if not table["policies"][name][str(t)]["off_target"]]
                           for name in ("pcee", "pabee", "budget")}
                claim = "PCEE-BERT: PCEE reaches any target speed-up (PABEE, budget cannot)"
                numbers = (f"PCEE {len(reached['pcee'])}/{len(REACH_TARGETS)}, PABEE {len(reached['pabee'])}, "
                           f"budget {len(reached['budget'])}")
                held = len(reached["pcee"]) == len(REACH_TARGETS) and len(reached["pabee"]) < len(REACH_TARGETS)
                put(claim, task, "held" if held else "refuted", numbers, {"reached": reached})
            # overthinking: some speed-up without loss
            thinking = summary.get("overthinking")
            if thinking:
                # the rule: *some* policy's no-loss setting (chosen on the first half) is faster than 1.05× and loses
                # nothing on the second; shown, the fastest that does, or else the fastest of all
                def fast_and_free(result: dict) -> bool:
                    return (result["speedup"]["median"] or 0) > 1.05 and result["delta"]["median"] >= -1e-9

                free = {name: result for name, result in thinking.items() if fast_and_free(result)}
                best_name, best = max((free or thinking).items(), key=lambda item: item[1]["speedup"]["median"] or 0)
                claim = "Overthinking: some speed-up costs nothing"
                numbers = f"{best_name} {best['speedup']['median']:.2f}×, {fmt(best['delta'])} points"
                if not learned_anything(task, (per_layer(task, main)[max(per_layer(task, main))]["median"])):
                    put(claim, task, "untestable", "the model learned nothing", best)
                else:
                    put(claim, task, "held" if free else "refuted", numbers, best)
        for task in self.tasks.values():  # DeeBERT's, ELBERT's and PCEE's rules read class probabilities
            for claim in [c for c in rows if c.startswith(("DeeBERT", "ELBERT", "PCEE-BERT"))]:
                if task.spec.is_regression and task.name not in rows[claim]:
                    put(claim, task, "untestable", "a regression task: the rule needs class probabilities", {})
        self.summary["claims"] = verdicts
        names = list(self.tasks)
        lines = ["| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for claim, cells in rows.items():
            lines.append(f"| {claim} | " + " | ".join(cells.get(n, "–") for n in names) + " |")
        return lines

    def write(self, started: float, halvings: int = HALVINGS) -> None:
        self.baselines()
        self.costs()
        self.layers()
        self.speedups()
        self.pcee_vs_pabee()
        self.pabee_layout()
        self.thresholds()
        self.overthinking_and_reach()
        self.plots_section()
        self.risk_control_section(halvings)
        claims = self.claims()
        header = ["# Tables (generated by scripts/analyze_results.py: do not edit)", "",
                  "Scores ×100 (acc for SST-2/RTE, F1 for MRPC, MCC for CoLA, Pearson for STS-B): median over seeds "
                  "[min–max]. Speed-up = L / mean exit layer.", ""]
        with open(os.path.join(self.results_dir, "tables.md"), "w", encoding="utf-8") as stream:
            stream.write("\n".join(header + self.tables) + "\n")
        rules = ["", "Verdict rules (all numbers ×100 points, medians over seeds; settings chosen on the first half of "
                 "dev and scored on the second, except the final-layer costs, which use the whole dev set):", "",
                 f"* exits cost the final layer nothing: held when joint − single exit ≥ −{NO_COST:g};",
                 "* patience keeps the score: PABEE at its best patience loses ≤ 0.5 against full depth at ≥ 1.3×;",
                 f"* DeeBERT: its entropy rule calibrated to {DEEBERT_SPEEDUP:.2f}× (40 % of layers saved) loses ≤ "
                 f"{NO_COST:g} (refuted if that speed-up is not reached within 5 %);",
                 f"* ELBERT: its rule (monotonic window of 2 or 3 layers) calibrated to 2× loses ≤ {NO_COST:g} "
                 "(refuted if 2× is not reached within 5 %);",
                 "* PCEE ≥ PABEE (PCEE-BERT's protocol): PCEE calibrated to the speed-up PABEE reaches at each "
                 "patience scores at least as well as PABEE, at every patience where PABEE exits early (≥ 1.05×) and "
                 "PCEE lands within 5 % of its speed-up; PCEE reaches any target: all of 1.33× … 5×;",
                 "* overthinking: some policy's no-loss setting is faster than 1.05× with no loss on the second half;",
                 "* untestable: the model scored no better than the constant prediction (regression: Pearson ≤ 0.1), "
                 "or the rule needs class probabilities and the task is a regression (STS-B)."]
        claims_md = ["# The papers' claims on all-MiniLM-L6-v2 (generated by scripts/analyze_results.py)", ""]
        claims_md += claims + rules
        with open(os.path.join(self.results_dir, "claims.md"), "w", encoding="utf-8") as stream:
            stream.write("\n".join(claims_md) + "\n")
        self.summary["analysis_wall_s"] = time.time() - started
        with open(os.path.join(self.results_dir, "summary.json"), "w", encoding="utf-8") as stream:
            json.dump(self.summary, stream, indent=1, default=float)


SCHEME_NAMES = {"weighted": "joint, weighted (PABEE)", "uniform": "joint, uniform",
                "learned": "joint, learned weights (ELBERT)", "final": "single exit"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "study"))
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "results"))
    parser.add_argument("--halvings", type=int, default=HALVINGS,
                        help="random calibration/test halvings of each seed's dev set for results/calibration.md")
    args = parser.parse_args(argv)
    started = time.time()
    tasks = load(args.runs_dir)
    if not tasks:
        print(f"no saved logits under {args.runs_dir}", file=sys.stderr)
        return 1
    os.makedirs(args.results_dir, exist_ok=True)
    Report(tasks, variant_info(), args.results_dir).write(started, args.halvings)
    print(f"wrote {args.results_dir}/tables.md, claims.md, calibration.md, summary.json and plots in "
          f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
