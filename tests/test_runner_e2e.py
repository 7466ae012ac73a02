"""End-to-end: train a 2-layer cut of the real MiniLM on an MRPC subset, sweep policies, check the results file.

Runs the runner in-process through ``main(argv)`` (a subprocess per call would spend most of the time importing).
Everything checked here is derived from the files the runner wrote: the JSONL records must agree with their
per-example TSVs, with the task metric recomputed from those TSVs, with speed-up = L / mean exit layer, and the
online (real batch-size-1 early exit) rows must match the replayed rows example by example.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_runs import threshold_between

import exit_policies
import run_glue_with_exits
from multiexit.data import compute_metrics, get_task
from multiexit.runner import args as runner_args
from multiexit.runner import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # trains a model through the runner: make test-fast leaves the file out


@pytest.fixture(scope="module")
def mrpc_dir(shared_dir):  # noqa: ANN001, ANN201
    return os.path.join(shared_dir, "data", "glue", "MRPC")


def read_records(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "exit_results.jsonl")) as stream:
        return [json.loads(line) for line in stream]


def read_details(output_dir: str, record: dict) -> dict[str, np.ndarray]:
    with open(os.path.join(output_dir, record["per_example_file"])) as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    return {
        "index": np.array([int(r["index"]) for r in rows]),
        "exit_layer": np.array([int(r["exit_layer"]) for r in rows]),
        "prediction": np.array([int(r["prediction"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
    }


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mrpc_dir):  # noqa: ANN001, ANN201
    output_dir = str(tmp_path_factory.mktemp("e2e") / "mrpc-2layer")
    argv = [
        "--model_type", "bert", "--model_name_or_path", "packaged-minilm", "--num_hidden_layers", "2",
        "--task_name", "MRPC", "--data_dir", mrpc_dir, "--output_dir", output_dir,
        "--do_train", "--max_train_samples", "64", "--max_steps", "4", "--per_gpu_train_batch_size", "16",
        "--learning_rate", "1e-4", "--save_steps", "2", "--logging_steps", "2", "--evaluate_during_training",
        "--do_eval", "--max_eval_samples", "24", "--per_gpu_eval_batch_size", "1", "--eval_all_checkpoints",
        "--patience", "1", "--early_exit_entropy", "0.6,0.69", "--maxprob_threshold", "0.55",
        "--pcee_patience", "1", "--pcee_tau", "0.99", "--elbert_delta", "0.99", "--budget_layer", "1",
        "--eval_each_highway", "--sweep_default_grids", "--save_layer_logits",
        "--online", "--verify_online", "--timing_repeats", "1", "--timing_warmup", "1",
    ]
    assert run_glue_with_exits.cli(argv) == 0
    return output_dir


def test_results_file_is_consistent(trained_run):  # noqa: ANN001
    task = get_task("mrpc")
    records = read_records(trained_run)
    assert {r["mode"] for r in records} == {"replay", "online"}
    assert {r["checkpoint"].split(os.sep)[-1] for r in records} >= {"checkpoint-2", "checkpoint-4"}
    required = {"task", "checkpoint", "policy", "params", "mode", "metrics", "num_examples", "num_layers",
                "avg_exit_layer", "speedup", "layer_saving", "wall_time_s", "per_example_file"}
    for record in records:
        assert required <= set(record), required - set(record)
        assert record["task"] == "mrpc" and record["num_layers"] == 2 and record["num_examples"] == 24
        details = read_details(trained_run, record)
        # every number in the record follows from the per-example file
        assert record["avg_exit_layer"] == pytest.approx(details["exit_layer"].mean())
        assert record["speedup"] == pytest.approx(record["num_layers"] / record["avg_exit_layer"])
        assert record["layer_saving"] == pytest.approx(1 - record["avg_exit_layer"] / record["num_layers"])
        assert details["exit_layer"].min() >= 1 and details["exit_layer"].max() <= 2
        assert record["metrics"] == pytest.approx(compute_metrics(task, details["prediction"], details["label"]))
        assert task.main_metric in record["metrics"]
        if record["mode"] == "online":
            assert record["wall_time_s"] > 0 and record["verified_against_replay"] is True
            # the timing fields follow from each other: the median of the repeats, and full depth's over this one's
            assert len(record["wall_time_repeats_s"]) == 1  # --timing_repeats 1
            assert record["wall_time_s"] == float(np.median(record["wall_time_repeats_s"]))
            assert record["wall_speedup"] == pytest.approx(record["full_depth_wall_time_s"] / record["wall_time_s"])
            assert record["batch_size"] == 1 and record["device"] == "cpu"
        else:
            assert record["wall_time_s"] is None


def test_online_equals_replay_example_by_example(trained_run):  # noqa: ANN001
    records = read_records(trained_run)
    replayed = {(r["checkpoint"], r["policy"], json.dumps(r["params"], sort_keys=True)): r
                for r in records if r["mode"] == "replay" and not r.get("grid")}
    online = [r for r in records if r["mode"] == "online"]
    assert len(online) == 3 * 7  # 3 checkpoints × 7 listed settings (budget, pabee, 2 deebert, maxprob, pcee, elbert)
    for record in online:
        twin = replayed[(record["checkpoint"], record["policy"], json.dumps(record["params"], sort_keys=True))]
        a, b = read_details(trained_run, record), read_details(trained_run, twin)
        np.testing.assert_array_equal(a["exit_layer"], b["exit_layer"])
        np.testing.assert_array_equal(a["prediction"], b["prediction"])


def _online_argv(trained_run: str, mrpc_dir: str, output_dir: str, entropy: float, maxprob: float) -> list[str]:
    return ["--model_type", "bert", "--model_name_or_path", trained_run, "--task_name", "mrpc",
            "--data_dir", mrpc_dir, "--output_dir", output_dir, "--do_eval", "--max_eval_samples", "24",
            "--per_gpu_eval_batch_size", "1", "--early_exit_entropy", repr(entropy),
            "--maxprob_threshold", repr(maxprob), "--online", "--verify_online",
            "--timing_repeats", "1", "--timing_warmup", "0"]


def _mid_depth_thresholds(trained_run: str) -> tuple[float, float]:
    """DeeBERT and max-prob thresholds chosen from the saved layer-1 logits so that the exit is decided per example
    (some exit at layer 1, some go on): online == replay then checks the decision, not just "never exit"."""
    logits = torch.from_numpy(np.load(os.path.join(trained_run, "layer_logits", "final_dev_logits.npy")))
    first_layer = logits[:, 0].float()
    return (threshold_between(exit_policies.entropy(first_layer)),
            threshold_between(torch.softmax(first_layer, dim=-1).amax(dim=-1)))


def test_online_equals_replay_when_examples_exit_at_different_depths(trained_run, mrpc_dir, tmp_path):  # noqa: ANN001
    entropy, maxprob = _mid_depth_thresholds(trained_run)
    output_dir = str(tmp_path / "online")
    assert run_glue_with_exits.cli(_online_argv(trained_run, mrpc_dir, output_dir, entropy, maxprob)) == 0
    records = read_records(output_dir)
    replayed = {(r["policy"], json.dumps(r["params"], sort_keys=True)): r for r in records if r["mode"] == "replay"}
    online = {r["policy"]: r for r in records if r["mode"] == "online"}
    assert set(online) == {"deebert", "maxprob"}
    for policy, record in online.items():
        assert record["verified_against_replay"] is True
        mine = read_details(output_dir, record)
        twin = read_details(output_dir, replayed[(policy, json.dumps(record["params"], sort_keys=True))])
        assert set(mine["exit_layer"].tolist()) == {1, 2}, f"{policy}: every example exited at the same layer"
        np.testing.assert_array_equal(mine["exit_layer"], twin["exit_layer"])
        np.testing.assert_array_equal(mine["prediction"], twin["prediction"])


def test_verify_online_raises_when_online_differs_from_replay(trained_run, mrpc_dir, tmp_path, monkeypatch):  # noqa: ANN001
    """Plant a one-example bug in the online path (its first example reports the other exit layer): --verify_online
    must stop the run rather than write a record that disagrees with the replay."""
    real_run_online = evaluation.run_online

    def run_online_with_a_bug(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real_run_online(*args, **kwargs)
        result["exit_layers"] = result["exit_layers"].copy()
        result["exit_layers"][0] = 3 - result["exit_layers"][0]  # 1 <-> 2
        return result

    monkeypatch.setattr(evaluation, "run_online", run_online_with_a_bug)
    entropy, maxprob = _mid_depth_thresholds(trained_run)
    output_dir = str(tmp_path / "planted")
    with pytest.raises(RuntimeError, match=r"online early exit differs from the replay .* on 1 examples"):
        run_glue_with_exits.cli(_online_argv(trained_run, mrpc_dir, output_dir, entropy, maxprob))
    assert not any(r["mode"] == "online" for r in read_records(output_dir))


def test_artifacts(trained_run):  # noqa: ANN001
    logits = np.load(os.path.join(trained_run, "layer_logits", "final_dev_logits.npy"))
    labels = np.load(os.path.join(trained_run, "layer_logits", "final_dev_labels.npy"))
    assert logits.shape == (24, 2, 2) and labels.shape == (24,)
    for name in ("score_vs_speedup_final.png", "exit_summary_final.md", "model.safetensors", "config.json",
                 "training_log.jsonl", "checkpoint-2/model.safetensors", "checkpoint-4/training_state.pt"):
        assert os.path.getsize(os.path.join(trained_run, name)) > 0, name
    with open(os.path.join(trained_run, "config.json")) as stream:
        config = json.load(stream)
    assert config["exit_loss_weighting"] == "weighted" and config["num_hidden_layers"] == 2
    log = [json.loads(line) for line in open(os.path.join(trained_run, "training_log.jsonl"))]
    assert [entry["step"] for entry in log] == [2, 4]
    assert set(log[-1]["eval_per_layer"]) == {"layer_1", "layer_2"}
    # per-layer scores (budget at every layer) and the default grids are in the results file
    records = read_records(trained_run)
    final_budget = {r["params"]["layer"] for r in records
                    if r["policy"] == "budget" and "final" in r["per_example_file"]}
    assert final_budget == {1, 2}
    # each run's folder keeps its own summary table and plot (the top-level ones are the latest run's)
    for record in records:
        run_dir = os.path.join(trained_run, *record["per_example_file"].split(os.sep)[:3])
        assert os.path.getsize(os.path.join(run_dir, "exit_summary.md")) > 0, run_dir
        assert os.path.getsize(os.path.join(run_dir, "score_vs_speedup.png")) > 0, run_dir
    grid_policies = {r["policy"] for r in records if r.get("grid")}
    assert grid_policies == {"budget", "pabee", "deebert", "maxprob", "pcee", "elbert"}


def test_results_are_appended_never_overwritten(trained_run, mrpc_dir):  # noqa: ANN001
    before = open(os.path.join(trained_run, "exit_results.jsonl")).read()
    argv = ["--model_type", "bert", "--model_name_or_path", trained_run, "--task_name", "mrpc", "--data_dir", mrpc_dir,
            "--output_dir", trained_run, "--do_eval", "--max_eval_samples", "24", "--patience", "1"]
    assert run_glue_with_exits.cli(argv) == 0
    after = open(os.path.join(trained_run, "exit_results.jsonl")).read()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 2  # full depth + pabee


def test_seed_command_lines_parse():
    """The PABEE README commands (paths aside) are accepted as they are."""
    train = ("--model_type albert --model_name_or_path albert-base-v2 --task_name MRPC --do_train --do_eval "
             "--do_lower_case --data_dir glue/MRPC --max_seq_length 128 --per_gpu_train_batch_size 32 "
             "--per_gpu_eval_batch_size 32 --learning_rate 2e-5 --save_steps 50 --logging_steps 50 "
             "--num_train_epochs 5 --output_dir out --evaluate_during_training")
    infer = ("--model_type albert --model_name_or_path out --task_name STS-B --do_eval --do_lower_case "
             "--data_dir glue/STS-B --max_seq_length 128 --per_gpu_eval_batch_size 1 --output_dir out "
             "--eval_all_checkpoints --patience 3,4,5,6,7,8 --regression_threshold 0.1")
    deebert = ("--model_type bert --model_name_or_path bert-base-uncased --task_name MRPC --do_eval --data_dir d "
               "--output_dir out --plot_data_dir plots --eval_highway --eval_each_highway --early_exit_entropy 0.1 "
               "--per_gpu_eval_batch_size 1 --train_highway --overwrite_output_dir --fp16_opt_level O1")
    for line in (train, infer, deebert):
        args = runner_args.parse_args(shlex.split(line))
        policies = runner_args.policies_from_args(args)
        assert all(p.name in {"pabee", "deebert"} for p in policies)
    infer_args = runner_args.parse_args(shlex.split(infer))
    policies = runner_args.policies_from_args(infer_args)
    assert [p.patience for p in policies] == [3, 4, 5, 6, 7, 8]
    assert {p.regression_threshold for p in policies} == {0.1}


def test_script_runs_the_seed_workflow(tmp_path, mrpc_dir):  # noqa: ANN001
    """scripts/train_pabee.sh with the extra arguments a user would add to make it tiny."""
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "pabee"), TASK_NAME="MRPC", PYTHON=sys.executable,
               GLUE_DIR=os.path.dirname(mrpc_dir), HF_HUB_OFFLINE="1")
    command = ["bash", os.path.join(REPO, "scripts", "train_pabee.sh"), "--num_hidden_layers", "2", "--max_steps", "2",
               "--max_train_samples", "32", "--max_eval_samples", "16", "--save_steps", "0", "--logging_steps", "0"]
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(str(tmp_path / "pabee"))
    assert [r["policy"] for r in records] == ["budget"] and records[0]["num_layers"] == 2
