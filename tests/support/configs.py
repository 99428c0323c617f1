"""Config dataclasses for tests: the composed `conf/` defaults with a test's own overrides.

The dataclasses have no defaults of their own (the YAML in `conf/` states each value once), so a
test that needs, say, a HarvestConfig asks for the default one and changes what it cares about.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def composed() -> dict[str, Any]:
    """The default composed config (what params.yaml holds), computed once per test session."""
    from token_journey.config import compose

    return compose()


def make(cls: type[T], **overrides: Any) -> T:
    """`cls` built from its default config section, with `overrides` applied."""
    from token_journey.config import build
    from token_journey.config.corpus import CorpusConfig
    from token_journey.config.eval import EvalConfig
    from token_journey.config.harvest import HarvestConfig
    from token_journey.config.journey import GenerationConfig, JourneyConfig
    from token_journey.config.model import ModelConfig
    from token_journey.config.report import ReportConfig
    from token_journey.config.sae import SAEConfig
    from token_journey.config.tracking import TrackingConfig

    sections = {ModelConfig: "model", CorpusConfig: "corpus", HarvestConfig: "harvest", SAEConfig: "sae",
                EvalConfig: "eval", ReportConfig: "report", TrackingConfig: "tracking", JourneyConfig: "journey"}
    if cls is GenerationConfig:
        section = composed()["journey"]["generation"]
    else:
        section = dict(composed()[sections[cls]])
        if cls is JourneyConfig:
            section["generation"] = make(GenerationConfig)
    return build(cls, {**section, **overrides}, cls.__name__)
