"""Fidelity to the published code: our exit policies against restatements of PABEE, DeeBERT, PCEE-BERT and ELBERT.

``tests/seed_reference.py`` restates each paper's exit rule from its repository, one example and one layer at a time,
with the same torch operations as the published loop (its docstrings cite file, function and lines, and say where
the restatement departs from the literal code). This module compares our policies with it in three ways:

* hand-built cases, where the expected exit layer and answer are worked out in comments and asserted for the
  restatement *and* for ours (offline :func:`multiexit.policies.replay` and the online batch-size-1 ``ExitTracker``);
* thousands of random float32 logits per rule (seeded; small and large logits, repeated rows, integer rows with
  exact ties, slowly drifting rows so that streaks happen), with 0 disagreements allowed in exit layer or answer
  between replay, the batch-size-1 tracker and the restatement;
* two model-level checks: DeeBERT's ``init_highway_pooler`` (every off-ramp pooler starts as a copy of the
  pretrained pooler) and ELBERT's single shared exit (``num_exit_layers: 1``, ``use_out_pooler``).

The policies are written against the exit-policy API of the spec (``PCEEExit(ensemble="none"|"pcee"|"all"|
"streak")``, ``ELBERTExit(..., margin=...)`` with ``criterion`` "same" / "monotonic" / "range", the
``shared_exit`` head and the pooler copy at load).

Known places where our policies *deliberately* differ from the literal code, each pinned by its own test below:
DeeBERT's untrained L-th ramp (we never test layer L), and a probability that underflows to 0 (DeeBERT's and ELBERT's
entropy become NaN and never exit; ours treats 0·log 0 as 0).

One place where the spec's wording and the code part ways in float32: ELBERT tracks p(class 0) for both classes, and
at large logits p(predicted class) rounds to 1.0 while p(class 0) keeps moving. For binary tasks the tests hold our
rule to the code (``test_elbert_monotonic_in_p_class0_even_when_saturated`` and the ``saturated`` random tests);
the moderate-logit random tests are unaffected by it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import seed_reference as ref
import torch
from torch.nn import functional as F

from multiexit.policies import ELBERTExit, EntropyExit, ExitTracker, PatienceExit, PCEEExit, replay
from multiexit.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ENSEMBLES = {0: "none", 1: "pcee", 2: "all"}  # PCEE-BERT's --do_ensemble -> our PCEEExit(ensemble=...)
CRITERIA = {"bias_1": "same", "bias_2": "monotonic", "bias_3": "range"}  # ELBERT's thres_name -> our criterion


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def rows_of(*rows: list[float]) -> torch.Tensor:
    """One example's per-layer logits [L, C] (float32)."""
    return torch.tensor(rows, dtype=torch.float32)


def rows_from_probs(*rows: list[float]) -> torch.Tensor:
    """One example's per-layer logits [L, C] from probabilities: log p, with p = 0 written as a logit of -1e4 (its
    softmax is exactly 0 in float32)."""
    logp = torch.tensor(rows, dtype=torch.float64).log().clamp(min=-1e4)
    return logp.float()


def pabee_policy(patience: int, regression_threshold: float | None = None) -> PatienceExit:
    return PatienceExit(patience=patience, regression_threshold=regression_threshold)


def pcee_policy(patience: int, tau: float, do_ensemble: int) -> PCEEExit:
    return PCEEExit(patience=patience, tau=tau, ensemble=ENSEMBLES[do_ensemble])


def elbert_policy(
    delta: float, window: int, thres_name: str, margin: float = 0.0, range_tmp: float | None = None
) -> ELBERTExit:
    criterion = CRITERIA[thres_name]
    return ELBERTExit(
        delta=delta,
        window=window,
        criterion=criterion,
        range_threshold=range_tmp if criterion == "range" else None,
        margin=margin,
    )


def run_tracker(policy, row: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The online path at batch size 1: one ``update`` per layer until the tracker is done."""
    num_layers = row.shape[0]
    tracker = ExitTracker(policy, batch_size=1, num_layers=num_layers)
    for layer in range(1, num_layers + 1):
        tracker.update(row[layer - 1 : layer], layer)
        if tracker.done:
            break
    assert tracker.done, "the tracker must be done after layer L"
    return int(tracker.exit_layer[0]), tracker.answer[0]


def run_replay(policy, row: torch.Tensor) -> tuple[int, torch.Tensor]:
    result = replay(policy, row[None])
    return int(result.exit_layer[0]), result.answer[0]


def same_answer(ours: torch.Tensor, expected: torch.Tensor, probs: bool) -> bool:
    """Logit answers must be the answering layer's logits exactly. A PCEE ensemble answers log(mean probabilities):
    its softmax must be the reference's mean probabilities and its argmax the same class."""
    if not probs:
        return ours.shape == expected.shape and torch.equal(ours.float(), expected.float())
    ours_probs = torch.softmax(ours.float(), dim=-1)
    return bool(
        torch.allclose(ours_probs, expected.float(), atol=1e-6, rtol=1e-5)
        and int(ours.argmax()) == int(expected.argmax())
    )


def assert_case(
    policy,
    row: torch.Tensor,
    reference: tuple[int, torch.Tensor],
    expected_layer: int,
    expected_probs: list[float] | None = None,
) -> None:
    """Pin one hand-built case: the restatement and both of our paths give ``expected_layer`` and answer with that
    layer's logits (or with ``expected_probs``, the mean probabilities of a PCEE ensemble)."""
    ref_layer, ref_answer = reference
    assert ref_layer == expected_layer, f"the restatement exits at {ref_layer}, the code at {expected_layer}"
    if expected_probs is None:
        assert torch.equal(ref_answer, row[expected_layer - 1])
        expected_answer, probs = row[expected_layer - 1], False
    else:
        expected_answer, probs = torch.tensor(expected_probs, dtype=torch.float32), True
        torch.testing.assert_close(ref_answer, expected_answer, atol=1e-6, rtol=1e-5)
    for path, (layer, answer) in (("replay", run_replay(policy, row)), ("tracker", run_tracker(policy, row))):
        assert layer == expected_layer, f"{path}: {policy} exits at {layer}, the published code at {expected_layer}"
        assert same_answer(answer, expected_answer, probs), f"{path}: {policy} answers {answer}, code {expected_answer}"


def compare_many(policy, layer_logits: torch.Tensor, reference, probs: bool) -> list[str]:
    """Exit layer and answer of every example from replay, the batch-size-1 tracker and ``reference(row)``;
    returns a description of each disagreement."""
    replayed = replay(policy, layer_logits)
    problems = []
    for index, row in enumerate(layer_logits):
        ref_layer, ref_answer = reference(row)
        got = {
            "replay": (int(replayed.exit_layer[index]), replayed.answer[index]),
            "tracker": run_tracker(policy, row),
        }
        for path, (layer, answer) in got.items():
            if layer != ref_layer or not same_answer(answer, ref_answer, probs):
                problems.append(
                    f"{policy}: example {index} {path} exits at {layer} answering {answer.tolist()}, the code at "
                    f"{ref_layer} answering {ref_answer.tolist()}; logits {row.tolist()}"
                )
    return problems


def assert_no_disagreement(name: str, problems: list[str], checked: int) -> None:
    print(f"{name}: {checked} random examples checked (replay, batch-1 tracker, restatement), "
          f"{len(problems)} disagreements")
    assert not problems, f"{len(problems)} disagreements, first ones:\n" + "\n".join(problems[:5])


# --------------------------------------------------------------------------------------------------------------------
# random logits
# --------------------------------------------------------------------------------------------------------------------


def random_logits(
    rng: np.random.Generator, n: int, num_layers: int, num_classes: int, big: float = 20.0, clip: float = 45.0
) -> torch.Tensor:
    """``n`` examples of [L, C] float32 logits built to make the rules' corner cases frequent.

    Each example has a scale among 0.05 .. ``big``; a fifth are small integers (exact ties in argmax and in
    probabilities); from layer 2 on a layer repeats the previous one exactly (30 %), drifts slightly from it (20 %),
    or rescales it (15 %, same argmax, confidence up or down); 5 % of the rows are constant (uniform softmax).
    Values are clipped to ±``clip``: with ``clip`` <= 45 no softmax probability underflows to 0 in float32, where
    the published entropies turn NaN (a deliberate difference, tested by hand)."""
    scales = rng.choice(np.array([0.05, 0.5, 2.0, 6.0, big]), size=n)
    x = rng.standard_normal((n, num_layers, num_classes)) * scales[:, None, None]
    integer = rng.random(n) < 0.2
    x[integer] = rng.integers(-2, 3, size=(int(integer.sum()), num_layers, num_classes))
    for layer in range(1, num_layers):
        u = rng.random(n)
        repeat = u < 0.3
        x[repeat, layer] = x[repeat, layer - 1]
        drift = (u >= 0.3) & (u < 0.5)
        noise = rng.standard_normal((int(drift.sum()), num_classes)) * 0.1 * scales[drift, None]
        x[drift, layer] = x[drift, layer - 1] + noise
        rescale = (u >= 0.5) & (u < 0.65)
        x[rescale, layer] = x[rescale, layer - 1] * rng.uniform(0.6, 1.7, size=(int(rescale.sum()), 1))
    constant = rng.random((n, num_layers)) < 0.05
    x[constant] = x[constant][:, :1]
    return torch.from_numpy(np.clip(x, -clip, clip).astype(np.float32))


def random_regression(rng: np.random.Generator, n: int, num_layers: int) -> torch.Tensor:
    """``n`` examples of [L, 1] regression outputs: half-integer walks (differences of exactly 0, 0.5, 1, ... so
    that ``|Δ| == threshold`` happens) and continuous walks with small and large steps."""
    halves = rng.integers(-2, 3, size=(n, num_layers)) * 0.5
    halves = np.cumsum(halves * (rng.random((n, num_layers)) < 0.6), axis=1)
    steps = rng.standard_normal((n, num_layers)) * rng.choice(np.array([0.01, 0.1, 1.0]), size=(n, 1))
    walks = np.cumsum(steps, axis=1) + rng.standard_normal((n, 1))
    values = np.where((rng.random(n) < 0.5)[:, None], halves, walks)
    return torch.from_numpy(values.astype(np.float32))[..., None]


def settings_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ====================================================================================================================
# PABEE
# ====================================================================================================================


def test_pabee_counter_resets_on_a_changed_argmax():
    """JetRunner/PABEE pabee/modeling_bert.py BertModel.forward: the counter goes up when the argmax equals the
    previous layer's and resets to 0 otherwise; the loop breaks at patient_counter == patience."""
    row = rows_of([2, 0, 0], [1, 0, 0], [0, 3, 0], [0, 2, 1], [0, 5, 0], [9, 0, 0])
    # argmax 0,0,1,1,1,0 -> counter 0,1,0,1,2 -> patience 2 exits at layer 5 with layer 5's logits
    assert_case(pabee_policy(2), row, ref.pabee(row, 2), expected_layer=5)


def test_pabee_earliest_exit_is_patience_plus_one():
    """PABEE (modeling_bert.py BertModel.forward): layer 1 has no previous result, so the counter can first reach
    ``patience`` at layer patience + 1."""
    row = rows_of([1, 0], [2, 0], [3, 0], [4, 0], [5, 0])
    for patience in (1, 2, 3):
        assert_case(pabee_policy(patience), row, ref.pabee(row, patience), expected_layer=patience + 1)


def test_pabee_patience_zero_is_the_full_model():
    """PABEE (modeling_bert.py BertModel.forward, ``elif self.patience == 0``): the whole encoder runs and the last
    classifier answers, even when every layer agrees."""
    row = rows_of([1, 0], [1, 0], [1, 0], [0, 1])
    assert_case(pabee_policy(0), row, ref.pabee(row, 0), expected_layer=4)


def test_pabee_argmax_ties_go_to_the_lower_class():
    """PABEE compares ``logits.argmax(dim=1)``; torch's argmax returns the first maximal index, so [1, 1] reads as
    class 0 (agreeing with [1, 0]) and [0, 1] -> [1, 1] is a change of class."""
    row = rows_of([1, 1], [1, 0], [2, 2], [0, 1])
    # argmax 0,0,0 -> counter 1 at layer 2, 2 at layer 3
    assert_case(pabee_policy(2), row, ref.pabee(row, 2), expected_layer=3)
    row = rows_of([0, 1], [1, 1], [1, 1], [0, 5])
    # argmax 1,0,0 -> counter 0 at layer 2 (1 != 0), 1 at layer 3
    assert_case(pabee_policy(1), row, ref.pabee(row, 1), expected_layer=3)


def test_pabee_exit_at_the_last_layer():
    """PABEE: the counter may reach ``patience`` exactly at layer L (an exit by the rule), and a patience longer than
    the model simply runs all layers (the loop ends with ``patient_result`` = layer L's logits)."""
    row = rows_of([0, 1], [0, 2], [0, 3])
    assert_case(pabee_policy(2), row, ref.pabee(row, 2), expected_layer=3)
    assert_case(pabee_policy(5), row, ref.pabee(row, 5), expected_layer=3)
    one_layer = rows_of([3, 1])
    assert_case(pabee_policy(1), one_layer, ref.pabee(one_layer, 1), expected_layer=1)


def test_pabee_regression_difference_is_strictly_below_the_threshold():
    """PABEE regression (modeling_bert.py BertModel.forward, ``if regression``): the counter goes up iff
    ``torch.abs(patient_result - labels) < self.regression_threshold`` (strict)."""
    row = rows_of([0.0], [0.5], [1.0], [1.25], [1.3], [9.0])
    # |Δ| = 0.5, 0.5 (not < 0.5), 0.25, 0.05 -> counter 0,0,1,2 -> exit at layer 5
    assert_case(pabee_policy(2, 0.5), row, ref.pabee(row, 2, 0.5), expected_layer=5)
    # with the code's default threshold 0 no two predictions ever agree: the full model runs
    assert_case(pabee_policy(1, 0.0), row, ref.pabee(row, 1, 0.0), expected_layer=6)
    # patience 0 is the full model for regression too
    assert_case(pabee_policy(0, 0.5), row, ref.pabee(row, 0, 0.5), expected_layer=6)


def test_pabee_random_classification_agrees_with_the_code():
    """PABEE classification (JetRunner/PABEE pabee/modeling_bert.py and modeling_albert.py, the patience loop in
    BertModel.forward / AlbertModel.forward) on random logits, 2-5 classes, 1-12 layers, patience 0-5."""
    rng = settings_rng(1)
    problems, checked = [], 0
    for patience, num_layers, num_classes in [
        (1, 4, 2), (2, 6, 3), (3, 12, 2), (0, 4, 5), (1, 1, 3), (2, 3, 5), (5, 8, 2), (1, 7, 4),
    ]:
        logits = random_logits(rng, 400, num_layers, num_classes, big=1e4, clip=1e4)  # argmax only: any scale
        problems += compare_many(
            pabee_policy(patience), logits, lambda row, p=patience: ref.pabee(row, p), probs=False
        )
        checked += len(logits)
    assert_no_disagreement("pabee classification", problems, checked)


def test_pabee_random_regression_agrees_with_the_code():
    """PABEE regression (pabee/modeling_bert.py BertModel.forward, ``if regression``) on random outputs with exact
    ``|Δ| == threshold`` cases, thresholds 0-1, patience 0-3."""
    rng = settings_rng(2)
    problems, checked = [], 0
    for patience, threshold, num_layers in [
        (1, 0.5, 4), (2, 0.1, 6), (2, 1.0, 12), (3, 0.5, 8), (1, 0.0, 5), (0, 0.5, 3), (1, 0.02, 2),
    ]:
        outputs = random_regression(rng, 300, num_layers)
        policy = pabee_policy(patience, threshold)
        problems += compare_many(
            policy, outputs, lambda row, p=patience, t=threshold: ref.pabee(row, p, t), probs=False
        )
        checked += len(outputs)
    assert_no_disagreement("pabee regression", problems, checked)


# ====================================================================================================================
# DeeBERT
# ====================================================================================================================


def test_deebert_exits_at_the_first_ramp_below_the_threshold_in_nats():
    """castorini/DeeBERT transformers/modeling_highway_bert.py BertEncoder.forward: ``if highway_entropy <
    self.early_exit_entropy[i]: raise HighwayException(new_output, i + 1)``, with ``entropy`` in nats."""
    row = rows_of([0, 0], [3, 0], [6, 0], [9, 0], [0, 0])
    # H = ln 2, 0.191, 0.0173, ... nats: threshold 0.1 -> layer 3 (the first below), answering with its logits
    assert_case(EntropyExit(threshold=0.1), row, ref.deebert(row, 0.1), expected_layer=3)
    # nats, not normalised: a 4-class row with H = 0.918 nats (0.662 of ln 4) does not pass 0.9
    row = rows_of([2, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0], [8, 0, 0, 0], [0, 0, 0, 0])
    # H = .918, .918, 1.268, .0078 nats: threshold 0.9 exits at layer 4
    assert_case(EntropyExit(threshold=0.9), row, ref.deebert(row, 0.9), expected_layer=4)
    assert_case(EntropyExit(threshold=0.95), row, ref.deebert(row, 0.95), expected_layer=1)


def test_deebert_threshold_is_strict():
    """DeeBERT BertEncoder.forward compares ``highway_entropy < early_exit_entropy[i]``: a uniform 2-class ramp has
    H = ln 2 exactly (in float32) and does not exit at threshold ln 2; threshold 0 never exits."""
    row = rows_of([0, 0], [0, 0], [5, 0])
    assert_case(EntropyExit(threshold=math.log(2)), row, ref.deebert(row, math.log(2)), expected_layer=3)
    row = rows_of([30, 0], [40, 0], [5, 0])
    assert_case(EntropyExit(threshold=0.0), row, ref.deebert(row, 0.0), expected_layer=3)


def test_deebert_layer_l_is_never_tested_but_answers():
    """DeeBERT checks ramp L too (BertEncoder.forward loops over every layer), although ``train_highway`` never trains
    it (``sum(highway_losses[:-1])``). Ours has no L-th ramp: the final classifier answers at layer L whatever its
    entropy, as the code does when no ramp raised HighwayException."""
    unconfident_last = rows_of([0, 0], [0.1, 0], [0, 0.2])
    assert_case(EntropyExit(threshold=0.1), unconfident_last, ref.deebert(unconfident_last, 0.1), expected_layer=3)
    confident_last = rows_of([0, 0], [0.1, 0], [20, 0])
    assert_case(EntropyExit(threshold=0.1), confident_last, ref.deebert(confident_last, 0.1), expected_layer=3)


def test_deebert_underflow_nan_is_a_deliberate_difference():
    """DeeBERT's ``entropy`` (modeling_highway_bert.py, after PR #18) is ``-sum(p * log p)``: when a probability
    underflows to exactly 0 (a logit gap beyond ~103 in float32) it is ``0 * -inf = NaN``, and ``NaN < threshold``
    is False, so that ramp never exits. The formula before PR #18 overflows instead (``exp(100) = inf``). Ours
    takes 0·log 0 = 0: a certain ramp has entropy 0 and exits. This is the one place where we do not follow the
    code on purpose; the random tests stay below that range."""
    row = rows_of([200, 0], [0, 0], [0, 0])
    assert torch.isnan(ref.deebert_entropy(row[:1])).all()
    assert torch.isnan(ref.deebert_entropy_original(rows_of([100, 0]))).all()
    assert ref.deebert(row, 0.5)[0] == 3  # the code: NaN entropy at layer 1, so no exit before L
    for path in (run_replay, run_tracker):
        layer, answer = path(EntropyExit(threshold=0.5), row)
        assert layer == 1 and torch.equal(answer, row[0])  # ours: H = 0 < 0.5


def test_deebert_random_agrees_with_the_code():
    """DeeBERT (castorini/DeeBERT modeling_highway_bert.py: entropy, BertEncoder.forward, HighwayException) on random
    logits, 2-5 classes, thresholds 0-1.2 nats, ramps 1..L-1 tested and the final classifier answering at L."""
    rng = settings_rng(3)
    problems, checked = [], 0
    for threshold, num_layers, num_classes in [
        (0.05, 4, 2), (0.2, 6, 3), (0.5, 10, 2), (0.0, 3, 2), (0.9, 5, 5), (0.3, 1, 3), (1.2, 8, 4), (0.01, 2, 2),
    ]:
        logits = random_logits(rng, 350, num_layers, num_classes)
        policy = EntropyExit(threshold=threshold)
        problems += compare_many(policy, logits, lambda row, t=threshold: ref.deebert(row, t), probs=False)
        checked += len(logits)
    assert_no_disagreement("deebert", problems, checked)


# ====================================================================================================================
# PCEE-BERT
# ====================================================================================================================


def test_pcee_ensemble_list_restarts_with_the_unconfident_layer():
    """michael-wzhu/PCEE-BERT pabee/modeling_pabee_bert.py BertModelWithPabeeV1.forward: ``if patient_counter == 0:
    all_prev_logits_close = [cur_probs]`` -- the list restarts with the current, *unconfident* layer, so the
    do_ensemble=1 answer averages the layer before the confident streak too.

    Layer 1: p = [.5, 0, .5], H/ln 3 = 0.631 >= 0.6: unconfident, counter 0, list [p1].
    Layer 2: p = [.3, .7, 0], H/ln 3 = 0.556 < 0.6: confident, counter 1 == patience: exit, list [p1, p2].
    do_ensemble=1 answers mean(p1, p2) = [.4, .35, .25]: class 0, where layer 2 alone says class 1."""
    row = rows_from_probs([0.5, 0.0, 0.5], [0.3, 0.7, 0.0])
    assert_case(pcee_policy(1, 0.6, 1), row, ref.pcee(row, 1, 0.6, 1), 2, expected_probs=[0.4, 0.35, 0.25])
    assert_case(pcee_policy(1, 0.6, 2), row, ref.pcee(row, 1, 0.6, 2), 2, expected_probs=[0.4, 0.35, 0.25])
    assert_case(pcee_policy(1, 0.6, 0), row, ref.pcee(row, 1, 0.6, 0), 2)
    for path in (run_replay, run_tracker):
        layer, answer = path(pcee_policy(1, 0.6, 1), row)
        assert int(answer.argmax()) == 0, "the code answers class 0"
        # our own "streak" variant (no published counterpart) averages only the confident streak: class 1
        layer, answer = path(PCEEExit(patience=1, tau=0.6, ensemble="streak"), row)
        assert layer == 2
        torch.testing.assert_close(torch.softmax(answer, -1), torch.tensor([0.3, 0.7, 0.0]), atol=1e-6, rtol=0)


def test_pcee_counter_reset_and_the_three_answers():
    """PCEE-BERT BertModelWithPabeeV1.forward: a confident layer (normalised entropy < tau) counts up, an unconfident
    one resets; answers: do_ensemble 0 the exit layer's logits, 1 the mean of all_prev_logits_close, 2 the mean of
    all_prev_logits (every layer so far)."""
    confident, unconfident = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]
    probs = [confident, unconfident, [0.05, 0.9, 0.05], [0.05, 0.92, 0.03], confident, unconfident]
    row = rows_from_probs(*probs)
    # counter 1,0,1,2 -> patience 2 exits at layer 4; list [p2 (unconfident), p3, p4]
    expected = {
        0: None,
        1: np.mean(probs[1:4], axis=0).tolist(),
        2: np.mean(probs[0:4], axis=0).tolist(),
    }
    for do_ensemble, expected_probs in expected.items():
        assert_case(pcee_policy(2, 0.5, do_ensemble), row, ref.pcee(row, 2, 0.5, do_ensemble), 4, expected_probs)


def test_pcee_earliest_exit_is_patience():
    """PCEE-BERT: the counter counts confident layers from layer 1, so the earliest exit is layer ``patience`` (one
    earlier than PABEE); a streak from layer 1 has no unconfident layer in front of it in the list."""
    probs = [[0.95, 0.05], [0.9, 0.1], [0.97, 0.03], [0.5, 0.5]]
    row = rows_from_probs(*probs)
    for patience in (1, 2, 3):
        mean = np.mean(probs[:patience], axis=0).tolist()
        assert_case(pcee_policy(patience, 0.6, 1), row, ref.pcee(row, patience, 0.6, 1), patience, mean)
        assert_case(pcee_policy(patience, 0.6, 0), row, ref.pcee(row, patience, 0.6, 0), patience)


def test_pcee_patience_zero_is_the_full_model_with_logits():
    """PCEE-BERT BertModelWithPabeeV1.forward ``elif self.patience == 0``: the whole encoder runs and the last
    classifier's logits answer, for every do_ensemble (the ensemble code is in the other branch)."""
    row = rows_from_probs([0.99, 0.01], [0.98, 0.02], [0.4, 0.6])
    for do_ensemble in (0, 1, 2):
        assert_case(pcee_policy(0, 0.5, do_ensemble), row, ref.pcee(row, 0, 0.5, do_ensemble), 3)


def test_pcee_reaching_the_last_layer_averages_what_the_list_holds():
    """PCEE-BERT: when the loop ends without ``patient_counter == patience``, the answer is still built from the
    lists: do_ensemble 1 averages all_prev_logits_close as it stands, 2 averages every layer, 0 is layer L's logits."""
    conf, unconf = [0.95, 0.05], [0.55, 0.45]
    # counter 1, 0, 1 at L = 3 (patience 3): close list [p2, p3]
    probs = [conf, unconf, [0.1, 0.9]]
    row = rows_from_probs(*probs)
    assert_case(pcee_policy(3, 0.5, 1), row, ref.pcee(row, 3, 0.5, 1), 3, np.mean(probs[1:], axis=0).tolist())
    assert_case(pcee_policy(3, 0.5, 2), row, ref.pcee(row, 3, 0.5, 2), 3, np.mean(probs, axis=0).tolist())
    assert_case(pcee_policy(3, 0.5, 0), row, ref.pcee(row, 3, 0.5, 0), 3)
    # layer L unconfident: counter 0, the list restarts as [pL], so do_ensemble 1 answers softmax(layer L)
    probs = [conf, conf, [0.45, 0.55]]
    row = rows_from_probs(*probs)
    assert_case(pcee_policy(3, 0.5, 1), row, ref.pcee(row, 3, 0.5, 1), 3, probs[2])
    assert_case(pcee_policy(3, 0.5, 2), row, ref.pcee(row, 3, 0.5, 2), 3, np.mean(probs, axis=0).tolist())


def test_pcee_tau_is_strict_on_normalised_entropy():
    """PCEE-BERT normal_shannon_entropy (pabee/modeling_pabee_bert.py) divides by ln C, and the test is
    ``cur_entropy < exiting_threshold``: a uniform row (exactly 1.0) is never confident at tau = 1; a 4-class row
    with H = 0.918 nats (0.662 of ln 4) is confident at tau 0.7 although H > 0.7 nats; a one-hot row is never
    confident at tau = 0."""
    row = rows_of([0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0])
    assert_case(pcee_policy(1, 1.0, 0), row, ref.pcee(row, 1, 1.0, 0), expected_layer=3)
    row = rows_of([2, 0, 0, 0], [0, 0, 0, 0])
    assert_case(pcee_policy(1, 0.7, 0), row, ref.pcee(row, 1, 0.7, 0), expected_layer=1)
    row = rows_of([100, 0], [0, 100], [50, 0])
    assert_case(pcee_policy(1, 0.0, 0), row, ref.pcee(row, 1, 0.0, 0), expected_layer=3)


@pytest.mark.parametrize("do_ensemble", [0, 1, 2])
def test_pcee_random_agrees_with_the_code(do_ensemble):
    """PCEE-BERT (michael-wzhu/PCEE-BERT pabee/modeling_pabee_bert.py BertModelWithPabeeV1.forward and
    normal_shannon_entropy) on random logits, 2-5 classes, patience 0-4, tau 0.05-0.95, for one --do_ensemble."""
    rng = settings_rng(10 + do_ensemble)
    problems, checked = [], 0
    for patience, tau, num_layers, num_classes in [
        (1, 0.3, 4, 2), (2, 0.6, 6, 3), (3, 0.9, 10, 2), (0, 0.5, 3, 4), (1, 0.95, 1, 3), (2, 0.05, 5, 5),
        (4, 0.7, 8, 2), (2, 0.4, 3, 3),
    ]:
        logits = random_logits(rng, 150, num_layers, num_classes)
        policy = pcee_policy(patience, tau, do_ensemble)
        reference = lambda row, p=patience, t=tau: ref.pcee(row, p, t, do_ensemble)  # noqa: E731
        problems += compare_many(policy, logits, reference, probs=do_ensemble != 0 and patience != 0)
        checked += len(logits)
    assert_no_disagreement(f"pcee do_ensemble={do_ensemble}", problems, checked)


# ====================================================================================================================
# ELBERT
# ====================================================================================================================


def test_elbert_monotonic_issue_case():
    """shakeley/ELBERT test_ver/modeling_albert.py ExitLayer.lower_than_thres, thres_name bias_2, window 2, δ 0.
    x = p(class 0) per layer = .731, .269, .269. Layer 2: x[-2] = .731 > .5 (class 0) but x[-1] < x[-2]: no.
    Layer 3: x[-2] = .269 < .5 (class 1), x[-1] == x[-2], a tie, passes: the code exits at 3."""
    row = rows_of([1, 0], [0, 1], [0, 1])
    assert_case(elbert_policy(0.0, 2, "bias_2"), row, ref.elbert(row, 0.0, 2, "bias_2"), expected_layer=3)
    longer = rows_of([1, 0], [0, 1], [0, 1], [0, 1])  # the same, with a layer after it: the exit is by the rule
    assert_case(elbert_policy(0.0, 2, "bias_2"), longer, ref.elbert(longer, 0.0, 2, "bias_2"), expected_layer=3)


def test_elbert_monotonic_ties_pass():
    """ELBERT lower_than_thres bias_2 fails only on ``x[-i] < logit`` (class 0) or ``x[-i] > logit`` (class 1):
    equal probabilities pass. [[30, 0]] * 3: x = 1.0, 1.0 at layer 2 -> the code exits at 2."""
    row = rows_of([30, 0], [30, 0], [30, 0])
    assert_case(elbert_policy(0.0, 2, "bias_2"), row, ref.elbert(row, 0.0, 2, "bias_2"), expected_layer=2)
    row = rows_of([0, 2], [0, 2], [0, 2], [0, 2])
    assert_case(elbert_policy(0.0, 3, "bias_2"), row, ref.elbert(row, 0.0, 3, "bias_2"), expected_layer=3)


def test_elbert_monotonic_direction_follows_the_window_start():
    """ELBERT bias_2: x[-N] decides the side (``is_larger``); class 0 needs p0 non-decreasing, class 1 needs p0
    non-increasing (p1 non-decreasing). A window that starts inside the margin never exits."""
    rising_0 = rows_of([1, 0], [2, 0], [3, 0], [0, 0])
    assert_case(elbert_policy(0.0, 3, "bias_2"), rising_0, ref.elbert(rising_0, 0.0, 3, "bias_2"), 3)
    falling_0 = rows_of([3, 0], [2, 0], [1, 0], [0, 0])
    assert_case(elbert_policy(0.0, 3, "bias_2"), falling_0, ref.elbert(falling_0, 0.0, 3, "bias_2"), 4)
    rising_1 = rows_of([0, 1], [0, 1.5], [0, 3], [0, 0])
    assert_case(elbert_policy(0.0, 2, "bias_2"), rising_1, ref.elbert(rising_1, 0.0, 2, "bias_2"), 2)
    # margin 0.3: the window [1, 2] starts at p0 = .731, not > .8: no exit at 2; [2, 3] starts at .881 and rises
    inside = rows_of([1, 0], [2, 0], [3, 0], [-1, 0])
    assert_case(elbert_policy(0.0, 2, "bias_2", 0.3), inside, ref.elbert(inside, 0.0, 2, "bias_2", 0.3), 3)


def test_elbert_monotonic_class_1_saturated_follows_the_code():
    """ELBERT AlbertTransformer.forward tracks ``softmax(logits)[0][0]``, p(class 0), in float32 for both sides.
    For class 1 at large logits p(class 1) rounds to 1.0 while p(class 0) still moves: [0, 31] -> [0, 30] has p1
    1.0 -> 1.0 (a tie) but p0 3.4e-14 -> 9.4e-14, a rise, which fails bias_2 on the class-1 side. The code exits
    at 3 (p0 equal at layers 2 and 3), not 2, and so do we: we judge p_c through 1 - p_c, which is p0 here."""
    row = rows_of([0, 31], [0, 30], [0, 30], [0, 30])
    assert_case(elbert_policy(0.0, 2, "bias_2"), row, ref.elbert(row, 0.0, 2, "bias_2"), expected_layer=3)


def test_elbert_class_0_saturation_is_a_deliberate_difference():
    """The mirror case: for class 0 the code compares p0 itself, which rounds to 1.0 in float32 beyond a logit gap of
    ~17, so [31, 0] -> [30, 0] is a tie (1.0, 1.0) and the code exits at 2, although p0 fell (p1 rose from 3.4e-14 to
    9.4e-14). We judge both classes through 1 - p_c without rounding, so this window is not monotonic and the exit is
    at 3 (the window [30, 0], [30, 0]). README, "What is different", lists this."""
    row = rows_of([31, 0], [30, 0], [30, 0], [30, 0])
    assert ref.elbert(row, 0.0, 2, "bias_2")[0] == 2
    for path in (run_replay, run_tracker):
        assert path(elbert_policy(0.0, 2, "bias_2"), row)[0] == 3


def test_elbert_range_issue_case():
    """ELBERT lower_than_thres bias_3, window 2, δ 0, range_tmp 0.05. x = .881, .119, .119. Layer 2: neither
    min > .5 nor max < .5. Layer 3: max = .119 < .5 and max - min = 0 <= .05: the code exits at 3."""
    row = rows_of([2, 0], [0, 2], [0, 2])
    reference = ref.elbert(row, 0.0, 2, "bias_3", range_tmp=0.05)
    assert_case(elbert_policy(0.0, 2, "bias_3", range_tmp=0.05), row, reference, expected_layer=3)
    longer = rows_of([2, 0], [0, 2], [0, 2], [0, 2])
    reference = ref.elbert(longer, 0.0, 2, "bias_3", range_tmp=0.05)
    assert_case(elbert_policy(0.0, 2, "bias_3", range_tmp=0.05), longer, reference, expected_layer=3)


def test_elbert_range_bound_is_inclusive_and_needs_one_side():
    """ELBERT bias_3: ``(max_tmp - min_tmp) <= range_tmp`` (inclusive: a range of 0 passes range_tmp 0) after
    ``min_tmp > 0.5 + margin or max_tmp < 0.5 - margin``; a window straddling 0.5 + margin never exits."""
    row = rows_of([1, 0], [1, 0], [5, 0])
    reference = ref.elbert(row, 0.0, 2, "bias_3", range_tmp=0.0)
    assert_case(elbert_policy(0.0, 2, "bias_3", range_tmp=0.0), row, reference, expected_layer=2)
    wide = rows_of([1, 0], [3, 0], [5, 0], [5.1, 0])
    # p0 = .731, .953, .9933, .9939: ranges .222, .040, .0006 -> with range_tmp .01 the exit is at layer 4
    reference = ref.elbert(wide, 0.0, 2, "bias_3", range_tmp=0.01)
    assert_case(elbert_policy(0.0, 2, "bias_3", range_tmp=0.01), wide, reference, expected_layer=4)
    # margin 0.3: p0 = .731 at layer 1 is not > .8, so the window [1, 2] fails; [2, 3] passes with range .04
    reference = ref.elbert(wide, 0.0, 2, "bias_3", 0.3, range_tmp=0.05)
    assert_case(elbert_policy(0.0, 2, "bias_3", 0.3, 0.05), wide, reference, expected_layer=3)


def test_elbert_same_side_with_margin():
    """ELBERT bias_1: count x < 0.5 - margin and x > 0.5 + margin over the last N; exit iff all N on one side."""
    row = rows_of([1, 0], [1, 0], [2, 0], [2, 0], [0, 0])
    # margin 0: p0 = .731 twice -> exit at 2; margin .3 (p0 must exceed .8): only layers 3, 4 -> exit at 4
    assert_case(elbert_policy(0.0, 2, "bias_1"), row, ref.elbert(row, 0.0, 2, "bias_1"), expected_layer=2)
    assert_case(elbert_policy(0.0, 2, "bias_1", 0.3), row, ref.elbert(row, 0.0, 2, "bias_1", 0.3), 4)
    switching = rows_of([2, 0], [0, 2], [2, 0], [0, 2], [0, 3])
    assert_case(elbert_policy(0.0, 2, "bias_1"), switching, ref.elbert(switching, 0.0, 2, "bias_1"), 5)


def test_elbert_exact_half_is_on_neither_side():
    """ELBERT lower_than_thres: p0 = 0.5 exactly (equal logits) is neither ``< 0.5 - m`` nor ``> 0.5 + m``, so no
    stage-2 criterion can pass with it in the window (our argmax tie picks class 0 with p = 0.5, not > 0.5)."""
    row = rows_of([0, 0], [0, 0], [0, 0], [0, 0])
    for thres_name in ("bias_1", "bias_2", "bias_3"):
        reference = ref.elbert(row, 0.0, 2, thres_name, range_tmp=0.5)
        assert_case(elbert_policy(0.0, 2, thres_name, range_tmp=0.5), row, reference, expected_layer=4)


def test_elbert_stage1_and_the_window_not_yet_full():
    """ELBERT lower_than_thres: every bias_* first exits when the normalised entropy (ExitLayer.forward:
    ``sum(p log p) / log(1/C)``) is below exit_thres, even before the window is full; otherwise ``len(x) <
    cnt_bias`` returns False, so stage 2 first fires at layer N."""
    row = rows_of([5, 0], [5, 0], [5, 0], [5, 0])
    # normalised entropy of [5, 0] = 0.058: δ 0.1 exits at layer 1, δ 0.05 waits for the window (N = 3)
    for thres_name in ("bias_1", "bias_2", "bias_3"):
        reference = ref.elbert(row, 0.1, 3, thres_name, range_tmp=0.1)
        assert_case(elbert_policy(0.1, 3, thres_name, range_tmp=0.1), row, reference, expected_layer=1)
        reference = ref.elbert(row, 0.05, 3, thres_name, range_tmp=0.1)
        assert_case(elbert_policy(0.05, 3, thres_name, range_tmp=0.1), row, reference, expected_layer=3)


def test_elbert_last_layer_answers_when_nothing_fires():
    """ELBERT AlbertTransformer.forward: without a break the loop ends at cnt = L and ``exit_logits`` is layer L's."""
    row = rows_of([2, 0], [0, 2], [2, 0], [0, 2])
    for thres_name in ("bias_1", "bias_2", "bias_3"):
        reference = ref.elbert(row, 0.01, 2, thres_name, range_tmp=0.01)
        assert_case(elbert_policy(0.01, 2, thres_name, range_tmp=0.01), row, reference, expected_layer=4)


def test_elbert_underflow_nan_is_a_deliberate_difference():
    """ELBERT ExitLayer.forward: ``(p * log p).sum() / log(1/C)`` is NaN when p underflows to 0, so stage 1 cannot
    fire there (``NaN < exit_thres`` is False) and only the window can exit. Ours takes 0·log 0 = 0 and exits."""
    row = rows_of([200, 0], [0, 1], [1, 0], [0, 0])
    assert torch.isnan(ref.elbert_normalised_entropy(row[:1], 2)).all()
    assert ref.elbert(row, 0.1, 3, "bias_1")[0] == 4
    for path in (run_replay, run_tracker):
        assert path(elbert_policy(0.1, 3, "bias_1"), row)[0] == 1


RANDOM_ELBERT = [  # (δ, N, margin, range_tmp, L)
    (0.0, 2, 0.0, 0.05, 4), (0.1, 2, 0.1, 0.2, 6), (0.3, 3, 0.0, 0.01, 10), (0.05, 4, 0.2, 0.3, 8),
    (0.0, 3, 0.3, 0.0, 5), (0.2, 2, 0.05, 0.1, 3), (0.0, 2, 0.0, 0.5, 1), (0.02, 5, 0.0, 0.15, 7),
]


def run_random_elbert(thres_name: str, seed: int, big: float, clip: float) -> tuple[list[str], int]:
    rng = settings_rng(seed)
    problems, checked = [], 0
    for delta, window, margin, range_tmp, num_layers in RANDOM_ELBERT:
        logits = random_logits(rng, 150, num_layers, 2, big=big, clip=clip)
        policy = elbert_policy(delta, window, thres_name, margin, range_tmp)
        reference = lambda row, d=delta, w=window, m=margin, r=range_tmp: ref.elbert(  # noqa: E731
            row, d, w, thres_name, m, r, dtype=torch.float64
        )
        problems += compare_many(policy, logits, reference, probs=False)
        checked += len(logits)
    return problems, checked


@pytest.mark.parametrize("thres_name", ["bias_1", "bias_2", "bias_3"])
def test_elbert_random_binary_agrees_with_the_code(thres_name):
    """ELBERT (shakeley/ELBERT test_ver/modeling_albert.py AlbertTransformer.forward, ExitLayer.forward,
    ExitLayer.lower_than_thres) on random binary logits of moderate size (|z| <= 8), windows 1-5, margins 0-0.3,
    δ 0-0.3; the restatement evaluated in float64 (see seed_reference.elbert)."""
    problems, checked = run_random_elbert(thres_name, seed=20 + int(thres_name[-1]), big=4.0, clip=8.0)
    assert_no_disagreement(f"elbert {thres_name} (moderate logits)", problems, checked)


@pytest.mark.parametrize("thres_name", ["bias_1", "bias_2", "bias_3"])
def test_elbert_random_binary_saturated_class_1_agrees_with_the_code(thres_name):
    """Large logits too (|z| up to 45), where p(class 1) rounds to 1.0 in float32 while the code's p(class 0) keeps
    moving (see test_elbert_monotonic_class_1_saturated_follows_the_code): class 1 leads at every layer here, so
    every window is on class 1's side, where the code's float32 p0 keeps every digit and the rules must agree
    exactly. (Class 0 saturated is the deliberate difference pinned above.)"""
    rng = settings_rng(30 + int(thres_name[-1]))
    problems, checked = [], 0
    for delta, window, margin, range_tmp, num_layers in RANDOM_ELBERT:
        logits = random_logits(rng, 150, num_layers, 2, big=25.0, clip=45.0)
        # make class 1 the prediction everywhere: its logit is the larger one, by a gap of at least 1
        low, high = logits.min(dim=-1).values, logits.max(dim=-1).values
        logits = torch.stack([low, high + 1.0], dim=-1)
        policy = elbert_policy(delta, window, thres_name, margin, range_tmp)
        reference = lambda row, d=delta, w=window, m=margin, r=range_tmp: ref.elbert(  # noqa: E731
            row, d, w, thres_name, m, r, dtype=torch.float64
        )
        problems += compare_many(policy, logits, reference, probs=False)
        checked += len(logits)
    assert_no_disagreement(f"elbert {thres_name} (large logits, class 1)", problems, checked)


def test_elbert_entropy_only_agrees_with_the_code():
    """ELBERT thres_name "entropy" (ExitLayer.lower_than_thres: ``self.entropy.mean() < self.exit_thres``) is stage 1
    alone; ours is ELBERTExit with a window longer than the model, so that stage 2 never fires."""
    rng = settings_rng(40)
    problems, checked = [], 0
    for delta, num_layers in [(0.05, 4), (0.2, 6), (0.5, 12), (0.0, 3), (0.9, 2)]:
        logits = random_logits(rng, 200, num_layers, 2)
        policy = ELBERTExit(delta=delta, window=num_layers + 1, criterion="same")
        reference = lambda row, d=delta: ref.elbert(row, d, 8, "entropy")  # noqa: E731
        problems += compare_many(policy, logits, reference, probs=False)
        checked += len(logits)
    assert_no_disagreement("elbert entropy", problems, checked)


# --------------------------------------------------------------------------------------------------------------------
# ELBERT beyond two classes: our generalisation (no published counterpart; the code only follows p(class 0))


def elbert_multiclass_spec(
    row: torch.Tensor, delta: float, window: int, criterion: str, margin: float, range_threshold: float | None
) -> tuple[int, torch.Tensor]:
    """Our ELBERT rule for any C, written naively from the spec (not from published code): stage 1 exits when
    H/ln C < δ; from layer i >= N, c = argmax at the window start (layer i-N+1) and p_c must exceed 0.5 + margin
    there; "same": at every layer of the window; "monotonic": p_c non-decreasing (ties pass); "range": above
    0.5 + margin everywhere and max - min <= range_threshold."""
    num_layers, num_classes = row.shape
    probs = torch.softmax(row.float(), dim=-1)
    for layer in range(1, num_layers + 1):
        p = probs[layer - 1].double()
        plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
        if float(-plogp.sum()) / math.log(num_classes) < delta:
            return layer, row[layer - 1]
        if layer < window:
            continue
        block = probs[layer - window : layer]
        c = int(block[0].argmax())
        p_c = [float(v) for v in block[:, c]]
        ok = p_c[0] > 0.5 + margin
        if criterion == "same":
            ok = ok and all(v > 0.5 + margin for v in p_c)
        elif criterion == "monotonic":
            ok = ok and all(later >= earlier for earlier, later in zip(p_c, p_c[1:]))
        else:
            ok = ok and all(v > 0.5 + margin for v in p_c) and max(p_c) - min(p_c) <= range_threshold
        if ok:
            return layer, row[layer - 1]
    return num_layers, row[num_layers - 1]


def test_elbert_multiclass_follows_the_class_at_the_window_start():
    """Beyond two classes the code's p(class 0) says nothing about the predicted class; ours follows c, the argmax
    at the window start. Class 2 rising from .846 to .924 exits at layer 2 (the code, reading p0 = .042 -> .076 as
    a class-1 side moving the wrong way, would not)."""
    row = rows_of([0, 1, 3], [0.5, -5, 3], [0, 0, 0])
    assert ref.elbert(row, 0.0, 2, "bias_2")[0] == 3  # the code's rule, applied as written to 3 classes
    for path in (run_replay, run_tracker):
        layer, answer = path(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), row)
        assert layer == 2 and torch.equal(answer, row[1])
    # c is fixed at the window start: class 1 at .74 falling to .54 is not monotonic though it stays the argmax
    row = rows_of([0, 2, 0.5], [0, 1, 0.3], [0, 0, 0])
    for path in (run_replay, run_tracker):
        assert path(ELBERTExit(delta=0.0, window=2, criterion="monotonic"), row)[0] == 3


@pytest.mark.parametrize("criterion", ["same", "monotonic", "range"])
def test_elbert_multiclass_random_matches_the_spec_and_is_sensible(criterion):
    """Our multi-class ELBERT on random 3-5 class logits: equal to the spec written naively above, and every
    stage-2 exit (δ = 0) keeps c as the argmax at every layer of the window, so c is also the answer's class."""
    rng = settings_rng(50)
    checked = 0
    problems = []
    for window, margin, range_threshold, num_layers, num_classes in [
        (2, 0.0, 0.1, 5, 3), (3, 0.1, 0.2, 8, 4), (2, 0.2, 0.05, 6, 5), (4, 0.0, 0.3, 10, 3),
    ]:
        logits = random_logits(rng, 150, num_layers, num_classes, big=4.0, clip=8.0)
        policy = ELBERTExit(
            delta=0.0, window=window, criterion=criterion, margin=margin,
            range_threshold=range_threshold if criterion == "range" else None,
        )
        spec = lambda row, w=window, m=margin, r=range_threshold: elbert_multiclass_spec(  # noqa: E731
            row, 0.0, w, criterion, m, r
        )
        problems += compare_many(policy, logits, spec, probs=False)
        result = replay(policy, logits)
        for index, layer in enumerate(result.exit_layer.tolist()):
            if layer == num_layers:  # with δ = 0 every earlier exit is a stage-2 (window) exit
                continue
            window_classes = logits[index, max(layer - window, 0) : layer].argmax(dim=-1).tolist()
            answer_class = int(result.answer[index].argmax())
            if layer < window or len(set(window_classes)) != 1 or answer_class != window_classes[0]:
                problems.append(f"{policy}: example {index} exits at {layer} with window classes {window_classes} "
                                f"and answer class {answer_class}")
        checked += len(logits)
    assert_no_disagreement(f"elbert multi-class {criterion} (spec)", problems, checked)


def test_elbert_multiclass_spec_equals_the_code_for_two_classes():
    """Sanity of the generalisation: for binary tasks the spec written above gives the code's exits (moderate
    logits, where float32 keeps p0 and p1 = 1 - p0 equally fine)."""
    rng = settings_rng(60)
    checked = 0
    for delta, window, margin, range_tmp, num_layers in RANDOM_ELBERT:
        logits = random_logits(rng, 100, num_layers, 2, big=4.0, clip=8.0)
        for thres_name, criterion in CRITERIA.items():
            for row in logits:
                code = ref.elbert(row, delta, window, thres_name, margin, range_tmp)
                spec = elbert_multiclass_spec(row, delta, window, criterion, margin, range_tmp)
                assert code[0] == spec[0], (thres_name, row.tolist())
                checked += 1
    print(f"elbert spec == code (binary): {checked} random examples checked")


# ====================================================================================================================
# Model-level checks
# ====================================================================================================================


def tiny_stock_bert(tmp_path, seed: int = 0):
    stock = tiny_model("bert", multi_exit=False, seed=seed, max_position_embeddings=32).eval()
    stock.save_pretrained(tmp_path)
    return stock


def tiny_stock_albert(tmp_path, seed: int = 0):
    stock = tiny_model("albert", multi_exit=False, seed=seed, layers=3, num_hidden_groups=1,
                       max_position_embeddings=32).eval()
    stock.save_pretrained(tmp_path)
    return stock


def token_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 100, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_deebert_off_ramp_poolers_start_as_the_pretrained_pooler(kind, tmp_path):
    """castorini/DeeBERT examples/run_highway_glue.py main: after loading the pretrained model it calls
    ``model.bert.init_highway_pooler()``, and transformers/modeling_highway_bert.py BertEncoder.init_highway_pooler
    copies (``param.copy_``) the pretrained pooler's weights into every highway's BertPooler. Loading a stock BERT
    (or ALBERT, whose pooler is ``albert.pooler``) checkpoint with ``pooler`` exits must do the same: every exit
    pooler equals the pretrained pooler, as a copy (the ramps' poolers train on their own in stage 2 while the
    backbone's stays frozen)."""
    from multiexit.albert import MultiExitAlbertForSequenceClassification
    from multiexit.bert import MultiExitBertForSequenceClassification

    if kind == "bert":
        stock = tiny_stock_bert(tmp_path)
        model = MultiExitBertForSequenceClassification.from_pretrained(tmp_path, exit_head_type="pooler")
        dense, stock_dense = model.bert.pooler.dense, stock.bert.pooler.dense
    else:
        stock = tiny_stock_albert(tmp_path)
        model = MultiExitAlbertForSequenceClassification.from_pretrained(tmp_path, exit_head_type="pooler")
        dense, stock_dense = model.albert.pooler, stock.albert.pooler
    assert torch.equal(dense.weight, stock_dense.weight)
    assert len(model.exits) == model.config.num_hidden_layers
    assert not torch.equal(dense.weight, torch.zeros_like(dense.weight))
    for depth, head in enumerate(model.exits):
        assert torch.equal(head.pooler.weight, dense.weight), f"exit {depth + 1}: pooler weight is not the pretrained"
        assert torch.equal(head.pooler.bias, dense.bias), f"exit {depth + 1}: pooler bias is not the pretrained"
        assert head.pooler.weight.data_ptr() != dense.weight.data_ptr(), "a copy, not the same tensor"


def test_trained_off_ramp_poolers_survive_a_reload(tmp_path):
    """DeeBERT only copies the pooler into the ramps once, on the pretrained model (run_highway_glue.py calls
    init_highway_pooler after the first from_pretrained, not when it reloads a trained checkpoint for
    evaluation). Our checkpoints that already hold exit poolers must load them unchanged."""
    from multiexit.bert import MultiExitBertForSequenceClassification

    tiny_stock_bert(tmp_path / "stock")
    model = MultiExitBertForSequenceClassification.from_pretrained(tmp_path / "stock", exit_head_type="pooler")
    with torch.no_grad():
        for head in model.exits:
            head.pooler.weight.add_(torch.randn_like(head.pooler.weight))
    model.save_pretrained(tmp_path / "trained")
    reloaded = MultiExitBertForSequenceClassification.from_pretrained(tmp_path / "trained")
    for mine, theirs in zip(reloaded.exits, model.exits):
        assert torch.equal(mine.pooler.weight, theirs.pooler.weight)
    assert not torch.equal(reloaded.exits[0].pooler.weight, reloaded.bert.pooler.dense.weight)


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_elbert_single_shared_exit_on_the_pretrained_pooler(kind, tmp_path):
    """shakeley/ELBERT config.json sets ``num_exit_layers: 1`` and ``use_out_pooler: true``; test_ver/
    modeling_albert.py AlbertTransformer.__init__ then builds one ``self.exit_out_layer`` used after every layer,
    and ExitLayer.forward computes ``classifier(dropout(tanh(pooler(h[:, 0]))))`` with the model's own pooler
    (``AlbertExitModel.pooler``, passed in as ``pooler``). With ``exit_head_type="shared_exit"`` our model has one
    exit module, and each layer's logits are that head applied to the pretrained pooler's output of that layer."""
    import modeling_multiexit_albert
    import modeling_multiexit_bert
    if kind == "bert":
        model_class = modeling_multiexit_bert.MultiExitBertForSequenceClassification
        tiny_stock_bert(tmp_path)
    else:
        model_class = modeling_multiexit_albert.MultiExitAlbertForSequenceClassification
        tiny_stock_albert(tmp_path)
    model = model_class.from_pretrained(tmp_path, exit_head_type="shared_exit").eval()
    assert len(model.exits) == 1, "ELBERT's num_exit_layers = 1: one exit module for every layer"
    dense = model.bert.pooler.dense if kind == "bert" else model.albert.pooler
    with torch.no_grad():
        out = model(**token_batch(), output_hidden_states=True)
        num_layers = model.config.num_hidden_layers
        assert out.all_logits.shape[0] == num_layers
        for depth in range(num_layers):
            pooled = torch.tanh(F.linear(out.hidden_states[depth + 1][:, 0], dense.weight, dense.bias))
            expected = model.exits[0](pooled)
            torch.testing.assert_close(out.all_logits[depth], expected, atol=1e-6, rtol=0)
