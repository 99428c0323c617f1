"""The circuits branch end to end with DVC on the tiny profile: its own pipeline file, apart from `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO
from test_pipeline import _run, _stages_run, make_project


def _ran(output: str) -> set[str]:
    """Stages run, without the `circuits/dvc.yaml:` prefix DVC gives the branch's."""
    return {name.split(":")[-1] for name in _stages_run(output)}


CIRCUITS = """circuits:
  layers: [0, 1, 2]
  train_tokens: 4096
  eval_tokens: 1024
  max_prompt_tokens: 32
  transcoder: {width: 64, batch_size: 256, train_tokens: 4096, eval_tokens: 1024, buffer_rows: 2048, dead_window_tokens: 2048,
               lr_warmup_steps: 2, sparsity_warmup_steps: 4, log_every: 4, checkpoint_every: 0}
"""


@pytest.mark.slow
def test_circuits_branch_end_to_end(tmp_path):
    root = make_project(tmp_path)
    shutil.copytree(REPO / "circuits", root / "circuits")
    profile = root / "conf/profile/tiny.yaml"
    profile.write_text(profile.read_text() + CIRCUITS)
    env = dict(os.environ, PYTHONPATH=str(root))
    params = subprocess.run([shutil.which("python"), "-m", "token_journey.config"], cwd=root, capture_output=True, text=True, env=env, check=True).stdout
    (root / "params.yaml").write_text(params)

    # The default pipeline does not know the branch.
    default = _run(["dvc", "stage", "list"], root)
    assert "circuits" not in default

    out = _run(["dvc", "repro", "circuits/dvc.yaml"], root)
    ran = _ran(out)
    assert {"circuits_harvest", "circuits_train@0", "circuits_train@2", "circuits_attribute"} <= ran
    assert "evaluate@0" not in ran and "report" not in ran  # only what the branch needs upstream
    graphs = sorted((root / "reports/circuits").glob("*.json"))
    metrics = json.loads(next(p for p in graphs if p.name.endswith(".metrics.json")).read_text())
    assert metrics["logits_max_abs_diff"] <= 1e-4 and metrics["completeness_error"] <= 1e-4
    graph = json.loads(next(p for p in graphs if not p.name.endswith(".metrics.json")).read_text())
    assert graph["metadata"]["scan"] == "tiny/" + yaml.safe_load(params)["circuits"]["transcoder"]["name"]
    assert list((root / "reports/circuits").glob("*.html"))
    # Nothing changed, nothing runs; a changed transcoder setting reruns training and the graph, not the harvest.
    assert not _ran(_run(["dvc", "repro", "circuits/dvc.yaml"], root))
    config = yaml.safe_load(params)
    config["circuits"]["transcoder"]["lr"] = 0.001
    (root / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    again = _ran(_run(["dvc", "repro", "circuits/dvc.yaml"], root))
    assert "circuits_harvest" not in again and {"circuits_train@1", "circuits_attribute"} <= again
