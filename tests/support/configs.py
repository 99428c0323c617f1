"""Config dataclasses for tests: the composed `conf/` defaults with a test's own overrides.

The dataclasses have no defaults of their own (the YAML in `conf/` states each value once), so a
test that needs, say, a HarvestConfig asks for the default one and changes what it cares about.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def composed(*overrides: str) -> dict[str, Any]:
    """The composed config (with no overrides: what params.yaml holds), computed once per test session."""
    from token_journey.config import compose

    return compose(list(overrides))


def make(cls: type[T], **overrides: Any) -> T:
    """`cls` built from its default config section, with `overrides` applied.

    For an SAEConfig with `architecture=...`, the default section is that architecture's preset
    (conf/sae/<architecture>.yaml), else the plain JumpReLU preset (conf/sae/jumprelu.yaml).
    """
    from token_journey.config import CONF_DIR, build
    from token_journey.config.circuits import CircuitsConfig
    from token_journey.config.corpus import CorpusConfig
    from token_journey.config.eval import EvalConfig
    from token_journey.config.harvest import HarvestConfig
    from token_journey.config.journey import GenerationConfig, JourneyConfig
    from token_journey.config.model import ModelConfig
    from token_journey.config.report import ReportConfig
    from token_journey.config.sae import SAEConfig
    from token_journey.config.tracking import TrackingConfig

    sections = {
        ModelConfig: "model",
        CorpusConfig: "corpus",
        HarvestConfig: "harvest",
        SAEConfig: "sae",
        EvalConfig: "eval",
        ReportConfig: "report",
        TrackingConfig: "tracking",
        JourneyConfig: "journey",
        CircuitsConfig: "circuits",
    }
    if cls is GenerationConfig:
        section = composed()["journey"]["generation"]
    elif cls is SAEConfig and (CONF_DIR / "sae" / f"{overrides.get('architecture')}.yaml").is_file():
        # Start from the architecture's own preset: keys it ignores hold 0 there, as SAEConfig requires.
        section = dict(composed(f"sae={overrides['architecture']}")["sae"])
    elif cls is SAEConfig:  # an architecture without a preset of its own (a transcoder): the plain JumpReLU recipe's keys
        section = dict(composed("sae=jumprelu")["sae"])
    else:
        section = dict(composed()[sections[cls]])
        if cls is JourneyConfig:
            section["generation"] = make(GenerationConfig)
    return build(cls, {**section, **overrides}, cls.__name__)


def make_sae(architecture: str, *, k: int, coefficient: float, **overrides: Any) -> Any:
    """An SAEConfig for `architecture` from its preset, with `k` or `coefficient`, whichever it uses.

    The other one stays 0, as SAEConfig requires of a key the architecture ignores, so one test body
    can loop over every architecture. Matryoshka keeps its preset's prefixes (1/16 ... 1 of the width),
    which need a width of at least 16. `b_dec` starts at the data mean unless a test asks otherwise: the TopK
    preset's geometric median needs a first batch, which `new_sae` then takes (tested on its own).
    """
    from token_journey.config.sae import SAEConfig
    from token_journey.sae.registry import USES_K

    uses_k = architecture in USES_K
    overrides.setdefault("b_dec_init", "mean")
    return make(SAEConfig, architecture=architecture, k=k if uses_k else 0, sparsity_coefficient=0.0 if uses_k else coefficient, **overrides)
