"""Offline replay: score every policy × setting from one cached all-layer pass, calibrate, compare, plot.

At batch size 1 an exit decision depends only on the per-layer logits, so one batched all-exits pass that caches
``[N, L, C]`` logits is enough to score any number of settings in seconds (:func:`sweep`). The replay uses the
same :class:`exit_policies.ExitTracker` as real early exit, and :func:`compare_with_online` checks the two agree
example by example.

Speed is reported two ways and always labelled: ``speedup`` = L / mean exit layer (what PABEE's README calls
"1.57×") and ``layer_saving`` = 1 − mean exit layer / L (what the seeds print as "Speed Up").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from errors import UserInputError
from exit_policies import (
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    ExitPolicy,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    replay,
)

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class PolicyScore:
    """One (policy, setting) scored on one set of examples."""

    policy: ExitPolicy
    metrics: dict[str, float]
    exit_layers: np.ndarray  # [N] 1-indexed
    predictions: np.ndarray  # [N] class index, or float for regression
    num_layers: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(self.exit_layers.shape[0])

    @property
    def avg_exit_layer(self) -> float:
        return float(self.exit_layers.mean())

    @property
    def speedup(self) -> float:
        return self.num_layers / self.avg_exit_layer

    @property
    def layer_saving(self) -> float:
        return 1.0 - self.avg_exit_layer / self.num_layers

    def summary(self) -> dict[str, object]:
        return {
            "policy": self.policy.name,
            "params": self.policy.params(),
            "metrics": self.metrics,
            "num_examples": self.num_examples,
            "num_layers": self.num_layers,
            "avg_exit_layer": self.avg_exit_layer,
            "speedup": self.speedup,
            "layer_saving": self.layer_saving,
        }


def predictions_from_logits(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Class index per row, or the regression value when there is one output."""
    logits = torch.as_tensor(logits)
    if logits.shape[-1] == 1:
        return logits[..., 0].float().numpy()
    return logits.argmax(dim=-1).numpy()


def score_policy(
    policy: ExitPolicy, layer_logits: torch.Tensor, labels: np.ndarray | None, metric_fn: MetricFn | None
) -> PolicyScore:
    """Replay ``policy`` over ``layer_logits`` [N, L, C] and score its answers (metrics empty without labels)."""
    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    policy.validate(num_labels, num_layers)
    result = replay(policy, layer_logits)
    predictions = predictions_from_logits(result.answer)
    metrics = metric_fn(predictions, labels) if (metric_fn is not None and labels is not None) else {}
    return PolicyScore(policy, metrics, result.exit_layer.numpy(), predictions, num_layers)


def sweep(
    policies: Sequence[ExitPolicy],
    layer_logits: torch.Tensor,
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    progress: bool = True,
) -> list[PolicyScore]:
    """Score every policy from the one cache. Seconds for hundreds of settings."""
    layer_logits = torch.as_tensor(layer_logits).float()
    return [
        score_policy(policy, layer_logits, labels, metric_fn)
        for policy in tqdm(policies, desc="replaying exit policies", disable=not progress, leave=False)
    ]


def per_layer_scores(layer_logits: torch.Tensor, labels: np.ndarray, metric_fn: MetricFn) -> list[PolicyScore]:
    """DeeBERT's each-layer evaluation from one pass (the seeds re-ran the dev set L times): budget(k) for each k."""
    num_layers = layer_logits.shape[1]
    return sweep([BudgetExit(layer=k) for k in range(1, num_layers + 1)], layer_logits, labels, metric_fn, False)


# --------------------------------------------------------------------------------------------------------------------
# Default grids for sweeps and plots
# --------------------------------------------------------------------------------------------------------------------


def default_grid(policy_name: str, num_layers: int, num_labels: int) -> list[ExitPolicy]:
    """A grid that spans each policy's range of speed-ups, for plots and calibration."""
    if policy_name == "budget":
        return [BudgetExit(layer=k) for k in range(1, num_layers + 1)]
    if policy_name == "pabee":
        if num_labels == 1:
            return [
                PatienceExit(patience=p, regression_threshold=t)
                for p in range(1, num_layers)
                for t in (0.05, 0.1, 0.2, 0.5)
            ]
        return [PatienceExit(patience=p) for p in range(1, num_layers)]
    if num_labels == 1:
        return []  # the other policies need class probabilities
    fractions = np.linspace(0.0, 1.0, 21)[1:]
    if policy_name == "deebert":
        max_entropy = math.log(num_labels)
        return [EntropyExit(threshold=round(float(f * max_entropy), 4)) for f in fractions]
    if policy_name == "maxprob":
        floor = 1.0 / num_labels
        return [MaxProbExit(threshold=round(float(1.0 - f * (1.0 - floor)), 4)) for f in fractions[:-1]]
    if policy_name == "pcee":
        return [
            PCEEExit(patience=p, tau=round(float(t), 3))
            for p in range(1, min(num_layers, 4))
            for t in np.linspace(0.05, 0.95, 10)
        ]
    if policy_name == "elbert":
        return [
            ELBERTExit(delta=round(float(d), 3), window=w, criterion="monotonic")
            for w in (2, 3)
            if w <= num_layers
            for d in np.linspace(0.05, 0.95, 10)
        ]
    raise UserInputError(f"no default grid for policy {policy_name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------

# The one continuous knob of each threshold policy, its range, and whether raising it makes exits earlier.
_KNOBS: dict[str, tuple[str, float, float, bool]] = {
    "deebert": ("threshold", 0.0, math.inf, True),
    "maxprob": ("threshold", 0.0, 1.0, False),
    "pcee": ("tau", 0.0, 1.0, True),
    "elbert": ("delta", 0.0, 1.0, True),
}


@dataclass
class Calibration:
    policy: ExitPolicy
    calibration_score: PolicyScore
    reference_metric: float
    reached_target: bool


def _knob(template: ExitPolicy) -> tuple[str, float, float, bool]:
    if template.name == "pcee" and template.maxprob is not None:  # PCEE-v1: confident when max-prob >= knob
        return ("maxprob", 0.0, 1.0, False)
    return _KNOBS[template.name]


def _with_knob(template: ExitPolicy, value: float) -> ExitPolicy:
    knob = _knob(template)[0]
    params = template.params()
    params[knob] = value
    return type(template)(**params)


def calibrate(
    template: ExitPolicy,
    layer_logits: torch.Tensor,
    labels: np.ndarray,
    metric_fn: MetricFn,
    main_metric: str,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
) -> Calibration:
    """Pick the setting of ``template``'s policy that meets a target on a calibration split.

    * ``target_speedup``: the least-aggressive setting whose speed-up (L / mean exit layer) is >= the target.
    * ``max_metric_drop``: the fastest setting whose main metric is >= full-depth metric − drop.

    Threshold policies (deebert, maxprob, pcee τ, elbert δ) are calibrated by bisection on their continuous knob,
    keeping the template's other parameters; patience and budget by scanning their integer knob."""
    if (target_speedup is None) == (max_metric_drop is None):
        raise UserInputError("calibration needs exactly one of a target speed-up or a maximum metric drop")
    if target_speedup is not None and not (target_speedup >= 1.0):
        raise UserInputError(f"target speed-up must be >= 1, got {target_speedup}")
    layer_logits = torch.as_tensor(layer_logits).float()
    num_layers = layer_logits.shape[1]
    reference = score_policy(BudgetExit(layer=num_layers), layer_logits, labels, metric_fn).metrics[main_metric]

    def meets(score: PolicyScore) -> bool:
        if target_speedup is not None:
            return score.speedup >= target_speedup - 1e-9
        return score.metrics[main_metric] >= reference - max_metric_drop - 1e-12

    def score(policy: ExitPolicy) -> PolicyScore:
        return score_policy(policy, layer_logits, labels, metric_fn)

    if template.name in _KNOBS:
        _, low, high, raising_is_faster = _knob(template)
        if math.isinf(high):
            high = math.log(layer_logits.shape[2]) + 1e-6  # entropy never exceeds ln C
        slow, fast = (low, high) if raising_is_faster else (high, low)

        def at(aggressiveness: float) -> PolicyScore:
            """0 = the full-depth end of the knob, 1 = the most aggressive end; speed-up grows with it."""
            return score(_with_knob(template, slow + aggressiveness * (fast - slow)))

        if target_speedup is not None:
            # smallest aggressiveness that reaches the speed-up: the best score that meets the target
            if not meets(at(1.0)):
                best = at(1.0)
                return Calibration(best.policy, best, reference, False)
            if meets(at(0.0)):
                best = at(0.0)
                return Calibration(best.policy, best, reference, True)
            failing, meeting = 0.0, 1.0
        else:
            # largest aggressiveness whose metric stays within the drop (bisection finds the first crossing)
            if meets(at(1.0)):
                best = at(1.0)
                return Calibration(best.policy, best, reference, True)
            meeting, failing = 0.0, 1.0
        for _ in range(iterations):
            middle = (failing + meeting) / 2
            if meets(at(middle)):
                meeting = middle
            else:
                failing = middle
        best = at(meeting)
        return Calibration(best.policy, best, reference, meets(best))

    candidates = default_grid(template.name, num_layers, layer_logits.shape[2])
    if template.name == "pabee" and layer_logits.shape[2] == 1:
        candidates = [p for p in candidates if p.regression_threshold == template.regression_threshold]
    scores = [score(policy) for policy in candidates] or [score(template)]
    meeting = [s for s in scores if meets(s)]
    if not meeting:
        best = max(scores, key=lambda s: s.speedup if target_speedup is not None else s.metrics[main_metric])
        return Calibration(best.policy, best, reference, False)
    if target_speedup is not None:
        best = min(meeting, key=lambda s: (s.speedup, -s.metrics[main_metric]))
    else:
        best = max(meeting, key=lambda s: (s.speedup, s.metrics[main_metric]))
    return Calibration(best.policy, best, reference, True)


# --------------------------------------------------------------------------------------------------------------------
# Online vs replay
# --------------------------------------------------------------------------------------------------------------------


def compare_with_online(
    replayed: PolicyScore, online_exit_layers: np.ndarray, online_predictions: np.ndarray, atol: float = 1e-4
) -> list[int]:
    """Indices of examples whose online exit layer or prediction differs from the replay (empty = identical)."""
    online_exit_layers = np.asarray(online_exit_layers)
    online_predictions = np.asarray(online_predictions)
    if online_exit_layers.shape != replayed.exit_layers.shape:
        raise ValueError(f"online has {online_exit_layers.shape[0]} examples, replay {replayed.num_examples}")
    layer_mismatch = online_exit_layers != replayed.exit_layers
    if np.issubdtype(replayed.predictions.dtype, np.floating):
        prediction_mismatch = ~np.isclose(online_predictions, replayed.predictions, atol=atol)
    else:
        prediction_mismatch = online_predictions != replayed.predictions
    return np.flatnonzero(layer_mismatch | prediction_mismatch).tolist()


# --------------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten on both speed-up and score, sorted by speed-up."""
    front, best = [], -math.inf
    for speed, value in sorted(points, key=lambda p: (-p[0], -p[1])):
        if value > best:
            front.append((speed, value))
            best = value
    return sorted(front)


def plot_score_vs_speedup(
    scores: Sequence[PolicyScore], main_metric: str, path: str, title: str = "", scale: float = 100.0
) -> None:
    """Score vs speed-up (L / mean exit layer): each policy's Pareto frontier (a step curve: the best score reachable at
    that speed-up or more) plus its settings as faint dots; the budgeted-exit curve is the baseline to beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_policy: dict[str, list[PolicyScore]] = {}
    for score in scores:
        if main_metric in score.metrics:
            by_policy.setdefault(score.policy.name, []).append(score)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, group in sorted(by_policy.items(), key=lambda item: item[0] != "budget"):
        points = [(s.speedup, s.metrics[main_metric] * scale) for s in group]
        style = {"color": "black", "linestyle": "--"} if name == "budget" else {}
        # a step, not a straight line, between Pareto points: for a speed-up between two settings the best score
        # reachable is the faster setting's (no setting lies in between)
        front = pareto_front(points)
        line = axes.plot(*zip(*front), marker="o", markersize=3, label=name, drawstyle="steps-pre", **style)[0]
        axes.scatter(*zip(*points), s=6, alpha=0.25, color=line.get_color())
    axes.set_xlabel("speed-up in layers (L / mean exit layer)")
    axes.set_ylabel(f"{main_metric} (×{scale:g})" if scale != 1 else main_metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
