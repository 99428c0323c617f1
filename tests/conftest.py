"""Shared fixtures: tiny random models of each family, the packaged SmolLM2 prepared once, a tiny report built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["llama", "gemma2", "gemma3"])
def tiny(request):
    """A tiny random-weight model of each supported family (float32, eager attention)."""
    from support.tiny import tiny_model

    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M, prepared once per test session as a safetensors folder.

    Reuses the pipeline's own `models/base/smollm2-135m` when it exists and is complete.
    """
    from token_journey.config import build, compose
    from token_journey.config.model import ModelConfig
    from token_journey.lm import MANIFEST, prepare_model

    existing = REPO / "models/base/smollm2-135m"
    if (existing / MANIFEST).is_file():
        return existing
    out = tmp_path_factory.mktemp("base") / "smollm2-135m"
    prepare_model(build(ModelConfig, compose()["model"], "model"), out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The prepared SmolLM2 loaded in float32 on the CPU."""
    from token_journey.lm import load_prepared

    return load_prepared(smollm2_dir, device="cpu")


@pytest.fixture(scope="session")
def report_inputs(tmp_path_factory):
    """The report's inputs (`support/report_inputs.py`), written once per test session."""
    from support.report_inputs import write_inputs

    return write_inputs(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="session")
def report_built(report_inputs):
    """The report built once per test session from `report_inputs`, and the config it was built with."""
    from support.configs import make
    from token_journey.config.report import ReportConfig
    from token_journey.report import build_report

    cfg = make(ReportConfig, n_index=2, n_random=2, n_strongest=2, n_dense=2, top_k=6, n_quantile_contexts=4, window=3, n_logit_tokens=5, search_features=4)
    return build_report(cfg, report_inputs, seed=0), cfg
