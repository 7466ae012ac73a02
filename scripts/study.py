#!/usr/bin/env python
"""The early-exit papers' claims, tested on fully fine-tuned all-MiniLM-L6-v2 (GLUE: SST-2, MRPC, RTE, CoLA, STS-B).

    python scripts/study.py search    # learning rate and epochs per task, chosen on a held-out 10 % of train
    python scripts/study.py train     # every (task, variant, seed) run with the chosen settings
    python scripts/study.py status    # done / running / left, with the time spent so far
    python scripts/analyze_results.py # tables, plots, claims (results/)

(``scripts/reproduce.sh`` runs all three.) Every run is one ``python run_glue_with_exits.py ...`` subprocess (the exact
command lines go to ``results/commands.txt`` and ``results/search_commands.txt``), ``--workers`` at a time with one
torch thread each (2 on this project's 2-core machine). The study survives interruption: a finished run (its saved
logits exist) is never run again, an interrupted one resumes from its last checkpoint (``--save_steps`` with
``--resume_from_checkpoint latest``), and two drivers never take the same run (lock files holding the runner's pid).
Run it in the background: ``nohup python scripts/study.py train > runs/study/driver.log 2>&1 &``.

Variants (``VARIANTS``; phase 1 first, for every task and seed, then phase 2, then 3):

* ``deebert2-<head>`` DeeBERT two-stage: stage 1 fine-tunes the backbone with the last exit only (so its final layer IS
  the single-exit baseline with that head), stage 2 trains the other exits on the frozen backbone;
* ``weighted-<head>`` PABEE's joint loss Σ i·L_i / Σ i; ``uniform-<head>``; ``learned-<head>`` ELBERT's learned
  weights (their own optimizer group, constant 1e-2);
* heads: ``linear`` (a Linear on each layer's token mean) and ``shared_pooler`` (PABEE's: one pretrained pooler shared
  by every exit; all-MiniLM-L6-v2's pooler was never trained: a random projection).

Every exit reads the mean of its layer's token states (``--exit_pooling mean``: this backbone's [CLS] carries no input
information below layer 4). Regression exits start at the training labels' mean (``--regression_exit_bias``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TaskSetting:
    folder: str  # under <glue_dir>
    max_train_samples: int | None  # None: the whole training set
    max_epochs: int  # the search evaluates after every epoch up to this
    learning_rates: tuple[float, ...] = (5e-5, 1e-4)


TASKS: dict[str, TaskSetting] = {
    # SST-2 on its first 20,000 sentences (of 67,349): 1-2 epochs of the whole set would take most of the study's
    # CPU budget; the other tasks use their whole training sets
    "SST-2": TaskSetting("SST-2", 20000, 2),
    "MRPC": TaskSetting("MRPC", None, 3),
    "RTE": TaskSetting("RTE", None, 3),
    "CoLA": TaskSetting("CoLA", None, 3),
    "STS-B": TaskSetting("STS-B", None, 3),
}


@dataclass(frozen=True)
class Variant:
    label: str
    scheme: str  # deebert2, weighted, uniform, learned
    head: str
    phase: int

    @property
    def flags(self) -> list[str]:
        scheme = ["--deebert_two_stage"] if self.scheme == "deebert2" else ["--exit_loss", self.scheme]
        return scheme + ["--exit_head_type", self.head]


HEAD_LABELS = {"linear": "linear head", "shared_pooler": "PABEE's shared-pooler head"}
SCHEME_LABELS = {"deebert2": "DeeBERT two-stage (stage 1 = single exit)", "weighted": "joint, weighted (PABEE)",
                 "uniform": "joint, uniform", "learned": "joint, learned weights (ELBERT)"}
VARIANTS: dict[str, Variant] = {
    f"{scheme}-{head}": Variant(f"{SCHEME_LABELS[scheme]}, {HEAD_LABELS[head]}", scheme, head, phase)
    for scheme, head, phase in (
        ("deebert2", "linear", 1), ("weighted", "linear", 1), ("weighted", "shared_pooler", 1),
        ("deebert2", "shared_pooler", 1), ("learned", "linear", 2), ("uniform", "linear", 2),
        ("learned", "shared_pooler", 3), ("uniform", "shared_pooler", 3),
    )
}

PLAN_SEEDS, PLAN_PHASES = [1, 2, 3], [1, 2, 3]  # the study's plan: every variant's phase, three seeds each

COMMON = ["--model_type", "bert", "--model_name_or_path", "packaged-minilm", "--max_seq_length", "128",
          "--per_gpu_train_batch_size", "32", "--per_gpu_eval_batch_size", "64", "--warmup_ratio", "0.06",
          "--weight_decay", "0.01", "--exit_pooling", "mean", "--group_by_length", "--overwrite_output_dir"]


# ====================================================================================================================
# The plan
# ====================================================================================================================


@dataclass(frozen=True)
class Run:
    name: str  # e.g. "MRPC/weighted-linear/seed1"
    output_dir: Path
    argv: list[str]
    done_file: Path  # exists once the run has finished

    @property
    def log(self) -> Path:
        return self.output_dir.parent / f"{self.output_dir.name}.log"


def glue_dir() -> Path:
    shared = os.environ.get("MULTIEXIT_SHARED_DIR", str(ROOT.parent / "shared"))
    return Path(os.environ.get("GLUE_DIR", os.path.join(shared, "data", "glue")))


@functools.cache  # one read of the training file per task, however many runs the plan has
def training_examples(task: str, heldout: bool) -> int:
    """How many examples a run trains on (the runner holds out 10 % first, then takes the first N)."""
    from multiexit.data import get_task, read_examples

    count = len(read_examples(get_task(task), "train", str(glue_dir() / TASKS[task].folder)))
    if heldout:
        count -= round(0.1 * count)
    return min(count, TASKS[task].max_train_samples or count)


def search_folder(runs_dir: Path, task: str, learning_rate: float) -> Path:
    return runs_dir / "search" / task / f"lr{learning_rate:g}"


def search_runs(runs_dir: Path) -> list[Run]:
    """Single-exit fine-tuning (linear head) on 90 % of train, scored on the other 10 % after every epoch."""
    runs = []
    for task, setting in TASKS.items():
        steps_per_epoch = math.ceil(training_examples(task, heldout=True) / 32)
        for lr in setting.learning_rates:
            out = search_folder(runs_dir, task, lr)
            argv = [*COMMON, "--task_name", task, "--data_dir", str(glue_dir() / setting.folder), "--output_dir",
                    str(out), "--do_train", "--exit_loss", "final", "--exit_head_type", "linear", "--learning_rate",
                    f"{lr:g}", "--num_train_epochs", str(setting.max_epochs), "--eval_split", "heldout",
                    "--evaluate_during_training", "--logging_steps", str(steps_per_epoch), "--seed", "1",
                    "--save_steps", str(steps_per_epoch), "--save_total_limit", "1"]
            if setting.max_train_samples:
                argv += ["--max_train_samples", str(setting.max_train_samples)]
            runs.append(Run(f"search/{task}/lr{lr:g}", out, argv, out / "training_log.done"))
    return runs


def chosen_settings(runs_dir: Path) -> dict[str, dict]:
    """Per task whose search runs have all finished: the (learning rate, epochs) with the best held-out final-layer
    score (ties: fewer epochs). A task still being searched (by this driver or another) has no choice yet."""
    from multiexit.data import get_task

    chosen = {}
    for task, setting in TASKS.items():
        trials = []
        folders = [search_folder(runs_dir, task, lr) for lr in setting.learning_rates]
        if not all((folder / "training_log.done").exists() for folder in folders):
            continue
        for lr, folder in zip(setting.learning_rates, folders):
            log = folder / "training_log.jsonl"
            entries = [json.loads(line) for line in log.read_text().splitlines() if '"eval_per_layer"' in line]
            for epoch, entry in enumerate(entries[: setting.max_epochs], start=1):
                scores = entry["eval_per_layer"]
                trials.append({"learning_rate": lr, "epochs": epoch, "heldout_score": scores[f"layer_{len(scores)}"],
                               "heldout_per_layer": scores})
        if trials:
            best = max(trials, key=lambda t: (round(t["heldout_score"], 4), -t["epochs"]))
            chosen[task] = {"learning_rate": best["learning_rate"], "epochs": best["epochs"],
                            "main_metric": get_task(task).main_metric, "trials": trials}
    return chosen


def train_runs(runs_dir: Path, settings: dict[str, dict], seeds: list[int], phases: list[int]) -> list[Run]:
    """Every (variant, task, seed) with the chosen settings, phase by phase, tasks interleaved within a phase."""
    runs = []
    for phase in phases:
        for seed in seeds:
            for task, setting in TASKS.items():
                if task not in settings:
                    continue
                for name, variant in VARIANTS.items():
                    if variant.phase != phase:
                        continue
                    out = runs_dir / task / name / f"seed{seed}"
                    chosen = settings[task]
                    steps_per_epoch = math.ceil(training_examples(task, heldout=False) / 32)
                    argv = [*COMMON, "--task_name", task, "--data_dir", str(glue_dir() / setting.folder),
                            "--output_dir", str(out), "--do_train", "--learning_rate", f"{chosen['learning_rate']:g}",
                            "--num_train_epochs", str(chosen["epochs"]), "--seed", str(seed), "--do_eval",
                            "--eval_each_highway", "--save_layer_logits", "--logging_steps", "50",
                            "--save_steps", str(max(100, steps_per_epoch // 2)), "--save_total_limit", "1",
                            *variant.flags]
                    if setting.max_train_samples:
                        argv += ["--max_train_samples", str(setting.max_train_samples)]
                    runs.append(Run(f"{task}/{name}/seed{seed}", out, argv,
                                    out / "layer_logits" / "final_dev_logits.npy"))
    return runs


# ====================================================================================================================
# Running: WORKERS subprocesses at a time, locks, resume
# ====================================================================================================================


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def try_lock(run: Run) -> Path | None:
    """A lock file beside the run's folder holding the owner's pid; a stale one (its owner is dead) is taken over."""
    lock = run.output_dir.parent / f"{run.output_dir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if alive(int(lock.read_text() or 0)):
                return None
        except ValueError:
            pass
        lock.unlink(missing_ok=True)
        return try_lock(run)
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    return lock


def command(run: Run) -> list[str]:
    argv = list(run.argv)
    if (run.output_dir / "trainer_state.json").exists() or any(run.output_dir.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "latest"]  # an interrupted run: on from its last checkpoint
    return [sys.executable, str(ROOT / "run_glue_with_exits.py"), *argv]


def finish(run: Run, seconds: float, runs_dir: Path, keep_models: bool) -> None:
    with open(runs_dir / "run_times.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"run": run.name, "wall_s": seconds, "end": time.strftime("%Y-%m-%dT%H:%M:%S")})
                     + "\n")
    if run.done_file.name == "training_log.done":
        run.done_file.write_text("done\n")
    if not keep_models:  # the logits are the results; weights and checkpoints only take disk
        for path in run.output_dir.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        (run.output_dir / "model.safetensors").unlink(missing_ok=True)
        shutil.rmtree(run.output_dir / ".feature_cache", ignore_errors=True)


def execute(runs: list[Run], workers: int, runs_dir: Path, keep_models: bool) -> int:
    """Run every unfinished run, ``workers`` at a time. Returns the number of failed runs."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false")
    pending = [run for run in runs if not run.done_file.exists()]
    running: dict[str, tuple[subprocess.Popen, Run, float, Path]] = {}
    failed = 0

    def stop(signum: int, frame: object) -> None:  # pass an interruption on to the runners, which end cleanly
        for process, *_ in running.values():
            process.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    print(f"{len(pending)} of {len(runs)} runs to do, {workers} at a time", flush=True)
    while pending or running:
        while pending and len(running) < workers:
            run = pending.pop(0)
            lock = try_lock(run)
            if lock is None:  # another driver has it
                continue
            run.output_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.log, "a", encoding="utf-8")  # noqa: SIM115 - closed when the process ends
            argv = command(run)
            log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(argv, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
            lock.write_text(str(process.pid))
            running[run.name] = (process, run, time.time(), lock)
            print(f"{time.strftime('%H:%M:%S')} start {run.name}", flush=True)
        time.sleep(5)
        for name, (process, run, started, lock) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            lock.unlink(missing_ok=True)
            seconds = time.time() - started
            if process.returncode == 0:
                finish(run, seconds, runs_dir, keep_models)
                print(f"{time.strftime('%H:%M:%S')} done  {name} ({seconds / 60:.1f} min)", flush=True)
            else:
                failed += 1
                print(f"{time.strftime('%H:%M:%S')} FAILED {name} (exit {process.returncode}; see {run.log})",
                      flush=True)
    return failed


COMMANDS_HEADER = ("# generated by scripts/study.py; run from the repository with GLUE_DIR set to the folder of the "
                   "GLUE task folders; environment: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1; one run per line")


def write_commands(path: Path, runs: list[Run]) -> None:
    # runnable as printed on any machine: data paths under $GLUE_DIR, the others relative to the repository
    lines = [COMMANDS_HEADER]
    lines += ["python run_glue_with_exits.py " + shlex.join(run.argv).replace(f"{glue_dir()}{os.sep}", "$GLUE_DIR/")
              .replace(f"{ROOT}{os.sep}", "") for run in runs]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("search", "train", "status"))
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "study"))
    parser.add_argument("--results_dir", default=str(ROOT / "results"))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 2)))
    parser.add_argument("--seeds", default=os.environ.get("SEEDS", ",".join(map(str, PLAN_SEEDS))))
    parser.add_argument("--phases", default=os.environ.get("PHASES", ",".join(map(str, PLAN_PHASES))))
    parser.add_argument("--keep_models", action="store_true")
    args = parser.parse_args(argv)
    runs_dir, results_dir = Path(args.runs_dir), Path(args.results_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    search = search_runs(runs_dir)
    if args.step == "search":
        write_commands(results_dir / "search_commands.txt", search)
        failed = execute(search, args.workers, runs_dir, keep_models=False)
        if not all(run.done_file.exists() for run in search):  # another driver still runs some
            print("search runs of another driver are still running: results/hparams.json is written when the last "
                  "one finishes (by the driver that runs it)", flush=True)
            return 1 if failed else 0
        (results_dir / "hparams.json").write_text(json.dumps(chosen_settings(runs_dir), indent=1) + "\n")
        return 1 if failed else 0
    settings = chosen_settings(runs_dir)
    runs = train_runs(runs_dir, settings, [int(s) for s in args.seeds.split(",")],
                      [int(p) for p in args.phases.split(",")])
    if args.step == "status":
        times = [json.loads(line) for line in (runs_dir / "run_times.jsonl").read_text().splitlines()] \
            if (runs_dir / "run_times.jsonl").exists() else []
        done = [run.name for run in search + runs if run.done_file.exists()]
        print(f"{len(done)} of {len(search) + len(runs)} runs done; {sum(t['wall_s'] for t in times) / 3600:.1f} h "
              f"of run time so far")
        for run in search + runs:
            print(("done " if run.done_file.exists() else "     ") + run.name)
        return 0
    if not settings:
        print("no search results yet: run `python scripts/study.py search` first", file=sys.stderr)
        return 2
    if len(settings) < len(TASKS):
        print(f"the search has not finished for {', '.join(t for t in TASKS if t not in settings)}: their runs are "
              "left out of this invocation", file=sys.stderr)
    # the whole plan, whichever part this invocation runs (a driver for one phase must not shorten the list)
    plan = train_runs(runs_dir, settings, PLAN_SEEDS, PLAN_PHASES)
    planned = {run.name for run in plan}
    write_commands(results_dir / "commands.txt", plan + [run for run in runs if run.name not in planned])
    return 1 if execute(runs, args.workers, runs_dir, args.keep_models) else 0


if __name__ == "__main__":
    sys.exit(main())
