"""Stopping on a scheduler's request: SIGTERM (Slurm, Kubernetes, spot instances) and SIGUSR1 (`sbatch
--signal=USR1@120`, sent before the time limit).

Python's default for SIGTERM is to die on the spot, losing everything since the last checkpoint. Inside
`stop_requests()` the signals only raise a flag; the long loops (training steps, harvest batches) look
at it between units of work, save what is complete (training: a checkpoint of the step just finished;
harvest: the shards already renamed into place, dropping the one in flight), and raise `Preempted`.
The stage prints its one line and exits with `PREEMPTED_EXIT`, which a job script can requeue on
(`[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`); rerunning the same command resumes.
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

    def at(self, done: int) -> None:
        """The loop reports how many units of work it has finished, so the signal's moment can be stated."""
        self._done = done

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal, self.done = signal.Signals(signum).name, self._done

    @property
    def requested(self) -> bool:
        return self.signal is not None


_active: StopRequest | None = None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGUSR1 as a flag for the duration of the block, then restore the handlers.

    Re-entrant: inside another such block (a stage wraps its whole run in one) this is the same request,
    so a signal that arrives between two loops (two SAEs of a family) stops the next one at its first
    step instead of killing the process. Outside the main thread (where Python cannot install handlers)
    the request never fires and the signals keep their usual effect.
    """
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)
