"""The seeds' own command lines, run unchanged against ``run_glue_with_exits.main`` (paths aside).

HF's example tests call ``main()`` with a patched ``sys.argv`` and check the values of the results dict it returns:
``examples/research_projects/bert-loses-patience/test_run_glue_with_pabee.py`` (PABEE) and
``examples/research_projects/deebert/test_glue_deebert.py`` (DeeBERT, three commands: train both stages, each-layer
evaluation, entropy evaluation). Their argument lists are copied here with only the model (a tiny local stand-in for
albert-base-v2 / roberta-base, which this offline machine cannot download) and the data folder (a tiny MRPC folder
in the glue_data layout) replaced. The score thresholds of those tests (>= 0.75, >= 0.666) need the real models, so
the checks here are what the runs must do: return each metric, train DeeBERT's two stages, and write DeeBERT's files
under --plot_data_dir. The PABEE README's two commands (training, then inference over a patience list) run too.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from tiny_runs import make_tiny_stock_model, read_records, write_mrpc

import run_glue_with_exits

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run_with_argv(argv: list[str]) -> dict:
    """As the HF tests do: ``with patch.object(sys, "argv", testargs): result = main()``."""
    with patch.object(sys, "argv", argv):
        return run_glue_with_exits.main()


def assert_metrics(result: dict, keys: set[str]) -> None:
    assert keys <= set(result), result
    for key, value in result.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)


@pytest.mark.slow
def test_hf_pabee_test_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    albert = make_tiny_stock_model(tmp_path / "albert-base-v2", "albert")
    write_mrpc(tmp_path / "tests" / "fixtures" / "tests_samples" / "MRPC")
    tmp_dir = tmp_path / "out"
    testargs = f"""
        run_glue_with_pabee.py
        --model_type albert
        --model_name_or_path {albert}
        --data_dir ./tests/fixtures/tests_samples/MRPC/
        --output_dir {tmp_dir}
        --overwrite_output_dir
        --task_name mrpc
        --do_train
        --do_eval
        --per_gpu_train_batch_size=2
        --per_gpu_eval_batch_size=1
        --learning_rate=2e-5
        --max_steps=50
        --warmup_steps=2
        --seed=42
        --max_seq_length=128
        """.split()
    result = run_with_argv(testargs)
    assert_metrics(result, {"acc", "f1", "acc_and_f1"})
    config = json.loads((tmp_dir / "config.json").read_text())
    assert config["model_type"] == "multiexit_albert" and config["exit_loss_weighting"] == "weighted"  # PABEE's loss


@pytest.mark.slow
def test_pabee_readme_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    albert = make_tiny_stock_model(tmp_path / "albert-base-v2", "albert")
    data = write_mrpc(tmp_path / "glue_data" / "MRPC")
    save = tmp_path / "save"
    train = (f"--model_type albert --model_name_or_path {albert} --task_name MRPC --do_train --do_eval "
             f"--do_lower_case --data_dir {data} --max_seq_length 128 --per_gpu_train_batch_size 32 "
             f"--per_gpu_eval_batch_size 32 --learning_rate 2e-5 --save_steps 50 --logging_steps 50 "
             f"--num_train_epochs 5 --output_dir {save} --evaluate_during_training").split()
    assert_metrics(run_glue_with_exits.main(train), {"acc", "f1"})
    infer = (f"--model_type albert --model_name_or_path {save} --task_name MRPC --do_eval --do_lower_case "
             f"--data_dir {data} --max_seq_length 128 --per_gpu_eval_batch_size 1 --learning_rate 2e-5 "
             f"--logging_steps 50 --num_train_epochs 15 --output_dir {save} --eval_all_checkpoints "
             f"--patience 3,4,5,6,7,8").split()
    result = run_glue_with_exits.main(infer)
    # 5 epochs of 24 examples at batch 32 = 5 steps: no checkpoint-50, so the final model alone; every patience is
    # reported (longer than this 2-layer model allows: full depth, with a warning, as PABEE's sweep does)
    assert_metrics(result, {"acc"} | {f"acc_pabee(patience={p})" for p in range(3, 9)})
    assert {r["params"]["patience"] for r in read_records(save) if r["policy"] == "pabee"} == set(range(3, 9))


@pytest.mark.slow
def test_hf_deebert_test_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="run_glue_with_exits")
    roberta = make_tiny_stock_model(tmp_path / "roberta-base", "roberta")
    write_mrpc(tmp_path / "tests" / "fixtures" / "tests_samples" / "MRPC")
    train_args = f"""
        run_glue_deebert.py
        --model_type roberta
        --model_name_or_path {roberta}
        --task_name MRPC
        --do_train
        --do_eval
        --do_lower_case
        --data_dir ./tests/fixtures/tests_samples/MRPC/
        --max_seq_length 128
        --per_gpu_eval_batch_size=1
        --per_gpu_train_batch_size=8
        --learning_rate 2e-4
        --num_train_epochs 3
        --overwrite_output_dir
        --seed 42
        --output_dir ./examples/deebert/saved_models/roberta-base/MRPC/two_stage
        --plot_data_dir ./examples/deebert/results/
        --save_steps 0
        --overwrite_cache
        --eval_after_first_stage
        """.split()
    result = run_with_argv(train_args)
    assert_metrics(result, {"acc", "f1", "acc_and_f1"})
    saved = tmp_path / "examples/deebert/saved_models/roberta-base/MRPC/two_stage"
    assert json.loads((saved / "training_args.json").read_text())["deebert_two_stage"]  # DeeBERT's two stages
    assert json.loads((saved / "config.json").read_text())["exit_head_type"] == "pooler"  # DeeBERT's off-ramps
    stages = [m for m in caplog.messages if m.startswith("***** training: stage")]
    assert [m.split()[3].rstrip(",") for m in stages] == ["deebert_stage1", "deebert_stage2"], stages

    eval_args = """
        run_glue_deebert.py
        --model_type roberta
        --model_name_or_path ./examples/deebert/saved_models/roberta-base/MRPC/two_stage
        --task_name MRPC
        --do_eval
        --do_lower_case
        --data_dir ./tests/fixtures/tests_samples/MRPC/
        --output_dir ./examples/deebert/saved_models/roberta-base/MRPC/two_stage
        --plot_data_dir ./examples/deebert/results/
        --max_seq_length 128
        --eval_each_highway
        --eval_highway
        --overwrite_cache
        --per_gpu_eval_batch_size=1
        """.split()
    result = run_with_argv(eval_args)
    assert_metrics(result, {"acc", "f1", "acc_and_f1"})
    plots = tmp_path / "examples/deebert/results/examples/deebert/saved_models/roberta-base/MRPC/two_stage"
    each_layer = np.load(plots / "each_layer.npy")  # DeeBERT's file: the F1 of each layer alone
    assert each_layer.shape == (2,) and each_layer[-1] == pytest.approx(result["f1"])

    entropy_eval_args = """
        run_glue_deebert.py
        --model_type roberta
        --model_name_or_path ./examples/deebert/saved_models/roberta-base/MRPC/two_stage
        --task_name MRPC
        --do_eval
        --do_lower_case
        --data_dir ./tests/fixtures/tests_samples/MRPC/
        --output_dir ./examples/deebert/saved_models/roberta-base/MRPC/two_stage
        --plot_data_dir ./examples/deebert/results/
        --max_seq_length 128
        --early_exit_entropy 0.1
        --eval_highway
        --overwrite_cache
        --per_gpu_eval_batch_size=1
        """.split()
    result = run_with_argv(entropy_eval_args)
    assert_metrics(result, {"acc", "f1", "acc_and_f1", "f1_deebert(threshold=0.1)"})
    values = np.load(plots / "entropy_0.1.npy")  # a plain float array: no allow_pickle needed
    names = json.loads((plots / "entropy_0.1.json").read_text())
    assert list(names)[:3] == ["eval_time_s", "fraction_of_layers_used", "result"] and len(values) == 3 + 2
    assert values[2] == pytest.approx(result["f1_deebert(threshold=0.1)"]) and values[3:].sum() == 12
    record = [r for r in read_records(tmp_path / "examples/deebert/saved_models/roberta-base/MRPC/two_stage")
              if r["policy"] == "deebert"][-1]
    assert values[1] == pytest.approx(record["avg_exit_layer"] / 2)


def test_deebert_default_threshold_minus_one_never_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeeBERT's --early_exit_entropy default is -1: every example runs the whole model."""
    monkeypatch.chdir(tmp_path)
    roberta = make_tiny_stock_model(tmp_path / "roberta-base", "roberta")
    data = write_mrpc(tmp_path / "MRPC")
    result = run_glue_with_exits.main(["--model_type", "roberta", "--model_name_or_path", str(roberta), "--task_name",
                                       "MRPC", "--data_dir", str(data), "--output_dir", "out", "--do_eval",
                                       "--early_exit_entropy", "-1", "--max_seq_length", "64"])
    assert result["acc_deebert(threshold=-1.0)"] == result["acc"]
    (record,) = [r for r in read_records(tmp_path / "out") if r["policy"] == "deebert"]
    assert record["avg_exit_layer"] == 2.0
