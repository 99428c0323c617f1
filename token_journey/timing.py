"""`python -m token_journey.timing [dvc repro args]`: run `dvc repro`, then print and record how
long each stage took and the peak memory of the largest stage process.

The figures go to `reports/pipeline_timing.json`, so the 20-minute / 8 GB budget of the default
pipeline is measured on every full run rather than guessed.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def run_repro(args: list[str], record: Path = Path("reports/pipeline_timing.json")) -> int:
    """Stream `dvc repro` output, timing each 'Running stage' block; returns dvc's exit code."""
    start = time.perf_counter()
    times: dict[str, float] = {}
    current, since = None, start
    proc = subprocess.Popen(["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        match = STAGE_LINE.match(line)
        if match:
            now = time.perf_counter()
            if current:
                times[current] = now - since
            current, since = match.group(1), now
    code = proc.wait()
    end = time.perf_counter()
    if current:
        times[current] = end - since
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    summary = {"stages_s": {k: round(v, 1) for k, v in times.items()}, "total_s": round(end - start, 1),
               "peak_rss_gb": round(peak_gb, 2), "exit_code": code}
    print("\nstage times:")
    for name, seconds in summary["stages_s"].items():
        print(f"  {name:<24} {seconds:8.1f} s")
    print(f"  {'total':<24} {summary['total_s']:8.1f} s   peak memory of one stage: {summary['peak_rss_gb']:.2f} GB")
    if times:  # a no-op repro leaves the last full run's record in place
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(summary, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(run_repro(sys.argv[1:]))
