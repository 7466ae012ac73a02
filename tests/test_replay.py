"""Offline replay engine: scores, speed-ups, sweeps, calibration, online comparison, Pareto front and plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multiexit.errors import UserInputError
from multiexit.policies import (
    POLICIES,
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    replay,
)
from multiexit.replay import (
    POINT_ESTIMATE,
    calibrate,
    calibrate_held_out,
    choose_setting,
    compare_with_online,
    curves_from_scores,
    default_grid,
    pareto_front,
    per_layer_scores,
    plot_score_vs_speedup,
    score_policy,
    sweep,
)

NUM_LAYERS, NUM_LABELS = 6, 3


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"acc": float((predictions == labels).mean())}


def neg_mse(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"neg_mse": -float(((predictions - labels) ** 2).mean())}


@pytest.fixture(scope="module")
def cache() -> tuple[torch.Tensor, np.ndarray]:
    """Synthetic cached logits [N, L, C] whose confidence and accuracy grow with depth, with per-example difficulty,
    so that every policy spreads its exits over the layers."""
    generator = torch.Generator().manual_seed(1234)
    n = 240
    labels = torch.randint(0, NUM_LABELS, (n,), generator=generator)
    ease = torch.rand(n, 1, generator=generator) * 2.5  # per-example difficulty
    depth = torch.arange(1, NUM_LAYERS + 1, dtype=torch.float32)[None] / NUM_LAYERS
    signal = (ease * depth * 3.0)[..., None] * torch.nn.functional.one_hot(labels, NUM_LABELS)[:, None].float()
    noise = torch.randn(n, NUM_LAYERS, NUM_LABELS, generator=generator) * 1.2
    return signal + noise, labels.numpy()


# --------------------------------------------------------------------------------------------------------------------
# score_policy, per_layer_scores, sweep
# --------------------------------------------------------------------------------------------------------------------


def test_score_policy_on_hand_example() -> None:
    # 4 examples, 4 layers, deebert(threshold 0.2): confident layers (0.98/0.01/0.01) marked C
    conf = {0: [0.98, 0.01, 0.01], 1: [0.01, 0.98, 0.01], 2: [0.01, 0.01, 0.98]}
    flat = [0.34, 0.33, 0.33]
    rows = [
        [conf[0], flat, flat, flat],  # exits at 1 answering 0
        [flat, conf[1], flat, flat],  # exits at 2 answering 1
        [flat, flat, flat, conf[2]],  # runs to 4, answers 2
        [flat, flat, flat, flat],  # runs to 4, answers 0 (first of the tie at .33/.33 after .34)
    ]
    layer_logits = torch.tensor(rows, dtype=torch.float64).log().float()
    labels = np.array([0, 2, 2, 1])
    score = score_policy(EntropyExit(threshold=0.2), layer_logits, labels, accuracy)
    assert score.exit_layers.tolist() == [1, 2, 4, 4]
    assert score.predictions.tolist() == [0, 1, 2, 0]
    assert score.metrics == {"acc": 0.5}  # examples 0 and 2 right
    assert score.num_examples == 4 and score.num_layers == 4
    assert score.avg_exit_layer == 2.75
    assert score.speedup == 4 / 2.75
    assert score.layer_saving == 1 - 2.75 / 4
    summary = score.summary()
    assert summary["policy"] == "deebert" and summary["params"] == {"threshold": 0.2}
    assert summary["speedup"] == score.speedup and summary["layer_saving"] == score.layer_saving
    # without labels or metric function: no metrics, same exits
    assert score_policy(EntropyExit(threshold=0.2), layer_logits, None, accuracy).metrics == {}
    assert score_policy(EntropyExit(threshold=0.2), layer_logits, labels, None).metrics == {}


def test_score_policy_validates_the_policy() -> None:
    layer_logits = torch.zeros(2, 3, 1)
    with pytest.raises(UserInputError, match="does not support regression"):
        score_policy(EntropyExit(threshold=0.1), layer_logits, None, None)  # regression
    with pytest.raises(UserInputError, match="the model has only 3 layers"):
        score_policy(BudgetExit(layer=4), torch.zeros(2, 3, 2), None, None)  # deeper than the model


def test_speedup_definitions(cache) -> None:
    layer_logits, labels = cache
    for policy in (PatienceExit(patience=2), EntropyExit(threshold=0.5), PCEEExit(patience=2, tau=0.6)):
        score = score_policy(policy, layer_logits, labels, accuracy)
        mean_layer = score.exit_layers.mean()
        assert score.speedup == NUM_LAYERS / mean_layer
        assert score.layer_saving == 1 - mean_layer / NUM_LAYERS
        assert 1.0 <= score.speedup <= NUM_LAYERS
        assert score.metrics["acc"] == float((score.predictions == labels).mean())


def test_regression_predictions_are_values() -> None:
    layer_logits = torch.tensor([[[0.5], [1.0], [1.02]], [[2.0], [3.0], [4.0]]])
    score = score_policy(
        PatienceExit(patience=1, regression_threshold=0.1), layer_logits, np.array([1.0, 4.0]), neg_mse
    )
    assert score.exit_layers.tolist() == [3, 3]
    assert score.predictions.dtype.kind == "f" and score.predictions.tolist() == pytest.approx([1.02, 4.0])
    assert score.metrics["neg_mse"] == pytest.approx(-(0.02**2) / 2, abs=1e-8)  # float32 logits


def test_per_layer_scores_equal_budget_scores(cache) -> None:
    layer_logits, labels = cache
    per_layer = per_layer_scores(layer_logits, labels, accuracy)
    assert len(per_layer) == NUM_LAYERS
    for k, score in enumerate(per_layer, start=1):
        budget = score_policy(BudgetExit(layer=k), layer_logits, labels, accuracy)
        assert score.policy == BudgetExit(layer=k)
        assert score.metrics == budget.metrics
        assert (score.exit_layers == k).all() and score.speedup == NUM_LAYERS / k
        np.testing.assert_array_equal(score.predictions, layer_logits[:, k - 1].argmax(-1).numpy())
    # the synthetic cache gets more accurate with depth
    assert per_layer[-1].metrics["acc"] > per_layer[0].metrics["acc"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sweep_over_default_grid(cache, name: str) -> None:
    layer_logits, labels = cache
    grid = default_grid(name, NUM_LAYERS, NUM_LABELS)
    assert grid and all(p.name == name for p in grid)
    scores = sweep(grid, layer_logits, labels, accuracy, progress=False)
    assert [s.policy for s in scores] == grid
    for policy, score in zip(grid, scores):
        assert 1.0 <= score.speedup <= NUM_LAYERS and 0.0 <= score.metrics["acc"] <= 1.0
        assert np.array_equal(score.exit_layers, replay(policy, layer_logits).exit_layer.numpy())
    # the grid spans a range of speed-ups
    assert max(s.speedup for s in scores) > min(s.speedup for s in scores)


def test_default_grid_regression_and_unknown() -> None:
    assert len(default_grid("budget", 4, 1)) == 4
    pabee = default_grid("pabee", 4, 1)
    assert pabee and all(p.regression_threshold and p.regression_threshold > 0 for p in pabee)
    for name in ("deebert", "maxprob", "pcee", "elbert"):
        assert default_grid(name, 4, 1) == []
    layer_logits = torch.randn(10, 4, 1, generator=torch.Generator().manual_seed(0))
    scores = sweep(default_grid("pabee", 4, 1) + default_grid("budget", 4, 1), layer_logits, None, None, False)
    assert all(1 <= s.avg_exit_layer <= 4 for s in scores)
    with pytest.raises(UserInputError, match="no default grid for policy 'fastest'"):
        default_grid("fastest", 4, 3)


# --------------------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------------------

# template, knob name, +1 if raising the knob makes exits earlier, -1 otherwise
KNOB_TEMPLATES = [
    (EntropyExit(threshold=0.3), "threshold", +1),
    (MaxProbExit(threshold=0.9), "threshold", -1),
    (PCEEExit(patience=2, tau=0.5), "tau", +1),
    (PCEEExit(patience=1, tau=0.5, ensemble="pcee"), "tau", +1),
    (ELBERTExit(delta=0.5, window=3, criterion="same"), "delta", +1),
    (ELBERTExit(delta=0.5, window=2, criterion="monotonic"), "delta", +1),
]


def _ends(template, knob: str, direction: int, layer_logits: torch.Tensor) -> tuple[float, float]:
    """Speed-ups at the full-depth end and at the most aggressive end of the knob."""
    high = math.log(NUM_LABELS) + 1e-6 if template.name == "deebert" else 1.0
    low_value, high_value = (0.0, high) if direction > 0 else (1.0, 0.0)
    params = template.params()
    slow = score_policy(type(template)(**{**params, knob: low_value}), layer_logits, None, None).speedup
    fast = score_policy(type(template)(**{**params, knob: high_value}), layer_logits, None, None).speedup
    return slow, fast


@pytest.mark.parametrize(
    ("template", "knob", "direction"), KNOB_TEMPLATES, ids=[t.label() for t, _, _ in KNOB_TEMPLATES]
)
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_calibrate_target_speedup_is_least_aggressive(cache, template, knob, direction, fraction) -> None:
    layer_logits, labels = cache
    slow, fast = _ends(template, knob, direction, layer_logits)
    assert slow < fast
    target = slow + fraction * (fast - slow)
    result = calibrate(template, layer_logits, labels, accuracy, "acc", target_speedup=target)
    assert result.reached_target
    assert result.calibration_score.speedup >= target
    assert type(result.policy) is type(template)
    # the other parameters of the template are kept
    kept = {k: v for k, v in template.params().items() if k != knob}
    assert {k: v for k, v in result.policy.params().items() if k != knob} == kept
    # a slightly less aggressive knob misses the target
    value = result.policy.params()[knob]
    less = type(template)(**{**result.policy.params(), knob: value - direction * 1e-6})
    assert score_policy(less, layer_logits, labels, accuracy).speedup < target
    # the reference is the full-depth metric
    assert (
        result.reference_metric
        == score_policy(BudgetExit(layer=NUM_LAYERS), layer_logits, labels, accuracy).metrics["acc"]
    )
    assert (
        result.calibration_score.metrics["acc"]
        == score_policy(result.policy, layer_logits, labels, accuracy).metrics["acc"]
    )


def test_calibrate_pcee_maxprob_template(cache) -> None:
    layer_logits, labels = cache
    result = calibrate(PCEEExit(patience=2, maxprob=0.9), layer_logits, labels, accuracy, "acc", target_speedup=2.0)
    assert result.reached_target and result.policy.maxprob is not None and result.policy.tau is None


@pytest.mark.parametrize("template", [PatienceExit(patience=3), BudgetExit(layer=6)], ids=lambda p: p.name)
def test_calibrate_target_speedup_integer_knob(cache, template) -> None:
    layer_logits, labels = cache
    grid = sweep(default_grid(template.name, NUM_LAYERS, NUM_LABELS), layer_logits, labels, accuracy, False)
    speedups = sorted({s.speedup for s in grid})
    assert len(speedups) >= 3
    for target in (speedups[1] - 1e-3, speedups[1], speedups[-1]):
        result = calibrate(template, layer_logits, labels, accuracy, "acc", target_speedup=target)
        assert result.reached_target and result.calibration_score.speedup >= target
        assert result.calibration_score.speedup == speedups[1 if target <= speedups[1] else -1]  # least aggressive


# a drop as the point estimate (risk="empirical") measures it, on the calibration examples themselves; the certified
# drop is tested in tests/test_certified_calibration.py
@pytest.mark.parametrize(
    "template",
    [t for t, _, _ in KNOB_TEMPLATES] + [PatienceExit(patience=3), BudgetExit(layer=6)],
    ids=lambda p: p.label(),
)
@pytest.mark.parametrize("drop", [0.0, 0.03, 0.1])
def test_calibrate_max_metric_drop(cache, template, drop: float) -> None:
    layer_logits, labels = cache
    result = calibrate(template, layer_logits, labels, accuracy, "acc", max_metric_drop=drop, risk=POINT_ESTIMATE)
    reference = score_policy(BudgetExit(layer=NUM_LAYERS), layer_logits, labels, accuracy).metrics["acc"]
    assert result.reference_metric == reference
    if template.name == "elbert":
        # ELBERT's stage 2 exits whatever delta is, so even delta = 0 may lose more than the drop
        slowest = score_policy(type(template)(**{**template.params(), "delta": 0.0}), layer_logits, labels, accuracy)
        assert result.reached_target == (slowest.metrics["acc"] >= reference - drop)
    else:
        assert result.reached_target  # the full-depth end of every other knob meets any drop >= 0
    if result.reached_target:
        assert result.calibration_score.metrics["acc"] >= reference - drop - 1e-12
    else:
        assert result.calibration_score.metrics["acc"] < reference - drop
    assert result.calibration_score.speedup >= 1.0


def test_calibrate_max_metric_drop_buys_speed(cache) -> None:
    layer_logits, labels = cache
    tight = calibrate(EntropyExit(threshold=0.1), layer_logits, labels, accuracy, "acc", max_metric_drop=0.0,
                      risk=POINT_ESTIMATE)
    loose = calibrate(EntropyExit(threshold=0.1), layer_logits, labels, accuracy, "acc", max_metric_drop=0.2,
                      risk=POINT_ESTIMATE)
    assert loose.calibration_score.speedup > 1.0
    assert loose.calibration_score.speedup >= tight.calibration_score.speedup


@pytest.mark.parametrize(
    "template",
    [t for t, _, _ in KNOB_TEMPLATES] + [PatienceExit(patience=3), BudgetExit(layer=6)],
    ids=lambda p: p.label(),
)
def test_calibrate_unreachable_targets(cache, template) -> None:
    layer_logits, labels = cache
    too_fast = calibrate(template, layer_logits, labels, accuracy, "acc", target_speedup=NUM_LAYERS + 1.0)
    assert too_fast.reached_target is False
    assert too_fast.calibration_score.speedup < NUM_LAYERS + 1.0
    too_good = calibrate(template, layer_logits, labels, accuracy, "acc", max_metric_drop=-0.5, risk=POINT_ESTIMATE)
    assert too_good.reached_target is False


def test_calibrate_rejects_bad_requests(cache) -> None:
    layer_logits, labels = cache
    with pytest.raises(UserInputError, match="exactly one of a target speed-up or a maximum metric drop"):
        calibrate(EntropyExit(threshold=0.1), layer_logits, labels, accuracy, "acc")
    with pytest.raises(UserInputError, match="exactly one of a target speed-up or a maximum metric drop"):
        calibrate(
            EntropyExit(threshold=0.1), layer_logits, labels, accuracy, "acc", target_speedup=2.0, max_metric_drop=0.1
        )
    with pytest.raises(UserInputError, match="target speed-up must be >= 1, got 0.5"):
        calibrate(EntropyExit(threshold=0.1), layer_logits, labels, accuracy, "acc", target_speedup=0.5)


def _two_halves(first_half_max_prob: float, second_half_max_prob: float, per_half: int):  # noqa: ANN202
    """Cached logits whose layer-1 max-prob is one value on the first half of the examples and another on the
    second (binary task, 4 layers, the deeper layers sure and right); layer 1 is right on the first half only."""
    half_labels = np.array([0, 1] * per_half)[:per_half]

    def rows(max_prob: float, right: bool) -> torch.Tensor:
        margin = math.log(max_prob / (1 - max_prob))
        layer_1 = torch.tensor([[margin, 0.0] if (label == 0) == right else [0.0, margin] for label in half_labels])
        deep = torch.tensor([[9.0, 0.0] if label == 0 else [0.0, 9.0] for label in half_labels])
        return torch.stack([layer_1, deep, deep, deep], dim=1)

    layer_logits = torch.cat([rows(first_half_max_prob, True), rows(second_half_max_prob, False)])
    return layer_logits, np.tile(half_labels, 2)


def test_calibrate_held_out_chooses_on_the_first_half_and_scores_on_the_second() -> None:
    layer_logits, labels = _two_halves(0.9, 0.6, per_half=10)
    result = calibrate_held_out([MaxProbExit(threshold=0.5)], layer_logits, labels, accuracy, "acc", target_speedup=4.0)
    chosen = result.calibration
    # the first half alone decides: every example there exits at layer 1 (speed-up 4, all right) with the least
    # aggressive threshold that still lets them, just under their 0.9
    assert chosen.reached_target and chosen.calibration_score.num_examples == 10
    assert chosen.calibration_score.speedup == pytest.approx(4.0) and chosen.calibration_score.metrics["acc"] == 1.0
    assert 0.6 < chosen.policy.threshold <= 0.9 + 1e-6  # 0.9 as float32 softmax computes it
    # the second half, never seen by the choice, is scored as it is: 0.6 < threshold, so nothing exits at layer 1
    held_out = result.held_out
    assert held_out.policy == chosen.policy and held_out.num_examples == 10
    np.testing.assert_array_equal(held_out.exit_layers, np.full(10, 2))
    assert held_out.speedup == pytest.approx(2.0) and held_out.metrics["acc"] == 1.0
    # choosing on the whole set would have given another setting: the halves were not pooled
    pooled = choose_setting([MaxProbExit(threshold=0.5)], layer_logits, labels, accuracy, "acc", target_speedup=4.0)
    assert pooled.policy.threshold <= 0.6


def test_calibrate_held_out_splits_an_odd_set_and_refuses_a_tiny_one() -> None:
    layer_logits, labels = _two_halves(0.9, 0.6, per_half=5)
    layer_logits, labels = torch.cat([layer_logits, layer_logits[:1]]), np.append(labels, labels[0])  # 11 examples
    result = calibrate_held_out([MaxProbExit(threshold=0.5)], layer_logits, labels, accuracy, "acc", target_speedup=4.0)
    assert result.calibration.calibration_score.num_examples == 5 and result.held_out.num_examples == 6
    with pytest.raises(UserInputError, match="at least 4 labelled eval examples"):
        calibrate_held_out([MaxProbExit(threshold=0.5)], layer_logits[:3], labels[:3], accuracy, "acc",
                           target_speedup=2.0)


# --------------------------------------------------------------------------------------------------------------------
# online comparison, Pareto front, plot
# --------------------------------------------------------------------------------------------------------------------


def test_compare_with_online_finds_planted_mismatches(cache) -> None:
    layer_logits, labels = cache
    score = score_policy(PatienceExit(patience=2), layer_logits, labels, accuracy)
    assert compare_with_online(score, score.exit_layers.copy(), score.predictions.copy()) == []
    layers, predictions = score.exit_layers.copy(), score.predictions.copy()
    layers[3] = layers[3] % NUM_LAYERS + 1
    predictions[7] = (predictions[7] + 1) % NUM_LABELS
    layers[11] = layers[11] % NUM_LAYERS + 1
    predictions[11] = (predictions[11] + 1) % NUM_LABELS
    assert compare_with_online(score, layers, predictions) == [3, 7, 11]
    with pytest.raises(ValueError, match=r"online has (\d+) examples, replay (?!\1)\d+"):
        compare_with_online(score, layers[:-1], predictions[:-1])


def test_compare_with_online_regression_tolerance() -> None:
    layer_logits = torch.tensor([[[0.5], [1.0]], [[2.0], [3.0]], [[1.0], [1.0]]])
    score = score_policy(BudgetExit(layer=2), layer_logits, None, None)
    layers = np.array([2, 2, 2])
    assert compare_with_online(score, layers, np.array([1.0 + 1e-6, 3.0, 1.0])) == []
    assert compare_with_online(score, layers, np.array([1.0, 3.01, 1.0])) == [1]
    assert compare_with_online(score, layers, np.array([1.0, 3.01, 1.0]), atol=0.1) == []


def test_pareto_front_hand_example() -> None:
    points = [(1.0, 0.9), (2.0, 0.85), (2.0, 0.8), (1.5, 0.7), (3.0, 0.6), (3.0, 0.6), (2.5, 0.85), (1.2, 0.88)]
    # (2.0, .85) is beaten by (2.5, .85); (1.5, .7) by (2.0, .85); the duplicate (3, .6) is kept once
    assert pareto_front(points) == [(1.0, 0.9), (1.2, 0.88), (2.5, 0.85), (3.0, 0.6)]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [(1.0, 0.5)]


def test_plot_writes_png(cache, tmp_path) -> None:
    layer_logits, labels = cache
    policies = default_grid("budget", NUM_LAYERS, NUM_LABELS) + default_grid("deebert", NUM_LAYERS, NUM_LABELS)
    policies += default_grid("pabee", NUM_LAYERS, NUM_LABELS)
    scores = sweep(policies, layer_logits, labels, accuracy, progress=False)
    path = tmp_path / "score_vs_speedup.png"
    plot_score_vs_speedup(curves_from_scores(scores, "acc"), str(path), "acc (×100)", title="synthetic")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
