"""Stopping on a scheduler's request: SIGTERM (Slurm, Kubernetes, spot instances) and SIGUSR1 (`sbatch
--signal=USR1@120`, sent before the time limit).

Python's default for SIGTERM is to die on the spot, losing everything since the last checkpoint. Every
stage runs inside `stop_requests(listen=False)`, which catches the signals; the long loops (training
steps, harvest batches) run inside `stop_requests()`, which listens: there a signal only raises a flag,
and the loop looks at it between units of work, saves what is complete (training: a checkpoint of the
step just finished; harvest: the shards already renamed into place, dropping the one in flight) and
raises `Preempted`. Where no loop listens (loading a model, writing a report) the signal raises
`Preempted` at once, as Ctrl-C would raise KeyboardInterrupt: every output is written under a temporary
name and renamed when complete, so nothing half-written is left. Either way the stage prints one line
and exits with `PREEMPTED_EXIT`, which a job script can requeue on (`[ $? -eq 75 ] && scontrol requeue
$SLURM_JOB_ID`); rerunning the same command resumes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from token_journey.errors import TokenJourneyError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75
"""sysexits' EX_TEMPFAIL: the work stopped on request and a rerun continues it."""


class Preempted(TokenJourneyError):
    """The run stopped on SIGTERM/SIGUSR1 after saving its progress; rerun to resume."""


class StopRequest:
    """Which stop signal arrived (None while none has), and how far the loop had got then."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.done: int | None = None
        """The units of work (steps, shards) finished when the signal arrived, as the loop last reported them."""
        self._done: int | None = None
        self.listeners = 0
        """How many loops that look at the flag are running (none: a signal stops the process at once)."""

    def at(self, done: int) -> None:
        """The loop reports how many units of work it has finished, so the signal's moment can be stated."""
        self._done = done

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal, self.done = signal.Signals(signum).name, self._done
        if not self.listeners:
            raise Preempted(f"{self.signal} received; stopped at once (complete outputs are kept, none is half-written); rerun the same command to resume")

    @property
    def requested(self) -> bool:
        return self.signal is not None


_active: StopRequest | None = None


@contextmanager
def stop_requests(listen: bool = True) -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGUSR1 for the duration of the block, then restore the handlers.

    `listen`: the block looks at `requested` between units of work; a signal then only sets the flag.
    Re-entrant: inside another such block (a stage wraps its whole run in one) this is the same request,
    so a signal that arrives between two loops (after the last step of one SAE of a family) stops the
    next one at its first step. Outside the main thread (where Python cannot install handlers) the
    request never fires and the signals keep their usual effect.
    """
    global _active
    if _active is not None:
        with _listening(_active, listen):
            yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    _active = request
    try:
        with _listening(request, listen):
            yield request
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _listening(request: StopRequest, listen: bool) -> Iterator[None]:
    request.listeners += listen
    try:
        yield
    finally:
        request.listeners -= listen
