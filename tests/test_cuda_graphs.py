"""Batch-size-1 early exit through :mod:`exit_cuda_graphs`: per-bucket static buffers and per-layer graphs.

On CPU the same static-buffer code runs without capture (``capture=False``), which tests the bucketing and padding:
the answers equal eager early exit on the same padded input bit for bit, and the unpadded input's up to float
rounding with the same exits. On a GPU the captured graphs must give eager's answers on the padded input exactly.

A random model's exits are near uniform, so fixed thresholds would let every input run to the last layer (or leave at
the first) and test nothing of the decision. The exit heads are sharpened and each threshold is set between the
values the inputs reach at the layers below the last, so the inputs leave at different depths, mid-depth included.
"""

from __future__ import annotations

import pytest
import torch
from tiny_runs import threshold_between

from multiexit.policies import (
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    ExitPolicy,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    entropy,
    normalized_entropy,
    replay,
)
from multiexit.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

NUM_LAYERS = 4


def make_model(kind: str, pooling: str) -> torch.nn.Module:
    model = tiny_model(kind, layers=NUM_LAYERS, num_labels=3, vocab_size=50, max_position_embeddings=80,
                       exit_pooling=pooling)
    with torch.no_grad():  # sharpen the exits: a random head's near-uniform answers would all look alike
        for head in model.exits:
            for parameter in head.parameters():
                if parameter.dim() == 2:
                    parameter.mul_(40)
    return model.eval()


def padded(input_ids: torch.Tensor, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((1, length), pad, dtype=torch.long)
    ids[:, : input_ids.shape[1]] = input_ids
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, : input_ids.shape[1]] = 1
    return ids, mask


def policies_for(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[ExitPolicy]:
    """A budget, PABEE, and the threshold rules with thresholds between the values ``inputs`` reach below the last
    layer (from the eager all-exits pass), so that the decision, not a constant, sets each exit."""
    with torch.no_grad():
        below_last = torch.cat([model(ids).all_logits.transpose(0, 1)[:, :-1].float() for ids in inputs])
    uncertainty = threshold_between(normalized_entropy(below_last))
    return [BudgetExit(layer=2), PatienceExit(patience=1),
            EntropyExit(threshold=threshold_between(entropy(below_last))),
            MaxProbExit(threshold=threshold_between(below_last.softmax(-1).amax(-1))),
            PCEEExit(patience=1, tau=uncertainty), PCEEExit(patience=2, tau=uncertainty, ensemble="pcee"),
            ELBERTExit(delta=uncertainty, window=2, criterion="monotonic")]


def assert_exits_spread(exit_layers: dict[str, list[int]], num_layers: int) -> None:
    """Each threshold rule sends the inputs to more than one depth, and some input leaves mid-depth."""
    for label, layers in exit_layers.items():
        if label.startswith(("deebert", "maxprob", "pcee(patience=1")):
            assert len(set(layers)) > 1, (label, layers)
    assert any(1 < layer < num_layers for layers in exit_layers.values() for layer in layers), exit_layers


@pytest.mark.parametrize("kind", ["bert", "albert", "roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_static_buffers_match_eager(kind: str, pooling: str) -> None:
    model = make_model(kind, pooling)
    graphs = model.exit_graphs(buckets=(8, 16, 32), capture=False)
    pad = model.config.pad_token_id or 0
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randint(2, 50, (1, length), generator=generator) for length in (3, 8, 11, 17)]
    policies, exit_layers = policies_for(model, inputs), {}
    for ids in inputs:
        length = ids.shape[1]
        bucket = graphs.bucket_for(length)
        assert bucket == min(b for b in graphs.buckets if b >= length)
        for policy in policies:
            graphed = model.early_exit(ids, policy=policy, cuda_graphs=True)
            padded_ids, padded_mask = padded(ids, bucket, pad)
            eager_padded = model.early_exit(padded_ids, padded_mask, policy=policy)
            assert torch.equal(graphed.exit_layers, eager_padded.exit_layers)
            assert torch.equal(graphed.logits, eager_padded.logits)
            eager = model.early_exit(ids, policy=policy)
            assert torch.equal(graphed.exit_layers, eager.exit_layers), (kind, pooling, length, policy)
            torch.testing.assert_close(graphed.logits, eager.logits, atol=1e-5, rtol=1e-5)
            exit_layers.setdefault(policy.label(), []).append(int(graphed.exit_layers))
    assert_exits_spread(exit_layers, NUM_LAYERS)


def test_longest_bucket_is_the_model_positions() -> None:
    model = make_model("bert", "cls")
    graphs = model.exit_graphs(buckets=(16, 512), capture=False)
    assert graphs.buckets == [16, 80] and graphs.bucket_for(80) == 80
    with pytest.raises(ValueError, match="longer than"):
        graphs.bucket_for(81)
    roberta = make_model("roberta", "cls")
    assert roberta.exit_graphs(buckets=(512,), capture=False).buckets == [78]  # positions start after padding_idx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("autocast", [None, torch.float16])
def test_captured_graphs_match_eager_on_gpu(pooling: str, autocast: torch.dtype | None) -> None:
    model = make_model("bert", pooling).cuda()
    model.exit_graphs(buckets=(16, 32), capture=True)
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randint(2, 50, (1, length), generator=generator).cuda() for length in (5, 16, 23, 9)]
    policies, exit_layers = policies_for(model, inputs), {}
    context = torch.autocast("cuda", dtype=autocast, enabled=autocast is not None)
    with context:  # graphs are captured on first use, under the same autocast as every later call
        for ids in inputs:
            length = ids.shape[1]
            for policy in policies:
                graphed = model.early_exit(ids, policy=policy, cuda_graphs=True)
                padded_ids, padded_mask = padded(ids.cpu(), model.exit_graphs().bucket_for(length), 0)
                eager = model.early_exit(padded_ids.cuda(), padded_mask.cuda(), policy=policy)
                assert torch.equal(graphed.exit_layers, eager.exit_layers)
                assert torch.equal(graphed.logits, eager.logits)
                assert torch.isfinite(graphed.logits).all()
                exit_layers.setdefault(policy.label(), []).append(int(graphed.exit_layers))
    assert any(1 < layer < NUM_LAYERS for layers in exit_layers.values() for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16])
def test_graphs_captured_in_one_autocast_context_replay_in_later_ones(autocast: torch.dtype) -> None:
    """As the runner uses them: captured ahead (prepare) in one autocast context that then closes, replayed in a fresh
    context per input (autocast's weight-cast cache is gone by then: the graphs must not read it), from CPU-resident
    inputs, on RoBERTa with mean-pooled exits; and a first call in inference mode poisons nothing."""
    model = make_model("roberta", "mean").cuda()
    model.exit_graphs(buckets=(16, 32), capture=True)
    generator = torch.Generator().manual_seed(6)
    inputs = [torch.randint(2, 50, (1, length), generator=generator) for length in (5, 16, 23)]  # on the host
    policies = policies_for(model, [ids.cuda() for ids in inputs])
    with torch.autocast("cuda", dtype=autocast):
        model.exit_graphs().prepare([ids.shape[1] for ids in inputs])
    scratch = torch.randn(1 << 22, device="cuda")  # takes memory a freed cast copy would have held
    for ids in inputs:
        for policy in policies:
            with torch.autocast("cuda", dtype=autocast):
                graphed = model.early_exit(ids, policy=policy, cuda_graphs=True)
            with torch.autocast("cuda", dtype=autocast):
                padded_ids, padded_mask = padded(ids, model.exit_graphs().bucket_for(ids.shape[1]), 1)
                eager = model.early_exit(padded_ids.cuda(), padded_mask.cuda(), policy=policy)
            assert torch.equal(graphed.exit_layers.cpu(), eager.exit_layers.cpu()), policy
            assert torch.equal(graphed.logits.cpu(), eager.logits.cpu()), policy
    del scratch
    with torch.inference_mode(), torch.autocast("cuda", dtype=autocast):
        first = model.early_exit(inputs[0], policy=policies[1], cuda_graphs=True)
    with torch.autocast("cuda", dtype=autocast):
        again = model.early_exit(inputs[0], policy=policies[1], cuda_graphs=True)
    assert torch.equal(first.logits, again.logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_size_one_batched_and_replay_agree_on_gpu() -> None:
    """On a GPU too, each row exits where it would alone: batch size 1 (eager), the batch (rows leaving it) and the
    replay of the all-exits pass agree on every exit layer and prediction."""
    model = make_model("bert", "cls").cuda()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 50, (8, 12), generator=generator).cuda()
    with torch.no_grad():
        cache = model(ids).all_logits.transpose(0, 1).float().cpu()
    policies = policies_for(model, [ids])
    assert_exits_spread({p.label(): replay(p, cache).exit_layer.tolist() for p in policies},
                        NUM_LAYERS)
    for policy in policies:
        replayed = replay(policy, cache)
        batched = model.early_exit(ids, policy=policy)
        singles = [model.early_exit(ids[i: i + 1], policy=policy) for i in range(8)]
        single_layers = torch.cat([s.exit_layers for s in singles]).cpu()
        assert torch.equal(batched.exit_layers.cpu(), replayed.exit_layer), policy
        assert torch.equal(single_layers, replayed.exit_layer), policy
        single_answers = torch.cat([s.logits for s in singles]).cpu()
        assert torch.equal(single_answers.argmax(-1), replayed.answer.argmax(-1))
        torch.testing.assert_close(batched.logits.cpu(), replayed.answer, atol=1e-4, rtol=1e-4)


def test_the_verification_reference_pads_like_the_graphs() -> None:
    """--verify_online with --cuda_graphs replays an all-exits pass over inputs padded to their bucket
    (multiexit.runner.evaluation.bucket_padding): its decisions and answers are the graph path's, bit for bit."""
    from multiexit.runner.evaluation import bucket_padding

    model = make_model("bert", "mean")
    graphs = model.exit_graphs(buckets=(8, 16, 32), capture=False)
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randint(2, 50, (1, length), generator=generator) for length in (3, 8, 11, 17, 30)]

    def collator(rows: list[dict]) -> dict:
        ids = torch.tensor([rows[0]["input_ids"]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    pad = bucket_padding(collator, graphs)
    with torch.no_grad():
        cache = torch.cat([model(**pad([{"input_ids": ids[0].tolist()}])).all_logits.transpose(0, 1)
                           for ids in inputs])
    assert pad([{"input_ids": inputs[2][0].tolist()}])["input_ids"].shape == (1, 16)
    for policy in policies_for(model, inputs):
        replayed = replay(policy, cache)
        graphed = [model.early_exit(ids, policy=policy, cuda_graphs=True) for ids in inputs]
        assert torch.equal(torch.cat([g.exit_layers for g in graphed]), replayed.exit_layer), policy
        assert torch.equal(torch.cat([g.logits for g in graphed]), replayed.answer), policy


def test_graphs_are_kept_per_bucket_and_autocast_state_and_left_out_of_copies() -> None:
    """A graph replays the dtypes it was captured in: the same bucket under autocast gets graphs of its own.
    prepare() builds the buckets of given lengths ahead of timing; a first call in inference mode does not poison
    the static buffers for later calls; a deep copy of the model leaves the graphs behind."""
    import copy

    model = make_model("bert", "cls")
    graphs = model.exit_graphs(buckets=(8, 32), capture=False)
    graphs.prepare([3, 20, 5])
    assert sorted(graphs._graphs) == [(8, False, torch.get_autocast_dtype("cpu")),
                                      (32, False, torch.get_autocast_dtype("cpu"))]
    ids = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.early_exit(ids, policy=PatienceExit(patience=1), cuda_graphs=True)
    assert (8, True, torch.bfloat16) in graphs._graphs and len(graphs._graphs) == 3
    fresh = make_model("bert", "cls")
    fresh.exit_graphs(buckets=(8,), capture=False)
    with torch.inference_mode():
        first = fresh.early_exit(ids, policy=PatienceExit(patience=1), cuda_graphs=True)
    again = fresh.early_exit(ids, policy=PatienceExit(patience=1), cuda_graphs=True)  # outside inference mode
    assert torch.equal(first.logits, again.logits)
    twin = copy.deepcopy(model)
    assert "_exit_graphs" not in twin.__dict__ and "_exit_graphs" in model.__dict__
    twin.exit_graphs(buckets=(8, 32), capture=False)  # the same buckets: the same padding
    assert torch.equal(twin.early_exit(ids, policy=PatienceExit(patience=1), cuda_graphs=True).logits,
                       model.early_exit(ids, policy=PatienceExit(patience=1), cuda_graphs=True).logits)


def test_a_capture_needs_an_attention_that_reads_nothing_on_the_host() -> None:
    from multiexit.cuda_graphs import ExitGraphs

    model = make_model("bert", "cls")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="this model uses 'flash_attention_2'"):
        ExitGraphs(model, capture=True)
    ExitGraphs(model, capture=False)  # the eager static-buffer path reads the mask on the device only
