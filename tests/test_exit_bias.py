"""Where fresh exits start. Regression exits trained from a plain pretrained model start at the training labels'
mean (their output biases), so that jointly trained exits do not flatten the backbone to reach the label offset;
--regression_exit_bias zero keeps the seeds' zero start; a multi-exit checkpoint keeps its trained biases.
Classification exits start at zero, or at the log class frequencies with --classification_exit_bias log_prior.
Mean-pooled exits default to the linear head (no pretrained pooler in front of a token mean)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import make_tiny_model, run_main, write_mrpc, write_stsb

from multiexit.data import get_task, read_examples

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def train(model: Path, data: Path, output_dir: Path, *flags: object, task: str = "sts-b") -> dict[str, torch.Tensor]:
    # learning rate 0: the weights after training are the weights the run started from
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", task, "--data_dir", data,
                               "--output_dir", output_dir, "--max_seq_length", 32, "--do_train", "--max_steps", 1,
                               "--learning_rate", 0, *flags])
    assert status == 0, stderr
    return load_file(output_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["shared_pooler", "pooler", "classification_head"])
def test_exits_start_at_the_label_mean(tmp_path: Path, head: str) -> None:
    model = make_tiny_model(tmp_path / "model", layers=3, num_labels=1)
    data = write_stsb(tmp_path / "STS-B")
    mean = sum(e.label for e in read_examples(get_task("sts-b"), "train", str(data))) / 24
    weights = train(model, data, tmp_path / "out", "--exit_head_type", head)
    # the task is saved with the model: evaluating it on another task's data is refused (tests/test_errors.py)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["finetuning_task"] == "stsb"
    output = "out_proj" if head == "classification_head" else "classifier"
    for depth in range(3):
        assert weights[f"exits.{depth}.{output}.bias"].item() == pytest.approx(mean, rel=1e-6)
    zero = train(model, data, tmp_path / "zero", "--exit_head_type", head, "--regression_exit_bias", "zero")
    assert all(zero[f"exits.{depth}.{output}.bias"].item() == 0.0 for depth in range(3))
    # continuing from a multi-exit checkpoint keeps its biases
    again = train(tmp_path / "zero", data, tmp_path / "again", "--overwrite_output_dir")
    assert all(again[f"exits.{depth}.{output}.bias"].item() == 0.0 for depth in range(3))

@pytest.mark.slow

def test_classification_exits_start_at_the_log_prior_when_asked(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", layers=2)
    data = write_mrpc(tmp_path / "MRPC")
    train_file = data / "train.tsv"
    header, *rows = train_file.read_text(encoding="utf-8").splitlines()
    rows = [("1" if i % 4 else "0") + row[1:] for i, row in enumerate(rows)]  # 3 of 4 examples are class 1
    train_file.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")

    prior = train(model, data, tmp_path / "prior", "--exit_head_type", "linear", "--classification_exit_bias",
                  "log_prior", task="mrpc")
    expected = torch.tensor([math.log(6 / 24), math.log(18 / 24)])
    for depth in range(2):
        torch.testing.assert_close(prior[f"exits.{depth}.classifier.bias"], expected)
    default = train(model, data, tmp_path / "default", "--exit_head_type", "linear", task="mrpc")  # the seeds' start
    assert all(default[f"exits.{depth}.classifier.bias"].abs().max() == 0 for depth in range(2))


def test_mean_pooled_exits_default_to_the_linear_head() -> None:
    from multiexit.tiny import tiny_model

    def head(model_type: str, **settings: object) -> str:
        return tiny_model(model_type, **settings).config.exit_head_type

    assert head("bert") == "shared_pooler"  # PABEE's, on [CLS]
    assert head("bert", exit_pooling="mean") == "linear"
    assert head("bert", exit_pooling="mean", exit_head_type="shared_pooler") == "shared_pooler"  # asked for explicitly
    assert head("roberta", exit_pooling="mean") == "classification_head"
