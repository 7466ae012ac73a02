"""Writing results and checkpoints so that nothing is lost or half-written.

* :func:`append_jsonl` appends one line under an exclusive ``flock`` on an ``O_APPEND`` file, so two sweeps writing
  into the same ``exit_results.jsonl`` both survive, line by line; :func:`read_jsonl` reads it back.
* :func:`atomic_write_text` and :func:`atomic_directory` write to a temporary name and ``os.replace`` it into place:
  a killed run leaves either the old file/checkpoint or the new one, never a partial one that looks like a result.
  :func:`atomic_directory` writes a manifest last (every file's size), so a folder damaged later (a copy cut short)
  is recognised by :func:`directory_damage`.
* :func:`writing` is the one place that recognises a write the machine refused (disk full, quota, read-only or
  failing file system, permissions) and turns it into :class:`~multiexit.errors.WriteError`, naming the file and
  what is intact; every writer here goes through it and leaves nothing half-written when it fails.
* :func:`save_training_state` / :func:`load_training_state` keep the optimizer, scheduler, step counters and every
  RNG state in plain tensors and containers, so they load with ``torch.load(weights_only=True)`` (no pickle).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

import numpy as np
import torch

from multiexit.errors import UserInputError, WriteError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.pt"
MANIFEST_NAME = "manifest.json"  # written last by atomic_directory: the size of every file in the folder

# the failures of a write that come from the machine, not from the program or its input
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM)
INTACT_FILE = "nothing was half-written (an earlier version of the file, if any, is unchanged)"
INTACT_LINES = "nothing was half-written (the records already in the file are whole)"
INTACT_FOLDER = "nothing was half-written (an earlier version of the folder, if any, is unchanged)"

logger = logging.getLogger(__name__)


def write_failure_cause(error: BaseException) -> str | None:
    """The machine's reason a write failed (``No space left on device (ENOSPC)``), or None for any other failure (a
    bug, an interruption), which must propagate as it is. Looks through the exception's causes, and reads the OS error
    code that Rust writers (safetensors) put in their message ("... (os error 28)") as they raise no OSError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None:
            match = re.search(r"\(os error (\d+)\)", str(current))
            code = int(match.group(1)) if match else None
        if code in WRITE_FAILURES:
            return f"{os.strerror(code)} ({errno.errorcode[code]})"
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def writing(path: str, intact: str = "") -> Iterator[None]:
    """Inside, a write the machine refuses (see :func:`write_failure_cause`) raises :class:`WriteError` naming
    ``path`` and ``intact`` (what is whole, how to go on); anything else propagates unchanged. Nested, the innermost
    path (the most precise) and the outermost ``intact`` given (from the caller that knows most) win."""
    try:
        yield
    except WriteError as error:
        if intact:
            error.intact = intact
        raise
    except Exception as error:
        cause = write_failure_cause(error)
        if cause is None:
            raise
        raise WriteError(path, cause, intact) from error


def make_folder(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``; a refusal of the machine raises WriteError."""
    with writing(path, "nothing was written there"):
        os.makedirs(path, exist_ok=True)


def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line, atomically with respect to other writers of the same file.

    The line is written under an exclusive ``flock`` (every writer of the file takes it), so lines of concurrent
    writers never interleave whatever their length. If a writer was killed in the middle of a line, the next one
    starts on a new line: the torn line stays unparseable (:func:`read_jsonl` skips it) but cannot corrupt the
    records written after it. A write that fails (a full disk) takes its part of the line back before the lock is
    released, so the file keeps only whole records.
    """
    line = (json.dumps(record, sort_keys=True, default=_json_default, allow_nan=True) + "\n").encode("utf-8")
    with writing(path, INTACT_LINES):
        file_descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX)
            size = os.fstat(file_descriptor).st_size
            if size and os.pread(file_descriptor, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                view = memoryview(line)
                while view:  # os.write may write less than asked (signals, huge lines): finish it under the lock
                    view = view[os.write(file_descriptor, view):]
                os.fsync(file_descriptor)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(file_descriptor, size)
                raise
        finally:
            fcntl.flock(file_descriptor, fcntl.LOCK_UN)
            os.close(file_descriptor)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file written by :func:`append_jsonl`, skipping (with a warning) torn lines."""
    records = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping an incomplete line (a writer was interrupted)", path, number)
    return records


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """Yield an open stream on a temporary file beside ``path``; on success the file is synced, made readable to all
    (mkstemp makes it private; results are meant to be shared) and renamed onto ``path``, on failure removed: readers
    see the old file or the new one, never a part. A write the machine refuses raises WriteError."""
    with writing(path, INTACT_FILE):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(handle, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``path`` via a temporary file renamed into place."""
    with atomic_file(path) as stream:
        stream.write(text)


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` via a temporary file renamed into place."""
    with atomic_file(path, "wb") as stream:
        np.save(stream, array)


def atomic_copy(source: str, path: str) -> None:
    """Copy ``source`` to ``path`` via a temporary file renamed into place."""
    with atomic_file(path, "wb") as stream, open(source, "rb") as original:
        shutil.copyfileobj(original, stream)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary sibling directory; on success its manifest (:data:`MANIFEST_NAME`, the size of every file) is
    written last and it replaces ``path`` (the old one is removed). A write the machine refuses raises WriteError,
    with the temporary directory removed and an earlier ``path`` untouched."""
    with writing(path, INTACT_FOLDER):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
        try:
            os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes it private
            yield temporary
            sizes = _file_sizes(temporary)
            with (writing(os.path.join(path, MANIFEST_NAME)),
                  open(os.path.join(temporary, MANIFEST_NAME), "w", encoding="utf-8") as stream):
                json.dump({"files": sizes}, stream, indent=1, sort_keys=True)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        if os.path.isdir(path):
            # rename the old one aside first so that at every instant one complete copy exists
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)


def _file_sizes(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (paths relative to it) and its size."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    return sizes


def directory_damage(folder: str) -> str | None:
    """Why ``folder``, written by :func:`atomic_directory`, is no longer whole (a file its manifest lists is missing,
    or has another size than when it was written: a copy cut short, a damaged disk), or None. A folder without a
    manifest (written before manifests were) is taken as it is: the caller checks what it needs."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as stream:
            sizes = dict(json.load(stream)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} is unreadable"
    for name, size in sorted(sizes.items()):
        try:
            actual = os.path.getsize(os.path.join(folder, name))
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes where {size} were written"
    return None


@contextlib.contextmanager
def staged_files(directory: str) -> Iterator[str]:
    """Yield a temporary folder inside ``directory``; on success every file written there is renamed into
    ``directory`` (each rename atomic, weights last), so no half-written file ever carries its final name. For the
    final model, which shares ``output_dir`` with results and checkpoints and so cannot be swapped as one folder."""
    with writing(directory, INTACT_FILE):
        os.makedirs(directory, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=".tmp-staged-", dir=directory)
        try:
            yield temporary
            names = sorted(os.listdir(temporary), key=lambda name: (name.endswith((".safetensors", ".bin")), name))
            for name in names:
                os.chmod(os.path.join(temporary, name), 0o666 & ~_umask())
                os.replace(os.path.join(temporary, name), os.path.join(directory, name))
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` folders under ``output_dir`` with saved weights, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        folder = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(folder, "config.json")):
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def _rng_state() -> dict[str, object]:
    numpy_state = np.random.get_state()
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, object]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: object) -> object:
    """``random.setstate`` needs tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


def save_training_state(folder: str, optimizer: torch.optim.Optimizer, scheduler: object, progress: dict) -> None:
    """Everything needed to resume exactly: optimizer, scheduler, counters and this process's RNG states."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": _rng_state(),
    }
    rank = int(os.environ.get("RANK", "0"))
    name = TRAINING_STATE_NAME if rank == 0 else f"training_state_rank{rank}.pt"
    with open(os.path.join(folder, name), "wb") as stream:
        recorder = _WriteErrorRecorder(stream)
        try:
            torch.save(state, recorder)
        except RuntimeError as error:
            if recorder.error is None:
                raise
            raise recorder.error from error


class _WriteErrorRecorder:
    """A stream for ``torch.save`` that keeps the OSError of a failed write: torch's writer drops it and fails later
    with "unexpected pos N vs M", which names neither the disk nor the reason."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.error = stream, None

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def load_training_state(
    folder: str, optimizer: torch.optim.Optimizer, scheduler: object, restore_rng: bool = True
) -> dict:
    """Restore what :func:`save_training_state` wrote; returns the saved progress counters.

    With ``restore_rng=False`` the RNG states are returned under ``"rng_state"`` instead of being applied, for the
    caller to apply with :func:`set_rng_state` at the exact point of the loop where they were saved (a resumed
    loop creates a data iterator that the original run had created before the checkpoint, and creating one draws
    from the global RNG).
    """
    rank = int(os.environ.get("RANK", "0"))
    name = TRAINING_STATE_NAME if rank == 0 else f"training_state_rank{rank}.pt"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        path = os.path.join(folder, TRAINING_STATE_NAME)
    if not os.path.isfile(path):
        raise UserInputError(f"{folder} has no {TRAINING_STATE_NAME}: it is not a resumable training checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
        return dict(state["progress"])
    return dict(state["progress"]) | {"rng_state": state["rng"]}


def set_rng_state(state: dict[str, object]) -> None:
    """Apply RNG states returned by ``load_training_state(..., restore_rng=False)``."""
    _set_rng_state(state)
