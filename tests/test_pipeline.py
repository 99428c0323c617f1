"""The whole DVC DAG end to end on a tiny configuration, in a scratch copy of the project.

Proves: `dvc repro` runs every stage and writes every output; a second `dvc repro` does
nothing; `dvc exp run -S sae.<key>=...` re-runs only training, evaluation, report and journey,
and the stage really sees the new value (Hydra composition of conf/ into params.yaml).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from support.tiny import save_tiny

TINY_PROFILE = """# @package _global_
defaults:
  - override /model: local
  - override /corpus: local
  - override /tracking: disabled
model: {{name: tiny, id: {model}}}
corpus: {{path: '{texts}/*.txt', context_size: 32, max_tokens: 6144, eval_tokens: 1024, eval_fraction: 0.2}}
harvest: {{layers: [0, 2], batch_size: 8, shard_rows: 1024, row_group_rows: 256}}
layer: 0
sae: {{width: 64, target_l0: 8, batch_size: 256, train_tokens: 4096, checkpoint_every: 8, eval_tokens: 1024, buffer_rows: 2048,
       lr_warmup_steps: 2, sparsity_warmup_steps: 4, log_every: 4}}
family: {{small: {{target_l0: 4}}, big: {{target_l0: 16}}}}
eval: {{max_tokens: 512, batch_size: 8}}
report: {{n_index: 1, n_random: 2, n_strongest: 2, n_dense: 1, max_tokens: 2000, top_k: 5}}
journey: {{generation: {{max_new_tokens: 3}}}}
"""


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(cwd))
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout + run.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project whose conf/ selects a tiny model, corpus and SAE."""
    return make_project(tmp_path_factory.mktemp("pipeline"))


def make_project(root: Path, device: str = "auto") -> Path:
    """Fill `root` with a git + DVC copy of the project on the tiny profile, `device` set in conf/ and params.yaml."""
    for name in ("conf", "stages", "token_journey"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    model = save_tiny("llama", root / "tiny-model")
    texts = root / "texts"
    texts.mkdir()
    words = "the word travelled through every layer of the network and back again to the start".split()
    for i in range(40):
        (texts / f"{i:02d}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(60 + 7 * i)))
    (root / "conf/profile/tiny.yaml").write_text(TINY_PROFILE.format(model=model, texts=texts))
    config = (root / "conf/config.yaml").read_text().replace("  - profile: cpu", "  - profile: tiny")
    config = config.replace("\ndevice: auto\n", f"\ndevice: {device}\n")
    (root / "conf/config.yaml").write_text(config)
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")  # the project's DVC settings: Hydra, cache links
    params = subprocess.run(
        [shutil.which("python"), "-m", "token_journey.config"], cwd=root, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)), check=True
    ).stdout
    (root / "params.yaml").write_text(params)
    return root


@pytest.mark.slow
def test_dag_end_to_end_then_noop_then_experiment(project):
    out = _run(["dvc", "repro"], project)
    expected = {"prepare_model", "collect_corpus", "harvest", "train_sae@0", "train_sae@2", "evaluate@0", "evaluate@2", "report", "journey"}
    assert _stages_run(out) == expected
    params = yaml.safe_load((project / "params.yaml").read_text())
    for layer in (0, 2):
        metrics = json.loads((project / f"reports/metrics/tiny/resid_post/layer_{layer}.json").read_text())
        # `sae` and the two family members (conf/family/default.yaml: JumpReLU at target L0 4, 8 and 16 here), each evaluated.
        names = ["jumprelu-w64-target4", params["sae"]["name"], "jumprelu-w64-target16"]
        assert names[1] == "jumprelu-w64-target8" and set(metrics["saes"]) == set(names)
        for entry in metrics["saes"].values():
            assert 0 < entry["l0"] <= 64 and entry["fvu"] >= 0
        l0s = [metrics["saes"][name]["l0"] for name in names]
        assert l0s == sorted(l0s), l0s  # the held-out L0 follows the targets
    assert (project / "reports/html/index.html").is_file()
    assert (project / "reports/summary.md").is_file()
    assert list((project / "reports/journey").glob("*.html"))
    assert _stages_run(_run(["dvc", "repro"], project)) == set()  # nothing changed, nothing runs

    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    coefficient = params["sae"]["sparsity_coefficient"] * 2
    out = _run(["dvc", "exp", "run", "-S", f"sae.sparsity_coefficient={coefficient}"], project)
    assert _stages_run(out) == {"train_sae@0", "train_sae@2", "evaluate@0", "evaluate@2", "report", "journey"}
    saved = sorted((project / "models/saes/tiny/resid_post/layer_0").glob("*/cfg.json"))
    seen = [json.loads(p.read_text()) for p in saved]
    assert any(json.dumps(coefficient) in json.dumps(cfg) for cfg in seen), "the stage did not see the -S value"
