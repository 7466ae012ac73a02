"""ELBERT's learned loss weights train as in ELBERT's run_glue.py: their own optimizer group at a constant rate
(``--exit_weight_learning_rate``, ELBERT's ``w_lr`` 1e-2), no weight decay, no schedule, no gradient clipping; so
they move, where at the model's rate (2e-5) they would stay at σ(4) ≈ 0.98. Saved with the model and resumed
exactly (tests/test_resume_and_ddp.py has a learned-weights scenario)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import make_tiny_model, run_main, write_sst2

from multiexit.bert import MultiExitBertForSequenceClassification
from multiexit.runner.training import TrainingPlan, clipped_parameters, loss_weight_parameters, make_optimizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class OneProcess:
    num_processes = 1


def test_optimizer_group_is_constant_without_decay(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "model", layers=3)
    model = MultiExitBertForSequenceClassification.from_pretrained(folder, exit_loss_weighting="learned")
    args = argparse.Namespace(weight_decay=0.1, adam_epsilon=1e-8, warmup_steps=2, warmup_ratio=0.0,
                              exit_weight_learning_rate=1e-2)
    optimizer, scheduler = make_optimizer(args, OneProcess(), model, TrainingPlan("joint", 2e-5), steps_per_stage=10)
    (weights,) = loss_weight_parameters(model)
    groups = [group for group in optimizer.param_groups if any(p is weights for p in group["params"])]
    assert len(groups) == 1 and len(groups[0]["params"]) == 1 and groups[0]["weight_decay"] == 0.0
    assert all(weights is not p for group in optimizer.param_groups[:2] for p in group["params"])
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [r[2] for r in rates] == [1e-2] * 10  # constant
    assert [r[0] for r in rates][:3] == pytest.approx([0.0, 1e-5, 2e-5])  # the model warms up, then decays
    assert rates[-1][0] < 2e-5
    assert all(p is not weights for p in clipped_parameters(model))  # ELBERT never clipped its W
    # the training loop's optimizer.zero_grad() clears them with the model's (ELBERT's model.zero_grad() skipped its
    # plain-tensor W, whose gradient then summed every step's: a difference the README lists)
    weights.grad = torch.ones_like(weights)
    optimizer.zero_grad()
    assert weights.grad is None


@pytest.mark.slow
def test_learned_weights_move_at_their_rate(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", layers=3)
    data = write_sst2(tmp_path / "SST-2", train=32, dev=4)

    def trained_weights(name: str, *flags: object) -> torch.Tensor:
        status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
                                   "--output_dir", tmp_path / name, "--max_seq_length", 32, "--do_train",
                                   "--exit_loss", "learned", "--learning_rate", "2e-5", "--weight_decay", "0.1",
                                   "--per_gpu_train_batch_size", 8, "--max_steps", 8, "--seed", 3, *flags])
        assert status == 0, stderr
        return load_file(tmp_path / name / "model.safetensors")["exit_loss_weights.logits"]

    at_their_rate = trained_weights("elbert")
    at_the_model_rate = trained_weights("model-rate", "--exit_weight_learning_rate", "2e-5")
    start = torch.full_like(at_their_rate, 4.0)
    # Adam moves each weight by about the learning rate per step: 8 steps at 1e-2 against 8 at 2e-5
    assert (at_their_rate - start).abs().min() > 0.02
    assert (at_the_model_rate - start).abs().max() < 1e-3
