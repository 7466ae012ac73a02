"""Certified calibration (Learn then Test's fixed-sequence testing, multiexit.replay.certify): its bounds are the exact
binomial tests, its sequences are the declared knob orders, and on synthetic logits whose true risk is known the chosen
setting's risk exceeds ε in at most a fraction δ of independent calibration sets (within binomial slack), where the
point estimate breaks it far more often. The runner's --calibrate_max_drop records the certified setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import beta, betabinom, binom, hypergeom
from tiny_runs import load_script, make_tiny_model, read_records, run_main, write_sst2

from multiexit.errors import UserInputError
from multiexit.policies import POLICIES, BudgetExit, EntropyExit, PatienceExit, PCEEExit
from multiexit.replay import (
    POINT_ESTIMATE,
    batch_upper_bound,
    calibrate,
    calibrate_held_out,
    certification_sequence,
    certification_sequences,
    certify,
    check_risk_request,
    example_losses,
    examples_needed,
    fixed_sequence_end,
    most_aggressive,
    risk_upper_bound,
    score_policy,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
ROOT = Path(__file__).resolve().parents[1]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"acc": float((predictions == labels).mean())}


# --------------------------------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------------------------------


def test_disagreement_bound_is_the_exact_binomial_test() -> None:
    """bound <= ε exactly when the binomial p-value P(Bin(n, ε) <= k) is <= the level; the bound is Clopper-Pearson."""
    for n in (20, 137, 436):
        k = np.arange(0, 12)
        bound = risk_upper_bound("disagreement", k, 0, n, 0.1)
        np.testing.assert_allclose(bound, beta.ppf(0.9, k + 1, n - k))
        for epsilon in (0.005, 0.01, 0.02, 0.05, 0.2):
            np.testing.assert_array_equal(bound <= epsilon, binom.cdf(k, n, epsilon) <= 0.1)
    assert risk_upper_bound("disagreement", 5, 0, 5, 0.1) == 1.0  # every example lost


def test_metric_bound_splits_the_level_between_losses_and_wins() -> None:
    """Risk metric: P(loss 1) from above and P(loss −1) from below, each at level / 2; wins can pull it under the
    disagreement bound, and it is never below the observed drop's worst case without wins."""
    worse, better, n = np.array([0, 3, 3, 10]), np.array([0, 0, 6, 10]), 400
    bound = risk_upper_bound("metric", worse, better, n, 0.1)
    lower = np.where(better > 0, beta.ppf(0.05, np.maximum(better, 1), n - better + 1), 0.0)
    np.testing.assert_allclose(bound, beta.ppf(0.95, worse + 1, n - worse) - lower)
    assert bound[2] < bound[1]  # three examples won back lower the bound
    assert bound[1] > risk_upper_bound("disagreement", 3, 0, n, 0.1)  # the split level costs a little without wins


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    bounds = np.array([[0.001, 0.004, 0.02, 0.001],  # the last setting passes, but the sequence stopped before it
                       [0.02, 0.001, 0.001, 0.001],
                       [0.001, 0.002, 0.003, 0.004]])
    np.testing.assert_array_equal(fixed_sequence_end(bounds, 0.01), [1, -1, 3])


def test_most_aggressive_takes_the_lowest_mean_exit_layer_among_the_certified() -> None:
    ends = np.array([[2, 1], [-1, 0], [-1, -1], [0, 1]])
    means = [np.array([[6, 5, 4]] * 4), np.array([[6, 4.5]] * 4)]
    sequence, setting = most_aggressive(ends, means)
    np.testing.assert_array_equal(sequence, [0, 1, -1, 1])
    np.testing.assert_array_equal(setting, [2, 0, -1, 1])


def test_examples_needed_without_loss_is_the_closed_form() -> None:
    for epsilon, level in ((0.01, 0.1), (0.005, 0.05), (0.02, 0.1 / 3)):
        needed = examples_needed("disagreement", 0.0, 0.0, epsilon, level)
        assert needed == math.ceil(math.log(level) / math.log(1 - epsilon))
        assert risk_upper_bound("disagreement", 0, 0, needed, level) <= epsilon
        assert risk_upper_bound("disagreement", 0, 0, needed - 1, level) > epsilon
    assert examples_needed("metric", 0.0, 0.0, 0.01, 0.1) == math.ceil(math.log(0.05) / math.log(0.99))
    assert examples_needed("disagreement", 0.02, 0.0, 0.01, 0.1) is None  # observed above ε: no n helps
    at_half = examples_needed("disagreement", 0.005, 0.0, 0.01, 0.1)
    assert risk_upper_bound("disagreement", round(0.005 * at_half), 0, at_half, 0.1) <= 0.01


def test_sequences_follow_the_declared_knobs_from_the_safest_end() -> None:
    assert [p.layer for p in certification_sequence(BudgetExit(layer=1), 6, 2)] == [6, 5, 4, 3, 2, 1]
    assert [p.patience for p in certification_sequence(PatienceExit(patience=1), 6, 2)] == [5, 4, 3, 2, 1]
    thresholds = [p.threshold for p in certification_sequence(EntropyExit(threshold=0.3), 6, 3, steps=10)]
    assert len(thresholds) == 11 and thresholds[0] == 0.0 and thresholds == sorted(thresholds)
    assert thresholds[-1] == pytest.approx(math.log(3) + 1e-6)
    maxprob = [p.threshold for p in certification_sequence(POLICIES["maxprob"](threshold=0.9), 6, 2, steps=4)]
    assert maxprob == [1.0, 0.75, 0.5, 0.25, 0.0]  # faster when lower: from 1 down
    # templates that differ only in the knob are one sequence; PCEE's patiences are three (δ is split three ways)
    assert len(certification_sequences([EntropyExit(threshold=0.1), EntropyExit(threshold=0.5)], 6, 2)) == 1
    pcee = certification_sequences(PCEEExit.calibration_templates(6, 2), 6, 2)
    assert [sequence[0].patience for sequence in pcee] == [1, 2, 3]
    assert all(p.tau == 0.0 for p in (sequence[0] for sequence in pcee))


def test_requests_that_cannot_be_certified_are_refused() -> None:
    with pytest.raises(UserInputError, match="'f1' is not one: certify risk 'disagreement'"):
        check_risk_request("metric", 0.01, 0.1, "f1", 2)
    with pytest.raises(UserInputError, match="'mcc' is not one"):
        check_risk_request("metric", 0.01, 0.1, "mcc", 2)
    with pytest.raises(UserInputError, match="'pearson' is not one"):
        check_risk_request("metric", 0.01, 0.1, "pearson", 1)
    with pytest.raises(UserInputError, match="needs labels"):
        check_risk_request("metric", 0.01, 0.1, "acc", 2, has_labels=False)
    with pytest.raises(UserInputError, match="regression task needs a tolerance > 0"):
        check_risk_request("disagreement", 0.01, 0.1, "pearson", 1)
    with pytest.raises(UserInputError, match=r"no number of examples certifies a risk of 0"):
        check_risk_request("disagreement", 0.0, 0.1, "acc", 2)
    with pytest.raises(UserInputError, match=r"delta, .* is in \(0, 1\)"):
        check_risk_request("disagreement", 0.01, 1.0, "acc", 2)
    with pytest.raises(UserInputError, match="risk must be one of disagreement, metric"):
        check_risk_request("accuracy", 0.01, 0.1, "acc", 2)
    check_risk_request("disagreement", 0.01, 0.1, "pearson", 1, tolerance=0.5)
    check_risk_request("disagreement", 0.01, 0.1, "f1", 2, has_labels=False)  # disagreement needs no labels


@pytest.mark.slow
def test_batch_tests_are_their_stated_p_values() -> None:
    """The i.i.d. batch test's p-value is the binomial p-value P(Bin(n, r) <= k) averaged over r ~ Beta(a + 1, m − a)
    (the law whose CDF is P(Bin(m, r) > a)), which is the beta-binomial and the hypergeometric CDF of the docs; the
    split test's is P(Hypergeometric(n + m, a + 1, n) <= k); the bound is the smallest batch loss a / m that passes.
    The i.i.d. test passes whenever the δ-split construction (population risk <= ε_pop at δ₁, the batch's binomial
    tail at ε_pop <= δ₂) does, for every split: it is that construction integrated over all of them."""
    from scipy.integrate import quad

    for n, m, level in ((436, 436, 0.1), (2000, 100, 0.05), (138, 139, 0.1 / 3)):
        counts = np.arange(0, 12)
        iid = risk_upper_bound("disagreement", counts, 0, n, level, batch_size=m, batch_sampling="iid")
        split = risk_upper_bound("disagreement", counts, 0, n, level, batch_size=m, batch_sampling="split")
        np.testing.assert_array_equal(iid, batch_upper_bound(counts, n, m, level))
        assert np.all(np.diff(iid) >= 0) and np.all(split >= iid)  # more losses, a higher bound; split is stricter
        for allowed in (0, 2, 5, 9):
            epsilon = allowed / m
            for k in (0, 1, 3, 6):
                p_value = hypergeom.cdf(k, n + m, n, allowed + k + 1)
                layer_cake = quad(lambda r, k, n, a, m: binom.cdf(k, n, r) * beta.pdf(r, a + 1, m - a), 0, 1,
                                  args=(k, n, allowed, m), points=[allowed / m], limit=200)[0]
                assert p_value == pytest.approx(layer_cake, abs=1e-7)
                assert p_value == pytest.approx(betabinom.cdf(k, n, allowed + 1, m - allowed), abs=1e-9)
                assert (iid[k] <= epsilon) == (p_value <= level)
                assert (split[k] <= epsilon) == (hypergeom.cdf(k, n + m, n, allowed + 1) <= level)
                for population_share in (0.2, 0.5, 0.8):  # δ₁ = share × level, δ₂ = the rest
                    population_risk = beta.ppf(level * (1 - population_share), allowed + 1, m - allowed)
                    if binom.cdf(k, n, population_risk) <= level * population_share:
                        assert iid[k] <= epsilon
    assert batch_upper_bound(np.array([100]), 100, 10, 0.1) == 1.0  # every example lost: only a = m passes


def test_the_accuracy_drop_of_a_batch_is_certified_through_its_lost_examples() -> None:
    """risk 'metric' with a batch size tests the examples lost (full depth right, this setting wrong): examples won
    back do not move the bound, and the bound is the 0/1 test's of the lost count."""
    worse, n, m = np.array([0, 2, 5]), 400, 400
    for better in (0, 7):
        np.testing.assert_array_equal(risk_upper_bound("metric", worse, better, n, 0.1, batch_size=m),
                                      risk_upper_bound("disagreement", worse, 0, n, 0.1, batch_size=m))
    assert examples_needed("metric", 0.02, 0.015, 0.01, 0.1, batch_size=m) is None  # lost 2 %: wins do not help
    assert examples_needed("metric", 0.02, 0.015, 0.01, 0.1) is not None  # the population risk is 0.5 %


def test_batch_requests_are_checked() -> None:
    with pytest.raises(UserInputError, match="batch size is a whole number of examples >= 1, got 0"):
        check_risk_request("disagreement", 0.01, 0.1, "acc", 2, batch_size=0)
    with pytest.raises(UserInputError, match="batch size is a whole number of examples >= 1, got 2.5"):
        check_risk_request("disagreement", 0.01, 0.1, "acc", 2, batch_size=2.5)
    with pytest.raises(UserInputError, match="batch sampling must be one of iid, split, got 'new'"):
        check_risk_request("disagreement", 0.01, 0.1, "acc", 2, batch_size=10, batch_sampling="new")
    with pytest.raises(UserInputError, match="risk 'empirical' .* certifies nothing"):
        check_risk_request(POINT_ESTIMATE, 0.01, 0.1, "acc", 2, batch_size=10)
    check_risk_request("metric", 0.01, 0.1, "acc", 2, batch_size=np.int64(10), batch_sampling="split")


def nested_counts(rng: np.random.Generator, trials: int, size: int, risks: np.ndarray) -> np.ndarray:
    """Loss counts [trials, G] of ``size`` i.i.d. examples under G settings of increasing ``risks`` whose losses are
    nested (an example lost by a setting is lost by every later one), as along a fine knob: the chain in which the
    i.i.d. batch test's bound is reached."""
    cells = rng.multinomial(size, np.diff(np.concatenate([[0.0], risks, [1.0]])), size=trials)
    return np.cumsum(cells[:, :-1], axis=1)


def certified_ends(counts: np.ndarray, n: int, epsilon: float, delta: float, **batch: object) -> np.ndarray:
    """Per trial, the last setting that fixed-sequence testing certifies from its calibration counts [trials, G]."""
    bounds = risk_upper_bound("disagreement", np.arange(n + 1), 0, n, delta, **batch)  # once per possible count
    return fixed_sequence_end(bounds[counts], epsilon)


def test_batch_certificate_holds_on_new_iid_batches() -> None:
    """The i.i.d. batch certificate's guarantee on independent calibration sets and batches: the certified setting
    (here the last of a fine chain of nested settings, the most aggressive) loses more than ε of a new batch of m
    examples in at most a fraction δ of 4000 trials, within binomial slack. The population certificate, whose promise
    is the expected loss, breaks the batch in about a quarter of them (n = 2000 calibration examples, m = 100)."""
    rng = np.random.default_rng(32)
    trials, n, m, epsilon, delta = 4000, 2000, 100, 0.03, 0.1
    risks = np.linspace(0.0, 0.06, 121)
    calibration, batch = nested_counts(rng, trials, n, risks), nested_counts(rng, trials, m, risks)
    rows = np.arange(trials)
    broken = {}
    for name, options in (("population", {}), ("batch", {"batch_size": m, "batch_sampling": "iid"})):
        ends = certified_ends(calibration, n, epsilon, delta, **options)
        broken[name] = int(((ends >= 0) & (batch[rows, np.maximum(ends, 0)] > epsilon * m)).sum())
        assert np.mean(ends > 0) > 0.9, name  # not vacuous: a setting beyond the safest is certified
    assert broken["batch"] <= binom.ppf(0.999, trials, delta), broken
    assert broken["population"] >= 2 * delta * trials, broken


def split_counts(rng: np.random.Generator, trials: int, pool_losses: list[np.ndarray], n: int, m: int) -> np.ndarray:
    """Per trial, a uniformly random calibration subset of n of a fixed pool's n + m examples, and each setting's
    losses in it: [trials, G] from the settings' lost example indices."""
    calibration = np.argsort(rng.random((trials, n + m)), axis=1) < n
    return np.stack([calibration[:, losses].sum(axis=1) for losses in pool_losses], axis=1)


def test_split_batch_certificate_holds_on_every_split_of_a_fixed_set() -> None:
    """The study's and the runner's protocol: one fixed set, calibration on a random part, the batch = the rest.
    Given the set, the split test's guarantee holds for any settings: on a chain of nested settings, and on a chain
    built against the i.i.d. test (100 disjoint pairs of lost examples, m = 20 of 220: the i.i.d. test certifies
    every pair, and some pair falls wholly in the batch in about half the splits) no certified setting loses more
    than ε of the batch in more than a fraction δ of 4000 splits, within binomial slack."""
    rng = np.random.default_rng(33)
    trials, delta = 4000, 0.1
    nested = [np.arange(int(risk * 800)) for risk in np.linspace(0.0, 0.06, 121)]
    pairs = [np.array([2 * j, 2 * j + 1]) for j in range(100)]
    for pool_losses, n, m, epsilon, iid_breaks in ((nested, 400, 400, 0.02, False), (pairs, 200, 20, 0.05, True)):
        calibration = split_counts(rng, trials, pool_losses, n, m)
        batch = np.array([len(losses) for losses in pool_losses])[None, :] - calibration
        for sampling in ("split", "iid"):
            ends = certified_ends(calibration, n, epsilon, delta, batch_size=m, batch_sampling=sampling)
            certified = np.arange(len(pool_losses))[None, :] <= ends[:, None]
            broken = int((certified & (batch > epsilon * m)).any(axis=1).sum())
            if sampling == "split":
                assert broken <= binom.ppf(0.999, trials, delta), (m, broken)
            elif iid_breaks:  # the i.i.d. test promises nothing given the set: here it breaks
                assert broken >= 3 * delta * trials, broken


# --------------------------------------------------------------------------------------------------------------------
# certify on logits
# --------------------------------------------------------------------------------------------------------------------


def layered_logits(rng: np.random.Generator, n: int, flip_rates: list[float]) -> tuple[torch.Tensor, np.ndarray]:
    """Binary [n, L, 2] logits whose last layer predicts class c and whose layer k predicts the other class with
    probability ``flip_rates[k]``, independently: budget(layer=k)'s disagreement with full depth is exactly that rate.
    Returns the logits and c."""
    final = rng.integers(0, 2, n)
    flips = rng.random((n, len(flip_rates))) < np.array(flip_rates)[None, :]
    predicted = np.where(flips, 1 - final[:, None], final[:, None])
    margin = rng.uniform(0.5, 4.0, (n, len(flip_rates)))
    logits = np.stack([np.where(predicted == 0, margin, 0.0), np.where(predicted == 1, margin, 0.0)], axis=-1)
    return torch.tensor(logits, dtype=torch.float32), final


# each budget(layer=k)'s true risk; the fixed sequence tests layers 6, 5, 4, ...: ε = 2 % lies between 5 and 4
TRUE_RISKS = [0.30, 0.10, 0.05, 0.021, 0.01, 0.0]


@pytest.mark.parametrize("risk", ["disagreement", "metric"])
def test_chosen_settings_exceed_epsilon_at_most_a_fraction_delta_of_the_time(risk: str) -> None:
    """The guarantee itself, on independent calibration sets of known risk: P(true risk of the answer > ε) <= δ,
    checked against the 99.9 % quantile of Binomial(trials, δ); the certificate is not vacuous (it often answers
    with layer 5, within ε); the point estimate breaks ε several times as often."""
    rng = np.random.default_rng(2024)
    epsilon, delta, trials, n = 0.02, 0.1, 150, 900
    # risk metric (the accuracy drop): full depth is right with probability 0.9, and a flipped answer loses an
    # example it had right or wins back one it had wrong, so budget(layer=k)'s risk is its flip rate × (0.9 − 0.1)
    right_at_full_depth = 1.0 if risk == "disagreement" else 0.9
    flip_rates = list(np.array(TRUE_RISKS) / (2 * right_at_full_depth - 1))
    certified_violations = estimate_violations = layer_5_or_faster = 0
    for _ in range(trials):
        logits, final = layered_logits(rng, n, flip_rates)
        labels = np.where(rng.random(n) < right_at_full_depth, final, 1 - final)
        result = certify([BudgetExit(layer=6)], logits, labels, accuracy, "acc", epsilon, delta, risk)
        certified_violations += TRUE_RISKS[result.policy.layer - 1] > epsilon
        layer_5_or_faster += result.policy.layer <= 5
        if risk == "disagreement":  # labels = full depth's answers: the accuracy drop is the disagreement
            estimate = calibrate(BudgetExit(layer=6), logits, final, accuracy, "acc", max_metric_drop=epsilon,
                                 risk=POINT_ESTIMATE)
            estimate_violations += TRUE_RISKS[estimate.policy.layer - 1] > epsilon
    assert certified_violations <= binom.ppf(0.999, trials, delta), certified_violations
    assert layer_5_or_faster >= trials // 4, layer_5_or_faster
    if risk == "disagreement":
        assert estimate_violations >= 3 * delta * trials, estimate_violations


def passes_by_hand(losses: int, n: int, epsilon: float, level: float, batch: dict) -> bool:
    """The test of one setting from its definition: the binomial p-value P(Bin(n, ε) <= k) (the population
    certificate), or a batch of m: the chance that at most k of the first a + k + 1 (i.i.d.) or a + 1 (split) of
    n + m exchangeable examples are calibration examples, a = ⌊ε m⌋ (docs/calibration.md)."""
    if not batch:
        return binom.cdf(losses, n, epsilon) <= level
    m = batch["batch_size"]
    allowed = math.floor(epsilon * m + 1e-9)
    draws = allowed + 1 + (losses if batch["batch_sampling"] == "iid" else 0)
    return allowed >= m or hypergeom.cdf(losses, n + m, n, draws) <= level


@pytest.mark.parametrize("batch", [{}, {"batch_size": None}, {"batch_size": 150, "batch_sampling": "iid"},
                                   {"batch_size": 150, "batch_sampling": "split"}], ids=str)
@pytest.mark.slow
def test_certify_is_fixed_sequence_testing_by_hand(batch: dict) -> None:
    """A continuous knob (DeeBERT, two-class entropy) and three PCEE templates: the answer is what the definition
    gives, computed here with the binomial p-value (or a batch certificate's hypergeometric one) and a loop that stops
    at the first failure. ``batch_size=None`` is the population certificate, the default."""
    batch = {key: value for key, value in batch.items() if value is not None}
    generator = torch.Generator().manual_seed(7)
    n, layers = 300, 4
    signal = torch.linspace(0.5, 4.0, layers)[None, :, None] * torch.tensor([1.0, -1.0])
    layer_logits = signal * torch.randn(n, 1, 1, generator=generator).sign() + torch.randn(n, layers, 2,
                                                                                              generator=generator)
    full = layer_logits[:, -1].argmax(-1).numpy()
    for templates, epsilon in (([EntropyExit(threshold=0.2)], 0.05), (PCEEExit.calibration_templates(layers, 2), 0.05),
                               ([EntropyExit(threshold=0.2)], 0.002)):
        sequences = certification_sequences(templates, layers, 2)
        level = 0.1 / len(sequences)
        best = None  # (mean exit layer, policy, disagreements)
        for sequence in sequences:
            for policy in sequence:
                score = score_policy(policy, layer_logits, None, None)
                disagreements = int((score.predictions != full).sum())
                if not passes_by_hand(disagreements, n, epsilon, level, batch):
                    break
                if best is None or score.avg_exit_layer < best[0]:
                    best = (score.avg_exit_layer, policy, disagreements)
        result = certify(templates, layer_logits, None, None, None, epsilon, **batch)
        certificate = result.certificate
        assert certificate.sequences == len(sequences) and certificate.level == pytest.approx(level)
        assert certificate.num_examples == n and certificate.delta == 0.1 and certificate.max_risk == epsilon
        assert certificate.batch_size == batch.get("batch_size")
        assert certificate.batch_sampling == batch.get("batch_sampling")
        if best is None:
            assert not certificate.certified and result.policy == BudgetExit(layer=layers)
            assert certificate.examples_needed_without_loss == examples_needed("disagreement", 0, 0, epsilon, level,
                                                                               **batch)
            assert certificate.examples_needed_without_loss > n
        else:
            assert certificate.certified and result.policy == best[1]
            assert certificate.observed_risk == best[2] / n
            assert certificate.bound <= epsilon
            if not batch:
                assert certificate.bound == pytest.approx(beta.ppf(1 - level, best[2] + 1, n - best[2]))
            else:  # the smallest allowance a whose test passes, as a fraction of the batch
                allowed = round(certificate.bound * batch["batch_size"])
                assert passes_by_hand(best[2], n, certificate.bound, level, batch)
                assert not passes_by_hand(best[2], n, (allowed - 1) / batch["batch_size"], level, batch)


def test_regression_disagreement_counts_answers_further_apart_than_the_tolerance() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 5, 400)
    noise = rng.normal(0, 1, (400, 4)) * np.array([1.0, 0.3, 0.05, 0.0])
    layer_logits = torch.tensor((truth[:, None] + noise)[..., None], dtype=torch.float32)
    templates = PatienceExit.calibration_templates(4, 1)
    result = certify(templates, layer_logits, None, None, None, 0.05, tolerance=0.25)
    assert result.certificate.sequences == len(templates)  # one per regression threshold
    full = layer_logits[:, -1, 0].numpy()
    losses = example_losses("disagreement", result.calibration_score.predictions, full, tolerance=0.25)
    assert losses.mean() == result.certificate.observed_risk
    assert np.array_equal(losses, np.abs(result.calibration_score.predictions - full) > 0.25)
    with pytest.raises(UserInputError, match="needs a tolerance"):
        certify(templates, layer_logits, None, None, None, 0.05)


def test_calibrate_held_out_certifies_on_the_first_half_without_labels() -> None:
    rng = np.random.default_rng(5)
    logits, final = layered_logits(rng, 1000, TRUE_RISKS)
    result = calibrate_held_out([BudgetExit(layer=6)], logits, None, None, None, max_metric_drop=0.02)
    certificate = result.calibration.certificate
    assert certificate.num_examples == 500 and result.held_out.num_examples == 500 and result.held_out.metrics == {}
    assert result.calibration.policy == certify([BudgetExit(layer=6)], logits[:500], None, None, None, 0.02).policy
    held_out_full = logits[500:, -1].argmax(-1).numpy()
    assert result.held_out_risk == float((result.held_out.predictions != held_out_full).mean())


# --------------------------------------------------------------------------------------------------------------------
# the study's batched replica and the runner
# --------------------------------------------------------------------------------------------------------------------


def test_the_study_scores_subsets_as_compute_metrics_does() -> None:
    analysis = load_script(ROOT / "scripts" / "analyze_results.py")
    from multiexit.data import compute_metrics, get_task

    rng = np.random.default_rng(11)
    masks = rng.random((6, 80)) < 0.5
    masks[0, :] = False
    masks[0, :3] = True  # a tiny subset, where F1 and MCC can be undefined
    for name in ("sst-2", "mrpc", "cola", "sts-b"):
        spec = get_task(name)
        task = analysis.Task(spec.name, spec)
        if spec.is_regression:
            labels, predictions = rng.uniform(0, 5, 80), rng.uniform(0, 5, (3, 80)).astype(np.float32)
        else:
            labels, predictions = rng.integers(0, 2, 80), rng.integers(0, 2, (3, 80))
            predictions[2] = 1  # a constant answer
        scores = analysis.subset_scores(task, predictions, labels, masks)
        for s, mask in enumerate(masks):
            for g, answer in enumerate(predictions):
                expected = compute_metrics(spec, answer[mask], labels[mask])[spec.main_metric]
                assert scores[s, g] == pytest.approx(expected, abs=1e-9, nan_ok=True), (name, s, g)


@pytest.mark.slow
def test_the_study_replays_once_and_indexes_what_certify_chooses_per_halving(monkeypatch: pytest.MonkeyPatch) -> None:
    """risk_control's batched halvings give, halving by halving, what calibrating the calibration half with the
    library and scoring the test half gives (drops large enough for 60 calibration examples to certify some)."""
    analysis = load_script(ROOT / "scripts" / "analyze_results.py")
    from multiexit.data import get_task

    monkeypatch.setattr(analysis, "RISK_EPSILONS", [0.02, 0.1, 0.2])

    rng = np.random.default_rng(9)
    logits, final = layered_logits(rng, 120, [0.3, 0.1, 0.0])
    labels = np.where(rng.random(120) < 0.8, final, 1 - final)
    spec = get_task("sst-2")
    task = analysis.Task(spec.name, spec, {"weighted-linear": {1: (logits, labels)}})
    halvings = 6
    cells = analysis.risk_control(task, "weighted-linear", halvings, ["deebert", "budget"])
    calibration, test = analysis.random_halvings(120, halvings, np.random.default_rng(1))
    faster: dict[tuple[str, str], int] = {}  # halvings whose choice is faster than full depth, per policy and method
    for name in ("deebert", "budget"):
        templates = POLICIES[name].calibration_templates(3, 2)
        # the population certificate, and (one policy) the batch certificates for a batch of the test half's size
        methods = [(risk, {}) for risk in ("disagreement", "metric")] + [
            (analysis.batch_method(risk, sampling), {"batch_size": 60, "batch_sampling": sampling})
            for risk in ("disagreement", "metric") for sampling in analysis.BATCH_SAMPLINGS if name == "deebert"]
        for method, batch in methods:
            risk = method.split("_")[0]
            for drop in analysis.RISK_EPSILONS:
                violations, speedups = 0, []
                for cal, held in zip(calibration, test):
                    chosen = certify(templates, logits[cal], labels[cal], accuracy, "acc", drop, analysis.RISK_DELTA,
                                     risk, **batch).policy
                    scored = score_policy(chosen, logits[held], labels[held], accuracy)
                    full = score_policy(BudgetExit(layer=3), logits[held], labels[held], accuracy)
                    loss = example_losses(risk, scored.predictions, full.predictions, labels[held]).mean()
                    violations += loss > drop + 1e-12
                    speedups.append(scored.speedup)
                cell = cells[name][method][str(drop)]
                assert cell["splits"] == halvings and cell["risk_test"] == violations, (name, method, drop)
                faster[name, method] = faster.get((name, method), 0) + cell["faster"]
                assert cell["speedup_median"] == pytest.approx(float(np.median(speedups)))
    assert all(faster.values()), faster  # every method certified something faster in some halving


@pytest.mark.slow
@pytest.mark.parametrize("batch_flag", [None, "held_out", "100"])
def test_runner_reports_the_certified_setting(tmp_path: Path, batch_flag: str | None) -> None:
    """--calibrate_max_drop records the certified setting; with --calibrate_batch_size, the batch certificate: for
    'held_out' the second half itself (split sampling), for a number a batch of new i.i.d. examples."""
    model = make_tiny_model(tmp_path / "model", layers=3, multi_exit=True)
    data = write_sst2(tmp_path / "SST-2", train=8, dev=60)
    output_dir = tmp_path / "out"
    batch = {None: {}, "held_out": {"batch_size": 30, "batch_sampling": "split"},
             "100": {"batch_size": 100, "batch_sampling": "iid"}}[batch_flag]
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
                               "--output_dir", output_dir, "--max_seq_length", 32, "--do_eval", "--save_layer_logits",
                               "--early_exit_entropy", "0.3", "--calibrate_max_drop", "0.3,0.001",
                               "--calibrate_delta", "0.2"]
                              + (["--calibrate_batch_size", batch_flag] if batch_flag else []))
    assert status == 0, stderr
    records = [r for r in read_records(output_dir) if "calibration" in r]
    logits = torch.as_tensor(np.load(output_dir / "layer_logits" / "model_dev_logits.npy"))  # the checkpoint: model
    assert {r["calibration"]["calibrated_policy"] for r in records} == set(POLICIES)  # pcee, elbert: their templates
    for record in records:
        calibration = record["calibration"]
        assert calibration["risk"] == "disagreement" and calibration["delta"] == 0.2
        assert calibration["num_examples"] == 30 and record["num_examples"] == 30
        name = calibration["calibrated_policy"]
        templates = [EntropyExit(threshold=0.3)] if name == "deebert" else POLICIES[name].calibration_templates(3, 2)
        expected = certify(templates, logits[:30], None, None, None, calibration["max_metric_drop"], 0.2, **batch)
        assert record["policy"] == expected.policy.name and record["params"] == expected.policy.params()
        assert calibration["batch_size"] == batch.get("batch_size")
        assert calibration["batch_sampling"] == batch.get("batch_sampling")
        assert calibration["certified"] == expected.certificate.certified
        assert calibration["bound"] == expected.certificate.bound
        if calibration["max_metric_drop"] == 0.001:  # 30 examples cannot certify 0.1 %: full depth, and how many would
            assert not calibration["certified"] and record["policy"] == "budget" and record["params"] == {"layer": 3}
            assert calibration["examples_needed_without_loss"] > 30
        assert 0.0 <= calibration["held_out_risk"] <= 1.0
    files = [r["per_example_file"] for r in records]
    assert len(files) == len(set(files)), "each policy's full-depth answer keeps its own file"
