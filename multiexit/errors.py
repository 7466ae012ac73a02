"""The exceptions the runner turns into one line on stderr and an exit status of their own.

* :class:`UserInputError` (exit status 2): a mistake the user can fix (bad flags, bad files, bad settings), so a user
  who mistypes a flag or points at the wrong folder sees what to fix instead of a traceback. Library code raises it
  for anything the caller can correct; genuine bugs keep raising ordinary exceptions.
* :class:`WriteError` (exit status 74, sysexits' EX_IOERR): the input was fine but the machine could not store a file
  (disk full, quota, read-only or failing file system, permissions). Raised by :func:`multiexit.io.writing`, the one
  place that recognises such failures.
* :class:`TrainingStopped` (exit status 143, 128 + SIGTERM): training was asked to stop (SIGTERM) and saved a
  checkpoint to resume from.
"""

EXIT_USER_INPUT = 2
EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class UserInputError(ValueError):
    """A mistake in the user's input (flags, files, settings) that the user can fix."""


class WriteError(Exception):
    """A file could not be written for a reason of the machine, not of the input.

    ``path`` is the file (or folder) being written, ``cause`` the system's reason (``No space left on device
    (ENOSPC)``), ``intact`` what the failure left whole and how to go on; the writer that raised it left nothing
    half-written."""

    def __init__(self, path: str, cause: str, intact: str = "") -> None:
        super().__init__(path, cause, intact)
        self.path, self.cause, self.intact = path, cause, intact

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.cause}" + (f"; {self.intact}" if self.intact else "")


class TrainingStopped(BaseException):
    """Training stopped at an optimisation-step boundary on request (SIGTERM) after saving ``checkpoint``.

    A BaseException, as KeyboardInterrupt: a request to stop, not an error, that no ``except Exception`` may swallow.
    ``resume`` says how to continue (set by the runner, which knows the command line)."""

    def __init__(self, checkpoint: str, step: int, resume: str = "") -> None:
        super().__init__(checkpoint, step, resume)
        self.checkpoint, self.step, self.resume = checkpoint, step, resume

    def __str__(self) -> str:
        return (f"training stopped at step {self.step} (SIGTERM) after saving {self.checkpoint}"
                + (f"; {self.resume}" if self.resume else ""))
