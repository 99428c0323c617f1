"""What the token journey follows and shows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from token_journey.errors import TokenJourneyError


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    temperature: float
    """Divides the logits before sampling; 0 = greedy."""
    top_k: int
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float
    """Sample only among the most likely tokens whose mass reaches top_p; 1 = no limit."""
    max_new_tokens: int
    """Tokens to generate after the text (0 = none)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TokenJourneyError(f"journey.generation.temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise TokenJourneyError(f"journey.generation.top_k={self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise TokenJourneyError(f"journey.generation.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 0:
            raise TokenJourneyError(f"journey.generation.max_new_tokens={self.max_new_tokens} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class JourneyConfig:
    text: str
    """The sentence followed through the network."""
    top_next: int
    """Most likely next tokens listed after the final softmax."""
    lens_top: int
    """Tokens per position and layer in the logit lens."""
    feature_top: int
    """SAE features per token, layer and SAE."""
    generation: GenerationConfig
    """Seeded sampling after the journey."""

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise TokenJourneyError("journey.text is empty; set journey.text='The capital of France is' (or --text)")
        for name in ("top_next", "lens_top", "feature_top"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"journey.{name}={getattr(self, name)} must be at least 1")


def journey_config(section: Mapping[str, Any] | Any) -> JourneyConfig:
    """Build JourneyConfig (with its nested generation section) from `cfg.journey`."""
    from token_journey.config import build

    if not isinstance(section, Mapping):
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section)
    generation = build(GenerationConfig, section.pop("generation", {}) or {}, "journey.generation")
    return build(JourneyConfig, {**section, "generation": generation}, "journey")
