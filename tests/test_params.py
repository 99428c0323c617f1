"""One source of config truth: conf/ composes to the committed params.yaml."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import REPO
from token_journey.config import compose


def test_params_yaml_is_the_composed_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == compose(), "params.yaml is stale: run `python -m token_journey.config > params.yaml`"


def test_overrides_reach_the_composed_config():
    cfg = compose(["layer=3", "model=llama-3.2-1b"])
    assert cfg["layer"] == 3
    assert cfg["paths"]["base_model"] == "models/base/llama-3.2-1b"


def test_stage_reads_params_yaml_under_dvc(tmp_path):
    """A stage run the way dvc.yaml runs it sees params.yaml, not conf/ (so `-S` takes effect)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["source"] = "local"
    params["model"]["id"] = str(tmp_path / "nowhere")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run(
        [sys.executable, str(REPO / "stages/prepare_model.py"), "--config-path", str(tmp_path), "--config-name", "params"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: local model folder '{tmp_path / 'nowhere'}' has no config.json")
