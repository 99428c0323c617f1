"""Run a command under torchrun so that a failure shows what each process said, not only torchrun's summary.

Each process's stdout and stderr go to files under `log_dir` (`--log-dir --redirects 3`), which torchrun
cannot lose: its `--tee` copy to the console is done by threads of its own that stop when torchrun is
itself signalled, possibly before a worker's last line. `process_lines` reads those files (the newest
run's), and `failure_report` is the assertion message: each process's last lines, then torchrun's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def torchrun_command(log_dir: Path, nproc: int = 2) -> list[str]:
    """The launcher part of a command: torchrun with `nproc` processes, each one's output in files under `log_dir`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "--tee",
        "3",
    ]


def process_lines(log_dir: Path) -> dict[int, list[str]]:
    """Each process's lines (stdout, then stderr) of the newest run under `log_dir`, by rank."""
    runs = sorted((p for p in Path(log_dir).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if Path(log_dir).is_dir() else []
    lines: dict[int, list[str]] = {}
    if not runs:
        return lines
    for folder in sorted(runs[-1].glob("attempt_*/*")):
        rank = int(folder.name)
        for stream in ("stdout.log", "stderr.log"):
            if (folder / stream).is_file():
                lines.setdefault(rank, []).extend((folder / stream).read_text(errors="replace").splitlines())
    return lines


def failure_report(done: subprocess.CompletedProcess, log_dir: Path, tail: int = 25) -> str:
    """Each process's last `tail` lines, then torchrun's own last lines, for an assertion message."""
    parts = [f"exit status {done.returncode}"]
    for rank, lines in sorted(process_lines(log_dir).items()):
        parts.append(f"--- process {rank} ---\n" + "\n".join(lines[-tail:]))
    own = [line for line in (done.stderr or "").splitlines() if not line.startswith("[default")]
    parts.append("--- torchrun ---\n" + "\n".join(own[-tail:]))
    return "\n".join(parts)


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a torchrun command to its end (or `timeout`), capturing its console output."""
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
