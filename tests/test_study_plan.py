"""scripts/study.py: hyper-parameters come from finished held-out searches only, and the training plan uses them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def study(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the scripts/study.py module
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "study", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "training_examples", lambda task, heldout: 640)  # no GLUE data needed
    return module


def write_search(runs_dir: Path, task: str, lr: float, layer6_scores: list[float], done: bool = True) -> None:
    folder = runs_dir / "search" / task / f"lr{lr:g}"
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": 10 * epoch, "eval_per_layer": {**{f"layer_{i}": 0.0 for i in range(1, 6)},
                                                                 "layer_6": score}})
             for epoch, score in enumerate(layer6_scores, start=1)]
    (folder / "training_log.jsonl").write_text("\n".join(lines) + "\n")
    if done:
        (folder / "training_log.done").write_text("done\n")


def test_choice_is_the_best_held_out_score_with_fewer_epochs_on_ties(study, tmp_path: Path) -> None:
    write_search(tmp_path, "MRPC", 5e-5, [0.80, 0.83, 0.82])
    write_search(tmp_path, "MRPC", 1e-4, [0.81, 0.83, 0.83])
    write_search(tmp_path, "RTE", 5e-5, [0.55, 0.57, 0.56])
    write_search(tmp_path, "RTE", 1e-4, [0.52, 0.58], done=False)  # still running: RTE has no choice yet
    chosen = study.chosen_settings(tmp_path)
    assert set(chosen) == {"MRPC"}
    assert (chosen["MRPC"]["learning_rate"], chosen["MRPC"]["epochs"]) == (5e-5, 2)  # 0.83 first reached at epoch 2
    assert len(chosen["MRPC"]["trials"]) == 6


def test_training_plan_uses_the_chosen_settings_phase_by_phase(study, tmp_path: Path) -> None:
    write_search(tmp_path, "MRPC", 5e-5, [0.80, 0.83, 0.82])
    write_search(tmp_path, "MRPC", 1e-4, [0.70, 0.71, 0.72])
    runs = study.train_runs(tmp_path, study.chosen_settings(tmp_path), seeds=[1, 2], phases=[1, 2])
    phase_of = {name: variant.phase for name, variant in study.VARIANTS.items()}
    phases = [phase_of[run.name.split("/")[1]] for run in runs]
    assert phases == sorted(phases) and set(phases) == {1, 2}
    assert len(runs) == 2 * sum(1 for v in study.VARIANTS.values() if v.phase in (1, 2))
    for run in runs:
        argv = run.argv
        assert argv[argv.index("--learning_rate") + 1] == "5e-05"
        assert argv[argv.index("--num_train_epochs") + 1] == "2"
        assert "--save_layer_logits" in argv and "--eval_split" not in argv  # scored on dev, trained on all of train
    two_stage = next(run for run in runs if "/deebert2-linear/" in run.name)
    assert "--deebert_two_stage" in two_stage.argv
    assert two_stage.argv[two_stage.argv.index("--exit_head_type") + 1] == "linear"


def test_commands_list_the_whole_plan_whatever_part_runs(study, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver started for one phase and one seed still writes every run of the plan to results/commands.txt."""
    for task in study.TASKS:
        write_search(tmp_path / "runs", task, 5e-5, [0.80, 0.83, 0.82])
        write_search(tmp_path / "runs", task, 1e-4, [0.70, 0.71, 0.72])
    executed = []
    monkeypatch.setattr(study, "execute", lambda runs, *args: executed.extend(runs) or False)
    results = tmp_path / "results"
    assert study.main(["train", "--phases", "2", "--seeds", "1", "--runs_dir", str(tmp_path / "runs"),
                       "--results_dir", str(results)]) == 0
    lines = (results / "commands.txt").read_text().splitlines()[1:]
    assert len(lines) == len(study.TASKS) * len(study.VARIANTS) * len(study.PLAN_SEEDS)
    assert len(executed) == len(study.TASKS) * sum(1 for v in study.VARIANTS.values() if v.phase == 2)
    assert all(" ".join(run.argv) in "\n".join(lines) for run in executed)
