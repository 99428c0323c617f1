"""What the token journey follows and shows."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


_EDIT = re.compile(r"^\s*(tc\s*:\s*)?(\d+)\s*:\s*(\d+)\s*(?:@\s*(\d+)\s*)?(?:=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*)?$")


@dataclass(frozen=True)
class Edit:
    """One latent set to a value at one layer, on every position or one (an ablation sets it to 0).

    The latent is the layer's SAE's, or with `transcoder` its transcoder's: that one is computed from
    the MLP's input and its change written into the MLP's output (how a graph's node is intervened on).
    """

    layer: int
    latent: int
    value: float
    spec: str
    """The text it was parsed from, for messages and the page."""
    position: int | None = None
    """The one position edited (0 = the first token), or None for every position."""
    transcoder: bool = False


def parse_edit(spec: str, ablate: bool) -> Edit:
    """`"15:1234=8"` (steer: latent 1234 of layer 15's SAE set to 8) or `"5:77"` (ablate: set to 0), on every
    position; `"5:77@3"`: at position 3 only; `"tc:5:77@3"`: latent 77 of layer 5's transcoder.

    Only the syntax is checked here; whether layer 15 has an SAE with a latent 1234 is checked
    against the SAEs found when the journey runs.
    """
    match = _EDIT.match(str(spec))
    flag = "--ablate" if ablate else "--steer"
    if match is None or (ablate and match.group(5) is not None) or (not ablate and match.group(5) is None):
        form = "[tc:]LAYER:LATENT[@POSITION], e.g. 5:77 or tc:5:77@3" if ablate else "[tc:]LAYER:LATENT[@POSITION]=VALUE, e.g. 15:1234=8"
        raise TokenJourneyError(f"{flag} {spec!r} is malformed; write {form}")
    value = 0.0 if ablate else float(match.group(5))
    position = None if match.group(4) is None else int(match.group(4))
    return Edit(int(match.group(2)), int(match.group(3)), value, str(spec).strip(), position, match.group(1) is not None)


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
    steer: tuple[str, ...]
    """SAE latents set to a value on every position, `"LAYER:LATENT=VALUE"`; the pass is re-run with them."""
    ablate: tuple[str, ...]
    """SAE latents set to zero on every position, `"LAYER:LATENT"`."""
    target: str | None
    """The token whose logit is attributed to SAE latents (e.g. `" Paris"`); None = the predicted token."""
    versus: str | None
    """When set, the logit difference target - versus is attributed instead of the target's logit."""
    attribution_top: int
    """Latents listed per SAE in the attribution of the prediction."""
    saes: tuple[str, ...]
    """SAEs shown beside the run's `sae` (family member ids or SAE folder names; `all`: every SAE found)."""

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise TokenJourneyError("journey.text is empty; set journey.text='The capital of France is' (or --text)")
        for name in ("top_next", "lens_top", "feature_top", "attribution_top"):
            if getattr(self, name) < 1:
                raise TokenJourneyError(f"journey.{name}={getattr(self, name)} must be at least 1")
        for name in ("target", "versus"):
            if getattr(self, name) == "":
                raise TokenJourneyError(f"journey.{name} is empty; give a token such as ' Paris', or null")
        _ = self.edits  # parsed now, so a malformed spec stops before any model is loaded

    @property
    def edits(self) -> list[Edit]:
        """The steering and ablation specs, parsed, in the order given."""
        return [parse_edit(s, False) for s in self.steer] + [parse_edit(s, True) for s in self.ablate]


def shown_saes(extra: Sequence[str], sae: Mapping[str, Any], family: Mapping[str, Any] | None) -> list[str]:
    """The SAE folder names the journey shows: the run's `sae`, then each of `extra` (a member id of `family`
    stands for its folder name; anything else is a folder name, or `all` for every SAE found)."""
    family = family or {}
    return [str(sae["name"]), *(str(family[x]["name"]) if x in family else str(x) for x in extra)]


def journey_config(section: Mapping[str, Any] | Any) -> JourneyConfig:
    """Build JourneyConfig (with its nested generation section) from `cfg.journey`."""
    from token_journey.config import build

    if not isinstance(section, Mapping):
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section)
    generation = build(GenerationConfig, section.pop("generation", {}) or {}, "journey.generation")
    return build(JourneyConfig, {**section, "generation": generation}, "journey")
