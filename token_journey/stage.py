"""What every `stages/*.py` entry point shares: Hydra wiring, logging and one-line errors.

A stage is a thin `main(cfg)` decorated with `@stage`. Run by hand it composes `conf/`
(`python stages/x.py key=value`, `-m` sweeps); run by DVC it reads the composed `params.yaml`
(`--config-path <repo> --config-name params`), which is what `dvc exp run -S key=value` rewrites.

Every way out goes through here. A `TokenJourneyError` is printed as one line on stderr and the process
exits with status 2; a stop on SIGTERM/SIGUSR1 (`Preempted`) with status 75, which schedulers can
requeue on. Under a launcher the line names the process, every process leaves the process group together
on success (`distributed.leave_processes`), and a process whose collective failed because another one
stopped prints that process's line and exits with status 3.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from token_journey.distributed import abandon_processes, current_processes, is_transport_error, leave_processes, peer_failure_line
from token_journey.errors import TokenJourneyError
from token_journey.preemption import PREEMPTED_EXIT, Preempted, stop_requests

REPO = Path(__file__).resolve().parents[1]
PEER_FAILED_EXIT = 3
"""Status of a process that stopped because another process of the same run did."""


def _stop(line: str, status: int, failure: str | None) -> None:
    """Print `line` as the one error line (naming the process under a launcher), leave the group, exit."""
    procs = current_processes()
    where = f"process {procs.index} of {procs.count}: " if procs.count > 1 and status != PEER_FAILED_EXIT else ""
    print(f"error: {where}{line}", file=sys.stderr, flush=True)
    abandon_processes(failure)
    sys.exit(status)


def run_guarded(func: Callable[[Any], Any], cfg: Any) -> Any:
    """`func(cfg)` with the exits described above; a bug still shows its traceback (after leaving the group)."""
    try:
        with stop_requests(listen=False):
            result = func(cfg)
        leave_processes()
        return result
    except Preempted as exc:
        _stop(str(exc), PREEMPTED_EXIT, f"it was asked to stop ({exc})")
    except TokenJourneyError as exc:
        _stop(str(exc), 2, str(exc))
    except Exception as exc:
        if is_transport_error(exc):
            _stop(peer_failure_line(exc), PEER_FAILED_EXIT, None)
        abandon_processes(f"{type(exc).__name__}: {str(exc)[:200]}")
        raise


def stage(func: Callable[[Any], Any]) -> Callable[[], Any]:
    """Wrap `func(cfg)` as a Hydra app on `conf/config.yaml` with friendly errors."""
    import hydra

    @functools.wraps(func)
    def guarded(cfg: Any) -> Any:
        logging.getLogger("token_journey").setLevel(logging.INFO)
        return run_guarded(func, cfg)

    return hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")(guarded)
