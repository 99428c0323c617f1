"""Peak resident memory of a piece of code, measured in a fresh Python process (Linux /proc).

`grown_bytes(setup, code)` runs `setup`, resets the kernel's high-water mark of the process's
resident set (`/proc/self/clear_refs`, value 5), runs `code`, and returns how far the peak rose
above the resident set at the reset: the bytes `code` held at its worst moment, whatever
allocated them (torch, numpy, mapped files), and nothing that `setup` already held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc: large blocks always mapped and free memory returned, so the peak does not depend on which earlier
blocks the allocator happened to keep (its adaptive threshold otherwise makes it vary by megabytes)."""

_PRELUDE = """
import json

def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

"""

_MEASURE = """
with open("/proc/self/clear_refs", "w") as _f:
    _f.write("5")
_before = _status("VmRSS")
{code}
print("PEAK " + json.dumps(_status("VmHWM") - _before))
"""


def grown_bytes(setup: str, code: str, cwd: Path | None = None) -> int:
    """Bytes by which the peak resident set rose while `code` ran, after `setup` (both Python source)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak resident set")
    source = _PRELUDE + textwrap.dedent(setup) + _MEASURE.format(code=textwrap.dedent(code))
    root = Path(__file__).resolve().parents[2]
    env_path = f"{root}:{root / 'tests'}"
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, cwd=cwd or root, env={**os.environ, "PYTHONPATH": env_path, **_STEADY_MALLOC}
    )
    if done.returncode != 0:
        raise AssertionError(f"measured code failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PEAK "))
    return int(json.loads(line[5:]))
