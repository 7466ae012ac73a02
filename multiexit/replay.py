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
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from multiexit.errors import UserInputError
from multiexit.io import atomic_file
from multiexit.policies import POLICIES, BudgetExit, ExitPolicy, Knob, replay

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

RISKS = ("disagreement", "metric")
"""What a certified calibration (:func:`certify`) bounds on new examples: ``disagreement``, the fraction of examples
whose answer differs from full depth's (needs no labels; it bounds the accuracy drop from above), or ``metric``, the
drop of accuracy against full depth (needs labels)."""
POINT_ESTIMATE = "empirical"
"""The uncertified rule, kept under this name: the fastest setting whose metric on the calibration examples is within
the drop of full depth's there. It promises nothing about other examples (docs/calibration.md measures how often it
breaks the drop on a held-out half)."""
PER_EXAMPLE_METRICS = ("acc",)
"""Main metrics that are means of a per-example term (correct or not): risk ``metric`` certifies their drop."""
SEQUENCE_STEPS = 100
"""A continuous knob's certification sequence: its declared range cut into this many equal steps."""
DEFAULT_DELTA = 0.1
BATCH_SAMPLINGS = ("iid", "split")
"""How a batch certificate's batch (``batch_size`` examples) relates to the calibration examples: ``iid``, new examples
drawn independently from the same distribution (deployment); ``split``, the rest of one fixed set of which the
calibration examples are a uniformly random part (the held-out protocol: the runner's second half of a shuffled eval
file, the study's test half). docs/calibration.md derives each test."""


@dataclass
class Certificate:
    """What a certified calibration promises: with probability at least 1 − ``delta`` over the draw of the
    ``num_examples`` calibration examples, the chosen setting's ``risk`` on new examples from the same distribution
    is at most ``max_risk`` (Learn then Test: Angelopoulos, Bates, Candès, Jordan, Lei 2021). A batch certificate
    (``batch_size`` m) promises more: with probability at least 1 − ``delta`` over the calibration examples and the
    batch together, the mean loss over the batch of m examples is at most ``max_risk`` (for risk ``metric``: the
    batch's fraction of lost examples, which bounds its accuracy drop); ``batch_sampling`` says how the batch is
    drawn (:data:`BATCH_SAMPLINGS`)."""

    risk: str
    max_risk: float  # ε
    delta: float  # δ
    num_examples: int  # calibration examples
    sequences: int  # fixed sequences tested (one per template that differs in more than its knob)
    level: float  # each sequence's test level: δ / sequences (Bonferroni)
    certified: bool  # False: no setting passed, and the answer is full depth
    # upper confidence bound of the chosen setting's risk at ``level`` (full depth: 0, exactly); a batch certificate:
    # the smallest batch mean loss that the batch test passes at ``level`` (:func:`batch_upper_bound`)
    bound: float
    observed_risk: float  # the chosen setting's risk on the calibration examples
    settings_certified: int  # in all sequences together
    # not certified: the fewest calibration examples with which the first setting of a sequence would pass were its
    # observed loss rates to stay as they are (None: its observed risk is already at least ε), and with no loss at all
    examples_needed: int | None = None
    examples_needed_without_loss: int | None = None
    batch_size: int | None = None  # None: the population certificate (the risk); m: the batch certificate
    batch_sampling: str | None = None  # a batch certificate's :data:`BATCH_SAMPLINGS`

    def summary(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Calibration:
    policy: ExitPolicy
    calibration_score: PolicyScore
    reference_metric: float  # full depth's main metric on the calibration examples (nan without labels)
    reached_target: bool  # for a certified calibration: whether some setting was certified
    certificate: Certificate | None = None  # a certified calibration's promise (:func:`certify`)


def check_risk_request(risk: str, max_risk: float, delta: float, main_metric: str | None, num_labels: int,
                       tolerance: float | None = None, has_labels: bool = True, batch_size: int | None = None,
                       batch_sampling: str = "iid") -> None:
    """What a calibration for a metric drop needs of its request and its task. Raises UserInputError."""
    if batch_size is not None:
        if risk == POINT_ESTIMATE:
            raise UserInputError(f"a batch size asks for a batch certificate; risk {POINT_ESTIMATE!r} (the point "
                                 "estimate) certifies nothing")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserInputError(f"a batch certificate's batch size is a whole number of examples >= 1, got "
                                 f"{batch_size!r}")
        if batch_sampling not in BATCH_SAMPLINGS:
            raise UserInputError(f"batch sampling must be one of {', '.join(BATCH_SAMPLINGS)}, got "
                                 f"{batch_sampling!r}")
    if risk == POINT_ESTIMATE:
        if not has_labels:
            raise UserInputError(f"risk {POINT_ESTIMATE!r} compares metrics and needs labels")
        return
    if risk not in RISKS:
        raise UserInputError(f"risk must be one of {', '.join(RISKS)} (or {POINT_ESTIMATE!r}, the uncertified point "
                             f"estimate), got {risk!r}")
    if not 0 < max_risk <= 1:
        raise UserInputError(f"a certified drop is in (0, 1] (no number of examples certifies a risk of 0), got "
                             f"{max_risk}")
    if not 0 < delta < 1:
        raise UserInputError(f"delta, the probability that the certificate fails, is in (0, 1), got {delta}")
    if risk == "metric":
        if num_labels == 1 or main_metric not in PER_EXAMPLE_METRICS:
            raise UserInputError(
                f"risk 'metric' certifies the drop of a metric that is a mean of per-example terms (accuracy); "
                f"{main_metric!r} is not one: certify risk 'disagreement' instead (docs/calibration.md says what it "
                f"implies for F1, MCC and correlations)")
        if not has_labels:
            raise UserInputError("risk 'metric' needs labels; risk 'disagreement' does not")
    if risk == "disagreement" and num_labels == 1 and not (tolerance is not None and 0 < tolerance < math.inf):
        raise UserInputError("risk 'disagreement' on a regression task needs a tolerance > 0: two answers disagree "
                             f"when they differ by more than it (got {tolerance})")


def example_losses(risk: str, predictions: np.ndarray, full_predictions: np.ndarray, labels: np.ndarray | None = None,
                   tolerance: float | None = None) -> np.ndarray:
    """Each example's loss against full depth, in {−1, 0, 1} (int8; ``predictions`` may carry leading axes):

    * ``disagreement``: 1 where the answer differs from full depth's (a regression answer: by more than
      ``tolerance``);
    * ``metric``: correct at full depth − correct here. 1: this setting loses the example, −1: it wins it back;
      the mean is the accuracy drop."""
    predictions, full_predictions = np.asarray(predictions), np.asarray(full_predictions)
    if risk == "disagreement":
        if np.issubdtype(predictions.dtype, np.floating):
            return (np.abs(predictions - full_predictions) > tolerance).astype(np.int8)
        return (predictions != full_predictions).astype(np.int8)
    if risk == "metric":
        return (full_predictions == labels).astype(np.int8) - (predictions == labels).astype(np.int8)
    raise ValueError(f"no per-example loss for risk {risk!r}")


def _binomial_upper(successes: np.ndarray, trials: np.ndarray, level: float) -> np.ndarray:
    """Clopper–Pearson: the largest rate r with P(Bin(trials, r) <= successes) >= level."""
    from scipy.stats import beta

    return np.where(successes >= trials, 1.0,
                    beta.ppf(1 - level, successes + 1, np.maximum(trials - successes, 1)))


def _binomial_lower(successes: np.ndarray, trials: np.ndarray, level: float) -> np.ndarray:
    """Clopper–Pearson: the smallest rate r with P(Bin(trials, r) >= successes) >= level."""
    from scipy.stats import beta

    return np.where(successes <= 0, 0.0, beta.ppf(level, np.maximum(successes, 1), trials - successes + 1))


def batch_upper_bound(losses: np.ndarray, num_examples: int, batch_size: int, level: float,
                      sampling: str = "iid") -> np.ndarray:
    """The batch test of a 0/1 loss, from the number of ``losses`` among ``num_examples`` (n) calibration examples:
    the smallest batch mean loss a/m (a = 0 … m, m = ``batch_size``) whose test passes at ``level``, that is whose
    p-value for "the batch loses more than a of its m examples" is at most ``level``. "bound <= ε" is the test at
    a = ⌊ε m⌋; with k losses the p-value is (docs/calibration.md derives both):

    * ``iid`` (new examples): P(Hypergeometric(n + m, a + k + 1, n) <= k), the chance that at most k of the first
      a + k + 1 of n + m exchangeable examples are calibration examples. It is the binomial p-value P(Bin(n, r) <= k)
      averaged over r ~ Beta(a + 1, m − a), the law whose CDF is P(Bin(m, r) > a): so the probability, over the
      calibration set and the batch, that a setting certified by a fixed sequence loses more than a of the batch is at
      most ``level``;
    * ``split`` (the batch is the rest of one fixed set of n + m examples, the calibration examples a random part):
      P(Hypergeometric(n + m, a + 1, n) <= k); given the set, the first setting of a sequence with more than a losses
      in the whole set passes with at most this probability, and no setting before it can lose more than a of the
      batch.

    A loss count above a is impossible when a = m, so every count passes there (bound 1)."""
    from scipy.stats import hypergeom

    if sampling not in BATCH_SAMPLINGS:
        raise ValueError(f"no batch test for sampling {sampling!r}")
    counts, inverse = np.unique(np.asarray(losses, dtype=np.int64), return_inverse=True)  # each count once
    pool = num_examples + batch_size

    def passes(allowed: np.ndarray) -> np.ndarray:
        draws = allowed + 1 + (counts if sampling == "iid" else 0)
        p_value = hypergeom.cdf(counts, pool, num_examples, np.minimum(draws, pool))
        return (allowed >= batch_size) | (p_value <= level)

    # p-values fall as the allowance a grows: bisect for the smallest passing a (a = −1 fails, a = m passes)
    failing, passing = np.full(counts.shape, -1, dtype=np.int64), np.full(counts.shape, batch_size, dtype=np.int64)
    while np.any(passing - failing > 1):
        middle = (failing + passing) // 2
        ok = passes(middle)
        failing, passing = np.where(ok, failing, middle), np.where(ok, middle, passing)
    return (passing / batch_size)[inverse].reshape(np.shape(losses))


def risk_upper_bound(risk: str, worse: np.ndarray, better: np.ndarray, num_examples: int | np.ndarray,
                     level: float, batch_size: int | None = None, batch_sampling: str = "iid") -> np.ndarray:
    """An upper confidence bound at ``level`` of the risk from the numbers of examples whose loss is 1 (``worse``)
    and −1 (``better``) among ``num_examples`` (arrays broadcast): the true risk exceeds it with probability at most
    ``level``. So "bound <= ε" is a test of H0: risk > ε whose type-I error is at most ``level``.

    * ``disagreement`` (a 0/1 loss): the exact binomial bound; bound <= ε exactly when the binomial p-value
      P(Bin(n, ε) <= worse) is <= ``level``;
    * ``metric`` (a loss in {−1, 0, 1}; risk = P(loss 1) − P(loss −1)): P(loss 1) bounded from above and P(loss −1)
      from below, each exactly at ``level`` / 2, and their difference (a union bound: both hold with probability
      at least 1 − ``level``).

    With a ``batch_size`` m, the bound is the batch test's (:func:`batch_upper_bound`) of the 0/1 loss "worse": the
    disagreement, or for ``metric`` the examples lost (full depth right, this setting wrong), whose fraction in a
    batch is at least the batch's accuracy drop; examples won back are not counted (``num_examples`` is a number)."""
    if batch_size is not None:
        if risk not in RISKS:
            raise ValueError(f"no bound for risk {risk!r}")
        return batch_upper_bound(worse, int(num_examples), batch_size, level, batch_sampling)
    worse = np.asarray(worse, dtype=np.float64)
    trials = np.asarray(num_examples, dtype=np.float64)
    if risk == "disagreement":
        return _binomial_upper(worse, trials, level)
    if risk == "metric":
        better = np.asarray(better, dtype=np.float64)
        return _binomial_upper(worse, trials, level / 2) - _binomial_lower(better, trials, level / 2)
    raise ValueError(f"no bound for risk {risk!r}")


def fixed_sequence_end(bounds: np.ndarray, max_risk: float) -> np.ndarray:
    """Fixed-sequence testing along the last axis (settings from the safest to the most aggressive): the index of
    the last setting before the first whose bound exceeds ``max_risk``, −1 when the first one does. Every setting up
    to it is certified, each tested at the full level: a setting whose risk exceeds ε can only be certified if the
    first such setting of the sequence is, which happens with probability at most the level."""
    return np.cumprod(np.asarray(bounds) <= max_risk, axis=-1).sum(axis=-1) - 1


def most_aggressive(ends: np.ndarray, mean_exit_layers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The (sequence, setting) to answer with: among the sequences' last certified settings (``ends`` [..., K]), the
    one with the lowest mean exit layer on the calibration examples (``mean_exit_layers``: per sequence, [..., G_k]);
    the first sequence on a tie; (−1, −1) where nothing is certified. Choosing by the data is allowed: with
    probability at least 1 − δ *every* certified setting is within ε."""
    ends = np.asarray(ends)
    candidates = np.stack([
        np.where(ends[..., k] >= 0,
                 np.take_along_axis(np.asarray(means, dtype=np.float64),
                                    np.maximum(ends[..., k], 0)[..., None], axis=-1)[..., 0],
                 np.inf)
        for k, means in enumerate(mean_exit_layers)], axis=-1)
    sequence = candidates.argmin(axis=-1)
    none = np.isinf(np.take_along_axis(candidates, sequence[..., None], axis=-1)[..., 0])
    setting = np.take_along_axis(ends, sequence[..., None], axis=-1)[..., 0]
    return np.where(none, -1, sequence), np.where(none, -1, setting)


def examples_needed(risk: str, worse_rate: float, better_rate: float, max_risk: float, level: float,
                    limit: int = 10**9, batch_size: int | None = None, batch_sampling: str = "iid") -> int | None:
    """The fewest examples n with which losses at these rates (counts rounded to the nearest integer) would be
    certified at ``level``; None when the rates' risk is at least ``max_risk`` (or n would exceed ``limit``). With a
    ``batch_size`` (the batch certificate, for the same batch), n is searched up to ``min(limit, 10**6)`` by doubling
    and bisection, which finds the fewest when the test passes for every n above it (so without loss; a ``split``
    batch with losses can fail again as n grows, since a larger calibration set leaves its losses fewer places)."""
    certified_rate = worse_rate if batch_size is not None else worse_rate - better_rate
    if certified_rate >= max_risk:
        return None
    if batch_size is not None:
        limit = min(limit, 10**6)

    def passes(n: int) -> bool:
        return bool(risk_upper_bound(risk, round(worse_rate * n), round(better_rate * n), n, level, batch_size,
                                     batch_sampling) <= max_risk)

    high = 1
    while not passes(high):
        if high >= limit:
            return None
        high = min(2 * high, limit)
    low = high // 2  # fails (or 0); bisect for the first n that passes
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


def _knob_setting(template: ExitPolicy, knob: Knob, aggressiveness: float) -> ExitPolicy:
    """``template`` with its continuous knob at ``aggressiveness``: 0 = the full-depth end of the knob's declared
    range, 1 = its most aggressive end; exits come earlier as it grows."""
    slow, fast = (knob.low, knob.high) if knob.faster_when == "higher" else (knob.high, knob.low)
    return template.replace(**{knob.field: slow + aggressiveness * (fast - slow)})


def certification_sequence(template: ExitPolicy, num_layers: int, num_labels: int,
                           steps: int = SEQUENCE_STEPS) -> list[ExitPolicy]:
    """The fixed order in which :func:`certify` tests the settings of ``template``'s knob, from the safest end to the
    most aggressive, declared before any data is seen: every value of an integer knob, or ``steps`` equal steps
    along a continuous knob's declared range (both ends included); the template alone if it has no knob."""
    knob = template.knob(num_layers, num_labels)
    if knob is None:
        return [template]
    if knob.integer:
        values = range(int(knob.low), int(knob.high) + 1)
        return [template.replace(**{knob.field: value})
                for value in (reversed(values) if knob.faster_when == "lower" else values)]
    return [_knob_setting(template, knob, step / steps) for step in range(steps + 1)]


def certification_sequences(templates: Sequence[ExitPolicy], num_layers: int, num_labels: int,
                            steps: int = SEQUENCE_STEPS) -> list[list[ExitPolicy]]:
    """One sequence per template, in the templates' order; templates that differ only in their knob give the same
    sequence and count once (each sequence costs the others level: δ is split evenly between them)."""
    sequences: dict[tuple[ExitPolicy, ...], list[ExitPolicy]] = {}
    for template in templates:
        sequence = certification_sequence(template, num_layers, num_labels, steps)
        sequences.setdefault(tuple(sequence), sequence)
    return list(sequences.values())


def certify(
    templates: Sequence[ExitPolicy],
    layer_logits: torch.Tensor,
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    main_metric: str | None,
    max_risk: float,
    delta: float = DEFAULT_DELTA,
    risk: str = "disagreement",
    tolerance: float | None = None,
    steps: int = SEQUENCE_STEPS,
    batch_size: int | None = None,
    batch_sampling: str = "iid",
) -> Calibration:
    """Learn then Test's fixed-sequence testing (Angelopoulos, Bates, Candès, Jordan, Lei 2021), as CALM applies it
    to early exit (Schuster et al. 2022): the fastest setting whose ``risk`` on new examples is at most ``max_risk``
    (ε) with probability at least 1 − ``delta`` (δ) over the draw of these calibration examples.

    Each template's knob gives a fixed sequence of settings from the safest to the most aggressive
    (:func:`certification_sequence`); the settings are tested in that order, each at level δ / (number of
    sequences), with "upper confidence bound of its risk <= ε" (:func:`risk_upper_bound`), and a sequence stops at
    its first failure (:func:`fixed_sequence_end`). The answer is the certified setting with the lowest mean exit
    layer here (:func:`most_aggressive`), or full depth (``budget(layer=L)``) when nothing passes; the certificate
    then says how many examples a pass would need. Every setting of every sequence is replayed once; labels are
    needed only for risk ``metric`` (and for the scores).

    ``batch_size`` m (None: the population certificate above) asks for a batch certificate: with probability at
    least 1 − δ, the mean loss over a batch of m examples drawn as ``batch_sampling`` says (:data:`BATCH_SAMPLINGS`)
    is at most ε. Only the test changes (:func:`batch_upper_bound`); the sequences, their levels and the choice are
    the same."""
    layer_logits = torch.as_tensor(layer_logits).float()
    num_examples, num_layers, num_labels = layer_logits.shape
    check_risk_request(risk, max_risk, delta, main_metric, num_labels, tolerance, labels is not None, batch_size,
                       batch_sampling)
    if not templates:
        raise ValueError("certify needs at least one template")

    def scored(policy: ExitPolicy) -> PolicyScore:
        return score_policy(policy, layer_logits, labels, metric_fn if labels is not None else None)

    full = scored(BudgetExit(layer=num_layers))
    reference = full.metrics[main_metric] if full.metrics and main_metric else math.nan
    sequences = certification_sequences(templates, num_layers, num_labels, steps)
    level = delta / len(sequences)
    replays = [[score_policy(policy, layer_logits, None, None) for policy in sequence] for sequence in sequences]
    losses = [example_losses(risk, np.stack([score.predictions for score in scores]), full.predictions, labels,
                             tolerance) for scores in replays]  # per sequence [G, N]
    bounds = [risk_upper_bound(risk, (loss > 0).sum(-1), (loss < 0).sum(-1), num_examples, level, batch_size,
                               batch_sampling) for loss in losses]
    ends = np.array([fixed_sequence_end(bound, max_risk) for bound in bounds])
    sequence, setting = (int(index) for index in most_aggressive(
        ends, [np.array([score.avg_exit_layer for score in scores]) for scores in replays]))
    common = {"risk": risk, "max_risk": max_risk, "delta": delta, "num_examples": num_examples,
              "sequences": len(sequences), "level": level, "settings_certified": int((ends + 1).sum()),
              "batch_size": batch_size, "batch_sampling": batch_sampling if batch_size is not None else None}
    batch = {"batch_size": batch_size, "batch_sampling": batch_sampling}
    if sequence < 0:
        first_rates = [((loss[0] > 0).mean(), (loss[0] < 0).mean()) for loss in losses]
        needed = [examples_needed(risk, worse, better, max_risk, level, **batch) for worse, better in first_rates]
        certificate = Certificate(**common, certified=False, bound=0.0, observed_risk=0.0,
                                  examples_needed=min((n for n in needed if n is not None), default=None),
                                  examples_needed_without_loss=examples_needed(risk, 0.0, 0.0, max_risk, level,
                                                                               **batch))
        return Calibration(full.policy, full, reference, False, certificate)
    chosen = scored(sequences[sequence][setting])
    certificate = Certificate(**common, certified=True, bound=float(bounds[sequence][setting]),
                              observed_risk=float(losses[sequence][setting].mean()))
    return Calibration(chosen.policy, chosen, reference, True, certificate)


def calibrate(
    template: ExitPolicy,
    layer_logits: torch.Tensor,
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    main_metric: str | None,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
    *,
    delta: float = DEFAULT_DELTA,
    risk: str = "disagreement",
    tolerance: float | None = None,
    steps: int = SEQUENCE_STEPS,
    batch_size: int | None = None,
    batch_sampling: str = "iid",
) -> Calibration:
    """Move the knob of ``template`` (:meth:`ExitPolicy.knob`) to meet a target on a calibration split.

    * ``target_speedup``: the least-aggressive setting whose speed-up (L / mean exit layer) here is >= the target
      (a promise about speed, measured on these examples);
    * ``max_metric_drop`` (ε): the setting :func:`certify` certifies: its ``risk`` (``disagreement`` with full depth,
      or the accuracy drop for ``metric``) is at most ε on new examples with probability at least 1 − ``delta``
      (with a ``batch_size`` m: the mean loss over a batch of m examples, drawn as ``batch_sampling`` says);
    * ``max_metric_drop`` with ``risk="empirical"``: the point estimate, the fastest setting whose main metric *here*
      is >= full depth's − ε, with no promise about other examples.

    For a target speed-up or the point estimate, a continuous knob (thresholds: DeeBERT entropy, max-prob, PCEE τ,
    ELBERT δ) is bisected, an integer knob (patience, budget layer) scanned; the template's other fields are kept."""
    if (target_speedup is None) == (max_metric_drop is None):
        raise UserInputError("calibration needs exactly one of a target speed-up or a maximum metric drop")
    if max_metric_drop is not None and risk != POINT_ESTIMATE:
        return certify([template], layer_logits, labels, metric_fn, main_metric, max_metric_drop, delta, risk,
                       tolerance, steps, batch_size, batch_sampling)
    if target_speedup is not None and not (target_speedup >= 1.0):
        raise UserInputError(f"target speed-up must be >= 1, got {target_speedup}")
    layer_logits = torch.as_tensor(layer_logits).float()
    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    if max_metric_drop is not None:
        check_risk_request(risk, max_metric_drop, delta, main_metric, num_labels, tolerance, labels is not None,
                           batch_size, batch_sampling)
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

    def at(aggressiveness: float) -> PolicyScore:
        return score(_knob_setting(template, knob, aggressiveness))

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
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    main_metric: str | None,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
    *,
    delta: float = DEFAULT_DELTA,
    risk: str = "disagreement",
    tolerance: float | None = None,
    steps: int = SEQUENCE_STEPS,
    batch_size: int | None = None,
    batch_sampling: str = "iid",
) -> Calibration:
    """One setting for several templates, settings of one policy that differ in what calibration does not move
    (PCEE's patience, ELBERT's window). A certified drop (:func:`certify`) tests one sequence per template and keeps
    the fastest certified setting. Otherwise every template is calibrated (:func:`calibrate`) and the best kept:
    among those meeting the target, the best calibration score (then, for a speed-up target, the smaller speed-up;
    for a drop, the larger); if none meets it, the fastest (speed-up target) or the best-scoring (drop)."""
    if not templates:
        raise ValueError("choose_setting needs at least one template")
    if max_metric_drop is not None and target_speedup is None and risk != POINT_ESTIMATE:
        return certify(templates, layer_logits, labels, metric_fn, main_metric, max_metric_drop, delta, risk,
                       tolerance, steps, batch_size, batch_sampling)
    results = [calibrate(t, layer_logits, labels, metric_fn, main_metric, target_speedup, max_metric_drop, iterations,
                         delta=delta, risk=risk, tolerance=tolerance, steps=steps, batch_size=batch_size,
                         batch_sampling=batch_sampling)
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
    held_out_risk: float | None = None  # a certified calibration's risk measured on the second half


def calibrate_held_out(
    templates: Sequence[ExitPolicy],
    layer_logits: torch.Tensor,
    labels: np.ndarray | None,
    metric_fn: MetricFn | None,
    main_metric: str | None,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    iterations: int = 40,
    *,
    delta: float = DEFAULT_DELTA,
    risk: str = "disagreement",
    tolerance: float | None = None,
    steps: int = SEQUENCE_STEPS,
    batch_size: int | None = None,
    batch_sampling: str = "iid",
) -> HeldOutCalibration:
    """The matched-speed-up protocol: choose the setting on the first half (:func:`choose_setting`), report it on the
    second half, so that the score is not measured on the examples that picked it. ``labels`` may be None for a
    certified disagreement (scores then have no metrics). A batch certificate whose batch is the second half itself
    is ``batch_size=len(second half)`` with ``batch_sampling="split"`` (the halves of a shuffled set)."""
    half = layer_logits.shape[0] // 2
    if half < 2:
        raise UserInputError("calibration needs at least 4 labelled eval examples")
    first_labels, second_labels = (None, None) if labels is None else (labels[:half], labels[half:])
    chosen = choose_setting(templates, layer_logits[:half], first_labels, metric_fn, main_metric, target_speedup,
                            max_metric_drop, iterations, delta=delta, risk=risk, tolerance=tolerance, steps=steps,
                            batch_size=batch_size, batch_sampling=batch_sampling)
    second_metric_fn = metric_fn if labels is not None else None
    held_out = score_policy(chosen.policy, layer_logits[half:], second_labels, second_metric_fn)
    held_out_risk = None
    if chosen.certificate is not None:
        full = score_policy(BudgetExit(layer=layer_logits.shape[1]), layer_logits[half:], None, None)
        held_out_risk = float(example_losses(risk, held_out.predictions, full.predictions, second_labels,
                                             tolerance).mean())
    return HeldOutCalibration(chosen, held_out, held_out_risk)


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
