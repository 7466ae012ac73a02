"""The runner's models in HF's tools, on a tiny random BERT and a tiny synthetic SST-2 folder: the model card
(README.md beside the saved model: its YAML header as HF's Trainer writes it, its body from the folder's files and
latest evaluation); ``--push_to_hub``, refused up front where the hub cannot be reached, and otherwise uploading the
model folder (the hub client replaced by a recorder: this machine has no network); scripts/check_hf_answers.py, which
finds the runner's answers through AutoModelForSequenceClassification and the early-exit pipeline; and a multi-exit
checkpoint saved before the multi-exit model types (config.json's model_type "bert"), which still evaluates through
the runner with the same results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from tiny_runs import comparable, load_script, make_tiny_model, read_records, run_main, write_sst2

from multiexit.modeling import REMOTE_CODE_MODULE
from multiexit.runner.hub import CARD_FILE, CARD_MARKER

LAYERS = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    return {"model": make_tiny_model(root / "model", layers=LAYERS), "data": write_sst2(root / "SST-2")}


def base_args(tiny: dict[str, Path], output_dir: Path, *extra: object) -> list[object]:
    return ["--model_name_or_path", tiny["model"], "--task_name", "sst-2", "--data_dir", tiny["data"],
            "--output_dir", output_dir, "--max_seq_length", 32, *extra]


TRAIN = ("--do_train", "--max_steps", 4, "--per_gpu_train_batch_size", 4, "--logging_steps", 0)


def read_card(folder: Path) -> tuple[dict, str]:
    text = (folder / CARD_FILE).read_text(encoding="utf-8")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def one_error(status: int, stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.slow
def test_the_card_describes_the_model_and_its_latest_evaluation(tiny, tmp_path):
    output = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output, *TRAIN, "--do_eval", "--eval_each_highway", "--patience", 1,
                                        "--calibrate_speedup", 1.2))
    assert status == 0, stderr
    metadata, body = read_card(output)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-classification"
    assert {"early-exit", "multi-exit", "bert"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # fine-tuned from a local folder, which is no hub id
    assert metadata["datasets"] == ["nyu-mll/glue"] and metadata["metrics"] == ["accuracy"]

    records = read_records(output)
    full_depth = next(r for r in records if r["policy"] == "budget" and r["params"]["layer"] == LAYERS)
    result = metadata["model-index"][0]["results"][0]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"] == {"name": "sst2", "type": "nyu-mll/glue", "config": "sst2", "split": "dev"}
    assert result["metrics"] == [{"type": "accuracy", "value": full_depth["metrics"]["acc"],
                                  "name": "accuracy (full depth)"}]

    assert body.startswith(CARD_MARKER)
    for layer in range(1, LAYERS + 1):  # every exit alone (--eval_each_highway)
        assert f"| budget | layer={layer} |" in body
    assert "| pabee | patience=1 |" in body
    assert "calibrated for target_speedup 1.2" in body
    assert "a Linear per layer on the model's pretrained pooler (PABEE)" in body
    assert "reading the first token's state ([CLS])" in body
    assert "Σ i·L_i / Σ i" in body and "- max_steps: 4" in body and "at most 32 tokens" in body
    assert f"`{REMOTE_CODE_MODULE}.py`" in body and "A stock `BertModel` loads its backbone" in body


@pytest.mark.slow
def test_the_card_shows_the_calibrated_policy_in_its_usage_example(tiny, tmp_path):
    output = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output, *TRAIN, "--do_eval", "--calibrate_speedup", 1.5))
    assert status == 0, stderr
    calibrated = next(r for r in read_records(output) if "calibration" in r)
    _, body = read_card(output)
    from multiexit.policies import POLICIES

    policy = POLICIES[calibrated["policy"]](**calibrated["params"])
    assert f"from multiexit.policies import {type(policy).__name__}" in body
    assert f"policy={policy!r})" in body


@pytest.mark.slow
def test_a_trained_model_gets_a_card_before_any_evaluation_and_a_foreign_readme_is_kept(tiny, tmp_path):
    output = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output, *TRAIN))
    assert status == 0, stderr
    metadata, body = read_card(output)
    assert "model-index" not in metadata and "Not evaluated yet" in body

    # evaluating the model where it is rewrites its card with the scores
    status, stderr = run_main(base_args(tiny, output, "--do_eval") + ["--model_name_or_path", output])
    assert status == 0, stderr
    metadata, body = read_card(output)
    assert "model-index" in metadata and "| budget | layer=3 |" in body and "Not evaluated yet" not in body

    (output / CARD_FILE).write_text("# my own notes\n")
    status, stderr = run_main(base_args(tiny, output, "--do_eval") + ["--model_name_or_path", output])
    assert status == 0, stderr
    assert (output / CARD_FILE).read_text() == "# my own notes\n"


def test_push_to_hub_is_refused_up_front_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    output = tmp_path / "out"
    error = one_error(*run_main(base_args(tiny, output, *TRAIN, "--push_to_hub")))
    assert "--push_to_hub needs the Hugging Face hub, and offline mode is on" in error
    assert not output.exists()  # before anything was written, training included


def test_push_to_hub_is_refused_up_front_when_the_hub_cannot_be_reached(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    output = tmp_path / "out"
    error = one_error(*run_main(base_args(tiny, output, *TRAIN, "--push_to_hub", "--hub_model_id", "me/tiny")))
    assert "--push_to_hub: could not create the hub repository 'me/tiny'" in error
    assert not output.exists()


def test_push_to_hub_needs_the_model_in_the_output_folder(tiny, tmp_path):
    error = one_error(*run_main(base_args(tiny, tmp_path / "out", "--do_eval", "--push_to_hub")))
    assert "--push_to_hub uploads the model in --output_dir" in error


@pytest.mark.slow
def test_push_to_hub_uploads_the_model_folder_with_its_card(tiny, tmp_path, monkeypatch):
    calls = []

    class RecordingHub:
        def create_repo(self, repo_id: str, exist_ok: bool = False) -> object:
            calls.append(("create_repo", repo_id, exist_ok))
            return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, **kwargs: object) -> str:
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", kwargs["repo_id"], sorted(path.name for path in folder.iterdir()),
                          kwargs["ignore_patterns"], read_card(folder)[0]["model-index"][0]["name"]))
            return "https://huggingface.co/me/tiny"

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    output = tmp_path / "tiny"
    status, stderr = run_main(base_args(tiny, output, *TRAIN, "--do_eval", "--push_to_hub"))
    assert status == 0, stderr
    assert calls[0] == ("create_repo", "tiny", True)
    name, repo_id, files, ignored, model_name = calls[1]
    assert (name, repo_id, model_name) == ("upload_folder", "me/tiny", "me/tiny")
    assert {"config.json", "model.safetensors", f"{REMOTE_CODE_MODULE}.py", CARD_FILE, "training_args.json",
            "exit_results.jsonl", "tokenizer.json"} <= set(files)
    assert "*/*" in ignored  # checkpoints, per-example files and the feature cache stay here
    assert len(calls) == 2


@pytest.mark.slow
def test_a_checkpoint_saved_with_the_backbone_model_type_evaluates_as_before(tiny, tmp_path):
    """Multi-exit checkpoints written before the multi-exit model types have config.json's model_type "bert" and no
    remote code: the runner evaluates them as it evaluates the same weights saved now."""
    new = make_tiny_model(tmp_path / "new", layers=LAYERS, multi_exit=True)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "bert"
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    (old / f"{REMOTE_CODE_MODULE}.py").unlink()
    results = {}
    for name, folder in (("new", new), ("old", old)):
        status, stderr = run_main(base_args(tiny, tmp_path / f"eval-{name}", "--do_eval", "--patience", "1,2",
                                            "--eval_each_highway") + ["--model_name_or_path", folder])
        assert status == 0, stderr
        results[name] = [comparable(record) for record in read_records(tmp_path / f"eval-{name}")]
    assert results["old"] == results["new"] and len(results["new"]) == LAYERS + 2
    status, stderr = run_main(base_args(tiny, tmp_path / "eval-roberta", "--do_eval", "--model_type", "roberta")
                              + ["--model_name_or_path", old])
    assert "is a 'bert' checkpoint but --model_type is 'roberta'" in one_error(status, stderr)


@pytest.mark.slow
def test_check_hf_answers_finds_the_runners_answers_through_hf(tiny, tmp_path, capsys):
    """Real early exit at batch size 1 (verified against the replay) and the replay itself: the model loaded with
    AutoModelForSequenceClassification gives every example the runner's exit layer and label in the pipeline."""
    output = tmp_path / "out"
    status, stderr = run_main(base_args(tiny, output, *TRAIN))
    assert status == 0, stderr
    status, stderr = run_main(base_args(tiny, output, "--do_eval", "--per_gpu_eval_batch_size", 1, "--online",
                                        "--verify_online", "--timing_repeats", 1, "--patience", "1,2",
                                        "--early_exit_entropy", 0.9) + ["--model_name_or_path", output])
    assert status == 0, stderr
    script = load_script(REPO / "scripts" / "check_hf_answers.py")
    capsys.readouterr()  # the runner's tables
    assert script.main([str(output), "--data_dir", str(tiny["data"])]) == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert {row[2] for row in table} == {"replay", "online"} and len(table) == 7  # full depth, 3 settings, twice
    assert all(row[3] == row[4] == row[5].rstrip(" |") for row in table)  # every example agrees
