"""Regression exits trained from a plain pretrained model start at the training labels' mean (their output biases),
so that jointly trained exits do not flatten the backbone to reach the label offset; --regression_exit_bias zero
keeps the seeds' zero start; a multi-exit checkpoint keeps its trained biases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import make_tiny_model, run_main, write_stsb

from glue_data import get_task, read_examples

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def train(model: Path, data: Path, output_dir: Path, *flags: object) -> dict[str, torch.Tensor]:
    # learning rate 0: the weights after training are the weights the run started from
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sts-b", "--data_dir", data,
                               "--output_dir", output_dir, "--max_seq_length", 32, "--do_train", "--max_steps", 1,
                               "--learning_rate", 0, *flags])
    assert status == 0, stderr
    return load_file(output_dir / "model.safetensors")


@pytest.mark.parametrize("head", ["shared_pooler", "pooler", "classification_head"])
def test_exits_start_at_the_label_mean(tmp_path: Path, head: str) -> None:
    model = make_tiny_model(tmp_path / "model", layers=3, num_labels=1)
    data = write_stsb(tmp_path / "STS-B")
    mean = sum(e.label for e in read_examples(get_task("sts-b"), "train", str(data))) / 24
    weights = train(model, data, tmp_path / "out", "--exit_head_type", head)
    output = "out_proj" if head == "classification_head" else "classifier"
    for depth in range(3):
        assert weights[f"exits.{depth}.{output}.bias"].item() == pytest.approx(mean, rel=1e-6)
    zero = train(model, data, tmp_path / "zero", "--exit_head_type", head, "--regression_exit_bias", "zero")
    assert all(zero[f"exits.{depth}.{output}.bias"].item() == 0.0 for depth in range(3))
    # continuing from a multi-exit checkpoint keeps its biases
    again = train(tmp_path / "zero", data, tmp_path / "again", "--overwrite_output_dir")
    assert all(again[f"exits.{depth}.{output}.bias"].item() == 0.0 for depth in range(3))
