"""One-line errors: what the CLI prints and the exit codes it ends with."""
from __future__ import annotations

import signal
from pathlib import Path


class UsageError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with code 2."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM and wrote a checkpoint (after finishing its step, or, when the step
    outlasted the signal by seconds, of the step before: `late`); the CLI says how to continue and exits with 128 +
    the signal's number (130, 143), as a shell reports a process a signal ended."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, late: bool = False):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint, self.late = signum, step, checkpoint, late

    def line(self, resume: str) -> str:
        """What the CLI prints: the signal, the step the checkpoint holds, and `resume`, the command that continues."""
        name = signal.Signals(self.signum).name
        where = f"wrote the checkpoint {self.checkpoint}; continue with: {resume}" if self.checkpoint else \
            "no checkpoint was asked for"
        if self.late:
            return f"interrupted by {name} during step {self.step + 1}, which was still running seconds later: " \
                   f"saved step {self.step} instead; {where}"
        return f"interrupted by {name} after step {self.step}: {where}"


def first_line(e: Exception, width: int = 160) -> str:
    """An exception's message, one line, cut at a word boundary."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."
