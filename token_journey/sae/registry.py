"""The SAE architectures by name: the one registry that config validation, building and loading share.

The classes are imported on first use, so this module (and the config that validates against it)
stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from token_journey.errors import TokenJourneyError

if TYPE_CHECKING:
    from token_journey.sae.base import SAE, SAESpec

ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "relu")
"""Architecture names (`cfg.json`'s `architecture`, the `sae.architecture` config key); `sae_class` maps each to its class."""

USES_K = frozenset({"topk", "batchtopk"})
"""Architectures whose encoder keeps k latents per token (k is ignored by the others)."""


def check_architecture(architecture: str) -> None:
    """A one-line error unless `architecture` is registered."""
    if architecture not in ARCHITECTURES:
        raise TokenJourneyError(f"sae.architecture={architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def check_k(architecture: str, k: int, width: int) -> None:
    """The one rule for k: an architecture in `USES_K` needs 1 <= k <= width."""
    if architecture in USES_K and not 1 <= k <= width:
        raise TokenJourneyError(f"sae.k={k} must be between 1 and the width {width} for {architecture}")


def sae_class(architecture: str) -> type[SAE]:
    """The class registered for `architecture` (imported here, so torch loads only when an SAE is built)."""
    check_architecture(architecture)
    from token_journey.sae.batchtopk import BatchTopKSAE
    from token_journey.sae.jumprelu import JumpReLUSAE
    from token_journey.sae.relu import ReLUSAE
    from token_journey.sae.topk import TopKSAE

    return {cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, BatchTopKSAE, ReLUSAE)}[architecture]


def build_sae(spec: SAESpec, device: Any = "cpu") -> SAE:
    """An SAE of `spec.architecture` with zero weights on `device` (call `init_weights` or load tensors)."""
    return sae_class(spec.architecture)(spec, device)
