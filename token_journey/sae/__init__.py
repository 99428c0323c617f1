"""Sparse autoencoders: four architectures on one base, training, and folder I/O.

`ARCHITECTURES` maps a name (`cfg.json`'s `architecture`) to its class; `build_sae` makes one.
"""

from __future__ import annotations

from token_journey.errors import TokenJourneyError
from token_journey.sae.base import SAE, SAECfg
from token_journey.sae.batchtopk import BatchTopKSAE
from token_journey.sae.jumprelu import JumpReLUSAE
from token_journey.sae.relu import ReLUSAE
from token_journey.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, BatchTopKSAE, ReLUSAE)
}


def build_sae(cfg: SAECfg) -> SAE:
    """An SAE of `cfg.architecture` with zero weights (call `init_weights` or load tensors)."""
    if cfg.architecture not in ARCHITECTURES:
        raise TokenJourneyError(
            f"unknown SAE architecture {cfg.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    if cfg.architecture in ("topk", "batchtopk") and cfg.k < 1:
        raise TokenJourneyError(f"sae.k={cfg.k}: {cfg.architecture} needs k between 1 and the width {cfg.d_sae}")
    return ARCHITECTURES[cfg.architecture](cfg)


from token_journey.sae.io import find_saes, load_sae, save_sae  # noqa: E402  (io needs build_sae)

__all__ = ["ARCHITECTURES", "SAE", "SAECfg", "build_sae", "find_saes", "load_sae", "save_sae"]
