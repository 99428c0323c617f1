"""Which SAEs one `train_sae` stage trains on its layer: `sae`, then each member of `family`.

The family (conf/family/) gives every layer a small Pareto front across L0 buckets without a
DVC stage per member: one stage per layer trains them one after another, and a member whose
folder already holds an SAE trained with its exact config is kept (`train_layer`), so adding a
member trains only that member. A sweep of `sae` (Hydra multirun, `dvc exp run -S sae.*`) trains
`sae` alone: it studies that one SAE, and its members would otherwise retrain the same family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from token_journey.config import build
from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError

log = logging.getLogger(__name__)


def sweeps_sae(overrides: list[str]) -> bool:
    """Whether a sweep member's overrides (`token_journey.sweeps.SweepMember`) change `sae`."""
    return any(o.split("=", 1)[0] == "sae" or o.startswith("sae.") for o in overrides)


def layer_saes(sae: SAEConfig, name: str, family: Mapping[str, Any], sweep: bool) -> list[tuple[str, SAEConfig]]:
    """(folder name, config) of every SAE to train on the layer: `sae` as `name`, then the members of
    `family` (id -> an `sae` section) under their own `name`, unless `sweep`.

    Two entries that would write one folder are one SAE when their configs agree, and an error
    naming the member otherwise (its folder name comes from its sae option and keys).
    """
    saes = [(name, sae)]
    if sweep:
        if family:
            log.info("a sweep of `sae`: training %s alone, not the %d family members", name, len(family))
        return saes
    for member, section in family.items():
        try:
            cfg = build(SAEConfig, section, f"family.{member}")
        except TokenJourneyError as exc:
            raise TokenJourneyError(f"family.{member}: {exc}") from None
        same = next((c for n, c in saes if n == cfg.name), None)
        if same is None:
            saes.append((cfg.name, cfg))
        elif asdict(same) != asdict(cfg):
            raise TokenJourneyError(
                f"family.{member} would write the SAE folder {cfg.name!r}, which another SAE of the layer writes with "
                "other settings; change the member's sae option or keys (its folder name comes from them)"
            )
    return saes
