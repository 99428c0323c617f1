"""One source of config truth: conf/ composes to the committed params.yaml."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from conftest import REPO

from token_journey.config import build, compose


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
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: local model folder '{tmp_path / 'nowhere'}' has no config.json")


GROUPS = {
    "model": "ModelConfig",
    "corpus": "CorpusConfig",
    "harvest": "HarvestConfig",
    "sae": "SAEConfig",
    "eval": "EvalConfig",
    "report": "ReportConfig",
    "journey": "JourneyConfig",
    "tracking": "TrackingConfig",
}


def _config_classes() -> list[type]:
    import dataclasses
    import importlib

    from token_journey.layout import Layout

    classes = [getattr(importlib.import_module(f"token_journey.config.{group}"), name) for group, name in GROUPS.items()]
    classes.append(importlib.import_module("token_journey.config.journey").GenerationConfig)
    classes.append(importlib.import_module("token_journey.config.report").ExplainerConfig)
    return [c for c in classes if dataclasses.is_dataclass(c)] + [Layout]


def test_config_values_are_stated_once_in_conf_not_in_the_dataclasses():
    """A default in a dataclass beside the one in conf/ would drift from it (they once disagreed)."""
    import dataclasses

    classes = _config_classes()
    assert len(classes) == 11
    defaulted = [
        f"{c.__name__}.{f.name}"
        for c in classes
        for f in dataclasses.fields(c)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == []


def test_every_option_of_every_group_builds():
    """Each file of conf/<group>/ states every key of its dataclass and passes validation."""
    from token_journey.config import build
    from token_journey.config.journey import journey_config
    from token_journey.layout import Layout

    built = 0
    for group, name in GROUPS.items():
        cls = getattr(__import__(f"token_journey.config.{group}", fromlist=[name]), name)
        for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
            cfg = compose([f"{group}={option}"])
            section = cfg[group]
            built += bool(journey_config(section) if group == "journey" else build(cls, section, group))
            Layout.from_config(cfg["paths"])
    assert built >= 17


def test_a_whole_number_given_for_a_float_key_builds_as_a_float():
    """`sae.adam_beta1=0` is parsed by Hydra as an int; torch's Adam refuses betas of mixed types."""
    from token_journey.config.sae import SAEConfig

    cfg = build(SAEConfig, compose(["sae=jumprelu-l0", "sae.adam_beta1=0", "sae.topk_warmup_fraction=0"])["sae"], "sae")
    assert type(cfg.adam_beta1) is float and type(cfg.topk_warmup_fraction) is float and type(cfg.batch_size) is int
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], betas=(cfg.adam_beta1, cfg.adam_beta2))
