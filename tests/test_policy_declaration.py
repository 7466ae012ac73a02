"""A policy is one class: a toy policy defined in this file only is swept by the runner (its flags appear, comma lists
sweep it, --sweep_default_grids and --calibrate_speedup pick it up), replayed, calibrated (to a speed-up, and certified
for a drop) and plotted, with no change anywhere else. The class-level declarations of the real policies are checked
too."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny_model, read_records, run_main, write_sst2

from multiexit.policies import POLICIES, ExitPolicy, Knob, Ops, PolicyFlag, State, replay
from multiexit.replay import calibrate, curves_from_scores, plot_score_vs_speedup, sweep
from multiexit.runner import args as runner_args

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def toy_policy() -> Iterator[type[ExitPolicy]]:
    """Defines (and so registers) a toy policy for one test, and unregisters it afterwards."""

    @dataclass(frozen=True)
    class ClassZeroExit(ExitPolicy):
        """Toy rule: exit at the first layer whose probability of class 0 is at least ``threshold``."""

        threshold: float = 0.9
        name: ClassVar[str] = "toy_class_zero"
        title: ClassVar[str] = "Toy (class-0 probability)"
        flags: ClassVar[tuple[PolicyFlag, ...]] = (
            PolicyFlag("--toy_threshold", "threshold", float, "toy class-0 probability thresholds (list)"),
        )

        def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
            return ops.take(ops.probs(logits), 0) >= self.threshold, state

        def knob(self, num_layers: int, num_labels: int) -> Knob:
            return Knob("threshold", 0.0, 1.0, faster_when="lower")

        @classmethod
        def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
            return [cls(threshold=t) for t in (0.3, 0.5, 0.7, 0.9, 1.0)] if num_labels > 1 else []

    assert POLICIES["toy_class_zero"] is ClassZeroExit
    yield ClassZeroExit
    del POLICIES["toy_class_zero"]


def test_toy_policy_through_replay_calibration_and_plot(toy_policy: type[ExitPolicy], tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    layer_logits = torch.randn(200, 4, 2, generator=generator) * torch.arange(1, 5)[None, :, None]
    labels = (layer_logits[:, -1].argmax(-1)).numpy()

    def accuracy(predictions: np.ndarray, gold: np.ndarray) -> dict[str, float]:
        return {"acc": float((predictions == gold).mean())}

    scores = sweep(toy_policy.default_grid(4, 2), layer_logits, labels, accuracy, progress=False)
    assert [s.policy.threshold for s in scores] == [0.3, 0.5, 0.7, 0.9, 1.0]
    assert scores[0].speedup > scores[-1].speedup >= 1.0  # lower threshold, earlier exits
    result = calibrate(toy_policy(), layer_logits, labels, accuracy, "acc", target_speedup=1.5)
    assert result.reached_target and result.calibration_score.speedup >= 1.5
    assert result.policy.name == "toy_class_zero" and 0.0 < result.policy.threshold < 1.0
    # certified along the declared knob, from its full-depth end (threshold 1) down
    certified = calibrate(toy_policy(), layer_logits, labels, accuracy, "acc", max_metric_drop=0.1)
    assert certified.certificate.certified and certified.certificate.sequences == 1
    assert certified.policy.name == "toy_class_zero" and certified.certificate.bound <= 0.1
    assert certified.calibration_score.speedup > 1.0
    path = tmp_path / "plot.png"
    plot_score_vs_speedup(curves_from_scores(scores, "acc"), str(path), "acc")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_toy_policy_through_the_runner(toy_policy: type[ExitPolicy], tmp_path: Path) -> None:
    args = runner_args.parse_args(["--task_name", "sst-2", "--output_dir", "x", "--toy_threshold", "0.5,0.9"])
    assert [p.label() for p in runner_args.policies_from_args(args)] == [
        "toy_class_zero(threshold=0.5)", "toy_class_zero(threshold=0.9)"]
    model = make_tiny_model(tmp_path / "model", layers=3, multi_exit=True)
    data = write_sst2(tmp_path / "SST-2", train=8, dev=16)
    output_dir = tmp_path / "out"
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
                               "--output_dir", output_dir, "--max_seq_length", 32, "--do_eval",
                               "--toy_threshold", "0.5,0.9", "--sweep_default_grids", "--calibrate_speedup", "1.5"])
    assert status == 0, stderr
    toy = [r for r in read_records(output_dir) if r["policy"] == "toy_class_zero"]
    requested = [r for r in toy if not r.get("grid") and "calibration" not in r]
    assert [r["params"]["threshold"] for r in requested] == [0.5, 0.9]
    assert [r["params"]["threshold"] for r in toy if r.get("grid")] == [0.3, 0.5, 0.7, 0.9, 1.0]
    calibrated = [r for r in toy if "calibration" in r]
    assert len(calibrated) == 1 and calibrated[0]["calibration"]["target_speedup"] == 1.5
    assert (output_dir / "score_vs_speedup_model.png").stat().st_size > 0  # named after the evaluated checkpoint


def test_bad_toy_value_names_its_flag(toy_policy: type[ExitPolicy]) -> None:
    from multiexit.errors import UserInputError

    args = runner_args.parse_args(["--task_name", "sst-2", "--output_dir", "x", "--toy_threshold", "0.5,abc"])
    with pytest.raises(UserInputError, match="--toy_threshold"):
        runner_args.policies_from_args(args)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_declares_what_the_rest_needs(name: str) -> None:
    cls = POLICIES[name]
    assert cls.title and cls.flags, name
    for num_layers, num_labels in ((6, 2), (12, 3), (4, 1)):
        grid = cls.default_grid(num_layers, num_labels)
        templates = cls.calibration_templates(num_layers, num_labels)
        if num_labels == 1 and not cls.supports_regression:
            assert grid == [] and templates == []
            continue
        assert grid and templates, (name, num_layers, num_labels)
        for policy in grid + templates:
            assert type(policy) is cls
            knob = policy.knob(num_layers, num_labels)
            assert knob is not None and hasattr(policy, knob.field) and knob.faster_when in ("higher", "lower")
            assert knob.low < knob.high or knob.integer and knob.low <= knob.high
            assert math.isfinite(knob.high)


@pytest.fixture
def documented_policy() -> Iterator[type[ExitPolicy]]:
    """The skeleton of docs/policies.md ("Adding a policy"), executed as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text(encoding="utf-8")
    code = text.split("## Adding a policy", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    import sys
    import types

    module = sys.modules["documented_policy"] = types.ModuleType("documented_policy")  # dataclasses look it up
    exec(compile(code, "docs/policies.md", "exec"), module.__dict__)  # noqa: S102 - the documentation's own example
    yield module.ConfidentRunExit
    del POLICIES["confident_run"], sys.modules["documented_policy"]


def test_the_documented_skeleton_works_everywhere(documented_policy: type[ExitPolicy], tmp_path: Path) -> None:
    from multiexit.tiny import tiny_model

    assert POLICIES["confident_run"] is documented_policy
    model = tiny_model("bert", layers=4, num_labels=3).eval()
    with torch.no_grad():  # sharper exits than a random head's near-uniform ones, so that some rows leave early
        for head in model.exits:
            head.classifier.weight.mul_(30)
    ids = torch.randint(5, 100, (6, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        layer_logits = model(ids, mask).all_logits.transpose(0, 1)
    seen = set()
    for threshold in (0.4, 0.5, 0.9):
        policy = documented_policy(threshold=threshold)
        expected = replay(policy, layer_logits)
        seen.update(expected.exit_layer.tolist())
        batched = model.early_exit(ids, mask, policy=policy)
        assert torch.equal(batched.exit_layers, expected.exit_layer)
        for row in range(len(ids)):  # batch size 1: Python floats (RowOps) give the same exits
            single = model.early_exit(ids[row:row + 1, : int(mask[row].sum())], policy=policy)
            assert int(single.exit_layers) == int(expected.exit_layer[row])
    assert min(seen) < 4 and max(seen) == 4  # rows left early and rows ran to the end: the rule was exercised
    args = runner_args.parse_args(["--task_name", "sst-2", "--output_dir", "x", "--confident_run_threshold",
                                   "0.8,0.9", "--confident_runs", "1,2"])
    assert len(runner_args.policies_from_args(args)) == 4
