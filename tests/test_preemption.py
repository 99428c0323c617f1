"""Stop signals (token_journey.preemption): a flag inside the loops that look at it, an immediate one-line
stop (status 75) anywhere else in a stage, and the previous handlers back afterwards.

The loops themselves are tested through the stages: tests/test_sae_resume.py (training) and
tests/test_harvest.py (harvest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from token_journey.preemption import PREEMPTED_EXIT, Preempted, stop_requests


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode of the main thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_listening_loop_gets_a_flag_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with stop_requests(listen=False) as outer:
        with stop_requests() as inner:
            assert inner is outer and not inner.requested
            inner.at(7)
            _signal_self(sig)  # no exception: the loop decides when to stop
            assert inner.requested and inner.signal == sig.name and inner.done == 7
        with pytest.raises(Preempted, match=f"^{sig.name} received; stopped at once"):
            _signal_self(sig)  # nobody listens any more: a second signal stops at once
    assert signal.getsignal(sig) is before


def test_where_nothing_listens_the_signal_stops_at_once():
    with pytest.raises(Preempted, match="rerun the same command to resume"), stop_requests(listen=False):
        _signal_self(signal.SIGTERM)
        pytest.fail("the signal did not stop the block")


def test_a_stage_that_looks_at_no_flag_still_stops_on_sigterm_in_one_line(tmp_path):
    """What the scheduler sees from, say, a report stage: exit status 75 and one line, not a hang until SIGKILL."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", SLEEP_S="120")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests/support/probe_stage.py"), f"hydra.run.dir={tmp_path}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: SIGTERM received; stopped at once") and "Traceback" not in err
