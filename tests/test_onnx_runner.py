"""``run_glue_with_exits.py --runtime onnxruntime``: the runner exports the checkpoint it evaluates (or reuses the
export of the same weights), runs the all-layer pass, replay, ``--online`` and ``--verify_online`` through ONNX
Runtime, and every record says which runtime made it; training and CUDA graphs are refused with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_runs import make_tiny_model, read_details, read_records, run_main, write_sst2

pytest.importorskip("onnxruntime", reason="the ONNX Runtime path needs the [onnx] extra (make install has it)")


def eval_argv(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--model_type", "bert", "--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
            "--output_dir", output, "--max_seq_length", "32", "--do_eval", "--timing_repeats", "1",
            "--timing_warmup", "1", *extra]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx-runner")
    model = make_tiny_model(folder / "model", layers=4, multi_exit=True, dropout=0.0, initializer_range=0.3)
    return model, write_sst2(folder / "SST-2", dev=16)


@pytest.mark.slow
def test_onnxruntime_evaluation_online_and_verified(tiny_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny_checkpoint
    policies = ["--patience", "1,2", "--early_exit_entropy", "0.6", "--budget_layer", "2"]
    status, err = run_main(eval_argv(model, data, tmp_path / "ort", "--runtime", "onnxruntime", "--ort_threads", "1",
                                     "--per_gpu_eval_batch_size", "1", "--online", "--verify_online", *policies))
    assert status == 0, err
    records = read_records(tmp_path / "ort")
    assert {record["runtime"] for record in records} == {"onnxruntime"}
    online = [record for record in records if record["mode"] == "online"]
    assert len(online) == 4 and all(record["verified_against_replay"] for record in online)
    manifest = json.loads((tmp_path / "ort" / "onnx" / "model" / "onnx_manifest.json").read_text())
    assert manifest["num_layers"] == 4
    # the same evaluation with torch: every record, and every example's exit layer and prediction, agree
    status, err = run_main(eval_argv(model, data, tmp_path / "torch", "--per_gpu_eval_batch_size", "1", "--online",
                                     "--verify_online", *policies))
    assert status == 0, err
    torch_records = read_records(tmp_path / "torch")
    assert {record["runtime"] for record in torch_records} == {"torch"}
    assert len(torch_records) == len(records)
    for ours, theirs in zip(records, torch_records):
        assert (ours["policy"], ours["params"], ours["mode"]) == (theirs["policy"], theirs["params"], theirs["mode"])
        assert read_details(tmp_path / "ort", ours) == read_details(tmp_path / "torch", theirs)
    summary = (tmp_path / "ort" / "exit_summary_model.md").read_text()
    assert "online (onnxruntime)" in summary


@pytest.mark.slow
def test_batched_onnxruntime_reuses_the_export(tiny_checkpoint: tuple[Path, Path], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    model, data = tiny_checkpoint
    argv = eval_argv(model, data, tmp_path, "--runtime", "onnxruntime", "--per_gpu_eval_batch_size", "4",
                     "--online", "--verify_online", "--patience", "1")
    assert run_main(argv)[0] == 0
    manifest = tmp_path / "onnx" / "model" / "onnx_manifest.json"
    written = os.stat(manifest).st_mtime_ns
    with caplog.at_level("INFO"):
        assert run_main(argv)[0] == 0
    assert os.stat(manifest).st_mtime_ns == written
    assert "reusing the ONNX export" in caplog.text
    batched = [record for record in read_records(tmp_path) if record["mode"] == "batched"]
    assert len(batched) == 2 and all(record["verified_against_replay"] for record in batched)


@pytest.mark.parametrize(("extra", "message"), [
    (["--do_train"], "cannot be combined with --do_train"),
    (["--bf16"], "cannot be combined with --bf16"),
    (["--ort_threads", "0"], "--ort_threads must be >= 1"),
])
def test_refused_combinations(tiny_checkpoint: tuple[Path, Path], tmp_path: Path, extra: list[str],
                              message: str) -> None:
    model, data = tiny_checkpoint
    status, err = run_main(eval_argv(model, data, tmp_path, "--runtime", "onnxruntime", *extra))
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("flag", [["--ort_threads", "2"], ["--onnx_int8"]])
def test_onnx_flags_need_the_runtime(tiny_checkpoint: tuple[Path, Path], tmp_path: Path, flag: list[str]) -> None:
    model, data = tiny_checkpoint
    status, err = run_main(eval_argv(model, data, tmp_path, *flag))
    assert status == 2 and f"{flag[0]} is for ONNX Runtime: add --runtime onnxruntime" in err


@pytest.mark.slow
def test_int8_evaluation(tiny_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    """--onnx_int8: every layer scored from the int8 export (its own folder), verified online against its replay."""
    model, data = tiny_checkpoint
    status, err = run_main(eval_argv(model, data, tmp_path, "--runtime", "onnxruntime", "--onnx_int8",
                                     "--eval_each_highway", "--per_gpu_eval_batch_size", "1", "--patience", "1",
                                     "--online", "--verify_online"))
    assert status == 0, err
    assert json.loads((tmp_path / "onnx" / "model-int8" / "onnx_manifest.json").read_text())["int8"] is True
    records = read_records(tmp_path)
    assert {record["runtime"] for record in records} == {"onnxruntime-int8"}
    assert len([r for r in records if r["mode"] == "replay" and r["policy"] == "budget"]) == 4  # every layer
    assert all(r["verified_against_replay"] for r in records if r["mode"] == "online")
