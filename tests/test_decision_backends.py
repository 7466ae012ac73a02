"""The two backends every rule runs on give the same numbers, bit for bit: RowOps (batch size 1, Python floats) and
TensorOps (a batch of rows as tensors: replay and batched early exit). Each rule is written once; this is what makes
its batch-size-1 decisions exactly those of the batched path and of the replay."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_policies import policy_and_logits

from multiexit.policies import RowOps, TensorOps

_LOGIT = st.one_of(st.floats(-60.0, 60.0, width=32),
                 st.sampled_from([0.0, 1.0, -1.0, 4.0, math.inf, -math.inf, math.nan]))


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 6)), elements=_LOGIT))
def test_measures_are_bit_identical(values: np.ndarray) -> None:
    logits = torch.from_numpy(values)
    if not torch.isfinite(logits.amax(dim=-1)).all() and (logits == math.inf).sum(-1).gt(1).any():
        return  # two +inf logits in a row: inf − inf, undefined in both backends alike
    rows = logits.tolist()
    for measure in ("entropy", "normalized_entropy", "max_prob"):
        batched = getattr(TensorOps, measure)(logits).tolist()
        one_by_one = [getattr(RowOps, measure)(row) for row in rows]
        assert np.array_equal(np.array(batched), np.array(one_by_one), equal_nan=True), measure
    probs = TensorOps.probs(logits)
    assert np.array_equal(probs.numpy(), np.array([RowOps.probs(row) for row in rows]), equal_nan=True)
    assert TensorOps.argmax(logits).tolist() == [RowOps.argmax(row) for row in rows]
    # the fused measure (one pass in RowOps) gives exactly what the two separate ones give, in both backends
    fused_probs, fused_entropy = TensorOps.probs_and_normalized_entropy(logits)
    assert torch.equal(fused_probs.isnan(), probs.isnan()) and torch.equal(fused_probs.nan_to_num(), probs.nan_to_num())
    for row, batched_entropy in zip(rows, fused_entropy.tolist()):
        row_probs, row_entropy = RowOps.probs_and_normalized_entropy(row)
        assert np.array_equal(row_probs, RowOps.probs(row), equal_nan=True)
        assert np.array_equal([row_entropy, batched_entropy], [RowOps.normalized_entropy(row)] * 2, equal_nan=True)
    # windows whose entries differ (the start class is the first entry's argmax, not the last's) or are equal (p_c
    # never falls)
    windows = (torch.stack([probs, probs.flip(-1), probs], dim=1), torch.stack([probs, probs, probs], dim=1))
    for window, bound in itertools.product(windows, (0.0, 0.3, 0.5, 1.0)):
        batched = [value.tolist() for value in TensorOps.start_class_window(window, bound)]
        one_by_one = [RowOps.start_class_window(entries, bound) for entries in window.tolist()]
        assert np.array_equal(np.array(batched).T, np.array(one_by_one, dtype=float), equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 5)),
              elements=st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.0, 1e-30, 5e-31, 1e-29, math.nan]))),
       st.lists(st.integers(0, 4), min_size=5, max_size=5))
def test_ensemble_sums_are_bit_identical(totals: np.ndarray, counts: list[int]) -> None:
    """The ensemble's running sums and their log-mean (floored at log 1e-30; count 0 counts as 1; NaN stays NaN)."""
    rows = torch.from_numpy(totals)
    count = torch.tensor(counts[: rows.shape[0]])
    summed = TensorOps.add_rows(rows, rows).numpy()
    assert np.array_equal(summed, np.array([RowOps.add_rows(row, row) for row in totals.tolist()]), equal_nan=True)
    batched = TensorOps.log_mean_rows(rows, count).numpy()
    one_by_one = [RowOps.log_mean_rows(row, n) for row, n in zip(totals.tolist(), count.tolist())]
    assert np.array_equal(batched, np.array(one_by_one), equal_nan=True)


def test_fp16_logits_are_read_exactly() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [3.5, 3.5, -2.0]], dtype=torch.float16)
    assert TensorOps.entropy(logits).tolist() == [RowOps.entropy(row) for row in logits.tolist()]
    assert TensorOps.entropy(logits)[1].item() == math.log(2 + math.exp(-5.5)) - (-5.5 * math.exp(-5.5)) / (
        2 + math.exp(-5.5))


@settings(max_examples=200, deadline=None)
@given(policy_and_logits())
def test_every_step_is_identical_on_both_backends(case: tuple) -> None:
    """Layer by layer, on every row, the same exits, answers and state: the batch run on TensorOps, each row run on
    RowOps (the whole batch at every layer, without compaction, so every step of every row is compared)."""
    policy, layer_logits = case
    num_rows, num_layers, num_labels = layer_logits.shape
    batch_state = policy.init_state(TensorOps, num_rows, num_labels)
    row_states = [policy.init_state(RowOps, 1, num_labels) for _ in range(num_rows)]
    for depth in range(num_layers):
        logits = layer_logits[:, depth]
        exits, batch_state = policy.step(TensorOps, batch_state, logits, depth + 1)
        answers = policy.answer(TensorOps, batch_state, logits, exits)
        for n, row in enumerate(logits.tolist()):
            row_exits, row_states[n] = policy.step(RowOps, row_states[n], row, depth + 1)
            row_answer = policy.answer(RowOps, row_states[n], row, row_exits)
            assert bool(exits[n]) == bool(row_exits), (policy.label(), depth + 1, n)
            assert torch.equal(answers[n].double(), torch.tensor(row_answer, dtype=torch.float64)), (policy, n)


@settings(max_examples=200, deadline=None)
@given(policy_and_logits(), st.data())
def test_nan_logits_get_the_same_decisions_on_both_backends(case: tuple, data: st.DataObject) -> None:
    """A NaN logit (a diverged fp16 head) is decided alike at batch size 1 and in a batch: argmax takes the first NaN
    as torch.argmax does, and every measure is NaN in both, so --verify_online does not call it a bug."""
    from test_policies import online_one_by_one

    from multiexit.policies import replay

    policy, layer_logits = case
    holes = data.draw(arrays(np.bool_, tuple(layer_logits.shape), elements=st.booleans()))
    layer_logits = layer_logits.masked_fill(torch.from_numpy(holes), math.nan)
    replayed = replay(policy, layer_logits)
    online_layers, online_answers = online_one_by_one(policy, layer_logits)
    assert torch.equal(online_layers, replayed.exit_layer), policy.label()
    assert torch.equal(online_answers.isnan(), replayed.answer.isnan())
    assert torch.equal(online_answers.nan_to_num(), replayed.answer.nan_to_num())
