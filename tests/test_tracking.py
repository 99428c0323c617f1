"""wandb tracking: offline runs are written locally, named after the DVC experiment and grouped by its baseline."""

from __future__ import annotations

import pytest

from support.configs import make
from token_journey.config.tracking import TrackingConfig
from token_journey.tracking import run_mode, start_run


def test_disabled_mode_starts_nothing(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_run({"a": 1}, make(TrackingConfig, mode="offline"), "train_sae") is None


def test_environment_wins_over_config(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_mode(make(TrackingConfig, mode="online")) == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert run_mode(make(TrackingConfig, mode="offline")) == "offline"


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
