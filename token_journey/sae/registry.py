"""The SAE architectures by name: the one registry that config validation, building and loading share.

The classes are imported on first use, so this module (and the config that validates against it)
stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from token_journey.errors import TokenJourneyError

if TYPE_CHECKING:
    from token_journey.sae.base import SAE, SAESpec

TRANSCODERS = {"jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu", "topk_transcoder": "topk", "topk_skip_transcoder": "topk"}
"""Transcoder architectures (named as SAELens names its JumpReLU ones) -> the SAE architecture of their encoder.

A transcoder reads the MLP's input (`TRANSCODER_INPUT_SITE`) and predicts its output (`TRANSCODER_SITE`);
a `skip` one adds a linear map of its input, `x W_skip^T` (see `token_journey/sae/transcoder.py`)."""

ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "matryoshka", "relu", *TRANSCODERS)
"""Architecture names (`cfg.json`'s `architecture`, the `sae.architecture` config key); `sae_class` maps each to its class."""

TRANSCODER_INPUT_SITE = "mlp_in"
"""The site a transcoder reads: the MLP's input, after its pre-MLP norm."""
TRANSCODER_SITE = "mlp_out"
"""The site a transcoder predicts (and whose folders, evaluation and report it belongs to)."""

USES_K = frozenset({"topk", "batchtopk", "matryoshka", "topk_transcoder", "topk_skip_transcoder"})
"""Architectures whose encoder keeps k latents per token (k is ignored by the others)."""

USES_PREFIXES = frozenset({"matryoshka"})
"""Architectures trained so that nested prefixes of their latents reconstruct (prefixes are ignored by the others)."""


def check_architecture(architecture: str) -> None:
    """A one-line error unless `architecture` is registered."""
    if architecture not in ARCHITECTURES:
        raise TokenJourneyError(f"sae.architecture={architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def encoder_of(architecture: str) -> str:
    """The SAE architecture whose encoder and training step `architecture` uses (itself for a plain SAE)."""
    return TRANSCODERS.get(architecture, architecture)


def is_transcoder(architecture: str) -> bool:
    """True for the architectures that map `TRANSCODER_INPUT_SITE` to `TRANSCODER_SITE`."""
    return architecture in TRANSCODERS


def check_site(architecture: str, site: str) -> None:
    """A one-line error when a transcoder is asked to predict anything but the MLP output."""
    if is_transcoder(architecture) and site != TRANSCODER_SITE:
        raise TokenJourneyError(
            f"sae.architecture={architecture} predicts the MLP output from its input: run it with "
            f"site={TRANSCODER_SITE} (and harvest.sites including {TRANSCODER_INPUT_SITE} and "
            f"{TRANSCODER_SITE}), not site={site}"
        )


def check_k(architecture: str, k: int, width: int) -> None:
    """The one rule for k: an architecture in `USES_K` needs 1 <= k <= width."""
    if architecture in USES_K and not 1 <= k <= width:
        raise TokenJourneyError(f"sae.k={k} must be between 1 and the width {width} for {architecture}")


def prefix_sizes(fractions: tuple[float, ...], width: int) -> tuple[int, ...]:
    """Latent counts of the nested prefixes given as fractions of `width` (increasing, in (0, 1], the last 1).

    Each fraction is rounded to the nearest count; counts that round to 0 or to the same count as
    the previous prefix are refused, since such a prefix would train nothing of its own.
    """
    if not fractions or fractions[-1] != 1 or any(not 0 < f <= 1 for f in fractions):
        raise TokenJourneyError(f"sae.prefixes={list(fractions)} must be fractions of the width in (0, 1] ending with 1")
    sizes = tuple(round(f * width) for f in fractions)
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise TokenJourneyError(f"sae.prefixes={list(fractions)} give prefix sizes {list(sizes)} at width {width}; they must be strictly increasing and >= 1")
    return sizes


def check_prefixes(architecture: str, prefixes: tuple[int, ...], width: int) -> None:
    """The one rule for prefix sizes (in latents): increasing, the last the whole width, and only where used."""
    if architecture not in USES_PREFIXES:
        if prefixes:
            raise TokenJourneyError(f"SAE prefixes {list(prefixes)} apply to matryoshka only, not {architecture}")
        return
    if not prefixes or prefixes[-1] != width or prefixes[0] < 1 or any(b <= a for a, b in zip(prefixes, prefixes[1:])):
        raise TokenJourneyError(f"{architecture} prefix sizes {list(prefixes)} must increase from >= 1 to the width {width}")


def sae_class(architecture: str) -> type[SAE]:
    """The class registered for `architecture` (imported here, so torch loads only when an SAE is built)."""
    check_architecture(architecture)
    from token_journey.sae.batchtopk import BatchTopKSAE
    from token_journey.sae.jumprelu import JumpReLUSAE
    from token_journey.sae.matryoshka import MatryoshkaSAE
    from token_journey.sae.relu import ReLUSAE
    from token_journey.sae.topk import TopKSAE
    from token_journey.sae.transcoder import TRANSCODER_CLASSES

    classes = (JumpReLUSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, ReLUSAE, *TRANSCODER_CLASSES)
    return {cls.architecture: cls for cls in classes}[architecture]


def build_sae(spec: SAESpec, device: Any = "cpu") -> SAE:
    """An SAE of `spec.architecture` with zero weights on `device` (call `init_weights` or load tensors)."""
    return sae_class(spec.architecture)(spec, device)
