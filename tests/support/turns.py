"""Two runs of the same command at once, made to overlap for certain: the first is started and frozen
(SIGSTOP) once it holds its output's lock, the second is started and read until it says it waits for the
first, then the first goes on (SIGCONT). Used by the tests of `token_journey.locks` through the stages."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

WAITING = "is being written by pid"
"""What the second run logs while it waits (token_journey.locks)."""


def run_overlapping(
    cmd: list[str], env: dict[str, str] | None, cwd: Path | None, started: Callable[[], bool], timeout: float = 300
) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run `cmd` twice, the second while the first, frozen once `started()` holds, owns the lock; both to the end."""
    first = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not started() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)
    said: list[str] = []
    try:
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in second.stdout:
            said.append(line)
            if WAITING in line:
                break
    finally:
        first.send_signal(signal.SIGCONT)
    said.extend(second.stdout)
    second.wait(timeout=timeout)
    first_out = first.communicate(timeout=timeout)[0]
    return (subprocess.CompletedProcess(cmd, first.returncode, first_out, ""), subprocess.CompletedProcess(cmd, second.returncode, "".join(said), ""))
