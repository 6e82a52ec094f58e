"""The base of every error a user can fix, plus the ones shared across modules; the CLI prints each as one line.

Each module keeps its own specific class (``RecipeError`` in recipe.py, ``DecodeError`` in domains, ...), all
subclasses of ``MmdomainError``: a message names the thing (file, field, sample key, limit) and the fix, so
``mmdomain`` can show it without a traceback (``--debug`` shows one).
"""
from __future__ import annotations


class MmdomainError(Exception):
    """A problem with the user's input or environment that they can fix; the message says what and how."""


class ModelLoadError(MmdomainError, ValueError):
    """A local model directory or weights file that cannot be used: missing, truncated, pickled, or not what
    it claims to be. The message names the file and the fix."""


class CheckpointError(MmdomainError, ValueError):
    """A checkpoint that cannot be read, written or used here: incomplete, truncated, of another format, or made
    for other base models. The message names the checkpoint directory (and file) and what to do instead."""


class RunInterrupted(MmdomainError, RuntimeError):
    """SIGINT/SIGTERM stopped a run at a step boundary, after saving a checkpoint to resume from."""

    def __init__(self, message: str, signal_number: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # what a shell reports for a process ended by that signal
