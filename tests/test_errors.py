"""Bad input gives one clear ``error: ...`` line, exit status 2, no traceback, and nothing written.

Every case runs the real runner in-process (``run_glue_with_exits.cli(argv)``) on a tiny random BERT and a tiny
synthetic SST-2 folder, so the whole file needs neither ../shared nor the network. For mistakes caught before any
work the output folder must not even be created: no results file, no checkpoint, no feature cache that would make
the corrected re-run fail with "output_dir already exists". Inputs that are tolerated on purpose (BOM, CRLF, stray
quotes, over-long inputs, a checkpoint without trained exit heads) must run and warn.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import make_tiny_model, read_details, read_records, run_main, sst2_rows, write_sst2

import run_glue_with_exits
from multiexit.errors import UserInputError
from multiexit.policies import EntropyExit, entropy, make_policy, replay

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    damaged = root / "damaged"  # a copy cut short
    shutil.copytree(model, damaged)
    weights = (model / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights / "config.json")
    multi_exit = make_tiny_model(root / "multi-exit", multi_exit=True)
    other_task = root / "trained-on-cola"  # what --do_train on CoLA writes into config.json
    shutil.copytree(multi_exit, other_task)
    config = json.loads((other_task / "config.json").read_text())
    (other_task / "config.json").write_text(json.dumps(config | {"finetuning_task": "cola"}))
    trained_on_dev = root / "trained-with-eval-split-dev"  # what --do_train (full training set) leaves
    shutil.copytree(multi_exit, trained_on_dev)
    (trained_on_dev / "training_args.json").write_text(json.dumps(
        {"do_train": True, "task_name": "sst-2", "eval_split": "dev", "heldout_fraction": 0.1}))
    trained_on_heldout = root / "trained-with-heldout-0.2"
    shutil.copytree(multi_exit, trained_on_heldout)
    (trained_on_heldout / "training_args.json").write_text(json.dumps(
        {"do_train": True, "task_name": "sst-2", "eval_split": "heldout", "heldout_fraction": 0.2}))
    resumable_dev = root / "checkpoint-3"  # a training checkpoint of a run on the whole training set
    shutil.copytree(trained_on_dev, resumable_dev)
    (resumable_dev / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (resumable_dev / "training_state.pt").write_bytes(b"")
    return {
        "model": model,
        "resumable_dev": resumable_dev,
        "trained_on_dev": trained_on_dev,
        "trained_on_heldout": trained_on_heldout,
        "multi_exit_2_labels": multi_exit,
        "other_task": other_task,
        "data": write_sst2(root / "SST-2"),
        "damaged": damaged,
        "no_weights": no_weights,
    }


def base_args(tiny: dict[str, Path], output_dir: Path, *extra: object) -> list[object]:
    return ["--model_name_or_path", tiny["model"], "--task_name", "sst-2", "--data_dir", tiny["data"],
            "--output_dir", output_dir, "--max_seq_length", 32, *extra]


def assert_one_clear_error(status: int, stderr: str, expected: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1, stderr
    assert re.search(expected, errors[0]), errors[0]
    return errors[0]


def write_dev(folder: Path, content: str | bytes, train: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = train if train is not None else "sentence\tlabel\n" + "\n".join(sst2_rows(6)) + "\n"
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    path = folder / "dev.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Flags, policies, model: each case is (flags after the base ones, the error message it must give)

FLAG_CASES = {
    "unknown task": (["--task_name", "sst-3", "--do_eval"], r"unknown task 'sst-3'; valid tasks are: cola, sst2"),
    "unknown model type": (["--model_type", "gpt2", "--do_eval"], r"unknown --model_type 'gpt2'; choose from bert"),
    "unknown policy criterion": (["--do_eval", "--elbert_delta", "0.1", "--elbert_criterion", "bogus"],
                                 r"elbert criterion must be one of monotonic, range, same, got 'bogus'"),
    "nothing to do": ([], r"nothing to do: pass --do_train and/or --do_eval"),
    "patience < 0": (["--do_eval", "--patience", "-1"], r"patience must be >= 0, got -1"),
    "non-integer patience": (["--do_eval", "--patience", "1.5"], r"--patience: '1.5' is not a valid int"),
    "non-numeric patience": (["--do_eval", "--patience", "two"], r"--patience: 'two' is not a valid int"),
    "pcee patience < 0": (["--do_eval", "--pcee_patience", "-2", "--pcee_tau", "0.3"], r"patience must be >= 0"),
    "entropy NaN": (["--do_eval", "--early_exit_entropy", "nan"], r"entropy threshold must be a number, got NaN"),
    "tau NaN": (["--do_eval", "--pcee_patience", "1", "--pcee_tau", "nan"], r"pcee tau must be a number, got NaN"),
    "tau < 0": (["--do_eval", "--pcee_patience", "1", "--pcee_tau", "-0.1"], r"pcee tau must be in \[0.0, 1.0\]"),
    "tau without patience": (["--do_eval", "--pcee_tau", "0.3"], r"PCEE needs --pcee_patience"),
    "delta > 1": (["--do_eval", "--elbert_delta", "1.5"], r"elbert delta must be in \[0.0, 1.0\], got 1.5"),
    "delta < 0": (["--do_eval", "--elbert_delta", "-0.5"], r"elbert delta must be in \[0.0, 1.0\], got -0.5"),
    "window < 1": (["--do_eval", "--elbert_delta", "0.1", "--elbert_window", "0"], r"elbert window must be >= 1"),
    "maxprob > 1": (["--do_eval", "--maxprob_threshold", "1.5"], r"max-prob threshold must be in \[0.0, 1.0\]"),
    "budget layer > L": (["--do_eval", "--budget_layer", "1,5"], r"budget\(layer=5\) can first exit at layer 5, "
                         r"but the model has only 2 layers"),
    "budget layer > L before training": (["--do_train", "--max_steps", "1", "--do_eval", "--budget_layer", "3"],
                                         r"model has only 2 layers"),
    "budget layer 0": (["--do_eval", "--budget_layer", "0"], r"budget layer must be >= 1, got 0"),
    "regression task with entropy": (["--task_name", "sts-b", "--do_eval", "--early_exit_entropy", "0.1"],
                                     r"policy 'deebert' needs class probabilities and does not support regression"),
    "regression task with pcee": (["--task_name", "sts-b", "--do_eval", "--pcee_patience", "2", "--pcee_tau", "0.2"],
                                  r"policy 'pcee' .* does not support regression"),
    "regression task with elbert": (["--task_name", "STS-B", "--do_eval", "--elbert_delta", "0.1"],
                                    r"policy 'elbert' .* does not support regression"),
    "regression task with maxprob": (["--task_name", "stsb", "--do_eval", "--maxprob_threshold", "0.9"],
                                     r"policy 'maxprob' .* does not support regression"),
    "calibration speed-up < 1": (["--do_eval", "--calibrate_speedup", "2,0.5"], r"--calibrate_speedup: .* got 0.5"),
    "calibration drop NaN": (["--do_eval", "--calibrate_max_drop", "nan"], r"--calibrate_max_drop: .* got nan"),
    "certified drop of 0": (["--do_eval", "--calibrate_max_drop", "0"],
                            r"--calibrate_max_drop 0 --calibrate_risk disagreement: a certified drop is in \(0, 1\]"),
    "certified F1 drop": (["--task_name", "mrpc", "--do_eval", "--calibrate_max_drop", "0.01", "--calibrate_risk",
                           "metric"], r"risk 'metric' certifies .*; 'f1' is not one: certify risk 'disagreement'"),
    "certified disagreement, regression": (["--task_name", "sts-b", "--do_eval", "--calibrate_max_drop", "0.05"],
                                           r"regression task needs a tolerance > 0"),
    "calibration delta 1": (["--do_eval", "--calibrate_max_drop", "0.01", "--calibrate_delta", "1"],
                            r"--calibrate_delta: the probability that a certificate fails is in \(0, 1\), got 1.0"),
    "calibration batch size 0": (["--do_eval", "--calibrate_max_drop", "0.01", "--calibrate_batch_size", "0"],
                                 r"--calibrate_batch_size: a number of examples >= 1 or 'held_out', got '0'"),
    "calibration batch of the point estimate": (["--do_eval", "--calibrate_max_drop", "0.01", "--calibrate_risk",
                                                 "empirical", "--calibrate_batch_size", "held_out"],
                                                r"--calibrate_batch_size asks for a batch certificate: it needs"),
    "fp16 with bf16": (["--do_eval", "--fp16", "--bf16"], r"choose one of --fp16 and --bf16"),
    "negative learning rate": (["--do_train", "--learning_rate=-1e-5"], r"--learning_rate must be a finite"),
    "NaN learning rate": (["--do_train", "--learning_rate", "nan"], r"--learning_rate must be a finite"),
    "zero batch size": (["--do_train", "--per_gpu_train_batch_size", "0"], r"--per_gpu_train_batch_size must be >= 1"),
    "max_seq_length beyond positions": (["--do_eval", "--max_seq_length", "128"],
                                        r"--max_seq_length 128 is longer than the 64 positions of"),
    "num_hidden_layers beyond depth": (["--do_eval", "--num_hidden_layers", "3"],
                                       r"--num_hidden_layers must be in \[1, 2\]"),
    "model folder does not exist": (["--do_eval", "--model_name_or_path", "{tmp}/no/such/model"],
                                    r"--model_name_or_path .*/no/such/model: no such folder"),
    "model folder without config": (["--do_eval", "--model_name_or_path", "{data}"], r"has no config.json"),
    "damaged weights file": (["--do_eval", "--model_name_or_path", "{damaged}"],
                             r"damaged/model.safetensors is damaged \(.*\); it was probably cut short"),
    "config without weights": (["--do_train", "--model_name_or_path", "{no_weights}"],
                               r"no-weights has a config.json but no weights file"),
    "model path is a file": (["--do_eval", "--model_name_or_path", "{data}/dev.tsv"], r"is a file"),
    "checkpoint of another task": (["--do_eval", "--model_name_or_path", "{other_task}"],
                                   r"trained-on-cola was fine-tuned on cola, not sst2; use a checkpoint of this task"),
    "max_eval_samples < 1": (["--do_eval", "--max_eval_samples", "-5"], r"--max_eval_samples must be >= 1"),
    "max_train_samples 0": (["--do_train", "--max_train_samples", "0"], r"--max_train_samples must be >= 1"),
    "policy flag without its policy's first": (["--do_eval", "--regression_threshold", "0.1"],
                                               r"--regression_threshold set no pabee setting without --patience"),
    "elbert range without the range criterion": (["--do_eval", "--elbert_delta", "0.1", "--elbert_range", "0.05"],
                                                 r"--elbert_range is the 'range' criterion's threshold"),
    "online without a setting": (["--do_eval", "--online"], r"--online / --verify_online run real early exit"),
    "checkpoint num_labels != task": (["--task_name", "mnli", "--do_eval", "--model_name_or_path", "{multi_exit}"],
                                      r"was trained with num_labels=2 but task mnli has 3 labels"),
    "eval with another exit_pooling": (["--do_eval", "--model_name_or_path", "{multi_exit}", "--exit_pooling", "mean"],
                                       r"was trained with exit_pooling='cls'; evaluating it with --exit_pooling mean"),
    "eval with another exit_head_type": (["--do_eval", "--model_name_or_path", "{multi_exit}", "--exit_head_type",
                                          "linear"], r"was trained with exit_head_type='shared_pooler'; evaluating it "
                                                     r"with --exit_head_type linear"),
    "held-out part of a model trained on all of train": (
        ["--do_eval", "--eval_split", "heldout", "--model_name_or_path", "{trained_on_dev}"],
        r"was trained on the whole training set \(--eval_split dev\), so it trained on examples of the held-out "
        r"part"),
    "held-out part of another fraction": (
        ["--do_eval", "--eval_split", "heldout", "--model_name_or_path", "{trained_on_heldout}"],
        r"less its held-out part \(--eval_split heldout --heldout_fraction 0.2\), so .* --heldout_fraction 0.1 would "
        r"score"),
    "resuming on another training set": (
        ["--do_train", "--resume_from_checkpoint", "{resumable_dev}", "--eval_split", "heldout"],
        r"checkpoint-3 was trained on the whole training set \(--eval_split dev\); resuming it on the training set "
        r"less its held-out part .* would mix the two"),
    "scores on the test split during training": (["--do_train", "--evaluate_during_training", "--eval_split", "test"],
                                                  r"--evaluate_during_training score .* the test split has no labels"),
    "calibration on 3 examples": (["--do_eval", "--max_eval_samples", "3", "--calibrate_speedup", "1.5"],
                                  r"needs at least 4 labelled examples, the dev split has 3"),
    "model type != checkpoint": (["--model_type", "roberta", "--do_eval"],
                                 r"is a 'bert' checkpoint but --model_type is 'roberta'"),
    "resume folder missing": (["--do_train", "--resume_from_checkpoint", "{tmp}/checkpoint-9"],
                              r"--resume_from_checkpoint .*checkpoint-9: no such folder"),
    "resume folder not a checkpoint": (["--do_train", "--resume_from_checkpoint", "{model}"],
                                       r"not a training checkpoint \(needs trainer_state.json"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_give_one_clear_error_and_write_nothing(case: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    flags, expected = FLAG_CASES[case]
    names = {"tmp": tmp_path, "data": tiny["data"], "model": tiny["model"], "multi_exit": tiny["multi_exit_2_labels"],
             "damaged": tiny["damaged"], "no_weights": tiny["no_weights"], "other_task": tiny["other_task"],
             "trained_on_dev": tiny["trained_on_dev"], "trained_on_heldout": tiny["trained_on_heldout"],
             "resumable_dev": tiny["resumable_dev"]}
    flags = [str(flag).format(**names) for flag in flags]
    output_dir = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output_dir, *flags))
    assert_one_clear_error(status, stderr, expected)
    assert not output_dir.exists(), sorted(p.name for p in output_dir.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --fp16 is valid")
def test_fp16_without_cuda(tiny: dict[str, Path], tmp_path: Path) -> None:
    status, stderr = run_main(base_args(tiny, tmp_path / "out", "--do_eval", "--fp16"))
    assert_one_clear_error(status, stderr, r"--fp16 needs a CUDA GPU \(none is available\)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--exit_policy", "pabee"], "unrecognized arguments: --exit_policy pabee"),
    (["--pat", "2"], "unrecognized arguments: --pat 2"),  # no prefix of --patience taken for it
    (["--pcee_ensemble", "bogus"], "argument --pcee_ensemble: invalid choice: 'bogus'"),
])
def test_argparse_errors_are_one_line(flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_glue_with_exits.cli(["--task_name", "sst-2", "--output_dir", "x", *flags])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines() == [f"error: {expected}" + stderr.split(expected, 1)[1].rstrip("\n")], stderr
    assert stderr.rstrip().endswith("(see --help)")


def test_unknown_policy_name() -> None:
    with pytest.raises(UserInputError, match=r"unknown exit policy 'early'; choose from budget, pabee"):
        make_policy("early", threshold=0.1)


def test_existing_output_dir_needs_overwrite(tiny: dict[str, Path], tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "exit_results.jsonl").write_text('{"kept": true}\n')
    status, stderr = run_main(base_args(tiny, output_dir, "--do_train", "--max_steps", 1))
    assert_one_clear_error(status, stderr, r"already exists and is not empty; pass --overwrite_output_dir")
    assert sorted(p.name for p in output_dir.iterdir()) == ["exit_results.jsonl"]
    assert (output_dir / "exit_results.jsonl").read_text() == '{"kept": true}\n'


# --------------------------------------------------------------------------------------------------------------------
# Data folders and files

ROWS = "\n".join(sst2_rows(4)) + "\n"
DATA_CASES = {
    "wrong column count": ("sentence\tlabel\n" + ROWS + "a fine film\t1\textra\n",
                           r"dev.tsv:6: expected 2 tab-separated columns, found 3; fix or remove this line"),
    "non-UTF-8 byte": (b"sentence\tlabel\ngood film\t1\nna\xefve plot\t0\n",  # Latin-1, not UTF-8
                       r"dev.tsv:3: byte 0xef \(byte 3 of the line\) is not valid UTF-8; re-save the file as UTF-8"),
    "label outside the label set": ("sentence\tlabel\n" + ROWS + "a fine film\t2\n",
                                    r"dev.tsv:6: label '2' is not one of \['0', '1'\] for task sst2"),
    "label is text": ("sentence\tlabel\n" + ROWS + "a fine film\tpositive\n", r"dev.tsv:6: label 'positive'"),
    "empty sentence": ("sentence\tlabel\n" + ROWS + "   \t1\n", r"dev.tsv:6: the text in column 1 is empty"),
    "header only": ("sentence\tlabel\n", r"dev.tsv: file has a header but no data rows"),
    "empty file": ("", r"dev.tsv: file is empty"),
    "BOM and a wrong header": ("\ufeffsentence\tlabel\tscore\nfine\t1\t3\n", r"dev.tsv:1: expected 2 tab-separated"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_malformed_files_name_file_and_line(case: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    content, expected = DATA_CASES[case]
    data = write_dev(tmp_path / "SST-2", content)
    output_dir = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output_dir, "--data_dir", data, "--do_eval", "--patience", 1))
    line = assert_one_clear_error(status, stderr, expected)
    assert str(data / "dev.tsv") in line
    assert not output_dir.exists()


def test_bad_train_file_stops_before_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = write_dev(tmp_path / "SST-2", "sentence\tlabel\n" + ROWS, train="sentence\tlabel\ngood\t1\nbad\t7\n")
    output_dir = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output_dir, "--data_dir", data, "--do_train", "--do_eval"))
    assert_one_clear_error(status, stderr, r"train.tsv:3: label '7' is not one of")
    assert not output_dir.exists()


def test_data_dir_problems(tiny: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    output_dir = tmp_path / "out"
    cases = [
        (["--data_dir", tmp_path / "missing"], r"missing: data directory does not exist; point --data_dir at the "
                                               r"sst2 data folder \(glue_data/SST-2\)"),
        (["--data_dir", empty], r"empty: data directory is empty"),
        (["--data_dir", tiny["data"] / "dev.tsv"], r"dev.tsv: is a file, not a data directory"),
        # the wrong task's folder: MRPC pointed at SST-2's files
        (["--data_dir", tiny["data"], "--task_name", "mrpc"], r"dev.tsv:1: the header looks like a file of "
                                                              r"glue_data/SST-2, not mrpc"),
        # MNLI's dev file is dev_matched.tsv: the message lists what the folder holds
        (["--data_dir", tiny["data"], "--task_name", "mnli", "--model_name_or_path", tiny["model"]],
         r"dev_matched.tsv: file not found \(the folder holds: dev.tsv, train.tsv\)"),
    ]
    for flags, expected in cases:
        status, stderr = run_main(base_args(tiny, output_dir, "--do_eval", *flags))
        assert_one_clear_error(status, stderr, expected)
        assert not output_dir.exists()


def test_no_data_dir_and_no_hub(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multiexit import data as glue_data
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(glue_data.datasets, "load_dataset", unreachable)
    argv = ["--model_name_or_path", tiny["model"], "--task_name", "sst-2", "--output_dir", tmp_path / "out",
            "--max_seq_length", 32, "--do_eval"]
    status, stderr = run_main(argv)
    assert_one_clear_error(status, stderr, r"no --data_dir was given for task sst2 and the Hugging Face hub could "
                                           r"not provide nyu-mll/glue .*; pass --data_dir pointing at a local copy")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tolerated_input_runs_and_warns(tiny: dict[str, Path], tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """BOM, CRLF line ends, unbalanced quotes (kept literally, no row merging) and inputs longer than
    --max_seq_length (truncated, with a warning) are accepted; a plain checkpoint without exit heads evaluated for
    early exit warns that the heads are untrained."""
    long_sentence = " ".join(["a long and winding review"] * 8)
    rows = ['\ufeffsentence\tlabel', 'a "quoted\t1', 'unbalanced " quote here\t0', 'plain text\t1',
            f'{long_sentence}\t0', '"fully quoted"\t1']
    data = write_dev(tmp_path / "SST-2", "\r\n".join(rows) + "\r\n")
    output_dir = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    status, stderr = run_main(base_args(tiny, output_dir, "--data_dir", data, "--do_eval", "--max_seq_length", 16,
                                        "--patience", 1, "--per_gpu_eval_batch_size", 4))
    assert status == 0, stderr
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "1 of 5 examples were longer than max_seq_length=16 and were truncated" in warnings
    assert "has no trained exit heads (2 of 2 are newly initialised)" in warnings
    records = read_records(output_dir)
    assert records and all(r["num_examples"] == 5 for r in records)
    assert [row[3] for row in read_details(output_dir, records[0])] == ["1", "0", "1", "0", "1"]


# --------------------------------------------------------------------------------------------------------------------
# fp16 logits and entropy


def test_fp16_logits_do_not_overflow_entropy() -> None:
    logits = torch.tensor([[60000.0, -60000.0], [0.0, 0.0], [65504.0, 65504.0], [-65504.0, 3.0]],
                          dtype=torch.float16)
    with torch.no_grad():  # the naive formula overflows in fp16: exp(60000) = inf, inf / inf = NaN
        naive_p = logits.exp() / logits.exp().sum(-1, keepdim=True)
        naive = -(naive_p * naive_p.log()).sum(-1)
    assert torch.isnan(naive).any()
    values = entropy(logits)
    assert values.dtype == torch.float64 and torch.isfinite(values).all()
    torch.testing.assert_close(values, torch.tensor([0.0, math.log(2), math.log(2), 0.0], dtype=torch.float64))
    # through the replay of an entropy policy on fp16 cached logits [N, L, C]: confident rows exit at layer 1
    layer_logits = torch.stack([logits, torch.zeros(4, 2, dtype=torch.float16)], dim=1)
    result = replay(EntropyExit(threshold=0.1), layer_logits)
    assert result.exit_layer.tolist() == [1, 2, 2, 1]
    assert torch.isfinite(result.answer).all()


# --------------------------------------------------------------------------------------------------------------------
# Security: no pickle, no remote code


def _source_files() -> list[Path]:
    skip = {".venv", ".git", "runs", "outputs", "build", "dist"}
    return [path for path in REPO.rglob("*.py") if not skip & set(path.relative_to(REPO).parts)]


def _calls(text: str, name: str) -> list[str]:
    """The full text of every call ``name(...)`` in ``text`` (balanced parentheses)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start(): end + 1])
    return calls


def _trusts_remote_code(text: str) -> bool:
    """Whether a call in ``text`` passes ``trust_remote_code`` other than False or None (a mention in a docstring,
    such as the instructions for loading a saved model's card, is no call)."""
    return any(isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
               and not (isinstance(node.value, ast.Constant) and node.value.value in (False, None))
               for node in ast.walk(ast.parse(text)))


# the one exception: it checks that checkpoints this package saves load through HF's remote code (the file saved
# beside their weights), on folders the test itself wrote
REMOTE_CODE_TEST = REPO / "tests" / "test_hf.py"


@pytest.mark.slow
def test_no_remote_code_and_no_unsafe_torch_load() -> None:
    files = _source_files()
    assert len(files) > 5
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        if _trusts_remote_code(text) and path != REMOTE_CODE_TEST:
            problems.append(f"{path}: trust_remote_code")
        for call in _calls(text, "torch.load"):
            if "weights_only=True" not in call.replace(" ", ""):
                problems.append(f"{path}: {call}")
        for call in _calls(text, "np.load") + _calls(text, "numpy.load"):
            if "allow_pickle=True" in call.replace(" ", ""):
                problems.append(f"{path}: {call}")
        if re.search(r"\bpickle\.loads?\(", text):
            problems.append(f"{path}: pickle.load")
    assert not problems, problems


@pytest.mark.parametrize("flags, ignored", [
    (["--stage2_learning_rate", "1e-5"], "--stage2_learning_rate (only DeeBERT's two stages"),
    (["--deebert_two_stage", "--exit_loss", "learned"], "--exit_loss learned (DeeBERT's stages"),
    (["--exit_weight_learning_rate", "0.1"], "--exit_weight_learning_rate (for --exit_loss learned)"),
    (["--warmup_steps", "10", "--warmup_ratio", "0.1"], "--warmup_ratio (--warmup_steps is given and wins"),
])
def test_flags_that_do_nothing_are_said(flags: list[str], ignored: str, caplog: pytest.LogCaptureFixture) -> None:
    from multiexit.runner import args as runner_args
    args = runner_args.parse_args(["--task_name", "sst-2", "--output_dir", "x", "--do_train", *flags])
    with caplog.at_level(logging.WARNING, logger="run_glue_with_exits"):
        runner_args.warn_unused_flags(args)
    assert f"ignored: {ignored}" in caplog.text
    caplog.clear()
    runner_args.warn_unused_flags(runner_args.parse_args(["--task_name", "sst-2", "--output_dir", "x",
                                                                "--do_train"]))
    assert "ignored" not in caplog.text
