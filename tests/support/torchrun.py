"""Run a command under torchrun so that a failure shows what each process said, not only torchrun's summary.

`--tee 3` makes torchrun prefix each worker's stdout and stderr lines with `[default<rank>]:`; `by_process`
sorts them back per process, and `failure_report` is the assertion message: each process's last lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PREFIX = re.compile(r"^\[default(\d+)\]:(.*)$")


def torchrun_command(nproc: int = 2, port: int | None = None) -> list[str]:
    """The launcher part of a command: torchrun with `nproc` processes, each line tagged with its process."""
    where = ["--master_port", str(port)] if port else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(nproc), "--tee", "3"]


def by_process(output: str) -> dict[int, list[str]]:
    """The lines of each process (by rank) in torchrun's tagged output; torchrun's own lines under -1."""
    lines: dict[int, list[str]] = {}
    for line in output.splitlines():
        match = PREFIX.match(line)
        rank, text = (int(match[1]), match[2]) if match else (-1, line)
        lines.setdefault(rank, []).append(text)
    return lines


def failure_report(done: subprocess.CompletedProcess, tail: int = 25) -> str:
    """Each process's last `tail` lines (stdout and stderr), then torchrun's own last lines."""
    lines = by_process((done.stdout or "") + "\n" + (done.stderr or ""))
    parts = [f"exit status {done.returncode}"]
    for rank in sorted(lines):
        name = "torchrun" if rank < 0 else f"process {rank}"
        parts.append(f"--- {name} ---\n" + "\n".join(lines[rank][-tail:]))
    return "\n".join(parts)


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a torchrun command to its end (or `timeout`), capturing the tagged output."""
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
