"""--eval_split heldout: a fixed part of the training set is held out of training and evaluated instead of dev."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from tiny_runs import make_tiny_model, read_records, run_main, write_sst2

from multiexit.data import get_task
from multiexit.runner.loading import read_split


def test_the_split_is_fixed_and_disjoint(tmp_path: Path) -> None:
    data = write_sst2(tmp_path / "SST-2", train=40, dev=5)
    task = get_task("sst2")
    args = argparse.Namespace(data_dir=str(data), eval_split="heldout", heldout_fraction=0.25)
    train, held = read_split(args, task, "train", None), read_split(args, task, "heldout", None)
    assert len(held) == 10 and len(train) == 30
    assert {e.guid for e in train}.isdisjoint({e.guid for e in held})
    assert [e.guid for e in read_split(args, task, "heldout", None)] == [e.guid for e in held]  # no --seed in it
    guids = [e.guid for e in train]
    assert guids == sorted(guids, key=lambda g: int(g.split("-")[1]))  # the original order


@pytest.mark.slow
def test_runner_evaluates_the_heldout_part(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", layers=2)
    data = write_sst2(tmp_path / "SST-2", train=40, dev=5)
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
                               "--output_dir", tmp_path / "out", "--max_seq_length", 32, "--do_train", "--max_steps", 1,
                               "--do_eval", "--eval_split", "heldout", "--heldout_fraction", "0.25"])
    assert status == 0, stderr
    (record,) = read_records(tmp_path / "out")
    assert record["split"] == "heldout" and record["num_examples"] == 10 and record["heldout_fraction"] == 0.25
    # the trained model, evaluated again on its own held-out part (same fraction), by a run that does not train
    status, stderr = run_main(["--model_name_or_path", tmp_path / "out", "--task_name", "sst-2", "--data_dir", data,
                               "--output_dir", tmp_path / "out", "--max_seq_length", 32, "--do_eval",
                               "--eval_split", "heldout", "--heldout_fraction", "0.25"])
    assert status == 0, stderr
    assert [r["num_examples"] for r in read_records(tmp_path / "out")] == [10, 10]


@pytest.mark.parametrize("fraction", ["0", "1", "1.5"])
def test_bad_fraction(tmp_path: Path, fraction: str) -> None:
    status, stderr = run_main(["--task_name", "sst-2", "--output_dir", tmp_path / "out", "--do_eval",
                               "--eval_split", "heldout", "--heldout_fraction", fraction])
    assert status == 2 and "--heldout_fraction must be in (0, 1)" in stderr


def test_eval_all_checkpoints_evaluates_each_folder_once(tmp_path: Path) -> None:
    """--model_name_or_path naming one of output_dir's checkpoints (by any path) is not evaluated twice."""
    from multiexit.runner.main import evaluated_checkpoints

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    args = argparse.Namespace(do_eval=True, do_train=False, eval_all_checkpoints=True, output_dir=str(tmp_path))
    same_folder = str(tmp_path / "checkpoint-2" / ".." / "checkpoint-4")
    assert evaluated_checkpoints(args, same_folder) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
    assert evaluated_checkpoints(args, "bert-base-uncased")[-1] == "bert-base-uncased"  # a hub name stays
    args.eval_all_checkpoints = False
    assert evaluated_checkpoints(args, same_folder) == [same_folder]


@pytest.mark.slow
def test_a_stale_checkpoint_that_trained_on_the_held_out_part_is_refused(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """--do_train --eval_all_checkpoints also evaluates checkpoints an earlier run left in output_dir: one trained on
    the whole training set is refused (after training, before it is scored). A plain pretrained model, which says
    nothing of how it was trained, is evaluated on the held-out part without a warning."""
    import json
    import shutil

    model = make_tiny_model(tmp_path / "model", layers=2)
    data = write_sst2(tmp_path / "SST-2", train=40, dev=5)
    output_dir = tmp_path / "out"
    stale = output_dir / "checkpoint-9"
    shutil.copytree(model, stale)
    (stale / "training_args.json").write_text(json.dumps({"task_name": "sst-2", "eval_split": "dev",
                                                           "heldout_fraction": 0.1, "do_train": True}))
    common = ["--task_name", "sst-2", "--data_dir", data, "--max_seq_length", 32, "--eval_split", "heldout"]
    status, stderr = run_main(["--model_name_or_path", model, "--output_dir", output_dir, *common, "--do_train",
                               "--max_steps", 1, "--overwrite_output_dir", "--do_eval", "--eval_all_checkpoints"])
    assert status == 2 and "checkpoint-9 was trained on the whole training set (--eval_split dev)" in stderr, stderr
    assert not (output_dir / "exit_results.jsonl").exists()
    caplog.set_level(logging.WARNING)
    status, stderr = run_main(["--model_name_or_path", model, "--output_dir", tmp_path / "plain", *common,
                               "--do_eval"])
    assert status == 0, stderr
    assert "cannot be checked" not in caplog.text
