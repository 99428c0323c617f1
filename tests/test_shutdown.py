"""Multi-process stages end together: a clean run leaves the process group without a transport error, and a
process that fails makes the others stop with one line (the failed process's own) instead of hanging."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

from support.torchrun import failure_report, process_lines, run, torchrun_command

STAGE = REPO / "tests/support/probe_stage.py"


def _launch(tmp_path, fail_rank: int, when: str = "early"):
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1", FAIL_RANK=str(fail_rank), FAIL_WHEN=when)
    done = run([*torchrun_command(tmp_path / "logs"), str(STAGE), f"hydra.run.dir={tmp_path / 'hydra'}"], env, tmp_path, timeout=120)
    return done, process_lines(tmp_path / "logs")


def test_a_clean_run_ends_together(tmp_path):
    done, lines = _launch(tmp_path, fail_rank=-1)
    assert done.returncode == 0, failure_report(done, tmp_path / "logs")
    for rank in (0, 1):
        assert f"process {rank} summed 2" in lines[rank], failure_report(done, tmp_path / "logs")


@pytest.mark.parametrize(("fail_rank", "when"), [(1, "early"), (0, "early"), (1, "late")])
def test_one_failing_process_stops_the_others_with_its_line(tmp_path, fail_rank, when):
    done, lines = _launch(tmp_path, fail_rank, when)
    other = 1 - fail_rank
    assert done.returncode != 0, failure_report(done, tmp_path / "logs")
    planted = f"a planted failure {'before' if when == 'early' else 'after'} the collective"
    errors = {rank: [line for line in lines.get(rank, []) if line.startswith("error:")] for rank in (0, 1)}
    assert errors[fail_rank] == [f"error: process {fail_rank} of 2: {planted}"], failure_report(done, tmp_path / "logs")
    # The other process names the failed one and its reason, in one line, with no traceback of its own.
    assert len(errors[other]) == 1, failure_report(done, tmp_path / "logs")
    assert f"process {fail_rank} of 2 failed: {planted}" in errors[other][0], failure_report(done, tmp_path / "logs")
    assert not any("Traceback" in line for line in lines.get(other, [])), failure_report(done, tmp_path / "logs")
