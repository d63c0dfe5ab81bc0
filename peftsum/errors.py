"""One-line errors: what the CLI prints and the exit codes it ends with."""
from __future__ import annotations

from pathlib import Path


class UsageError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with code 2."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after finishing its step and writing a checkpoint; the CLI says how to
    continue and exits with 128 + the signal's number (130, 143), as a shell reports a process a signal ended."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def first_line(e: Exception, width: int = 160) -> str:
    """An exception's message, one line, cut at a word boundary."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."
