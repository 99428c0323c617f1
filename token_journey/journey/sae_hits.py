"""SAE features active on each token at each layer, when the pipeline has trained SAEs.

For every (site, layer) with SAE folders under `<paths.saes>`, the recomputed activation
`[T, d_model]` is encoded and the strongest latents per token are kept, each with the link to its
dashboard in the report (`layout.report_page`, relative to the journey page's folder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from token_journey.layout import report_page

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureHits:
    """The top SAE latents on each token for one SAE."""

    site: str
    layer: int
    sae_name: str
    top: list[list[tuple[int, float]]]
    """Per position: [(latent id, activation), ...] strongest first, zeros left out."""
    report_root: str
    """The report root relative to the journey page's folder (`Layout.journey_to_report`)."""

    def link(self, feature: int) -> str:
        """Relative link from a journey page to the feature's report dashboard."""
        return f"{self.report_root}/{report_page(self.site, self.layer, self.sae_name)}#feature-{feature}"


@torch.inference_mode()
def top_features(encoder: Any, acts: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of `acts [T, d_in]`: the `k` largest positive latents of `encoder.encode(acts) [T, d_sae]`."""
    latents = encoder.encode(acts.float())
    values, ids = latents.topk(min(k, latents.shape[-1]), dim=-1)
    return [[(int(i), float(v)) for i, v in zip(row_i, row_v, strict=True) if v > 0] for row_i, row_v in zip(ids, values, strict=True)]


def sae_features(saes_root: Path | None, sites: list[dict[str, torch.Tensor]], k: int,
                 report_root: str) -> tuple[list[FeatureHits], str]:
    """Features of every SAE found for these activations, and a note saying what was (not) found.

    `sites[L]` maps a site name to its `[T, d_model]` activation at layer L; `report_root` is the
    report folder relative to the journey page, for the feature links.
    """
    if saes_root is None or not Path(saes_root).is_dir():
        return [], f"no SAEs at {saes_root}; run the pipeline (dvc repro) to train them and see features here"
    from token_journey.sae.io import find_saes, load_sae

    hits = []
    for layer, acts in enumerate(sites):
        for site, tensor in acts.items():
            for folder in find_saes(Path(saes_root), site, layer):
                sae = load_sae(folder, device=tensor.device)
                if sae.cfg.d_in != tensor.shape[-1]:
                    log.warning("skipping %s: d_in %d != d_model %d", folder, sae.cfg.d_in, tensor.shape[-1])
                    continue
                hits.append(FeatureHits(site, layer, folder.name, top_features(sae, tensor, k), report_root))
    note = f"{len(hits)} SAE(s) found under {saes_root}" if hits else f"no SAE folders under {saes_root} yet"
    return hits, note
