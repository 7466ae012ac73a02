"""Offline replay: score every policy × setting from one cached all-layer pass, calibrate, compare, plot.

At batch size 1 an exit decision depends only on the per-layer logits, so one batched all-exits pass that caches
``[N, L, C]`` logits is enough to score any number of settings in seconds (:func:`sweep`). The replay uses the
same :class:`multiexit.policies.ExitTracker` as real early exit, and :func:`compare_with_online` checks the two agree
example by example.

Speed is reported two ways and always labelled: ``speedup`` = L / mean exit layer (what PABEE's README calls
"1.57×") and ``layer_saving`` = 1 − mean exit layer / L (what the seeds print as "Speed Up").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from multiexit.errors import UserInputError
from multiexit.io import atomic_file
from multiexit.policies import POLICIES, BudgetExit, ExitPolicy, replay

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class PolicyScore:
    """One (policy, setting) scored on one set of examples."""

    policy: ExitPolicy
    metrics: dict[str, float]
    exit_layers: np.ndarray  # [N] 1-indexed
    predictions: np.ndarray  # [N] class index, or float for regression
    num_layers: int

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
# Default grids for sweeps and plots (declared by each policy class)
# --------------------------------------------------------------------------------------------------------------------


def default_grid(policy_name: str, num_layers: int, num_labels: int) -> list[ExitPolicy]:
    """The grid that policy ``policy_name`` declares, spanning its range of speed-ups, for plots and calibration."""
    if policy_name not in POLICIES:
        raise UserInputError(f"no default grid for policy {policy_name!r}; policies are {', '.join(POLICIES)}")
    return POLICIES[policy_name].default_grid(num_layers, num_labels)


# --------------------------------------------------------------------------------------------------------------------
# Calibration: one protocol for the runner and the study
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    policy: ExitPolicy
    calibration_score: PolicyScore
    reference_metric: float
    reached_target: bool


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
    """Move the knob of ``template`` (:meth:`ExitPolicy.knob`) to meet a target on a calibration split.

    * ``target_speedup``: the least-aggressive setting whose speed-up (L / mean exit layer) is >= the target.
    * ``max_metric_drop``: the fastest setting whose main metric is >= full-depth metric − drop.

    A continuous knob (thresholds: DeeBERT entropy, max-prob, PCEE τ, ELBERT δ) is bisected, an integer knob
    (patience, budget layer) scanned; the template's other fields are kept."""
    if (target_speedup is None) == (max_metric_drop is None):
        raise UserInputError("calibration needs exactly one of a target speed-up or a maximum metric drop")
    if target_speedup is not None and not (target_speedup >= 1.0):
        raise UserInputError(f"target speed-up must be >= 1, got {target_speedup}")
    layer_logits = torch.as_tensor(layer_logits).float()
    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    reference = score_policy(BudgetExit(layer=num_layers), layer_logits, labels, metric_fn).metrics[main_metric]

    def meets(score: PolicyScore) -> bool:
        if target_speedup is not None:
            return score.speedup >= target_speedup - 1e-9
        return score.metrics[main_metric] >= reference - max_metric_drop - 1e-12

    def score(policy: ExitPolicy) -> PolicyScore:
        return score_policy(policy, layer_logits, labels, metric_fn)

    knob = template.knob(num_layers, num_labels)
    if knob is None:
        best = score(template)
        return Calibration(best.policy, best, reference, meets(best))
    if knob.integer:
        values = range(int(knob.low), int(knob.high) + 1)
        scores = [score(template.replace(**{knob.field: value})) for value in values] or [score(template)]
        meeting = [s for s in scores if meets(s)]
        if not meeting:
            best = max(scores, key=lambda s: s.speedup if target_speedup is not None else s.metrics[main_metric])
            return Calibration(best.policy, best, reference, False)
        if target_speedup is not None:
            best = min(meeting, key=lambda s: (s.speedup, -s.metrics[main_metric]))
        else:
            best = max(meeting, key=lambda s: (s.speedup, s.metrics[main_metric]))
        return Calibration(best.policy, best, reference, True)

    slow, fast = (knob.low, knob.high) if knob.faster_when == "higher" else (knob.high, knob.low)

    def at(aggressiveness: float) -> PolicyScore:
        """0 = the full-depth end of the knob, 1 = the most aggressive end; speed-up grows with it."""
        return score(template.replace(**{knob.field: slow + aggressiveness * (fast - slow)}))

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


def choose_setting(
    templates: Sequence[ExitPolicy],
    layer_logits: torch.Tensor,
    labels: np.ndarray,
    metric_fn: MetricFn,
    main_metric: str,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
) -> Calibration:
    """Calibrate every template (:func:`calibrate`) and keep the best: among those meeting the target, the best
    calibration score (then, for a speed-up target, the smaller speed-up; for a drop, the larger); if none meets it,
    the fastest (speed-up target) or the best-scoring (drop). The templates are settings of one policy that differ in
    what calibration does not move (PCEE's patience, ELBERT's window)."""
    if not templates:
        raise ValueError("choose_setting needs at least one template")
    results = [calibrate(t, layer_logits, labels, metric_fn, main_metric, target_speedup, max_metric_drop, iterations)
               for t in templates]
    reached = [r for r in results if r.reached_target]
    speed_sign = -1 if target_speedup is not None else 1
    if reached:
        return max(reached, key=lambda r: (r.calibration_score.metrics[main_metric],
                                           speed_sign * r.calibration_score.speedup))
    if target_speedup is not None:
        return max(results, key=lambda r: r.calibration_score.speedup)
    return max(results, key=lambda r: r.calibration_score.metrics[main_metric])


@dataclass
class HeldOutCalibration:
    """A setting chosen on the first half of an evaluation set and scored on the second half."""

    calibration: Calibration
    held_out: PolicyScore


def calibrate_held_out(
    templates: Sequence[ExitPolicy],
    layer_logits: torch.Tensor,
    labels: np.ndarray,
    metric_fn: MetricFn,
    main_metric: str,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
) -> HeldOutCalibration:
    """The matched-speed-up protocol: choose the setting on the first half (:func:`choose_setting`), report it on the
    second half, so that the score is not measured on the examples that picked it."""
    half = layer_logits.shape[0] // 2
    if half < 2:
        raise UserInputError("calibration needs at least 4 labelled eval examples")
    chosen = choose_setting(templates, layer_logits[:half], labels[:half], metric_fn, main_metric, target_speedup,
                            max_metric_drop, iterations)
    held_out = score_policy(chosen.policy, layer_logits[half:], labels[half:], metric_fn)
    return HeldOutCalibration(chosen, held_out)


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


Curve = Sequence[tuple[float, float]]  # (speed-up, score) points of one policy's settings

# distinct markers and dash patterns: several policies coincide on binary tasks and must stay visible
_STYLES = [{"marker": m, "linestyle": ls} for m, ls in
           [("s", "-"), ("^", "-."), ("v", ":"), ("D", "-"), ("x", "--"), ("P", "-."), ("*", ":"), ("o", "-")]]


def curves_from_scores(scores: Sequence[PolicyScore], main_metric: str, scale: float = 100.0) -> dict[str, Curve]:
    """{policy name: [(speed-up, score × scale)]} of the scores that have ``main_metric``."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for score in scores:
        if main_metric in score.metrics:
            curves.setdefault(score.policy.name, []).append((score.speedup, score.metrics[main_metric] * scale))
    return curves


def plot_score_vs_speedup(
    curves: dict[str, Curve],
    path: str,
    ylabel: str,
    title: str = "",
    xlabel: str = "speed-up in layers (L / mean exit layer)",
    reference_lines: Sequence[tuple[str, float, str]] = (),
) -> None:
    """Score vs speed-up: each curve's Pareto frontier as a step line (the best score reachable at that speed-up or
    more: no setting lies between two points) plus its settings as faint dots. A curve named ``budget`` (the static
    exit, the baseline to beat) is black and dashed; legends use the policy's title where the name is a policy's.
    ``reference_lines`` are (label, score, colour) horizontal lines (full depth, a single-exit model). The image is
    drawn under a temporary name and renamed (:func:`multiexit.io.atomic_file`), so concurrent runs never leave a
    half-written file, nor does a failed write (WriteError)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styled = 0
    for name, points in sorted(curves.items(), key=lambda item: item[0] != "budget"):
        points = [(speed, value) for speed, value in points if value is not None and not math.isnan(value)]
        if not points:
            continue
        if name == "budget":
            style = {"color": "black", "linestyle": "--", "marker": "o"}
        else:
            style, styled = _STYLES[styled % len(_STYLES)], styled + 1
        label = POLICIES[name].title if name in POLICIES else name
        line = axes.plot(*zip(*pareto_front(points)), markersize=4, alpha=0.85, markerfacecolor="none", label=label,
                         drawstyle="steps-pre", **style)[0]
        axes.scatter(*zip(*points), s=7, alpha=0.25, color=line.get_color())
    for label, value, color in reference_lines:
        if value is not None and not math.isnan(value):
            axes.axhline(value, color=color, linestyle=":", linewidth=1, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    try:
        with atomic_file(path, "wb") as stream:
            figure.savefig(stream, format=os.path.splitext(path)[1].lstrip(".") or "png")
    finally:
        plt.close(figure)
