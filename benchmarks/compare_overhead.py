#!/usr/bin/env python
"""Compare early exit's per-layer overhead at batch size 1 across git revisions, with the benchmark's own measure:

    python benchmarks/compare_overhead.py HEAD~1 HEAD WORKTREE --processes 8 --policies pabee,elbert

A few µs of the overhead depend on the process (where the interpreter's objects land in memory), so one process per
revision says little about a change of half a microsecond. This runs ``benchmark_exits.overhead_in_this_process`` (the
measurement of BENCHMARKS.md's overhead section: ``early_exit`` with a policy that never fires minus the all-exits
forward, tiny 12-layer BERT) in ``--processes`` fresh processes per revision, the revisions alternating in a rotated
order so that a drift in the machine's speed hits them alike, and reports per policy the median over the processes
and every process's value.

Each revision's library code (the ``multiexit`` package) is taken from ``git archive <revision>`` and put first on
the child process's ``PYTHONPATH``; ``WORKTREE`` is the working tree as it is, uncommitted changes included. The
measuring code is always this checkout's ``benchmark_exits.py``, so every revision is measured the same way; it builds
its model with ``multiexit.tiny``, so the revisions compared must have the package layout. Run it on a quiet machine:
every process competes for the same cores as anything else running.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORKTREE = "WORKTREE"


def git(*arguments: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *arguments], capture_output=True, text=True,
                          check=True).stdout.strip()


def checkout(revision: str, into: Path) -> tuple[Path, str]:
    """The folder holding ``revision``'s files, and its name for the report (short hash, or WORKTREE)."""
    if revision == WORKTREE:
        return REPO_ROOT, WORKTREE
    try:
        commit = git("rev-parse", "--verify", "--short=9", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"compare_overhead: {revision!r} is not a git revision of {REPO_ROOT}: "
                         f"{error.stderr.strip()}") from None
    folder = into / commit
    if not folder.exists():
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit], capture_output=True,
                                 check=True).stdout
        folder.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    return folder, f"{revision} ({commit})" if revision != commit else commit


def run_child(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """The benchmark's overhead measure on ``folder``'s package, in a fresh process."""
    from benchmark_exits import overhead_in_fresh_process  # this script's folder is first on sys.path

    measure = argparse.Namespace(threads=args.threads, overhead_calls=args.calls, overhead_policies=args.policies)
    result = overhead_in_fresh_process(measure, code_folder=folder)
    return {name: row["overhead_per_layer_s"] for name, row in result["rows"].items()}


def report(results: dict) -> list[str]:
    names = list(results["revisions"])
    lines = [f"Command: `{results['command']}`", "",
             f"Per-layer overhead of early exit over the all-exits forward (µs), median over {results['processes']} "
             f"fresh processes per revision ({results['calls']} calls each); CPU: {results['cpu']}", "",
             "| policy | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for policy in results["policies"]:
        cells = []
        for name in names:
            values = [run[policy] * 1e6 for run in results["revisions"][name]]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "(median, and in brackets the lowest and highest process)"]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="*", default=["HEAD", WORKTREE],
                        help=f"git revisions, or {WORKTREE} for the working tree (default: HEAD {WORKTREE})")
    parser.add_argument("--processes", type=int, default=8, help="fresh processes per revision")
    parser.add_argument("--calls", type=int, default=400, help="early_exit calls per policy and process")
    parser.add_argument("--policies", default="",
                        help="policies measured, comma-separated (default: all of the benchmark's overhead "
                             "measurement, each with its never-firing setting)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    parser.add_argument("--json", default=None, help="raw per-process results")
    args = parser.parse_args(argv)
    args.policies = [name for name in args.policies.split(",") if name]
    if args.processes < 1 or args.calls < 1:
        parser.error("--processes and --calls must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    from benchmark_exits import cpu_model  # this script's folder is first on sys.path

    with tempfile.TemporaryDirectory(prefix="compare-overhead-") as scratch:
        folders = {}
        for revision in args.revisions:
            folder, name = checkout(revision, Path(scratch))
            folders[name] = folder
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in folders}
        names = list(folders)
        for round_index in range(args.processes):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:  # rotated: no revision always runs first
                runs[name].append(run_child(folders[name], args))
                print(f"[compare_overhead] round {round_index + 1}/{args.processes}: {name}", file=sys.stderr,
                      flush=True)
    command = "python benchmarks/compare_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "cpu": cpu_model(), "processes": args.processes, "calls": args.calls,
               "policies": list(runs[names[0]][0]), "revisions": runs}  # the policies the measurement ran
    lines = report(results)
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
