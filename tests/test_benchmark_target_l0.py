"""benchmarks/target_l0.py: the coefficient-tuned reference brackets the L0 and interpolates its FVU."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import target_l0  # noqa: E402


def _fake_run(calls):
    """A JumpReLU whose held-out L0 is 0.03 / coefficient^0.8 and whose FVU falls linearly in log L0."""

    def run(preset, overrides, tokens, *data):
        coefficient = float(next(o for o in overrides if o.startswith("sae.sparsity_coefficient=")).split("=")[1])
        calls.append(coefficient)
        l0 = 0.03 / coefficient**0.8
        return {"fvu": 0.6 - 0.1 * math.log(l0), "l0": l0, "dead_fraction": 0.0, "coefficient": coefficient, "threshold_scale": None}

    return run


def test_reference_brackets_the_l0_and_interpolates_the_fvu(monkeypatch):
    calls = []
    monkeypatch.setattr(target_l0, "run", _fake_run(calls))
    ref = target_l0.reference(32.0, 1e-4, 250_000, [], None, None, None)
    l0s = [r["l0"] for r in ref["runs"]]
    assert len(calls) <= target_l0.MAX_REFERENCE_RUNS
    assert any(abs(x / 32 - 1) < 0.03 for x in l0s) or (min(l0s) <= 32 < max(l0s)), l0s
    # FVU is exactly linear in log L0 here, so the interpolation must give the true value at 32.
    assert ref["fvu_at_l0"] == pytest.approx(0.6 - 0.1 * math.log(32), abs=2e-3 if len(l0s) == 1 else 1e-4)
