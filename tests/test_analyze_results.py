"""scripts/analyze_results.py (the study's report generator) on synthetic saved logits: it runs end to end, and the
numbers it reports are the ones recomputed here from the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 6


def write_run(folder: Path, logits: np.ndarray, labels: np.ndarray) -> None:
    out = folder / "layer_logits"
    out.mkdir(parents=True)
    np.save(out / "final_dev_logits.npy", logits.astype(np.float32))
    np.save(out / "final_dev_labels.npy", labels)


def classification_logits(rng: np.random.Generator, labels: np.ndarray, skill: float) -> np.ndarray:
    """[N, L, 2] logits whose margin towards the true class grows with depth (and with ``skill``), plus noise."""
    n = len(labels)
    sign = np.where(labels == 1, 1.0, -1.0)[:, None]
    margin = skill * np.linspace(0.2, 2.0, LAYERS)[None, :] * sign + rng.normal(0, 1.0, (n, LAYERS))
    return np.stack([-margin / 2, margin / 2], axis=-1)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    runs, results = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    sst2_labels = rng.integers(0, 2, 120)
    stsb_labels = rng.uniform(0, 5, 90)
    truth: dict = {}
    for seed in (1, 2, 3):
        for variant, skill in (("weighted", 1.0), ("deebert2", 0.8), ("uniform", 1.2)):
            logits = classification_logits(rng, sst2_labels, skill)
            write_run(runs / "SST-2" / variant / f"seed{seed}", logits, sst2_labels)
            truth[("SST-2", variant, seed)] = (logits, sst2_labels)
        for variant in ("weighted", "deebert2", "uniform"):
            noise = rng.normal(0, 1.0, (len(stsb_labels), LAYERS)) * np.linspace(2.0, 0.3, LAYERS)[None, :]
            logits = (stsb_labels[:, None] + noise)[..., None]
            write_run(runs / "STS-B" / variant / f"seed{seed}", logits, stsb_labels)
            truth[("STS-B", variant, seed)] = (logits, stsb_labels)
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "analyze_results.py"), "--runs_dir", str(runs), "--results_dir",
         str(results)], capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return runs, results, truth


def test_writes_every_artefact(study: tuple[Path, Path, dict]) -> None:
    _, results, _ = study
    for name in ("README.md", "tables.md", "summary.json"):
        assert (results / name).stat().st_size > 0, name
    for name in ("SST-2_score_vs_speedup.png", "STS-B_score_vs_speedup.png", "SST-2_loss_weightings.png",
                 "STS-B_loss_weightings.png"):
        assert (results / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    readme = (results / "README.md").read_text()
    for heading in ("## The papers' claims, checked", "## 1. Does multi-exit training cost final-layer quality?",
                    "## 2. Per-layer scores", "## 3. Score vs speed-up", "Matched speed-ups"):
        assert heading in readme, heading
    tables = (results / "tables.md").read_text()
    for scheme in ("multi-exit, weighted loss (PABEE)", "DeeBERT two-stage"):  # thresholds for every scheme
        assert f"### STS-B: PABEE with regression thresholds (full dev, {scheme})" in tables, scheme


def test_per_layer_scores_are_the_recomputed_ones(study: tuple[Path, Path, dict]) -> None:
    """Medians and spreads over seeds of each layer's accuracy / Pearson, recomputed from the logits here."""
    from scipy.stats import pearsonr

    _, results, truth = study
    summary = json.loads((results / "summary.json").read_text())
    for (task, variant), score in (
        (("SST-2", "weighted"), lambda lg, y, k: float((lg[:, k].argmax(-1) == y).mean())),
        (("STS-B", "deebert2"), lambda lg, y, k: float(pearsonr(lg[:, k, 0], y)[0])),
    ):
        per_layer = summary["tasks"][task]["variants"][variant]["per_layer"]
        for k in range(LAYERS):
            values = [score(*truth[(task, variant, seed)], k) for seed in (1, 2, 3)]
            assert per_layer[str(k + 1)]["median"] == pytest.approx(float(np.median(values)), abs=1e-6)
            assert per_layer[str(k + 1)]["min"] == pytest.approx(min(values), abs=1e-6)
            assert per_layer[str(k + 1)]["max"] == pytest.approx(max(values), abs=1e-6)


def test_final_layer_cost_is_paired_by_seed(study: tuple[Path, Path, dict]) -> None:
    _, results, truth = study
    summary = json.loads((results / "summary.json").read_text())
    cost = summary["tasks"]["SST-2"]["final_layer_cost"]
    assert cost["baseline_variant"] == "deebert2"  # no "final" run: DeeBERT's stage-1 model is the single-exit one
    def final_accuracy(variant: str, seed: int) -> float:
        logits, labels = truth[("SST-2", variant, seed)]
        return float((logits[:, -1].argmax(-1) == labels).mean())

    deltas = [final_accuracy("weighted", s) - final_accuracy("deebert2", s) for s in (1, 2, 3)]
    assert cost["weighted_minus_single_exit"]["median"] == pytest.approx(float(np.median(deltas)), abs=1e-6)
