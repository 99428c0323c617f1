"""The per-stage memory figure of `token_journey.timing`: the RSS of a whole process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from token_journey.timing import tree_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tree_rss_counts_a_grandchild():
    """A grandchild holding 200 MiB (touched, so resident) raises the tree's RSS by at least that much."""
    ready = f"/tmp/tree-rss-{os.getpid()}"
    grandchild = f"import time; b = bytearray(200 * 2**20); open({ready!r}, 'w').close(); time.sleep(30)"
    child_code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    before = tree_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", child_code], start_new_session=True)  # its own group, ended whole
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(ready)
        assert tree_rss_bytes(os.getpid()) - before >= 200 * 2**20
        assert tree_rss_bytes(child.pid) >= 200 * 2**20
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if os.path.exists(ready):
            os.remove(ready)
