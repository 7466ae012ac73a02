"""Exit policies pinned on hand-built logits, plus property tests: online (batch 1) == batched == replay == spec.

Every hand-built case is a ``[1, L, C]`` (or ``[N, L, C]``) tensor whose argmax, entropy and probabilities can be
read off directly; the expected exit layer is worked out in the comment next to it. Layers are 1-indexed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from multiexit.errors import UserInputError
from multiexit.policies import (
    POLICIES,
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    ExitTracker,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    entropy,
    make_policy,
    max_prob,
    normalized_entropy,
    parse_list,
    replay,
)

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def logits_seq(*rows: list[float]) -> torch.Tensor:
    """One example: rows of logits, one per layer -> [1, L, C]."""
    return torch.tensor([rows], dtype=torch.float32)


def probs_seq(*rows: list[float]) -> torch.Tensor:
    """One example from per-layer probabilities (logits = log p) -> [1, L, C]."""
    return torch.tensor([rows], dtype=torch.float64).log().float()


def run(policy, layer_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Exit layer and answer of the single example in ``layer_logits`` [1, L, C]."""
    result = replay(policy, layer_logits)
    return int(result.exit_layer[0]), result.answer[0]


def assert_answers_with_layer(policy, layer_logits: torch.Tensor, expected_layer: int) -> None:
    layer, answer = run(policy, layer_logits)
    assert layer == expected_layer, f"{policy.label()} exited at {layer}, expected {expected_layer}"
    assert torch.equal(answer, layer_logits[0, expected_layer - 1].float()), "must answer with the exit layer's head"


# Near one-hot (confident) and uniform-ish (unconfident) probability rows over 3 classes.
CONF = {0: [0.98, 0.01, 0.01], 1: [0.01, 0.98, 0.01], 2: [0.01, 0.01, 0.98]}
UNCONF = [0.34, 0.33, 0.33]
LN3 = math.log(3)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------------------------------------
# confidence measures
# --------------------------------------------------------------------------------------------------------------------


def test_entropy_values() -> None:
    # uniform over C: H = ln C; normalised 1. One-hot: 0.
    uniform = torch.zeros(2, 4)
    assert entropy(uniform).tolist() == [math.log(4)] * 2  # exactly (decisions are in float64)
    assert normalized_entropy(uniform).tolist() == [1.0, 1.0]
    p = torch.tensor([[0.7, 0.2, 0.1]])
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy(p.log()).item() == pytest.approx(expected, rel=1e-6)
    assert normalized_entropy(p.log()).item() == pytest.approx(expected / LN3, rel=1e-6)
    assert max_prob(p.log()).item() == pytest.approx(0.7, rel=1e-6)


def test_entropy_fp16_large_and_infinite_logits_are_finite() -> None:
    inf = math.inf
    big = torch.tensor([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]], dtype=torch.float16)
    assert big.dtype == torch.float16 and torch.isfinite(big).all()
    h = entropy(big)
    assert torch.isfinite(h).all() and h.dtype == torch.float64
    assert h.tolist() == pytest.approx([0.0, math.log(2), LN3], abs=1e-5)
    assert torch.isfinite(normalized_entropy(big)).all()
    with_inf = torch.tensor([[inf, 0.0, 0.0], [-inf, 0.0, 0.0], [-inf, -inf, 3.0]], dtype=torch.float16)
    h = entropy(with_inf)
    assert torch.isfinite(h).all()
    assert h.tolist() == pytest.approx([0.0, math.log(2), 0.0], abs=1e-6)
    assert torch.isfinite(normalized_entropy(with_inf)).all()
    # and the policies built on entropy run on such fp16 logits without NaN decisions
    seq = torch.stack([big[0], with_inf[1], big[1]])[None]  # [1, 3, 3] fp16
    assert run(EntropyExit(threshold=0.1), seq)[0] == 1  # layer 1 is one-hot at fp16 scale: H = 0 < 0.1
    assert run(PCEEExit(patience=1, tau=0.01), seq)[0] == 1
    assert run(ELBERTExit(delta=0.01, window=3), seq)[0] == 1
    layer, answer = run(EntropyExit(threshold=0.1), seq)
    assert torch.isfinite(answer).all()


def test_max_prob_with_positive_infinite_logit() -> None:
    row = torch.tensor([[math.inf, 0.0, 0.0]], dtype=torch.float16)
    assert max_prob(row).item() == 1.0


# --------------------------------------------------------------------------------------------------------------------
# budget
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_budget_exits_at_its_layer(k: int) -> None:
    seq = probs_seq(CONF[0], UNCONF, CONF[1], CONF[2])
    assert_answers_with_layer(BudgetExit(layer=k), seq, k)
    assert BudgetExit(layer=k).earliest_exit() == k


# --------------------------------------------------------------------------------------------------------------------
# PABEE
# --------------------------------------------------------------------------------------------------------------------


def test_pabee_constant_argmax_exits_at_patience_plus_one() -> None:
    # argmax 0 at every layer (values differ so the answers are distinguishable)
    seq = logits_seq(*[[1.0 + i, 0.5, 0.0] for i in range(6)])
    assert_answers_with_layer(PatienceExit(patience=1), seq, 2)
    assert_answers_with_layer(PatienceExit(patience=2), seq, 3)  # not 2: layer 2 only raises the counter to 1
    assert_answers_with_layer(PatienceExit(patience=4), seq, 5)
    assert_answers_with_layer(PatienceExit(patience=5), seq, 6)
    assert PatienceExit(patience=2).earliest_exit() == 3


def test_pabee_patience_zero_runs_full_depth() -> None:
    seq = logits_seq(*[[5.0, 0.0, 0.0]] * 4)
    assert_answers_with_layer(PatienceExit(patience=0), seq, 4)
    assert PatienceExit(patience=0).earliest_exit() == 1


def test_pabee_counter_resets_on_disagreement() -> None:
    # argmax per layer: 0 0 1 1 1 1. counter: L1 0, L2 1, L3 reset 0, L4 1, L5 2 -> exit at 5 with patience 2
    seq = logits_seq([2, 0, 0], [3, 0, 0], [0, 2, 0], [0, 3, 0], [0, 4, 0], [0, 5, 0])
    assert_answers_with_layer(PatienceExit(patience=2), seq, 5)
    # argmax 0 0 1 0 0 0, patience 3: L2 1, L3 0, L4 0 (1 vs 0), L5 1, L6 2 -> never reaches 3, L answers
    seq = logits_seq([2, 0, 0], [3, 0, 0], [0, 2, 0], [4, 0, 0], [5, 0, 0], [6, 0, 0])
    assert_answers_with_layer(PatienceExit(patience=3), seq, 6)
    # confidence is irrelevant to PABEE, only agreement: flat-ish but agreeing rows exit
    seq = logits_seq([0.1, 0, 0], [0.01, 0, 0], [0.2, 0, 0])
    assert_answers_with_layer(PatienceExit(patience=2), seq, 3)


def test_pabee_regression_with_threshold() -> None:
    # predictions 1.0, 1.05, 1.08, 2.0, 2.01, 2.02 ; threshold 0.1
    # |diff|: L2 0.05 (<0.1, c=1), L3 0.03 (c=2), L4 0.92 (reset), L5 0.01 (c=1), L6 0.01 (c=2)
    seq = logits_seq([1.0], [1.05], [1.08], [2.0], [2.01], [2.02])
    assert_answers_with_layer(PatienceExit(patience=1, regression_threshold=0.1), seq, 2)
    assert_answers_with_layer(PatienceExit(patience=2, regression_threshold=0.1), seq, 3)
    assert_answers_with_layer(PatienceExit(patience=3, regression_threshold=0.1), seq, 6)  # never 3 in a row
    assert_answers_with_layer(PatienceExit(patience=2, regression_threshold=0.02), seq, 6)  # only L5, L6 agree
    # the comparison is strict: a difference of exactly the threshold does not agree
    seq = logits_seq([0.0], [0.5], [1.0], [1.5])
    assert_answers_with_layer(PatienceExit(patience=1, regression_threshold=0.5), seq, 4)
    PatienceExit(patience=2, regression_threshold=0.1).validate(num_labels=1, num_layers=6)  # valid


def test_pabee_regression_needs_threshold() -> None:
    with pytest.raises(UserInputError, match="needs --regression_threshold > 0"):
        PatienceExit(patience=2).validate(num_labels=1, num_layers=6)
    with pytest.raises(UserInputError, match="needs --regression_threshold > 0"):
        PatienceExit(patience=2, regression_threshold=0.0).validate(num_labels=1, num_layers=6)
    PatienceExit(patience=0).validate(num_labels=1, num_layers=6)  # full depth needs no threshold


# --------------------------------------------------------------------------------------------------------------------
# DeeBERT
# --------------------------------------------------------------------------------------------------------------------


def test_deebert_first_layer_below_threshold() -> None:
    # entropies: L1 ~ln3=1.0986, L2 ~0.112 (0.98/0.01/0.01), L3 ~ln3, L4 ~0.112
    seq = probs_seq(UNCONF, CONF[1], UNCONF, CONF[2])
    h = entropy(seq[0])
    assert h[1] == pytest.approx(0.1120, abs=1e-3) and h[0] == pytest.approx(LN3, abs=1e-3)
    assert_answers_with_layer(EntropyExit(threshold=0.2), seq, 2)
    assert_answers_with_layer(EntropyExit(threshold=1.2), seq, 1)  # every layer is below 1.2
    assert_answers_with_layer(EntropyExit(threshold=0.05), seq, 4)  # none below: layer L answers


def test_deebert_threshold_is_strict_and_in_nats() -> None:
    seq = logits_seq([0.0, -math.inf], [0.0, -math.inf], [0.0, 0.0])  # entropy exactly 0, 0, ln 2
    assert_answers_with_layer(EntropyExit(threshold=0.0), seq, 3)  # 0 < 0 is false
    assert_answers_with_layer(EntropyExit(threshold=1e-6), seq, 1)
    # nats, not normalised: uniform over 2 classes has H = ln 2 = 0.693 -> exits under 0.7, not under 0.69
    seq = logits_seq([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert_answers_with_layer(EntropyExit(threshold=0.7), seq, 1)
    assert_answers_with_layer(EntropyExit(threshold=0.69), seq, 3)


def test_deebert_negative_threshold_never_exits() -> None:
    # DeeBERT's own default, --early_exit_entropy -1: no entropy is below it, so every example runs to layer L
    seq = logits_seq([9.0, 0.0], [9.0, 0.0], [9.0, 0.0])
    assert_answers_with_layer(EntropyExit(threshold=-1.0), seq, 3)


def test_deebert_last_layer_answers_untested() -> None:
    # only the last layer is confident; whether or not it would pass the test, it answers with its own head
    seq = probs_seq(UNCONF, UNCONF, CONF[2])
    assert_answers_with_layer(EntropyExit(threshold=0.2), seq, 3)
    seq = probs_seq(UNCONF, UNCONF, UNCONF)
    assert_answers_with_layer(EntropyExit(threshold=0.2), seq, 3)
    # a 1-layer model: layer 1 is layer L
    assert_answers_with_layer(EntropyExit(threshold=0.2), probs_seq(UNCONF), 1)


# --------------------------------------------------------------------------------------------------------------------
# max-prob
# --------------------------------------------------------------------------------------------------------------------


def test_maxprob_boundary_is_inclusive() -> None:
    # uniform over 4 classes: max prob exactly 0.25; over 2: exactly 0.5
    seq = logits_seq([0.0] * 4, [0.0] * 4, [0.0] * 4)
    assert max_prob(seq[0]).tolist() == [0.25, 0.25, 0.25]
    assert_answers_with_layer(MaxProbExit(threshold=0.25), seq, 1)
    # the next float32 above 0.25 (decisions run in float32, so a float64 epsilon would round back to 0.25)
    assert_answers_with_layer(MaxProbExit(threshold=float(np.nextafter(np.float32(0.25), np.float32(1)))), seq, 3)
    seq = logits_seq([0.0, 0.0], [0.0, 0.0])
    assert_answers_with_layer(MaxProbExit(threshold=0.5), seq, 1)


def test_maxprob_first_confident_layer() -> None:
    seq = probs_seq([0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.75, 0.05], [0.9, 0.05, 0.05])
    assert_answers_with_layer(MaxProbExit(threshold=0.7), seq, 3)
    assert_answers_with_layer(MaxProbExit(threshold=0.55), seq, 2)
    assert_answers_with_layer(MaxProbExit(threshold=0.95), seq, 4)
    assert_answers_with_layer(MaxProbExit(threshold=0.0), seq, 1)


# --------------------------------------------------------------------------------------------------------------------
# PCEE-BERT
# --------------------------------------------------------------------------------------------------------------------


def test_pcee_exits_at_patience_when_all_confident() -> None:
    seq = probs_seq(CONF[0], CONF[1], CONF[2], CONF[0], CONF[1])  # every layer confident (norm. H ~0.10)
    assert_answers_with_layer(PCEEExit(patience=1, tau=0.5), seq, 1)
    assert_answers_with_layer(PCEEExit(patience=2, tau=0.5), seq, 2)  # one earlier than PABEE's 3
    assert_answers_with_layer(PCEEExit(patience=4, tau=0.5), seq, 4)
    assert PCEEExit(patience=2, tau=0.5).earliest_exit() == 2
    assert PCEEExit(patience=0, tau=0.5).earliest_exit() == 1
    assert_answers_with_layer(PCEEExit(patience=0, tau=0.5), seq, 5)  # patience 0 runs full depth


def test_pcee_counter_reset_by_one_unconfident_layer() -> None:
    # C U C C C -> counter 1 0 1 2 3
    seq = probs_seq(CONF[0], UNCONF, CONF[0], CONF[1], CONF[2], UNCONF, UNCONF)
    assert_answers_with_layer(PCEEExit(patience=2, tau=0.5), seq, 4)
    assert_answers_with_layer(PCEEExit(patience=3, tau=0.5), seq, 5)
    # C C U C C U C: patience 3 never reached -> L
    seq = probs_seq(CONF[0], CONF[0], UNCONF, CONF[0], CONF[0], UNCONF, CONF[0])
    assert_answers_with_layer(PCEEExit(patience=3, tau=0.5), seq, 7)


def test_pcee_tau_is_on_normalised_entropy_and_strict() -> None:
    # [0.7, 0.2, 0.1]: H = 0.8018 nats, normalised 0.7298
    p = [0.7, 0.2, 0.1]
    seq = probs_seq(p, p, p)
    nh = float(normalized_entropy(seq[0])[0])
    assert nh == pytest.approx(0.7298, abs=1e-4)
    assert_answers_with_layer(PCEEExit(patience=1, tau=0.75), seq, 1)  # 0.73 < 0.75 (would fail on nats 0.80)
    assert_answers_with_layer(PCEEExit(patience=1, tau=0.72), seq, 3)
    assert_answers_with_layer(PCEEExit(patience=1, tau=nh), seq, 3)  # strict <


def test_pcee_v1_maxprob_variant() -> None:
    # max probs: 0.6 0.8 0.8 0.5 0.9 0.9 ; threshold 0.8 (inclusive) -> confident: N Y Y N Y Y
    seq = probs_seq(
        [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.5, 0.25, 0.25], [0.05, 0.05, 0.9], [0.9, 0.05, 0.05]
    )
    mp = max_prob(seq[0])
    assert (mp[1] >= 0.8).item() and (mp[2] >= 0.8).item()  # float32 rounding keeps these at >= 0.8
    assert_answers_with_layer(PCEEExit(patience=2, maxprob=0.8), seq, 3)
    assert_answers_with_layer(PCEEExit(patience=3, maxprob=0.8), seq, 6)  # reset at L4, never 3 in a row
    assert_answers_with_layer(PCEEExit(patience=2, maxprob=0.85), seq, 6)  # only L5, L6: counter 2 at L6
    assert_answers_with_layer(PCEEExit(patience=1, maxprob=0.85), seq, 5)
    # exact boundary: uniform over 2 classes is max prob 0.5 exactly
    seq = logits_seq([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert_answers_with_layer(PCEEExit(patience=2, maxprob=0.5), seq, 2)


def test_pcee_streak_ensemble_is_mean_of_streak_probabilities() -> None:
    # (PCEE's own ensemble, "pcee", is in test_seed_fidelity.py; "streak" is our variant)
    # layer 1 confident (class 0), layer 2 unconfident (reset), layers 3-4 confident -> exit at 4 with patience 2;
    # the answer averages layers 3 and 4 only (layer 1's probabilities were dropped with the reset).
    p1, p2 = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]
    p3, p4 = [0.1, 0.85, 0.05], [0.05, 0.93, 0.02]
    seq = probs_seq(p1, p2, p3, p4, [0.3, 0.3, 0.4])
    policy = PCEEExit(patience=2, tau=0.6, ensemble="streak")
    layer, answer = run(policy, seq)
    assert layer == 4
    expected = [(a + b) / 2 for a, b in zip(p3, p4)]  # [0.075, 0.89, 0.035]
    assert answer.exp().tolist() == pytest.approx(expected, abs=1e-6)
    assert answer.tolist() == pytest.approx([math.log(x) for x in expected], abs=1e-5)
    assert torch.softmax(answer, -1).tolist() == pytest.approx(expected, abs=1e-6)
    # the ensemble can flip the prediction against the exit layer's own head
    q3, q4 = [0.05, 0.9, 0.05], [0.5, 0.45, 0.05]
    seq = probs_seq(q3, q4, UNCONF)
    layer, answer = run(PCEEExit(patience=2, maxprob=0.49, ensemble="streak"), seq)
    assert layer == 2 and int(answer.argmax()) == 1 and int(seq[0, 1].argmax()) == 0
    assert answer.exp().tolist() == pytest.approx([0.275, 0.675, 0.05], abs=1e-6)


def test_pcee_ensembles_at_last_layer() -> None:
    # the policy exits at L by its own rule (patience == L): every ensemble averages the whole streak
    p = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.95, 0.03, 0.02]]
    seq = probs_seq(*p)
    for ensemble in ("pcee", "all", "streak"):
        layer, answer = run(PCEEExit(patience=3, tau=0.9, ensemble=ensemble), seq)
        assert layer == 3
        assert answer.exp().tolist() == pytest.approx(np.mean(p, axis=0).tolist(), abs=1e-6)
    # not exiting by its rule: "streak" answers with layer L's own logits; PCEE's ensemble averages its list,
    # which restarted at the unconfident layer 1 (layers 1-3); "all" averages every layer (the same three here)
    p = [UNCONF, CONF[0], CONF[1]]
    seq = probs_seq(*p)
    assert_answers_with_layer(PCEEExit(patience=3, tau=0.5, ensemble="streak"), seq, 3)
    for ensemble in ("pcee", "all"):
        layer, answer = run(PCEEExit(patience=3, tau=0.5, ensemble=ensemble), seq)
        assert layer == 3
        assert answer.exp().tolist() == pytest.approx(np.mean(p, axis=0).tolist(), abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# ELBERT
# --------------------------------------------------------------------------------------------------------------------


def test_elbert_stage1_exit_on_normalised_entropy() -> None:
    # layer 1 confident: exits at 1 although the window (3) is not full yet
    seq = probs_seq(CONF[2], UNCONF, UNCONF, UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.2, window=3, criterion="same"), seq, 1)
    # delta is on H / ln C: [0.7, 0.2, 0.1] has normalised 0.73 (nats 0.80)
    p = [0.7, 0.2, 0.1]
    seq = probs_seq([0.5, 0.25, 0.25], p, [0.34, 0.33, 0.33], [0.3, 0.4, 0.3])
    assert_answers_with_layer(ELBERTExit(delta=0.75, window=4, criterion="same"), seq, 2)
    assert_answers_with_layer(ELBERTExit(delta=0.72, window=5, criterion="same"), seq, 4)


def test_elbert_window_not_full_before_layer_n() -> None:
    # p_0 rises .55 -> .6 -> .7 -> .8 -> .9, argmax 0 throughout, high entropy (no stage 1 with delta 0)
    seq = probs_seq([0.55, 0.25, 0.2], [0.6, 0.2, 0.2], [0.7, 0.15, 0.15], [0.8, 0.1, 0.1], [0.9, 0.05, 0.05])
    for criterion in ("monotonic", "same"):
        assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion=criterion), seq, 2)
        assert_answers_with_layer(ELBERTExit(delta=0.0, window=3, criterion=criterion), seq, 3)
        assert_answers_with_layer(ELBERTExit(delta=0.0, window=4, criterion=criterion), seq, 4)
        assert_answers_with_layer(ELBERTExit(delta=0.0, window=6, criterion=criterion), seq, 5)  # never full


def test_elbert_monotonic_multiclass() -> None:
    # c is fixed at the window start and must hold p_c > 0.5 there; p_c must not fall across the window (ties pass)
    # [.6 .3 .1] -> [.3 .6 .1]: c = 0 falls; [.3 .6 .1] -> [.2 .7 .1]: c = 1 (.6 > .5) rises -> exit at 3
    seq = probs_seq([0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), seq, 3)
    # equal p_c passes: .6 .6 exits at 2
    seq = probs_seq([0.6, 0.3, 0.1], [0.6, 0.2, 0.2], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), seq, 2)
    # a start at p_c <= 0.5 + margin never counts: .55 .7 .8 with margin .1 -> window [.7 .8] at layer 3
    seq = probs_seq([0.55, 0.25, 0.2], [0.7, 0.2, 0.1], [0.8, 0.1, 0.1], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), seq, 2)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic", margin=0.1), seq, 3)
    # window 3 needs the whole window: .6 .55 .7 .8 -> layer 3 falls at .55; layer 4 (.55 .7 .8) rises
    seq = probs_seq([0.6, 0.3, 0.1], [0.55, 0.35, 0.1], [0.7, 0.2, 0.1], [0.8, 0.1, 0.1], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=3, criterion="monotonic"), seq, 4)
    # falling confidence never exits; neither does a class below half the probability
    seq = probs_seq([0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.2, 0.2], [0.55, 0.25, 0.2])
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), seq, 4)
    seq = probs_seq([0.4, 0.3, 0.3], [0.45, 0.3, 0.25], [0.48, 0.3, 0.22])
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), seq, 3)


def test_elbert_range_multiclass() -> None:
    # every window layer must have p_c > 0.5 + margin for the start's c, and max - min of p_c <= the threshold
    # p_0: .60 .62 .80 .81 then class 1 at .9
    seq = probs_seq([0.6, 0.3, 0.1], [0.62, 0.2, 0.18], [0.8, 0.1, 0.1], [0.81, 0.1, 0.09], [0.05, 0.9, 0.05])
    # window 2: ranges L2 .02, L3 .18, L4 .01; L5 leaves class 0
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.05), seq, 2)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.015), seq, 4)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.005), seq, 5)
    # the bound is inclusive: a constant window passes range 0
    seq = probs_seq([0.6, 0.3, 0.1], [0.6, 0.3, 0.1], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.0), seq, 2)
    # the same max-probability across a prediction flip is not a narrow range of one class's probability
    seq = probs_seq([0.7, 0.2, 0.1], [0.2, 0.7, 0.1], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.5), seq, 3)


def test_elbert_same_multiclass() -> None:
    # all window layers on the start class's side (p_c > 0.5 + margin); argmax 0 1 1 2 2 2 with p > .5 at each
    seq = probs_seq([0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6], UNCONF)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="same"), seq, 3)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=3, criterion="same"), seq, 6)
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="same", margin=0.15), seq, 6)
    # the argmax alone is not enough: class 2 leads at .45 < .5 in every layer
    seq = probs_seq([0.3, 0.25, 0.45], [0.3, 0.25, 0.45], [0.3, 0.25, 0.45])
    assert_answers_with_layer(ELBERTExit(delta=0.0, window=2, criterion="same"), seq, 3)


def test_elbert_window_of_one() -> None:
    # ELBERT's code accepts cnt_thres 1: the window is the current layer alone (p_c > 0.5 + margin)
    seq = probs_seq([0.45, 0.3, 0.25], [0.55, 0.3, 0.15], UNCONF)
    for criterion, extra in (("same", {}), ("monotonic", {}), ("range", {"range_threshold": 0.0})):
        assert_answers_with_layer(ELBERTExit(delta=0.0, window=1, criterion=criterion, **extra), seq, 2)


def test_elbert_four_classes_per_sample() -> None:
    # Two samples, 4 classes, each row with its own class (ELBERT's code followed class 0 of sample 0 only).
    # Sample 0: class 3 rises .55 .6 .7 (argmax 3). Sample 1: class 0 falls .8 .7 .6 .55.
    s0 = [[0.15, 0.15, 0.15, 0.55], [0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.1, 0.7], [0.04, 0.04, 0.07, 0.85]]
    s1 = [[0.8, 0.1, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.55, 0.25, 0.1, 0.1]]
    batch = torch.tensor([s0, s1], dtype=torch.float64).log().float()
    result = replay(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), batch)
    assert result.exit_layer.tolist() == [2, 4]
    result = replay(ELBERTExit(delta=0.0, window=2, criterion="same"), batch)
    assert result.exit_layer.tolist() == [2, 2]
    # range of p_c: s0 .55 .6 (.05), s1 .8 .7 (.1) -> threshold .06: s0 exits at 2, s1 at 4 (.6 .55)
    result = replay(ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.06), batch)
    assert result.exit_layer.tolist() == [2, 4]
    assert torch.equal(result.answer, torch.stack([batch[0, 1], batch[1, 3]]))
    # stage 1 with 4 classes: normalised entropy of s0 layer 4 = H/ln 4
    nh = normalized_entropy(batch[0, 3]).item()
    p = np.array(s0[3])
    assert nh == pytest.approx(float(-(p * np.log(p)).sum() / math.log(4)), rel=1e-5)
    result = replay(ELBERTExit(delta=nh + 1e-4, window=5, criterion="same"), batch)
    assert result.exit_layer.tolist() == [4, 4]


# --------------------------------------------------------------------------------------------------------------------
# every policy: the last layer answers with its own logits
# --------------------------------------------------------------------------------------------------------------------

LAST_LAYER_CASES = [
    BudgetExit(layer=3),
    PatienceExit(patience=0),
    PatienceExit(patience=1),
    EntropyExit(threshold=0.0),
    EntropyExit(threshold=1.0),
    MaxProbExit(threshold=0.99),
    PCEEExit(patience=0, tau=0.5),
    PCEEExit(patience=1, tau=0.9, ensemble="streak"),
    PCEEExit(patience=0, tau=0.9, ensemble="pcee"),
    PCEEExit(patience=2, maxprob=0.99),
    ELBERTExit(delta=0.0, window=4, criterion="same"),
    ELBERTExit(delta=0.0, window=2, criterion="same"),
    ELBERTExit(delta=0.0, window=2, criterion="monotonic"),
    ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=0.01),
]


@pytest.mark.parametrize("policy", LAST_LAYER_CASES, ids=lambda p: p.label())
def test_final_layer_answers_with_own_logits(policy) -> None:
    # argmax 0 1 1 (the tie at layer 3 goes to the first class), max prob falls .40 .36 .335 and the argmax class's
    # probability falls too (.39 -> .36, .36 -> .335); nothing is confident (normalised H > 0.9). No rule fires before
    # L (PABEE patience 1 and ELBERT 'same' fire at L itself), so every policy answers with layer L's logits.
    seq = probs_seq([0.40, 0.39, 0.21], [0.30, 0.36, 0.34], [0.33, 0.335, 0.335])
    assert normalized_entropy(seq[0]).min() > 0.9
    assert_answers_with_layer(policy, seq, 3)


# --------------------------------------------------------------------------------------------------------------------
# validation, labels, parsing
# --------------------------------------------------------------------------------------------------------------------

INVALID = [
    (PatienceExit, {"patience": -1}),
    (PatienceExit, {"patience": 2.5}),
    (PatienceExit, {"patience": 2.0}),
    (PatienceExit, {"patience": True}),
    (PatienceExit, {"patience": "3"}),
    (PatienceExit, {"patience": 2, "regression_threshold": -0.1}),
    (PatienceExit, {"patience": 2, "regression_threshold": math.nan}),
    (PCEEExit, {"patience": -1, "tau": 0.5}),
    (PCEEExit, {"patience": 1.5, "tau": 0.5}),
    (PCEEExit, {"patience": 2}),  # no threshold
    (PCEEExit, {"patience": 2, "tau": 0.5, "maxprob": 0.9}),  # both
    (PCEEExit, {"patience": 2, "tau": math.nan}),
    (PCEEExit, {"patience": 2, "tau": -0.1}),
    (PCEEExit, {"patience": 2, "tau": 1.5}),
    (PCEEExit, {"patience": 2, "maxprob": 1.1}),
    (EntropyExit, {"threshold": math.nan}),
    (EntropyExit, {"threshold": "0.1"}),
    (MaxProbExit, {"threshold": math.nan}),
    (MaxProbExit, {"threshold": -0.1}),
    (MaxProbExit, {"threshold": 1.5}),
    (ELBERTExit, {"delta": -0.1}),
    (ELBERTExit, {"delta": 1.1}),
    (ELBERTExit, {"delta": math.nan}),
    (ELBERTExit, {"delta": 0.1, "window": 0}),
    (ELBERTExit, {"delta": 0.1, "margin": -0.1}),
    (ELBERTExit, {"delta": 0.1, "margin": 0.6}),
    (PCEEExit, {"patience": 2, "tau": 0.5, "ensemble": True}),
    (PCEEExit, {"patience": 2, "tau": 0.5, "ensemble": "mean"}),
    (ELBERTExit, {"delta": 0.1, "window": 2.0}),
    (ELBERTExit, {"delta": 0.1, "criterion": "rising"}),
    (ELBERTExit, {"delta": 0.1, "criterion": "range"}),  # range without its threshold
    (ELBERTExit, {"delta": 0.1, "criterion": "range", "range_threshold": math.nan}),
    (ELBERTExit, {"delta": 0.1, "criterion": "range", "range_threshold": -0.5}),
    (BudgetExit, {"layer": 0}),
    (BudgetExit, {"layer": 2.0}),
]


@pytest.mark.parametrize(("cls", "params"), INVALID, ids=lambda v: getattr(v, "name", None) or repr(v))
def test_invalid_parameters(cls, params) -> None:
    for build in (lambda: cls(**params), lambda: make_policy(cls.name, **params)):
        with pytest.raises(UserInputError) as error:
            build()
        # the message names a parameter (PCEE without a threshold names the one it lacks)
        message = str(error.value).replace("_", " ")
        assert any(name.replace("_", " ") in message for name in [*params, "tau"]), message


def test_validate_against_model_and_task() -> None:
    with pytest.raises(UserInputError, match=r"can first exit at layer 7, but the model has only 6 layers"):
        BudgetExit(layer=7).validate(num_labels=3, num_layers=6)
    BudgetExit(layer=6).validate(num_labels=3, num_layers=6)
    BudgetExit(layer=2).validate(num_labels=1, num_layers=6)  # budget works for regression
    PatienceExit(patience=5).validate(num_labels=3, num_layers=6)
    PCEEExit(patience=6, tau=0.5).validate(num_labels=3, num_layers=6)


def test_patience_longer_than_the_model_warns_and_runs_full_depth(caplog) -> None:
    """PABEE's own sweep (--patience 3,4,5,6,7,8) must keep working on a 6-layer model: too long = full depth (the
    warning comes once per setting and depth, not at every early_exit call)."""
    import multiexit.policies

    multiexit.policies._WARNED_NEVER_EARLY.clear()
    logits = torch.zeros(2, 6, 3)
    logits[..., 0] = 5.0  # every layer agrees and is confident
    for policy in (PatienceExit(patience=6), PCEEExit(patience=7, tau=0.5)):
        with caplog.at_level("WARNING"):
            policy.validate(num_labels=3, num_layers=6)
        assert "every example runs to the last layer" in caplog.text
        assert replay(policy, logits).exit_layer.tolist() == [6, 6]
    with pytest.raises(UserInputError, match="does not support regression"):
        PCEEExit(patience=7, tau=0.5).validate(num_labels=1, num_layers=6)  # regression still refused
    for policy in (
        EntropyExit(threshold=0.1),
        MaxProbExit(threshold=0.9),
        PCEEExit(patience=2, tau=0.5),
        PCEEExit(patience=2, maxprob=0.9),
        ELBERTExit(delta=0.1),
    ):
        policy.validate(num_labels=2, num_layers=6)
        with pytest.raises(UserInputError, match=f"policy '{policy.name}' needs class probabilities"):
            policy.validate(num_labels=1, num_layers=6)
    assert issubclass(UserInputError, ValueError)


def test_labels_and_params_are_stable() -> None:
    assert BudgetExit(layer=3).label() == "budget(layer=3)"
    assert PatienceExit(patience=3).label() == "pabee(patience=3)"
    assert PatienceExit(patience=2, regression_threshold=0.1).label() == "pabee(patience=2,regression_threshold=0.1)"
    assert EntropyExit(threshold=0.25).label() == "deebert(threshold=0.25)"
    assert MaxProbExit(threshold=0.9).label() == "maxprob(threshold=0.9)"
    assert PCEEExit(patience=2, tau=0.3).label() == "pcee(patience=2,tau=0.3)"
    assert PCEEExit(patience=2, maxprob=0.9).label() == "pcee(patience=2,maxprob=0.9)"
    assert PCEEExit(patience=2, tau=0.3, ensemble="pcee").label() == "pcee(patience=2,tau=0.3,ensemble=pcee)"
    assert ELBERTExit(delta=0.1, margin=0.2).label() == "elbert(delta=0.1,window=2,criterion=monotonic,margin=0.2)"
    assert ELBERTExit(delta=0.1, window=3).label() == "elbert(delta=0.1,window=3,criterion=monotonic)"
    assert (
        ELBERTExit(delta=0.1, criterion="range", range_threshold=0.05).label()
        == "elbert(delta=0.1,window=2,criterion=range,range_threshold=0.05)"
    )
    assert PatienceExit(patience=3).params() == {"patience": 3, "regression_threshold": None}
    assert PCEEExit(patience=2, tau=0.3).params() == {"patience": 2, "tau": 0.3, "maxprob": None, "ensemble": "none"}
    assert ELBERTExit(delta=0.1).params() == {
        "delta": 0.1,
        "window": 2,
        "criterion": "monotonic",
        "range_threshold": None,
        "margin": 0.0,
    }
    # equal settings give equal labels, params and policies; params rebuild the policy
    for policy in (PatienceExit(patience=3), PCEEExit(patience=2, maxprob=0.9, ensemble="all"), ELBERTExit(delta=0.5)):
        again = make_policy(policy.name, **policy.params())
        assert again == policy and again.label() == policy.label() and hash(again) == hash(policy)
    assert set(POLICIES) == {"budget", "pabee", "deebert", "maxprob", "pcee", "elbert"}


def test_make_policy() -> None:
    assert make_policy("pabee", patience=4) == PatienceExit(patience=4)
    assert make_policy("pcee", patience=2, tau=0.3) == PCEEExit(patience=2, tau=0.3)
    with pytest.raises(UserInputError, match="unknown exit policy"):
        make_policy("patience", patience=4)
    with pytest.raises(UserInputError, match="bad parameters for policy 'pabee'.*'threshold'"):
        make_policy("pabee", threshold=0.5)  # unknown parameter


def test_parse_list() -> None:
    assert parse_list("--patience", "3,4,5", int) == [3, 4, 5]
    assert parse_list("--patience", " 3 , 4 ", int) == [3, 4]
    assert parse_list("--patience", "6", int) == [6]
    assert parse_list("--patience", None, int) == []
    assert parse_list("--patience", "", int) == []
    assert parse_list("--threshold", "0.1,0.25", float) == [0.1, 0.25]
    values = parse_list("--patience", "3,4", int)
    assert all(type(v) is int for v in values)
    for bad in ("3,x", "2.5", "x", "3,4.5", "inf", "nan"):
        with pytest.raises(UserInputError, match="--patience"):
            parse_list("--patience", bad, int)
    with pytest.raises(UserInputError, match="--threshold"):
        parse_list("--threshold", "0.1,abc", float)


# --------------------------------------------------------------------------------------------------------------------
# property tests: online (batch 1) == batched tracker with compaction == replay == the documented rules
# --------------------------------------------------------------------------------------------------------------------

_LOGIT = st.one_of(
    st.floats(-8.0, 8.0, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 4.0]),  # ties and repeated rows make streaks and boundary cases likely
)
_UNIT = st.floats(0.0, 1.0)


@st.composite
def policy_and_logits(draw) -> tuple:
    name = draw(st.sampled_from(sorted(POLICIES)))
    regression_capable = POLICIES[name].supports_regression
    n = draw(st.integers(1, 8))
    num_layers = draw(st.integers(1, 6))
    num_labels = draw(st.integers(1 if regression_capable else 2, 5))
    layer_logits = torch.from_numpy(draw(arrays(np.float32, (n, num_layers, num_labels), elements=_LOGIT)))
    if name == "budget":
        policy = BudgetExit(layer=draw(st.integers(1, num_layers)))
    elif name == "pabee":
        threshold = draw(st.floats(0.01, 3.0)) if num_labels == 1 else None
        policy = PatienceExit(patience=draw(st.integers(0, num_layers - 1)), regression_threshold=threshold)
    elif name == "deebert":
        policy = EntropyExit(threshold=draw(st.floats(0.0, math.log(num_labels) + 0.1)))
    elif name == "maxprob":
        policy = MaxProbExit(threshold=draw(_UNIT))
    elif name == "pcee":
        use_tau = draw(st.booleans())
        value = draw(_UNIT)
        policy = PCEEExit(
            patience=draw(st.integers(0, num_layers)),
            tau=value if use_tau else None,
            maxprob=None if use_tau else value,
            ensemble=draw(st.sampled_from(["none", "pcee", "all", "streak"])),
        )
    else:
        criterion = draw(st.sampled_from(["monotonic", "range", "same"]))
        policy = ELBERTExit(
            delta=draw(_UNIT),
            window=draw(st.integers(1, 4)),
            criterion=criterion,
            range_threshold=draw(_UNIT) if criterion == "range" else None,
            margin=draw(st.sampled_from([0.0, 0.1, 0.3])),
        )
    policy.validate(num_labels, num_layers)  # only valid settings
    return policy, layer_logits


def online_one_by_one(policy, layer_logits: torch.Tensor, host_arrays: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """What real early exit at batch size 1 does: one tracker per example, fed layer by layer until done
    (``host_arrays``: numpy arrays, as ONNX Runtime's pass feeds it given numpy inputs, and numpy answers)."""
    layers, answers = [], []
    num_layers = layer_logits.shape[1]
    for row in layer_logits:
        tracker = ExitTracker(policy, 1, num_layers, numpy=host_arrays)
        for depth in range(num_layers):
            tracker.update(row[None, depth].numpy() if host_arrays else row[None, depth], depth + 1)
            if tracker.done:
                break
        assert tracker.done
        exit_layer, answer = tracker.exit_layer, tracker.answer
        if host_arrays:
            assert isinstance(exit_layer, np.ndarray) and isinstance(answer, np.ndarray)
            exit_layer, answer = torch.from_numpy(exit_layer), torch.from_numpy(answer)
        layers.append(exit_layer[0])
        answers.append(answer[0])
    return torch.stack(layers), torch.stack(answers)


def batched_like_the_model(policy, layer_logits: torch.Tensor, host_arrays: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's loop does: the running batch is compacted with the mask that update() returns
    (``host_arrays``: the logits fed as numpy arrays, as ONNX Runtime's pass feeds them given numpy inputs, and
    numpy answers)."""
    num_layers = layer_logits.shape[1]
    tracker = ExitTracker(policy, layer_logits.shape[0], num_layers, numpy=host_arrays)
    running = layer_logits
    for depth in range(num_layers):
        keep = tracker.update(running[:, depth].numpy() if host_arrays else running[:, depth], depth + 1)
        if tracker.done:
            break
        if keep is not None:
            assert keep.dtype == torch.bool and keep.shape == (running.shape[0],) and not keep.all()
            running = running[keep]
    assert tracker.done
    if host_arrays:
        assert isinstance(tracker.exit_layer, np.ndarray) and isinstance(tracker.answer, np.ndarray)
        return torch.from_numpy(tracker.exit_layer), torch.from_numpy(tracker.answer)
    return tracker.exit_layer, tracker.answer


def spec_reference(policy, row: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The documented rules written out naively for one example [L, C], in float64 as the policies decide."""
    num_layers, num_labels = row.shape
    row64 = row.double()
    probs = torch.softmax(row64, dim=-1)
    h, nh, mp = entropy(row), normalized_entropy(row), max_prob(row)
    argmax = row.argmax(dim=-1)
    counter = 0
    members: list[torch.Tensor] = []  # PCEE's ensemble members
    for i in range(1, num_layers + 1):
        x = i - 1
        if isinstance(policy, BudgetExit):
            if i >= policy.layer:
                return i, row[x]
        elif isinstance(policy, PatienceExit):
            if i == 1:
                agrees = False
            elif num_labels == 1:
                agrees = bool((row64[x, 0] - row64[x - 1, 0]).abs() < (policy.regression_threshold or 0.0))
            else:
                agrees = int(argmax[x]) == int(argmax[x - 1])
            counter = counter + 1 if agrees else 0
            if policy.patience > 0 and counter == policy.patience:
                return i, row[x]
        elif isinstance(policy, EntropyExit):
            if i < num_layers and h[x] < policy.threshold:
                return i, row[x]
        elif isinstance(policy, MaxProbExit):
            if mp[x] >= policy.threshold:
                return i, row[x]
        elif isinstance(policy, PCEEExit):
            confident = bool(nh[x] < policy.tau) if policy.tau is not None else bool(mp[x] >= policy.maxprob)
            counter = counter + 1 if confident else 0
            if policy.ensemble == "pcee":
                members = members + [probs[x]] if confident else [probs[x]]
            elif policy.ensemble == "all":
                members = members + [probs[x]]
            else:
                members = members + [probs[x]] if confident else []
            exits = policy.patience > 0 and counter == policy.patience
            if exits or i == num_layers:
                if policy.patience == 0 or policy.ensemble == "none" or (policy.ensemble == "streak" and not exits):
                    return i, row[x]
                return i, torch.stack(members).mean(dim=0).clamp(min=1e-30).log().float()
        elif isinstance(policy, ELBERTExit):
            if nh[x] < policy.delta:
                return i, row[x]
            n = policy.window
            if i >= n:
                window = probs[i - n : i]
                c = int(window[0].argmax())
                p_c = window[:, c]
                side = p_c > 0.5 + policy.margin
                if policy.criterion == "same":
                    ok = bool(side.all())
                elif policy.criterion == "monotonic":
                    ok = bool(side[0]) and bool((p_c[1:] >= p_c[:-1]).all())
                else:
                    ok = bool(side.all()) and bool(p_c.max() - p_c.min() <= policy.range_threshold)
                if ok:
                    return i, row[x]
        else:  # pragma: no cover
            raise AssertionError(policy)
    return num_layers, row[-1]


@settings(max_examples=200, deadline=None)
@given(policy_and_logits())
def test_online_equals_replay(case) -> None:
    policy, layer_logits = case
    replayed = replay(policy, layer_logits)
    # batch size 1 decides on Python floats (RowOps), a batch on tensors (TensorOps): the same numbers, bit for bit
    online_layers, online_answers = online_one_by_one(policy, layer_logits)
    assert torch.equal(online_layers, replayed.exit_layer)
    assert torch.equal(online_answers, replayed.answer)
    batched_layers, batched_answers = batched_like_the_model(policy, layer_logits)
    assert torch.equal(batched_layers, replayed.exit_layer)
    assert torch.equal(batched_answers, replayed.answer)
    for run in (online_one_by_one, batched_like_the_model):  # fed numpy arrays (ONNX Runtime): the same, bit for bit
        layers, answers = run(policy, layer_logits, host_arrays=True)
        assert torch.equal(layers, replayed.exit_layer) and torch.equal(answers, replayed.answer)


@settings(max_examples=50, deadline=None)
@given(policy_and_logits())
def test_replay_follows_documented_rules(case) -> None:
    policy, layer_logits = case
    num_layers = layer_logits.shape[1]
    replayed = replay(policy, layer_logits)
    assert replayed.exit_layer.dtype == torch.long and replayed.answer.shape == layer_logits[:, 0].shape
    for n, row in enumerate(layer_logits):
        layer = int(replayed.exit_layer[n])
        assert 1 <= layer <= num_layers
        assert layer >= policy.earliest_exit() or layer == num_layers
        expected_layer, expected_answer = spec_reference(policy, row)
        assert layer == expected_layer, f"{policy.label()} row {n}"
        torch.testing.assert_close(replayed.answer[n], expected_answer, rtol=1e-5, atol=1e-5)
        if not (isinstance(policy, PCEEExit) and policy.ensemble != "none"):
            assert torch.equal(replayed.answer[n], row[layer - 1]), "answers with the exit layer's own head"


@settings(max_examples=50, deadline=None)
@given(policy_and_logits(), st.randoms(use_true_random=False))
def test_replay_is_per_example(case, rnd) -> None:
    """Permuting the batch permutes the results: no row's decision depends on another row."""
    policy, layer_logits = case
    order = list(range(layer_logits.shape[0]))
    rnd.shuffle(order)
    perm = torch.tensor(order)
    base, shuffled = replay(policy, layer_logits), replay(policy, layer_logits[perm])
    assert torch.equal(shuffled.exit_layer, base.exit_layer[perm])
    torch.testing.assert_close(shuffled.answer, base.answer[perm], rtol=1e-6, atol=1e-6)
