"""wandb tracking: offline runs are written locally, named after the DVC experiment and grouped by its baseline."""

from __future__ import annotations

import os

import pytest

from support.configs import make
from token_journey.config.tracking import TrackingConfig
from token_journey.errors import TokenJourneyError
from token_journey.tracking import run_mode, start_run


def test_disabled_mode_starts_nothing(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_run({"a": 1}, make(TrackingConfig, mode="offline"), "train_sae") is None


def test_environment_wins_over_config(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_mode(make(TrackingConfig, mode="online")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's old name for offline
    assert run_mode(make(TrackingConfig, mode="online")) == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert run_mode(make(TrackingConfig, mode="offline")) == "offline"


def test_an_empty_wandb_mode_is_dropped_with_a_warning_and_a_bad_one_is_one_line(monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "")
    with caplog.at_level("WARNING", logger="token_journey.tracking"):
        assert run_mode(make(TrackingConfig, mode="disabled")) == "disabled"
    assert "WANDB_MODE is set but empty" in caplog.text and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(TokenJourneyError, match=r"^WANDB_MODE='onlin' is not one of offline, online, disabled"):
        run_mode(make(TrackingConfig, mode="offline"))


@pytest.mark.slow
def test_the_stage_with_an_empty_wandb_mode_trains_and_a_bad_one_stops_in_one_line(tmp_path):
    """What a job script does: `WANDB_MODE= python stages/train_sae.py tracking=online ...`."""
    from test_sae_stage import _run, _write_split

    acts = tmp_path / "acts"
    _write_split(acts / "resid_post" / "layer_0", 256, 1)
    _write_split(acts / "resid_post" / "layer_0" / "eval", 128, 2)
    env = {"WANDB_MODE": "", "WANDB_SILENT": "true", "HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc")}
    done = _run(tmp_path, acts, "tracking=online", f"tracking.dir={tmp_path}", env=env)
    assert done.returncode == 0 and "WANDB_MODE is set but empty" in done.stdout + done.stderr, done.stderr[-2000:]
    bad = _run(tmp_path / "bad", acts, "tracking=online", env={"WANDB_MODE": "onlne"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: WANDB_MODE='onlne' is not one of")


@pytest.mark.slow
def test_offline_run_is_written_locally_with_the_experiment_name(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lucid-owl")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = start_run({"sae": {"k": 32}}, make(TrackingConfig, mode="offline", dir=str(tmp_path)), "train_sae", name="topk")
    assert run is not None
    run.log({"train/fvu": 0.5})
    assert run.name == "exp-lucid-owl-topk" and run.group == "dvc-01234567"  # shared by the experiments queued from that commit
    assert run.config["sae"]["k"] == 32
    run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path, caplog):
    """No API key and no ~/.netrc entry: one warning and an offline run, not a login prompt or a traceback."""
    from token_journey.tracking import has_credentials

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert not has_credentials()
    with caplog.at_level("WARNING", logger="token_journey.tracking"):
        run = start_run({"a": 1}, make(TrackingConfig, mode="online", dir=str(tmp_path)), "report")
    try:
        assert run is not None and run.settings.mode == "offline"
        assert "no wandb credentials" in caplog.text and "wandb sync" in caplog.text
    finally:
        run.finish()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_credentials()
