"""The benchmark cannot rot: every measurement of benchmarks/benchmark_exits.py runs here on tiny models (seconds),
through the public API, and its report has every section. (The numbers of a smoke run mean nothing.)"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # runs whole scripts: make test-fast leaves it out
benchmark_exits = load_script(ROOT / "benchmarks" / "benchmark_exits.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("benchmark")
    results = benchmark_exits.main(["--smoke", "--output", str(folder / "BENCHMARKS.md"), "--json",
                                    str(folder / "results.json")])
    json.loads((folder / "results.json").read_text())  # valid JSON
    return results, (folder / "BENCHMARKS.md").read_text()


def test_every_measurement_ran(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    m = results["measurements"]
    assert set(m["decision"]["rows"]) >= {"budget", "pabee", "deebert", "maxprob", "pcee", "elbert"}
    assert set(m["overhead"]["rows"]) == {"pabee", "deebert", "maxprob", "pcee", "elbert"}
    assert all(row["decision_cold_s"] > 0 and row["decision_warm_s"] > 0 for row in m["overhead"]["rows"].values())
    for key in ("a", "b", "c"):
        assert len(m[key]) == 2 and all(block["rows"] for block in m[key]), key  # real and long inputs
    assert len(m["d"]) == 1 and len(m["e"]) == 1
    policies = {row["policy"] for row in m["a"][0]["rows"]}
    assert policies == {"budget", "pabee", "deebert", "maxprob", "pcee", "elbert"}
    values = [r["ratio"] for key in ("a", "b", "c") for block in m[key] for r in block["rows"]]
    values += [r["ratio"] for block in m["a"] for r in block["floor"]] + [m["d"][0]["ratio"], m["e"][0]["ratio"]]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert [row["k"] for row in m["a"][0]["floor"]] == [1, 6, 12]
    for row in (r for block in m["a"] for r in block["rows"]):  # (a) against a perfect early exit
        assert row["perfect_s"] > 0 and math.isclose(row["floor_ratio"], row["wall_s"] / row["perfect_s"])
        # the perfect early exit that also reads the setting's exits: a budget reads only its own exit
        assert math.isclose(row["heads_floor_ratio"], row["wall_s"] / row["perfect_with_heads_s"])
        if row["policy"] == "budget":
            assert row["perfect_with_heads_s"] == row["perfect_s"]
    assert all(math.isfinite(block["head_read_s"]) for block in m["a"])
    # (f): ONNX Runtime early exit for the settings of (a), both input regimes, 1 and 2 threads
    assert [(block["regime"], block["threads"]) for block in m["f"]] == [
        (m["a"][0]["regime"], 1), (m["a"][0]["regime"], 2), (m["a"][1]["regime"], 1), (m["a"][1]["regime"], 2)]
    for block, bs1 in zip(m["f"], [m["a"][0], m["a"][0], m["a"][1], m["a"][1]]):
        assert [row["setting"] for row in block["rows"]] == [row["setting"] for row in bs1["rows"]]
        assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in block["rows"])
    # the fastest path to the demo's accuracy (a tiny stand-in for the demo model), at 1 and 2 threads
    assert [block["threads"] for block in m["fastest"]] == [1, 2]
    for block in m["fastest"]:
        paths = [row["path"] for row in block["rows"]]
        assert {"torch eager, stock", "torch.compile, stock", "ONNX Runtime, stock",
                "ONNX Runtime early exit, DeeBERT 0.7", "ONNX Runtime early exit, PABEE 2",
                "torch early exit, PABEE 2", "ONNX Runtime int8 early exit, DeeBERT 0.7"} <= set(paths)
        stock = next(row for row in block["rows"] if row["path"] == "ONNX Runtime, stock")
        assert stock["speedup_over_ort_stock"] == 1.0
        assert all(0 <= row["accuracy"] <= 100 and row["ms_per_example"] > 0 for row in block["rows"])
        assert sum("pass" in row for row in block["rows"]) == 2  # ONNX Runtime early exit, each setting


def test_fastest_path_runs_combine_into_medians_and_the_verdict_uses_them() -> None:
    def run(stock_ms: float, ours_ms: float, eager_ms: float) -> dict:
        """One run of fastest_path_block, as it reports it: three paths, one setting S."""
        rows = [{"path": path, "setting": setting, "ms_per_example": ms, "accuracy": 90.0, "avg_layers": 3.0,
                 "speedup_over_ort_stock": stock_ms / ms, "speedup_over_ort_stock_min": stock_ms / ms}
                for path, setting, ms in (("ONNX Runtime, stock", "", stock_ms), ("torch eager, stock", "", eager_ms),
                                          ("ONNX Runtime early exit, S", "S", ours_ms))]
        return {"threads": 2, "examples": 4, "rows": rows, "blocked": True, "settings": ["S"], "mean_tokens": 9.0,
                "load_average": [0.1, 0.2]}

    # speed-ups of ours per run: 2.0, 1.5, 1.9 -> median 1.9 (passes); one bad run does not decide
    block = benchmark_exits.combine_fastest_runs([run(10.0, 5.0, 20.0), run(9.0, 6.0, 20.0), run(9.5, 5.0, 20.0)])
    ours = next(row for row in block["rows"] if row["path"] == "ONNX Runtime early exit, S")
    assert block["runs"] == 3 and len(block["load_average"]) == 3
    assert ours["speedup_runs"] == [2.0, 1.5, 1.9] and ours["speedup_over_ort_stock"] == 1.9
    assert ours["ms_per_example"] == 5.0 and ours["fastest_fp32"] and ours["pass"]
    assert sum("pass" in row for row in block["rows"]) == 1
    # median speed-up 1.5 misses; and a path faster than ours (median ms) takes "fastest" away
    block = benchmark_exits.combine_fastest_runs([run(9.0, 6.0, 20.0), run(9.0, 6.0, 20.0), run(10.0, 5.0, 20.0)])
    assert not next(row for row in block["rows"] if "pass" in row)["pass"]
    block = benchmark_exits.combine_fastest_runs([run(10.0, 5.0, 4.0)])
    ours = next(row for row in block["rows"] if "pass" in row)
    assert not ours["fastest_fp32"] and not ours["pass"] and ours["speedup_runs"] == [2.0]


def test_perfect_early_exit_prices_each_example_at_its_own_depth() -> None:
    # two examples, cut to 1, 6 and 12 layers: the second (a longer input) costs twice as much per layer
    cut = np.array([[2.0, 3.0], [7.0, 13.0], [13.0, 25.0]])
    depths = [1, 6, 12]
    assert benchmark_exits.perfect_early_exit_s([1.0, 12.0], depths, cut) == 2.0 + 25.0
    assert benchmark_exits.perfect_early_exit_s([12.0, 1.0], depths, cut) == 13.0 + 3.0
    assert math.isclose(benchmark_exits.perfect_early_exit_s([3.0, 9.0], depths, cut), 4.0 + 19.0)


def test_interleaved_timing_orders_calls_per_slot_or_in_blocks() -> None:
    import torch

    calls: list[tuple[str, int]] = []
    variants = {name: (lambda slot, name=name: calls.append((name, slot))) for name in ("a", "b")}
    timings, _ = benchmark_exits.interleaved(variants, slots=3, repeats=2, device=torch.device("cpu"), warmup=0)
    assert calls[:2] in ([("a", 0), ("b", 0)], [("b", 0), ("a", 0)])  # every variant on slot 0, then slot 1
    assert [slot for _, slot in calls[:6]] == [0, 0, 1, 1, 2, 2]
    calls.clear()
    timings, _ = benchmark_exits.interleaved(variants, slots=3, repeats=2, device=torch.device("cpu"), warmup=1,
                                             blocked=True)
    # per repeat, for each variant (the order rotating), a warm-up call on slot 0 and every slot
    assert calls == [("a", 0), ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 0), ("b", 1), ("b", 2),
                     ("b", 0), ("b", 0), ("b", 1), ("b", 2), ("a", 0), ("a", 0), ("a", 1), ("a", 2)]
    assert all(len(timing.wall) == 2 and len(timing.wall[0]) == 3 for timing in timings.values())


def test_report_has_every_section(smoke: tuple[dict, str]) -> None:
    _, report = smoke
    for heading in ("## Summary", "## The exit decision at batch size 1", "overhead per layer over the all-exits",
                    "## Batch size 1: the floor, (a) and (b)", "## (c) Batched early exit",
                    "## (d) Replay sweep and (e) training step", "python benchmarks/benchmark_exits.py --smoke",
                    "## (f) Early exit on ONNX Runtime", "## The fastest path to the demo's accuracy, 2 thread(s)"):
        assert heading in report, heading


def test_decision_and_overhead_alone(tmp_path: Path) -> None:
    """``--models ''``: only the two model-free measurements, and the report has no empty sections; the overhead in
    two fresh processes, whose medians it reports beside each process's value."""
    results = benchmark_exits.main(["--smoke", "--models", "", "--overhead_processes", "2",
                                    "--output", str(tmp_path / "B.md")])
    overhead = results["measurements"]["overhead"]
    assert overhead["processes"] == 2
    for row in overhead["rows"].values():
        each = row["per_process_overhead_per_layer_s"]
        assert len(each) == 2 and row["overhead_per_layer_s"] == statistics.median(each)
    report = (tmp_path / "B.md").read_text()
    assert "## The exit decision at batch size 1" in report and "decision cold" in report
    assert "## (c) Batched early exit" not in report and "## Batch size 1: the floor" not in report


def test_cuda_section_rehearsed_on_cpu(tmp_path: Path) -> None:
    """The CUDA section's code (bs 1 eager and with the graphs flag, (b), batched (c) in fp16 and bf16) on CPU, where
    no graph is captured: a rehearsal, so that the GPU script (benchmarks/gpu_checks.sh) cannot rot unseen."""
    results = benchmark_exits.main(["--smoke", "--gpu_section_on_cpu", "--output", str(tmp_path / "B.md")])
    cuda = results["measurements"]["cuda"]
    assert [block["cuda_graphs"] for block in cuda["bs1"]] == [False, True]
    assert len(cuda["b"]) == 2 and len(cuda["c"]) == 4
    for block in cuda["bs1"]:
        assert block["rows"] and all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in block["rows"])
    assert all(math.isfinite(row["ratio"]) for block in cuda["c"] for row in block["rows"])
    # (f) on ONNX Runtime's CUDA provider: rehearsed here on its CPU provider
    assert [block["provider"] for block in cuda["f"]] == ["CPUExecutionProvider"] and cuda["f"][0]["rows"]
    assert "## CUDA: batch size 1, eager and CUDA graphs" in (tmp_path / "B.md").read_text()


def test_overhead_comparison_measures_each_revision_in_its_own_process(tmp_path: Path) -> None:
    # benchmarks/compare_overhead.py: the benchmark's overhead measure, with a revision's own library code
    import subprocess

    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    compare_overhead = load_script(ROOT / "benchmarks" / "compare_overhead.py")

    results = compare_overhead.main(["HEAD", "WORKTREE", "--processes", "1", "--calls", "2", "--policies", "pabee",
                                     "--output", str(tmp_path / "table.md")])
    assert len(results["revisions"]) == 2 and "WORKTREE" in results["revisions"]
    assert all(len(runs) == 1 and math.isfinite(runs[0]["pabee"]) for runs in results["revisions"].values())
    assert "| pabee |" in (tmp_path / "table.md").read_text()
