"""Batch-size-1 early exit reads the device once per layer (the exit logits) and never synchronises otherwise.

Counted on CPU: a TorchDispatchMode sees every tensor operation, including the ones that read a device value on the
host (``item()``, ``bool()``, ``nonzero``, ...), which must not happen at all. The host reads a CPU tensor serves
without the dispatcher (``tolist``, ``numpy``, ``cpu``, ``__array__``) are spied on directly: the decision's one
``tolist()`` of the exit logits per layer read (in ``ExitTracker.update``) must be the only ones.
A decision itself runs no tensor operation.
The one host read that a CPU input gets and a GPU input does not, the all-ones test of a CPU attention mask in
``MultiExitMixin._prepare`` (through numpy, on host memory), is no synchronisation: a mask on a GPU is never tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.masking_utils import create_bidirectional_mask

import exit_policies
from multiexit.policies import POLICIES, BudgetExit, ELBERTExit, EntropyExit, ExitTracker, PatienceExit, PCEEExit
from multiexit.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# operations that read a tensor's value on the host: a synchronisation on a GPU (and a copy that names a device)
SYNCHRONISING = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item")


class OperationLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        target = (kwargs or {}).get("device")
        if name.startswith("_to_copy") and target is not None and target != args[0].device:
            name = "device_copy"  # a copy to another device; a dtype cast on the same device is not a transfer
        self.names.append(name)
        return func(*args, **(kwargs or {}))


# host reads that bypass the dispatcher on a CPU tensor (on a GPU each is a copy and a synchronisation)
HOST_READS = ("tolist", "numpy", "cpu", "__array__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of calls to each of ``HOST_READS``: the dispatch log cannot see them on CPU."""
    counts = dict.fromkeys(HOST_READS, 0)

    def spy(name: str):  # noqa: ANN202
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counting

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    return counts


@dataclass(frozen=True)
class ExitAtEveryLayerRead(exit_policies.ExitPolicy):
    """Exits at ``layer`` like a budget but reads every exit, as a stateful rule does (unregistered: no name)."""

    layer: int = 1

    def step(self, ops: exit_policies.Ops, state: dict, logits: object, layer: int) -> tuple:
        return ops.constant(logits, layer >= self.layer), state


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("exit_at", [1, 3, 6])
@pytest.mark.parametrize("policy_type", [ExitAtEveryLayerRead, BudgetExit])
def test_one_transfer_per_layer_and_no_other_sync(host_reads: dict[str, int], pooling: str, exit_at: int,
                                                  policy_type: type) -> None:
    model = tiny_model("bert", layers=6, num_labels=2, vocab_size=50, exit_pooling=pooling).eval()
    ids = torch.randint(1, 50, (1, 9))
    with OperationLog() as log:
        output = model.early_exit(ids, torch.ones_like(ids), policy=policy_type(layer=exit_at))
    assert int(output.exit_layers) == exit_at
    synchronising = [name for name in log.names if name.split(".")[0] in (*SYNCHRONISING, "device_copy")]
    assert synchronising == [], synchronising
    # one read of the exit logits (a tolist()) per layer whose exit the rule reads: every layer run, or only the
    # budget's layer; and no host read besides those but the documented numpy() all-ones test of the CPU mask (a GPU
    # mask is never read)
    reads = 1 if policy_type is BudgetExit else exit_at
    assert host_reads == {"tolist": reads, "numpy": 1, "cpu": 0, "__array__": 0}


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("exit_at", [1, 4, 6])
def test_a_budget_computes_only_its_own_exit(monkeypatch: pytest.MonkeyPatch, batch_size: int, exit_at: int) -> None:
    """A budget exit runs the layers below its own as a model cut there would: no exit head, no read; its answer is
    the all-exits forward's logits at that layer."""
    model = tiny_model("bert", layers=6, num_labels=3, vocab_size=50, exit_pooling="mean").eval()
    ids = torch.randint(1, 50, (batch_size, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        reference = model(ids, mask).all_logits[exit_at - 1]
    heads_run = []
    original = type(model)._exit_logits

    def counting(self, depth: int, *args: object) -> torch.Tensor:  # noqa: ANN001
        heads_run.append(depth + 1)
        return original(self, depth, *args)

    monkeypatch.setattr(type(model), "_exit_logits", counting)
    output = model.early_exit(ids, mask, policy=BudgetExit(layer=exit_at))
    assert heads_run == [exit_at]
    assert output.exit_layers.tolist() == [exit_at] * batch_size
    torch.testing.assert_close(output.logits, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", [PatienceExit(patience=2), EntropyExit(threshold=0.1), PCEEExit(patience=2, tau=0.3),
                                    PCEEExit(patience=2, tau=0.3, ensemble="pcee"),
                                    ELBERTExit(delta=0.1, window=3, criterion="monotonic")],
                         ids=lambda p: p.label())
def test_a_decision_runs_no_tensor_operation(host_reads: dict[str, int], policy: exit_policies.ExitPolicy) -> None:
    tracker = ExitTracker(policy, 1, 6)
    layers = [torch.tensor([[0.3, -0.2]]), torch.tensor([[-0.1, 0.2]])]
    with OperationLog() as log:
        for layer, logits in enumerate(layers, start=1):  # two layers that do not exit
            assert tracker.update(logits, layer) is None
    assert log.names == [] and host_reads == {"tolist": 2, "numpy": 0, "cpu": 0, "__array__": 0}


def test_every_policy_is_covered() -> None:
    assert set(POLICIES) == {"budget", "pabee", "deebert", "maxprob", "pcee", "elbert"}


def test_an_unpadded_cpu_mask_is_dropped_with_the_same_bits() -> None:
    """A CPU attention mask without padding is dropped (the layers run unmasked, as in the stock model) and every
    exit's logits are bit-identical to the masked pass; a padded mask is kept."""
    model = tiny_model("bert", layers=3, num_labels=2, vocab_size=50, exit_pooling="mean").eval()
    ids = torch.randint(1, 50, (2, 9))
    ones, padded = torch.ones_like(ids), torch.ones_like(ids)
    padded[1, 6:] = 0
    assert model._prepare(ids, ones, None, None, None)[1] is None
    assert model._prepare(ids, padded, None, None, None)[1] is not None
    with torch.no_grad():
        unmasked = model(ids, ones).all_logits
        hidden, _, weights = model._prepare(ids, ones, None, None, None)  # then the masked pass, forced
        mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=ones,
                                         allow_is_bidirectional_skip=False)
        modules, masked = model.loop_modules(), []
        for depth in range(3):
            hidden, logits = model._layer_step(depth, hidden, mask, weights, modules)
            masked.append(logits)
    assert torch.equal(unmasked, torch.stack(masked))
