"""benchmarks/rehearsal.py: its overrides compose at both shapes (offline, the GPU profile's widths, every
layer), and its per-stage figures are the stage's own peak, which `wait4` reports for a child's children, and its time."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from rehearsal import MODELS, overrides, run_measured  # noqa: E402

from token_journey.config import compose  # noqa: E402


@pytest.mark.parametrize("shape", sorted(MODELS))
def test_overrides_compose_the_rehearsal_offline(shape):
    conf = compose(overrides(shape))
    assert conf["model"]["source"] == "rehearsal" and conf["model"]["id"] == shape
    assert conf["corpus"]["name"] == compose(["corpus=offline"])["corpus"]["name"]  # the offline corpus, no network
    assert conf["sae"]["width"] == compose(["profile=gpu"])["sae"]["width"] >= 16384
    assert conf["family"], "the default family trains beside `sae`"


def test_run_measured_reports_the_peak_and_the_time_of_a_stage_grandchild(tmp_path):
    """A 300 MB allocation two processes down (as dvc -> stage) shows in the figure, and the time the
    `stages/` process ran is told apart from its parent's own second."""
    stage = tmp_path / "stages" / "fake.py"
    stage.parent.mkdir()
    stage.write_text("import time\nb = bytearray(300 * 2**20)\ntime.sleep(1.5)\n")
    parent = f"import subprocess, sys, time; subprocess.run([sys.executable, {str(stage)!r}], check=True); time.sleep(1.0)"
    code, seconds, in_stages, peak = run_measured([sys.executable, "-c", parent], tmp_path, {}, tmp_path / "log", every_s=0.1)
    assert code == 0 and peak > 300 * 2**20  # at least the forking process's resident set too: pytest's, here
    assert 1.0 <= in_stages <= 2.2 and seconds >= in_stages + 0.8, (seconds, in_stages)
