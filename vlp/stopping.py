"""Stop requests: Ctrl-C, preemption and schedulers' early warnings end a run at a step boundary.

SIGINT (Ctrl-C), SIGTERM (what clusters send before they preempt a job) and SIGUSR1 (SLURM's
`--signal=USR1@SECONDS` warning) ask the run to stop: the trainer finishes its current
optimizer step, writes a checkpoint and exits with 128 + the signal's number (130, 143, 138).
A second SIGINT stops at once (KeyboardInterrupt, nothing saved). A SIGTERM or SIGUSR1 within
SAME_REQUEST_S of the first request is the same request passed on: `accelerate launch` and
torchrun answer Ctrl-C by sending their children SIGTERM right after the terminal's SIGINT.

Forked children (DataLoader workers) inherit the handlers, which ignore the signals there: a
Ctrl-C reaches the whole process group, and the main process decides when its workers end.
SIGTERM is different: torch's workers install their own handler, and launchers and schedulers
(`accelerate launch`, SLURM) send it to every descendant, so workers may die once a stop was
requested. From the first request on, a worker's death is therefore no error (torch's SIGCHLD
check is set aside): the step being finished has its batch, or one already prefetched.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SAME_REQUEST_S = 1.0


class Stopped(Exception):
    """The run stopped on request at a step boundary (its checkpoint is written)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """The first stop signal received (`signum`, 0 while none); a context that installs the
    handlers (in the main thread only; elsewhere it records nothing) and restores the old ones."""

    def __init__(self, program: str = "vlp") -> None:
        self.program = program
        self.signum = 0
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker: its main process stops it
            return
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            # workers terminated by a launcher from now on are expected (restored on exit).
            # A Python no-op, not SIG_DFL: a SIGCHLD already pending for torch's handler would
            # otherwise find no Python handler and CPython prints "Signal 17 ignored due to race
            # condition" with a traceback
            previous = signal.signal(signal.SIGCHLD, _child_ended)
            if previous is not None:  # None: not set from Python, nothing to restore
                self._previous.setdefault(signal.SIGCHLD, previous)
            if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
                name = signal.Signals(signum).name
                line = f"{self.program}: {name}: stopping after this step (Ctrl-C again: at once)"
                os.write(2, f"{line}\n".encode())  # not print: the loop may be printing now
            return
        if signum != signal.SIGINT and now - self._first_at < SAME_REQUEST_S:
            return  # a launcher passing the same request on
        raise KeyboardInterrupt  # asked twice: stop at once


def _child_ended(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD after a stop request: nothing to do (the default disposition, from Python)."""
