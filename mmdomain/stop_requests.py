"""SIGINT / SIGTERM ask a run to stop at the next step boundary, after a checkpoint, instead of killing it mid-step.

A cluster's preemption (SIGTERM) or one Ctrl-C then costs at most one step of work: the loop sees ``requested``,
saves, and exits with a message saying how to resume. A second Ctrl-C stops at once (the last periodic checkpoint
is still there to resume from).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class StopRequests:
    def __init__(self) -> None:
        self.requested: str | None = None
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_number = name, signum
        log.warning("%s: finishing this step and saving a checkpoint before stopping (Ctrl-C again stops at once)", name)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def outlive_launcher_stop() -> None:
    """On a launched rank whose run has failed: keep SIGTERM from killing the process before it has said why it stopped.

    When one rank dies, torchrun's agent SIGTERMs the others 0.04-0.09 s later (measured with gloo on this machine);
    a survivor still tearing down (destroying the process group, releasing the run's lock) then died silently, and
    the line naming the rank that failed and the command to resume was lost. The process is ending anyway, and the
    agent escalates to SIGKILL after its own grace period, so nothing waits on this rank for long."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ignore_signals() -> None:
    """In a DataLoader worker: a Ctrl-C reaches the whole process group, but only the main process decides when to
    stop; a worker that died of it would fail the step the main process is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
