"""Real early exit on tiny random BERT, RoBERTa and ALBERT models agrees with the offline replay and with itself.

For every policy, at settings picked from the cached all-layer logits so that exits spread over the layers:

(a) ``early_exit`` on each example alone (batch size 1, no padding) == replay of the all-layer pass;
(b) ``early_exit`` on the padded batch of 8 (varied lengths, attention mask) == batch size 1, example by example;
(c) layers after the last exit never run, and exited rows really leave the batch.

Models run in float64 so that padding or batch composition (differences ~1e-15) cannot flip an argmax or a
threshold test; the thresholds are put in the middle of wide gaps between the cached values for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from multiexit.albert import MultiExitAlbertForSequenceClassification
from multiexit.bert import MultiExitBertForSequenceClassification, MultiExitRobertaForSequenceClassification
from multiexit.errors import UserInputError
from multiexit.policies import (
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    ExitPolicy,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    entropy,
    max_prob,
    normalized_entropy,
    replay,
)
from multiexit.tiny import tiny_config

NUM_LAYERS = 6
LENGTHS = [12, 5, 9, 3, 12, 7, 10, 4]
# beside the factory's tiny sizes: no dropout, and large random weights, so that confidences and argmaxes vary from
# layer to layer
SETTINGS = dict(layers=NUM_LAYERS, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.3)


@dataclass
class Setup:
    model: torch.nn.Module
    input_ids: torch.Tensor  # [8, T] right-padded
    attention_mask: torch.Tensor  # [8, T]
    token_type_ids: torch.Tensor | None
    layer_logits: torch.Tensor  # [8, L, C] float32 cache of the all-layer pass on the padded batch
    policies: dict[str, list[ExitPolicy]]

    def example(self, i: int) -> dict[str, torch.Tensor | None]:
        """Example ``i`` alone, unpadded (batch size 1)."""
        n = LENGTHS[i]
        return {
            "input_ids": self.input_ids[i : i + 1, :n],
            "attention_mask": self.attention_mask[i : i + 1, :n],
            "token_type_ids": None if self.token_type_ids is None else self.token_type_ids[i : i + 1, :n],
        }

    def batch(self) -> dict[str, torch.Tensor | None]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


def _build(kind: str) -> Setup:
    torch.manual_seed({"bert": 0, "roberta": 1, "albert": 2, "bert_regression": 3, "albert_mean": 4,
                       "roberta_mean": 6}[kind])
    if kind == "bert":
        config = tiny_config("bert", **SETTINGS, attn_implementation="eager")
        model, pad, with_types = MultiExitBertForSequenceClassification(config), 0, True
    elif kind == "roberta":
        config = tiny_config("roberta", **SETTINGS, attn_implementation="sdpa")
        model, pad, with_types = MultiExitRobertaForSequenceClassification(config), 1, False
    elif kind in ("albert", "albert_mean"):
        config = tiny_config("albert", **SETTINGS, attn_implementation="eager")
        pooling = "mean" if kind == "albert_mean" else "cls"  # mean: the padding mask must follow the row compaction
        model, pad, with_types = MultiExitAlbertForSequenceClassification(config, exit_pooling=pooling), 0, True
    elif kind == "roberta_mean":
        config = tiny_config("roberta", **SETTINGS, attn_implementation="sdpa")
        model = MultiExitRobertaForSequenceClassification(config, exit_pooling="mean")
        pad, with_types = 1, False
    else:  # regression, DeeBERT-style pooler exits, sdpa
        config = tiny_config("bert", **{**SETTINGS, "num_labels": 1}, attn_implementation="sdpa")
        model, pad, with_types = MultiExitBertForSequenceClassification(config, exit_head_type="pooler"), 0, False
    # One set of exit-head weights for every layer: consecutive layers then agree more often (as trained exits do),
    # so that PABEE's patience 2 also exits before L on these random models.
    for head in model.exits[1:]:
        head.load_state_dict(model.exits[0].state_dict())
    model = model.double().eval()
    assert model.config._attn_implementation == config._attn_implementation

    longest = max(LENGTHS)
    input_ids = torch.full((len(LENGTHS), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    token_type_ids = torch.zeros(len(LENGTHS), longest, dtype=torch.long) if with_types else None
    for i, n in enumerate(LENGTHS):
        input_ids[i, :n] = torch.randint(3, config.vocab_size, (n,))
        attention_mask[i, :n] = 1
        if token_type_ids is not None:
            token_type_ids[i, n // 2 : n] = 1  # a second segment
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    layer_logits = out.all_logits.transpose(0, 1).float()
    assert layer_logits.shape == (len(LENGTHS), NUM_LAYERS, config.num_labels)
    setup = Setup(model, input_ids, attention_mask, token_type_ids, layer_logits, {})
    setup.policies = _policies(layer_logits)
    return setup


def _between(values: torch.Tensor, low_q: float, high_q: float) -> float:
    """A threshold in the middle of the widest gap between the sorted cached values whose rank lies in the quantile
    band [low_q, high_q]: far from every value, so float rounding cannot move any example across it."""
    ordered = torch.unique(values.flatten().double())
    start = int(low_q * (len(ordered) - 1))
    stop = max(int(high_q * (len(ordered) - 1)), start + 1)
    gaps = ordered[start + 1 : stop + 1] - ordered[start:stop]
    k = int(gaps.argmax())
    assert gaps[k] > 1e-5, "cached values too close together for a robust threshold"
    return float((ordered[start + k] + ordered[start + k + 1]) / 2)


def _policies(layer_logits: torch.Tensor) -> dict[str, list[ExitPolicy]]:
    num_labels = layer_logits.shape[-1]
    if num_labels == 1:
        diffs = (layer_logits[:, 1:, 0] - layer_logits[:, :-1, 0]).abs()
        return {
            "budget": [BudgetExit(layer=2), BudgetExit(layer=5)],
            "pabee": [
                PatienceExit(patience=1, regression_threshold=_between(diffs, 0.2, 0.5)),
                PatienceExit(patience=2, regression_threshold=_between(diffs, 0.5, 0.9)),
            ],
        }
    early = layer_logits[:, :-1]  # what the threshold policies test (layer L answers anyway)
    h, nh, mp = entropy(early), normalized_entropy(early), max_prob(early)
    top = max_prob(layer_logits)
    ranges = (top[:, 1:] - top[:, :-1]).abs()
    return {
        "budget": [BudgetExit(layer=2), BudgetExit(layer=NUM_LAYERS - 1)],
        "pabee": [PatienceExit(patience=1), PatienceExit(patience=2)],
        "deebert": [EntropyExit(threshold=_between(h, 0.05, 0.3)), EntropyExit(threshold=_between(h, 0.3, 0.7))],
        "maxprob": [MaxProbExit(threshold=_between(mp, 0.7, 0.95)), MaxProbExit(threshold=_between(mp, 0.4, 0.7))],
        "pcee": [
            PCEEExit(patience=2, tau=_between(nh, 0.4, 0.8), ensemble="pcee"),
            PCEEExit(patience=1, maxprob=_between(mp, 0.5, 0.8)),
        ],
        "elbert": [
            ELBERTExit(delta=_between(nh, 0.05, 0.3), window=3, criterion="monotonic"),
            ELBERTExit(delta=_between(nh, 0.0, 0.15), window=3, criterion="same"),
            ELBERTExit(delta=0.0, window=2, criterion="range", range_threshold=_between(ranges, 0.1, 0.4)),
        ],
    }


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


KINDS = ["bert", "roberta", "albert", "bert_regression", "albert_mean", "roberta_mean"]
_SETUPS: dict[str, Setup] = {}


def get_setup(kind: str) -> Setup:
    if kind not in _SETUPS:
        _SETUPS[kind] = _build(kind)
    return _SETUPS[kind]


def _cases() -> list:
    cases = []
    for kind in KINDS:
        names = (
            ["budget", "pabee"]
            if kind == "bert_regression"
            else ["budget", "pabee", "deebert", "maxprob", "pcee", "elbert"]
        )
        for name in names:
            for index in range(3 if name == "elbert" else 2):
                cases.append(pytest.param(kind, name, index, id=f"{kind}-{name}-{index}"))
    return cases


def test_cached_logits_are_well_separated() -> None:
    """Preconditions for exact agreement: no near-ties in any argmax or between consecutive layers' probabilities."""
    for kind in KINDS:
        layer_logits = get_setup(kind).layer_logits
        if layer_logits.shape[-1] == 1:
            continue
        top2 = layer_logits.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-5, kind
        probs = layer_logits.softmax(-1)
        assert (probs[:, 1:] - probs[:, :-1]).abs().min() > 1e-6, kind


@pytest.mark.parametrize("kind", KINDS)
def test_settings_spread_exits_over_layers(kind: str) -> None:
    """The chosen settings make the comparisons meaningful: exits land on several layers, not only on L."""
    setup = get_setup(kind)
    for name, policies in setup.policies.items():
        layers = torch.cat([replay(p, setup.layer_logits).exit_layer for p in policies])
        if name == "budget":  # a budget sends every example to its own layer, by construction
            expected = torch.cat([torch.full((len(setup.layer_logits),), p.layer) for p in policies])
            assert torch.equal(layers, expected), f"{kind} budget: exits {layers.tolist()}"
            continue
        assert len(set(layers.tolist())) >= 3, f"{kind} {name}: exits {layers.tolist()}"
        assert (layers < NUM_LAYERS).any(), f"{kind} {name}: exits {layers.tolist()}"


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(dim=-1)


@pytest.mark.parametrize(("kind", "name", "index"), _cases())
def test_early_exit_matches_replay_and_batch(kind: str, name: str, index: int) -> None:
    setup = get_setup(kind)
    policy = setup.policies[name][index]
    replayed = replay(policy, setup.layer_logits)
    regression = setup.layer_logits.shape[-1] == 1

    # (a) batch size 1, no padding == replay of the all-layer pass
    single_layers, single_logits = [], []
    for i in range(len(LENGTHS)):
        out = setup.model.early_exit(**setup.example(i), policy=policy)
        assert out.exit_layers.shape == (1,) and out.logits.shape == (1, setup.layer_logits.shape[-1])
        single_layers.append(int(out.exit_layers[0]))
        single_logits.append(out.logits[0])
    single_logits = torch.stack(single_logits)
    assert single_layers == replayed.exit_layer.tolist(), f"{policy.label()}"
    if regression:
        torch.testing.assert_close(_predictions(single_logits), _predictions(replayed.answer), rtol=0, atol=1e-5)
    else:
        assert torch.equal(_predictions(single_logits), _predictions(replayed.answer)), f"{policy.label()}"
    torch.testing.assert_close(single_logits, replayed.answer, rtol=1e-5, atol=1e-5)

    # (b) the padded batch of 8 == batch size 1, example by example
    batched = setup.model.early_exit(**setup.batch(), policy=policy)
    assert batched.exit_layers.tolist() == single_layers, f"{policy.label()}"
    if regression:
        torch.testing.assert_close(_predictions(batched.logits), _predictions(single_logits), rtol=0, atol=1e-5)
    else:
        assert torch.equal(_predictions(batched.logits), _predictions(single_logits)), f"{policy.label()}"
    torch.testing.assert_close(batched.logits, single_logits, rtol=1e-5, atol=1e-5)


def _layer_call_sizes(model) -> tuple[list[int], list]:
    """Register pre-hooks on every distinct layer module (ALBERT shares them across depths); the returned list gets
    the batch size of each call, in call order, i.e. one entry per depth actually run."""
    sizes: list[int] = []
    modules = {id(m): m for m in (model._layer_at(d) for d in range(NUM_LAYERS))}
    handles = [m.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0])) for m in modules.values()]
    return sizes, handles


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", [BudgetExit(layer=1), MaxProbExit(threshold=0.0)], ids=lambda p: p.name)
def test_loop_stops_when_everything_exits_at_layer_1(kind: str, policy: ExitPolicy) -> None:
    setup = get_setup(kind)
    if setup.layer_logits.shape[-1] == 1 and not policy.supports_regression:
        # refused before any layer runs, not silently exited at layer 1
        with pytest.raises(UserInputError, match="does not support regression"):
            setup.model.early_exit(**setup.batch(), policy=policy)
        return
    model = setup.model
    sizes, handles = _layer_call_sizes(model)
    second_layer_calls, second_head_calls = [], []
    handles.append(model.exits[1].register_forward_hook(lambda *_: second_head_calls.append(1)))
    if model._layer_at(1) is not model._layer_at(0):  # BERT, RoBERTa: layer 2 is its own module
        handles.append(model._layer_at(1).register_forward_hook(lambda *_: second_layer_calls.append(1)))
    try:
        out = model.early_exit(**setup.batch(), policy=policy)
    finally:
        for handle in handles:
            handle.remove()
    assert out.exit_layers.tolist() == [1] * len(LENGTHS)
    torch.testing.assert_close(out.logits, setup.layer_logits[:, 0], rtol=1e-5, atol=1e-5)
    assert sizes == [len(LENGTHS)], "only layer 1 may run"
    assert second_layer_calls == [] and second_head_calls == []


@pytest.mark.parametrize("kind", ["bert", "roberta", "albert", "albert_mean"])
def test_exited_rows_leave_the_batch(kind: str) -> None:
    """Each depth runs exactly on the rows that have not exited yet; after the deepest exit nothing runs."""
    setup = get_setup(kind)
    for policy in setup.policies["deebert"] + setup.policies["pcee"]:
        sizes, handles = _layer_call_sizes(setup.model)
        try:
            out = setup.model.early_exit(**setup.batch(), policy=policy)
        finally:
            for handle in handles:
                handle.remove()
        exit_layers = out.exit_layers
        expected = [int((exit_layers >= depth).sum()) for depth in range(1, int(exit_layers.max()) + 1)]
        assert sizes == expected, f"{policy.label()}: exits {exit_layers.tolist()}"
        assert len(set(expected)) > 1 or int(exit_layers.max()) < NUM_LAYERS  # some compaction or an early stop
