"""benchmarks/rehearsal.py: its overrides compose at both shapes (offline, the GPU profile's widths, every
layer), and its per-stage figure is the stage's own peak, which `wait4` reports for a child's children."""

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


def test_run_measured_reports_the_peak_of_a_grandchild(tmp_path):
    """A 300 MB allocation two processes down (as dvc -> stage) shows in the figure; the parent's own doesn't hide it."""
    grandchild = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'b = bytearray(300 * 2**20)'], check=True)"
    code, seconds, peak = run_measured([sys.executable, "-c", grandchild], tmp_path, {}, tmp_path / "log")
    assert code == 0 and seconds > 0 and 300 * 2**20 < peak < 600 * 2**20
