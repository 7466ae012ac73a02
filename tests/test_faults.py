"""Faults a long run meets, each injected for real: a write the machine refuses, a damaged feature cache, a damaged
checkpoint, SIGTERM.

* Write failures come from the kernel, never from a mock: ``/dev/full`` (every write fails with ENOSPC),
  ``RLIMIT_FSIZE`` lowered while one chosen writer runs (its writes fail with EFBIG, after a partial write where the
  limit falls inside one: no root needed, and it reaches the Rust and C++ writers of safetensors and pyarrow), and
  where the machine lets this process mount one, a small tmpfs that fills up (ENOSPC). Every writer of
  the runner (checkpoint weights and training state, training log, final model, feature cache, results, per-example
  files, summaries, plot, logits, DeeBERT's plot data) ends in one ``error:`` line naming its file, exit status 74,
  no partial or temporary file, and, during training, the earlier checkpoints whole and the command that resumes.
* Damaged derived data heals: a truncated or unreadable feature cache is rebuilt with a warning;
  ``--resume_from_checkpoint latest`` skips a damaged checkpoint (a warning names it) and ends bit-identical to an
  uninterrupted run; a damaged checkpoint given by name is a clear error.
* SIGTERM to a training process (a real signal, to a real subprocess): it stops at a step boundary, saves a
  checkpoint, says how to resume, exits 143; the resumed run ends bit-identical to an uninterrupted one. With two
  processes (torchrun, gloo), a SIGTERM to one of them stops both at the same step, and the resumed two-process run
  is exact too. A real SIGINT still stops at once with exit status 130.

Runs that need a runner in a clean process state run forked (one thread, stdout and stderr on /dev/null so the only
regular files written are the runner's). The torn-line and concurrent-append survivals are in test_resume_and_ddp.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import make_tiny_model, read_records, run_main, write_sst2

from multiexit import io as multiexit_io
from multiexit.errors import WriteError
from multiexit.io import (
    append_jsonl,
    atomic_directory,
    atomic_save_npy,
    atomic_write_text,
    list_checkpoints,
    read_jsonl,
    save_training_state,
    write_failure_cause,
)
from multiexit.runner import evaluation as runner_evaluation
from multiexit.runner import main as runner_main
from multiexit.runner import training as runner_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def leftovers(*folders: Path) -> list[str]:
    """Temporary files or folders anywhere under ``folders`` (what a failed write must not leave)."""
    found = []
    for folder in folders:
        for root, directories, files in os.walk(folder):
            found += [os.path.join(root, name) for name in directories + files if name.startswith((".tmp-", ".old-"))]
            found += [os.path.join(root, name) for name in files if re.fullmatch(r"tmp\w{8}", name)]  # tempfile's
    return found


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a run's stderr (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# The one place that recognises a failed write, and the writers of multiexit.io on /dev/full (ENOSPC)


def test_write_failures_are_recognised_and_nothing_else() -> None:
    from safetensors import SafetensorError

    assert write_failure_cause(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device (ENOSPC)"
    assert write_failure_cause(PermissionError(errno.EACCES, "denied")) == "Permission denied (EACCES)"
    assert write_failure_cause(OSError(errno.EROFS, "x")) == "Read-only file system (EROFS)"
    assert write_failure_cause(OSError(errno.EDQUOT, "x")) == "Disk quota exceeded (EDQUOT)"
    assert write_failure_cause(OSError(errno.EIO, "x")) == "Input/output error (EIO)"
    # safetensors (Rust) raises no OSError: its message carries the OS error code
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure_cause(rust) == "No space left on device (ENOSPC)"
    try:  # a failure raised while handling one
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert write_failure_cause(wrapped) == "No space left on device (ENOSPC)"
    for other in (RuntimeError("a bug"), FileNotFoundError(errno.ENOENT, "x"), FileExistsError(errno.EEXIST, "x"),
                  ValueError("os error 28 is mentioned, not raised")):
        assert write_failure_cause(other) is None


def test_writing_names_the_file_and_lets_other_errors_through(tmp_path: Path) -> None:
    with pytest.raises(WriteError) as caught:
        with multiexit_io.writing("outer"), multiexit_io.writing("/out/model.safetensors", "inner intact"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == "could not write /out/model.safetensors: No space left on device (ENOSPC); inner intact"
    with pytest.raises(WriteError) as caught:  # the outer caller knows more about what is intact
        with multiexit_io.writing("outer", "outer intact"), multiexit_io.writing("/out/x", "inner intact"):
            raise OSError(errno.EIO, "Input/output error")
    assert caught.value.path == "/out/x" and caught.value.intact == "outer intact"
    with pytest.raises(KeyError):
        with multiexit_io.writing("/out/x"):
            raise KeyError("a bug")


@pytest.fixture
def dev_full() -> str:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    return "/dev/full"


def test_a_results_file_on_a_full_disk(tmp_path: Path, dev_full: str) -> None:
    path = tmp_path / "exit_results.jsonl"
    os.symlink(dev_full, path)  # every write to it fails in the kernel with ENOSPC
    with pytest.raises(WriteError) as caught:
        append_jsonl(str(path), {"run": 1})
    assert caught.value.path == str(path) and caught.value.cause == "No space left on device (ENOSPC)"
    assert "the records already in the file are whole" in str(caught.value)


@contextlib.contextmanager
def temporary_files_on(device: str) -> Iterator[None]:
    """Every temporary file that ``multiexit.io`` creates meanwhile writes to ``device``: the atomic writers'
    final names never exist before the rename, so the fault goes where their bytes go."""
    original = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        handle, name = original(*args, **kwargs)
        target = os.open(device, os.O_WRONLY)
        os.dup2(target, handle)
        os.close(target)
        return handle, name

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multiexit_io.tempfile, "mkstemp", mkstemp)
        yield


@pytest.mark.parametrize("writer", ["text", "npy", "copy"])
def test_atomic_files_on_a_full_disk_keep_the_earlier_file(writer: str, tmp_path: Path, dev_full: str) -> None:
    path = tmp_path / "exit_summary_final.md"
    atomic_write_text(str(path), "the earlier table\n")
    (tmp_path / "source.png").write_bytes(b"\x89PNG" * 1000)
    write: Callable[[], None] = {
        "text": lambda: atomic_write_text(str(path), "x" * 100_000),
        "npy": lambda: atomic_save_npy(str(path), np.ones(1000)),
        "copy": lambda: multiexit_io.atomic_copy(str(tmp_path / "source.png"), str(path)),
    }[writer]
    with temporary_files_on(dev_full), pytest.raises(WriteError) as caught:
        write()
    assert caught.value.path == str(path) and "(ENOSPC)" in caught.value.cause
    assert path.read_text() == "the earlier table\n"
    assert sorted(os.listdir(tmp_path)) == ["exit_summary_final.md", "source.png"]


def test_a_checkpoint_folder_on_a_full_disk_keeps_the_earlier_one(tmp_path: Path, dev_full: str) -> None:
    folder = tmp_path / "checkpoint-3"
    with atomic_directory(str(folder)) as temporary:
        Path(temporary, "config.json").write_text("{}")
    with pytest.raises(WriteError) as caught:
        with atomic_directory(str(folder)) as temporary:
            Path(temporary, "config.json").write_text('{"new": 1}')
            os.symlink(dev_full, os.path.join(temporary, "model.safetensors"))
            with multiexit_io.writing(str(folder / "model.safetensors")):
                Path(temporary, "model.safetensors").write_bytes(b"weights" * 1000)
    assert caught.value.path == str(folder / "model.safetensors") and "(ENOSPC)" in caught.value.cause
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    assert (folder / "config.json").read_text() == "{}"


def test_the_training_state_reports_the_disk_not_torch_internals(tmp_path: Path, dev_full: str) -> None:
    """torch's own writer reports a failed write as "unexpected pos N vs M"; the OSError is what is raised."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    os.symlink(dev_full, tmp_path / "training_state.pt")
    with pytest.raises(OSError) as caught:
        save_training_state(str(tmp_path), optimizer, scheduler, {"global_step": 1})
    assert caught.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------------------------------------------------
# A partial write: RLIMIT_FSIZE makes the kernel write part of a line, then refuse the rest (EFBIG)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """While inside, no regular file of this process may grow past ``limit`` bytes: the kernel writes what fits and
    fails the rest with EFBIG (Python ignores SIGXFSZ). Only for forked children whose stdout and stderr are not
    regular files (see run_forked)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def run_forked(function: Callable[[], object]) -> object:
    """``function()`` in a forked child with one intra-op thread and stdout/stderr on /dev/null; returns its result
    (or raises what it raised, as a RuntimeError naming it)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            send.send(("ok", function()))
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            send.send(("raised", f"{type(error).__name__}: {error}"))
        os._exit(0)

    process = context.Process(target=child)
    process.start()
    try:
        if not receive.poll(600):
            raise TimeoutError("the forked child did not answer")
        outcome, value = receive.recv()
    finally:
        process.join(timeout=60)
    if outcome != "ok":
        raise RuntimeError(value)
    return value


def test_a_line_cut_by_a_full_disk_is_taken_back(tmp_path: Path) -> None:
    path = tmp_path / "exit_results.jsonl"
    append_jsonl(str(path), {"run": 1})
    size = path.stat().st_size

    def append_past_the_limit() -> str:
        with file_size_limit(size + 20):  # the kernel writes 20 bytes of the line, then refuses the rest
            try:
                append_jsonl(str(path), {"run": 2, "payload": "x" * 1000})
            except WriteError as error:
                return str(error)
        return "no error"

    message = run_forked(append_past_the_limit)
    assert message.startswith(f"could not write {path}: File too large (EFBIG)"), message
    assert path.stat().st_size == size  # the 20 bytes were taken back
    append_jsonl(str(path), {"run": 3})
    assert read_jsonl(str(path)) == [{"run": 1}, {"run": 3}]


# --------------------------------------------------------------------------------------------------------------------
# Every writer of the runner, failing for real in the middle of a run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    return {"model": make_tiny_model(root / "model", dropout=0.1, layers=2),
            "data": write_sst2(root / "SST-2", train=18, dev=9), "root": root}


def runner_argv(tiny_run: dict[str, Path], output_dir: Path, *extra: object) -> list[str]:
    return [str(flag) for flag in (
        "--model_name_or_path", tiny_run["model"], "--task_name", "sst-2", "--data_dir", tiny_run["data"],
        "--output_dir", output_dir, "--max_seq_length", 32, "--do_train", "--max_steps", 6, "--save_steps", 3,
        "--per_gpu_train_batch_size", 4, "--learning_rate", "1e-3", "--logging_steps", 1, "--seed", 7,
        "--do_eval", "--patience", 1, "--early_exit_entropy", "0.6,0.69", *extra)]


def every_output(output_dir: Path) -> list[object]:
    """The flags that make an evaluation write everything it can: per-layer records, the logits, DeeBERT's plot data
    (--plot_data_dir also makes the training DeeBERT's two stages, as in its scripts: 6 steps each)."""
    plots = output_dir.parent / f"{output_dir.name}-plots"
    return ["--eval_each_highway", "--save_layer_logits", "--plot_data_dir", plots]


def limited(module: object, name: str, limit: Callable[..., int | None]) -> Callable[[], None]:
    """Patch ``module.name`` so that the file-size limit ``limit(*args)`` (None: no limit for this call) holds
    while it runs: the fault is chosen by writer, the failure comes from the kernel."""
    original = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        chosen = limit(*args, **kwargs)
        if chosen is None:
            return original(*args, **kwargs)
        with file_size_limit(chosen):
            return original(*args, **kwargs)

    return lambda: setattr(module, name, wrapper)


def on_call(number: int, size: int | Callable[..., int]) -> Callable[..., int | None]:
    """A limit for the ``number``-th call only (1 = the first); ``size`` may depend on the call's arguments."""
    calls = {"count": 0}

    def limit(*args: object, **kwargs: object) -> int | None:
        calls["count"] += 1
        if calls["count"] != number:
            return None
        return size(*args, **kwargs) if callable(size) else size

    return limit


def partial_line(path_argument: int = 0) -> Callable[..., int]:
    """A limit 20 bytes past the current end of the JSONL file the call appends to: part of the line is written."""
    return lambda *args, **kwargs: (os.path.getsize(args[path_argument]) if os.path.exists(args[path_argument])
                                    else 0) + 20


SMALL = 64 * 1024  # config.json, training_args.json fit; weights, training state, tokenizer.json do not

# writer -> (how to make it fail, the file the error must name, whether it fails during training)
WRITERS = {
    "checkpoint weights": (lambda: limited(runner_training, "save_checkpoint", lambda folder, *a, **k: SMALL
                                           if folder.endswith("checkpoint-6") else None),
                           "checkpoint-6/model.safetensors", True),
    "training state": (lambda: limited(runner_training, "save_training_state", on_call(2, SMALL)),
                       "checkpoint-6/training_state.pt", True),
    "training log": (lambda: limited(runner_training, "append_jsonl", on_call(4, partial_line())),
                     "training_log.jsonl", True),
    "final model": (lambda: limited(runner_main, "save_final_model", lambda *a, **k: SMALL),
                    "model.safetensors", True),
    "feature cache": (lambda: limited(runner_main, "load_features", on_call(1, 0)), ".arrow", False),
    "results": (lambda: limited(runner_evaluation, "append_jsonl", on_call(2, partial_line())),
                "exit_results.jsonl", False),
    "per-example file": (lambda: limited(runner_evaluation, "write_per_example", on_call(2, 0)), ".tsv", False),
    "summary": (lambda: limited(runner_evaluation, "write_summary", lambda *a, **k: 0),
                "exit_summary_final.md", False),
    "plot": (lambda: limited(runner_evaluation, "plot_score_vs_speedup", lambda *a, **k: 0),
             "score_vs_speedup_final.png", False),
    "layer logits": (lambda: limited(runner_evaluation, "atomic_save_npy", on_call(1, 0)),
                     "layer_logits/final_dev_logits.npy", False),
    "DeeBERT plot data": (lambda: limited(runner_evaluation, "write_deebert_plot_data", lambda *a, **k: 0),
                          "each_layer.npy", False),
}


def run_runner_forked(argv: list[str], inject: Callable[[], None] | None = None) -> tuple[int, str]:
    def run() -> tuple[int, str]:
        if inject is not None:
            inject()()
        return run_main(argv)

    return run_forked(run)


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_of_the_runner_fails_cleanly(writer: str, tiny_run: dict[str, Path], tmp_path: Path) -> None:
    inject, named, during_training = WRITERS[writer]
    output_dir = tmp_path / "run"
    argv = runner_argv(tiny_run, output_dir, *every_output(output_dir))
    status, stderr = run_runner_forked(argv, inject)
    line = error_line(stderr)
    assert status == 74, stderr[-3000:]
    assert line.startswith("error: could not write ") and named in line.split(": ")[1], line
    assert "File too large (EFBIG)" in line and "nothing was half-written" in line, line
    assert not leftovers(output_dir, tmp_path / "run-plots")
    if writer in ("training log", "results"):  # the line the disk cut was taken back
        file = output_dir / named
        assert all(json.loads(text) for text in file.read_text().splitlines())
    if during_training:
        whole = [c for c in list_checkpoints(str(output_dir)) if runner_training.checkpoint_damage(c) is None]
        assert whole == list_checkpoints(str(output_dir))  # every checkpoint there is whole
        # the training log fails at step 4, the checkpoint writers at checkpoint-6, the final model after step 12
        assert os.path.basename(whole[-1]) == ("checkpoint-12" if writer == "final model" else "checkpoint-3")
        resume = shlex.join(["python", "run_glue_with_exits.py", *argv, "--resume_from_checkpoint", "latest"])
        assert line.endswith(f"the last whole one is {whole[-1]}: fix the cause (or copy {output_dir} to another "
                             f"disk) and resume from it with: {resume}"), line


@pytest.mark.slow
def test_a_run_that_failed_to_write_a_checkpoint_resumes_exactly(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """The issue's case: the disk fills while checkpoint-6's training state is written; the resumed run (the command
    the error prints) ends with the weights and results of a run that never failed."""
    straight = tmp_path / "straight"
    status, stderr = run_runner_forked(runner_argv(tiny_run, straight))
    assert status == 0, stderr[-3000:]
    failed = tmp_path / "failed"
    inject, _, _ = WRITERS["training state"]
    status, stderr = run_runner_forked(runner_argv(tiny_run, failed), inject)
    assert status == 74
    command = shlex.split(error_line(stderr).split("resume from it with: ")[1])
    assert command[:2] == ["python", "run_glue_with_exits.py"]
    status, stderr = run_runner_forked(command[2:])
    assert status == 0, stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(failed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    volatile = ("time", "wall_time_s", "checkpoint", "per_example_file", "wall_time_repeats_s",
                "full_depth_wall_time_s", "wall_speedup", "device")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in read_records(straight)] == \
        [{k: v for k, v in r.items() if k not in volatile} for r in read_records(failed)]


# --------------------------------------------------------------------------------------------------------------------
# A real small disk (tmpfs), where this process may mount one


@pytest.fixture
def small_disk(tmp_path: Path) -> Callable[[str], Path]:
    """``mount(size, options)``: a fresh tmpfs of ``size`` (``"30m"``; ``options`` such as ``",ro"``) under tmp_path;
    skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str, options: str = "") -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path) -> None:
    """Write a ballast file until the disk is full."""
    with open(disk / "ballast", "wb") as stream:
        with contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()


@pytest.mark.slow
def test_a_full_disk_while_checkpointing(small_disk: Callable[[str], Path], tiny_run: dict[str, Path],
                                         tmp_path: Path) -> None:
    """--save_steps 1 onto a 30 MB disk: two checkpoints of the tiny model fit, the third does not. The error names
    the file and the last whole checkpoint; resumed from a copy on a roomier disk, the run ends as one that never
    failed."""
    disk = small_disk("30m")
    output_dir = disk / "run"
    argv = runner_argv(tiny_run, output_dir, "--save_steps", 1)
    status, stderr = run_runner_forked(argv)
    line = error_line(stderr)
    assert status == 74 and "No space left on device (ENOSPC)" in line, line
    assert line.startswith(f"error: could not write {output_dir}/checkpoint-")
    whole = list_checkpoints(str(output_dir))
    assert whole and all(runner_training.checkpoint_damage(c) is None for c in whole)
    assert f"the last whole one is {whole[-1]}:" in line
    assert not leftovers(output_dir)
    roomy = tmp_path / "roomy"
    shutil.copytree(output_dir, roomy)
    command = shlex.split(line.split("resume from it with: ")[1])[2:]
    command[command.index("--output_dir") + 1] = str(roomy)
    status, stderr = run_runner_forked(command)
    assert status == 0, stderr[-3000:]
    straight = tmp_path / "straight"
    status, stderr = run_runner_forked(runner_argv(tiny_run, straight, "--save_steps", 1))
    assert status == 0, stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(roomy / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_a_full_disk_for_the_feature_cache_and_the_results(small_disk: Callable[[str], Path],
                                                           tiny_run: dict[str, Path], tmp_path: Path) -> None:
    disk = small_disk("4m")
    trained = tiny_run["root"] / "trained"
    if not (trained / "model.safetensors").exists():
        status, stderr = run_runner_forked(runner_argv(tiny_run, trained))
        assert status == 0, stderr[-3000:]
    evaluation = ["--model_name_or_path", str(trained), "--task_name", "sst-2", "--data_dir", str(tiny_run["data"]),
                  "--max_seq_length", "32", "--do_eval", "--patience", "1", "--early_exit_entropy", "0.6,0.69"]
    output_dir = disk / "eval"
    status, stderr = run_runner_forked([*evaluation, "--output_dir", str(output_dir)])  # cache and results fit
    assert status == 0, stderr[-3000:]
    records = (output_dir / "exit_results.jsonl").read_bytes()
    fill(disk)
    # the same evaluation again: the cache is read, the results cannot be written
    status, stderr = run_runner_forked([*evaluation, "--output_dir", str(output_dir)])
    line = error_line(stderr)
    assert status == 74 and "No space left on device (ENOSPC)" in line and str(output_dir) in line, line
    assert (output_dir / "exit_results.jsonl").read_bytes() == records
    assert not leftovers(output_dir)
    # a new folder on the full disk: the feature cache cannot be written
    status, stderr = run_runner_forked([*evaluation, "--output_dir", str(disk / "fresh")])
    line = error_line(stderr)
    assert status == 74 and "No space left on device (ENOSPC)" in line, line
    assert "/.feature_cache/features-" in line and line.split(": ")[1].endswith(".arrow"), line
    assert not leftovers(disk / "fresh") and not os.listdir(disk / "fresh" / ".feature_cache")
    # space again: the run goes through, appending to the whole records
    (disk / "ballast").unlink()
    status, stderr = run_runner_forked([*evaluation, "--output_dir", str(output_dir)])
    assert status == 0, stderr[-3000:]
    assert len(read_records(output_dir)) == 2 * len(records.splitlines())


def test_a_read_only_output_folder(small_disk: Callable[..., Path], tiny_run: dict[str, Path]) -> None:
    disk = small_disk("1m", ",ro")
    model = make_tiny_model(disk.parent / "model", multi_exit=True)
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", tiny_run["data"],
                               "--output_dir", disk / "eval", "--max_seq_length", 32, "--do_eval"])
    assert status == 74
    assert error_line(stderr) == (f"error: could not write {disk / 'eval'}: Read-only file system (EROFS); nothing "
                                  f"was written there")


# --------------------------------------------------------------------------------------------------------------------
# A damaged feature cache heals


def _cache_files(output_dir: Path) -> tuple[Path, Path]:
    (arrow,) = (output_dir / ".feature_cache").glob("features-*.arrow")
    return arrow, arrow.with_suffix(".json")


@pytest.mark.parametrize("damage", ["arrow cut to 200 bytes", "arrow cut in half", "count unreadable",
                                    "count of other examples"])
@pytest.mark.slow
def test_a_damaged_feature_cache_is_rebuilt(damage: str, tiny_run: dict[str, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The issue's case: ``features-*.arrow`` cut to 200 bytes stopped every later run in the folder with pyarrow's
    traceback; the cache is derived data, so the next run tokenises again, says so, and gets the same features."""
    trained = make_tiny_model(tmp_path / "model", multi_exit=True)
    argv = ["--model_name_or_path", trained, "--task_name", "sst-2", "--data_dir", tiny_run["data"], "--output_dir",
            tmp_path / "eval", "--max_seq_length", 32, "--do_eval", "--patience", 1]
    status, stderr = run_main(argv)
    assert status == 0, stderr
    arrow, count = _cache_files(tmp_path / "eval")
    whole = arrow.read_bytes()
    if damage == "arrow cut to 200 bytes":
        arrow.write_bytes(whole[:200])
    elif damage == "arrow cut in half":
        arrow.write_bytes(whole[: len(whole) // 2])
    elif damage == "count unreadable":
        count.write_text('{"trunc')
    else:
        count.write_text(json.dumps({"truncated": 0, "examples": 3}))
    caplog.set_level(logging.WARNING)
    status, stderr = run_main(argv)
    assert status == 0, stderr
    assert f"the feature cache {arrow} is damaged" in caplog.text and "tokenising again" in caplog.text
    assert arrow.read_bytes() == whole and json.loads(count.read_text())["examples"] == 9
    first, second = read_records(tmp_path / "eval")[:2], read_records(tmp_path / "eval")[2:]
    assert [r["metrics"] for r in first] == [r["metrics"] for r in second]
    assert not leftovers(tmp_path / "eval" / ".feature_cache")


# --------------------------------------------------------------------------------------------------------------------
# A damaged checkpoint: latest skips it, by name it is an error


@pytest.fixture(scope="module")
def uninterrupted(tiny_run: dict[str, Path]) -> Path:
    output_dir = tiny_run["root"] / "uninterrupted-9"
    status, stderr = run_main(runner_argv(tiny_run, output_dir, "--max_steps", 9))
    assert status == 0, stderr
    return output_dir


def _damage(checkpoint: Path, damage: str) -> str:
    """Damage ``checkpoint`` as a copy cut short or a failing disk would; returns what the warning must say."""
    if damage == "weights cut short":
        weights = checkpoint / "model.safetensors"
        size = weights.stat().st_size
        weights.write_bytes(weights.read_bytes()[:200])
        return f"model.safetensors has 200 bytes where {size} were written"
    if damage == "training state cut short":
        state = checkpoint / "training_state.pt"
        state.write_bytes(state.read_bytes()[:-1000])
        return "training_state.pt has"
    if damage == "tokenizer missing":
        (checkpoint / "tokenizer.json").unlink()
        return "tokenizer.json is missing"
    if damage == "training state missing":
        (checkpoint / "training_state.pt").unlink()
        return "it has no training_state.pt"
    assert damage == "old checkpoint cut short"  # written before manifests: the files themselves are checked
    (checkpoint / "manifest.json").unlink()
    state = checkpoint / "training_state.pt"
    state.write_bytes(state.read_bytes()[:-1000])
    return "training_state.pt is unreadable"


DAMAGES = ["weights cut short", "training state cut short", "tokenizer missing", "training state missing",
           "old checkpoint cut short"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_latest_skips_a_damaged_checkpoint(damage: str, uninterrupted: Path, tiny_run: dict[str, Path],
                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, output_dir)
    (output_dir / "model.safetensors").unlink()  # no final model: the run was interrupted during training
    reason = _damage(output_dir / "checkpoint-9", damage)
    caplog.set_level(logging.WARNING)
    status, stderr = run_main(runner_argv(tiny_run, output_dir, "--max_steps", 9, "--resume_from_checkpoint",
                                          "latest"))
    assert status == 0, stderr
    assert f"skipping {output_dir / 'checkpoint-9'}: not a whole training checkpoint ({reason}" in caplog.text
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)  # resumed from checkpoint-6: the same end
    assert runner_training.checkpoint_damage(str(output_dir / "checkpoint-9")) is None  # written again, whole


@pytest.mark.slow
def test_a_damaged_checkpoint_given_by_name_is_an_error(uninterrupted: Path, tiny_run: dict[str, Path],
                                                        tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-9"
    shutil.copytree(uninterrupted / "checkpoint-9", checkpoint)
    reason = _damage(checkpoint, "weights cut short")
    status, stderr = run_main(runner_argv(tiny_run, tmp_path / "run", "--resume_from_checkpoint", checkpoint))
    assert status == 2
    assert error_line(stderr) == (f"error: --resume_from_checkpoint {checkpoint}: the checkpoint is damaged "
                                  f"({reason}); copy it again, or resume from another one (--resume_from_checkpoint "
                                  f"latest takes the newest whole one)")
    assert not (tmp_path / "run").exists()  # found before anything is written


def test_checkpoints_of_an_older_version_stay_resumable(tmp_path: Path) -> None:
    """Written before manifests: whole when the files the resume reads are there and open."""
    from multiexit.tiny import tiny_model

    folder = tmp_path / "checkpoint-3"
    model = tiny_model("bert", layers=1, multi_exit=True)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with atomic_directory(str(folder)) as temporary:
        model.save_pretrained(temporary)
        save_training_state(temporary, optimizer, scheduler, {"global_step": 3})
        Path(temporary, "trainer_state.json").write_text('{"global_step": 3}')
    assert runner_training.checkpoint_damage(str(folder)) is None
    (folder / "manifest.json").unlink()
    assert runner_training.checkpoint_damage(str(folder)) is None
    (folder / "trainer_state.json").write_text("{")
    assert runner_training.checkpoint_damage(str(folder)) == "trainer_state.json is unreadable"


# --------------------------------------------------------------------------------------------------------------------
# SIGTERM


SLOW_STEPS = """\
import sys, time
import multiexit.runner.training as training

original = training.model_inputs


def slowed(batch):  # each training forward waits, so that a test can signal the run in the middle of training
    time.sleep(0.2)
    return original(batch)


training.model_inputs = slowed
import run_glue_with_exits

sys.exit(run_glue_with_exits.cli())
"""


def slow_script(folder: Path) -> Path:
    script = folder / "run_slowly.py"
    script.write_text(SLOW_STEPS)
    return script


def wait_for_steps(log: Path, steps: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {steps}: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {steps} in {log}")


def single_thread_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_sigterm_stops_training_at_a_step_and_the_resumed_run_is_exact(tiny_run: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    argv = runner_argv(tiny_run, output_dir, "--max_steps", 12, "--save_steps", 0)
    process = subprocess.Popen([sys.executable, str(slow_script(tmp_path)), *argv], cwd=REPO, env=single_thread_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(output_dir / "training_log.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    (checkpoint,) = list_checkpoints(str(output_dir))  # --save_steps 0: only the one SIGTERM asked for
    step = int(checkpoint.rsplit("-", 1)[1])
    assert 2 <= step < 12 and runner_training.checkpoint_damage(checkpoint) is None
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    resume = shlex.join(["python", str(slow_script(tmp_path)), *argv, "--resume_from_checkpoint", "latest"])
    assert stopped == [f"stopped: training stopped at step {step} (SIGTERM) after saving {checkpoint}; resume with: "
                       f"{resume}"], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "exit_results.jsonl").exists()
    assert [r["step"] for r in read_jsonl(str(output_dir / "training_log.jsonl"))] == list(range(1, step + 1))
    assert not leftovers(output_dir)
    # the printed command's arguments resume; the run ends as one that was never stopped
    command = shlex.split(stopped[0].split("resume with: ")[1])
    assert command[:2] == ["python", str(slow_script(tmp_path))]
    status, stderr = run_runner_forked(command[2:])
    assert status == 0, stderr[-3000:]
    straight = tmp_path / "straight"
    status, stderr = run_runner_forked(runner_argv(tiny_run, straight, "--max_steps", 12, "--save_steps", 0))
    assert status == 0, stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in read_jsonl(str(output_dir / "training_log.jsonl"))] == list(range(1, 13))
    assert [r["metrics"] for r in read_records(straight)] == [r["metrics"] for r in read_records(output_dir)]


@pytest.mark.slow
def test_sigint_keeps_its_behaviour(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """A real SIGINT, sent by the run to itself in its third training step (in-process: the SIGTERM handler is
    installed then), still stops it at once: KeyboardInterrupt, exit status 130, no checkpoint saved."""
    output_dir = tmp_path / "run"
    original, forwards = runner_training.model_inputs, []

    def model_inputs(batch: dict) -> dict:
        forwards.append(1)
        if len(forwards) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the KeyboardInterrupt
        return original(batch)

    before = signal.getsignal(signal.SIGTERM)
    # Python's own SIGINT handler, as a terminal's run has it: a process started in the background by a
    # non-interactive shell (nohup ... &) inherits SIGINT ignored, and Python then installs none
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runner_training, "model_inputs", model_inputs)
            status, stderr = run_main(runner_argv(tiny_run, output_dir, "--max_steps", 12, "--save_steps", 0))
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert status == 130, stderr[-3000:]
    assert "interrupted: completed checkpoints and result lines are intact" in stderr
    assert not list_checkpoints(str(output_dir))
    assert signal.getsignal(signal.SIGTERM) == before  # the training's SIGTERM handler is gone


def test_sigterm_outside_training_keeps_its_default() -> None:
    """Only the training loop holds SIGTERM back; around it the handler is restored, and a SIGTERM that came after
    the loop's last check is delivered again, with its default effect."""
    before = signal.getsignal(signal.SIGTERM)
    with runner_training.stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not runner_training._stop_signal.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner_training._stop_signal.is_set()
        runner_training._stop_signal.clear()  # (as if the loop had acted on it)
    assert signal.getsignal(signal.SIGTERM) == before

    def late_signal() -> None:
        with runner_training.stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        os._exit(0)  # not reached: the default SIGTERM ends the process

    child = multiprocessing.get_context("fork").Process(target=late_signal)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGTERM


def worker_of_rank(launcher: int, rank: int) -> int:
    """The process id of torchrun's (``launcher``'s) worker of ``rank``."""
    for children in Path(f"/proc/{launcher}/task").glob("*/children"):
        for pid in children.read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_run: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """A scheduler may signal one process of a torchrun launch: both stop at the same step (they agree on it in an
    all-reduce at each step boundary), one checkpoint is saved, one message printed; resuming with two processes
    ends as a two-process run that was never stopped. Dropout 0: a checkpoint keeps the main process's RNG state
    only, so the other process's dropout masks after a resume are not those of the uninterrupted run."""
    model = make_tiny_model(tmp_path / "model", dropout=0.0, layers=2)

    def training(output_dir: Path) -> list[str]:  # (training only: evaluation adds nothing here)
        argv = runner_argv({**tiny_run, "model": model}, output_dir, "--max_steps", 10, "--save_steps", 0,
                           "--per_gpu_train_batch_size", 2)
        return argv[: argv.index("--do_eval")]

    output_dir = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.Popen([*launch, str(slow_script(tmp_path)), *training(output_dir)], cwd=REPO,
                               env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(output_dir / "training_log.jsonl", 2, process)
    os.kill(worker_of_rank(process.pid, 1), signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports its workers' exit status 143 as a failure
    (checkpoint,) = list_checkpoints(str(output_dir))  # one checkpoint: the step both processes stopped at
    assert runner_training.checkpoint_damage(checkpoint) is None
    step = json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"]
    assert checkpoint.endswith(f"checkpoint-{step}") and step < 10
    assert [r["step"] for r in read_jsonl(str(output_dir / "training_log.jsonl"))] == list(range(1, step + 1))
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "resume with: torchrun --nproc_per_node 2 " in stopped[0], stderr[-3000:]
    result = subprocess.run([*launch, str(slow_script(tmp_path)), *training(output_dir), "--resume_from_checkpoint",
                             "latest"], cwd=REPO, env=single_thread_env(), capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = tmp_path / "straight"
    result = subprocess.run([*launch, "run_glue_with_exits.py", *training(straight)], cwd=REPO,
                            env=single_thread_env(), capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
