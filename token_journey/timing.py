"""`python -m token_journey.timing [dvc repro args]`: run `dvc repro`, then print and record how
long each stage took and its peak memory.

The figures go to `reports/pipeline_timing.json`, so the 20-minute / 8 GB budget of the default
pipeline is measured on every full run rather than guessed. Per stage, the peak memory is the
largest resident set of the whole `dvc repro` process tree seen while that stage ran (sampled
twice a second from /proc, so a peak shorter than that can be missed; dvc's own ~0.2 GB is
included); the run's overall figure is the kernel's exact peak of the largest single process.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from token_journey.errors import TokenJourneyError
from token_journey.layout import atomic_write_text

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of process `root` and all its descendants now (Linux /proc; 0 elsewhere)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(entry.parent.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


class _PeakSampler:
    """Samples the RSS of a process tree in a thread; `take()` returns the peak since the last take."""

    def __init__(self, root: int, every_s: float = 0.5) -> None:
        self.root, self.every_s, self.peak = root, every_s, 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            rss = tree_rss_bytes(self.root)
            with self._lock:
                self.peak = max(self.peak, rss)

    def take(self) -> int:
        with self._lock:
            peak, self.peak = self.peak, tree_rss_bytes(self.root)
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_repro(args: list[str], record: Path = Path("reports/pipeline_timing.json")) -> int:
    """Stream `dvc repro` output, timing each 'Running stage' block and its peak RSS; returns dvc's exit code."""
    start = time.perf_counter()
    times: dict[str, float] = {}
    peaks: dict[str, int] = {}
    current, since = None, start
    proc = subprocess.Popen(["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = _PeakSampler(proc.pid)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        match = STAGE_LINE.match(line)
        if match:
            now = time.perf_counter()
            peak = sampler.take()
            if current:
                times[current], peaks[current] = now - since, peak
            current, since = match.group(1), now
    code = proc.wait()
    end = time.perf_counter()
    peak = sampler.take()
    sampler.stop()
    if current:
        times[current], peaks[current] = end - since, peak
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    summary = {
        "stages_s": {k: round(v, 1) for k, v in times.items()},
        "total_s": round(end - start, 1),
        "stages_peak_rss_gb": {k: round(v / 1024**3, 2) for k, v in peaks.items()},
        "peak_rss_gb": round(peak_gb, 2),
        "exit_code": code,
    }
    print("\nstage times (peak RSS of the process tree while the stage ran):")
    for name, seconds in summary["stages_s"].items():
        print(f"  {name:<24} {seconds:8.1f} s {summary['stages_peak_rss_gb'][name]:8.2f} GB")
    print(f"  {'total':<24} {summary['total_s']:8.1f} s   peak memory of one stage: {summary['peak_rss_gb']:.2f} GB")
    if times:  # a no-op repro leaves the last full run's record in place
        atomic_write_text(record, json.dumps(summary, indent=1) + "\n")  # whole, or one line on a full disk
    return code


def main(argv: list[str]) -> int:
    """`run_repro`, with a `TokenJourneyError` (e.g. a disk too full for the record) as one line and status 2."""
    try:
        return run_repro(argv)
    except TokenJourneyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
