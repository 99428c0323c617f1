"""SAE features active on each token at each layer, when the pipeline has trained SAEs.

`load_saes` finds every SAE folder under `<paths.saes>` whose (site, layer) the model has and
loads it once; `sae_features` encodes the recomputed activation `[T, d_model]` with each (a transcoder
at mlp_out: the recomputed MLP input) and keeps
the strongest latents per token, each with the link to its dashboard in the report
(`layout.report_page`, relative to the journey page's folder). Steering and attribution reuse the
same loaded SAEs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from token_journey.layout import report_page
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, is_transcoder

log = logging.getLogger(__name__)


def feature_link(report_root: str, site: str, layer: int, sae_name: str, feature: int) -> str:
    """Relative link from a journey page to one feature's report dashboard."""
    return f"{report_root}/{report_page(site, layer, sae_name)}#feature-{feature}"


@dataclass(frozen=True)
class LayerSAE:
    """One SAE found for the model: where it reads and the loaded module."""

    site: str
    layer: int
    name: str
    sae: Any
    """A `token_journey.sae.base.SAE` (encode/decode, `W_dec [d_sae, d_in]`, `b_dec [d_in]`)."""

    @property
    def reads(self) -> str:
        """The site its latents are computed from: `site`, or for a transcoder (at mlp_out) the MLP's input."""
        return TRANSCODER_INPUT_SITE if is_transcoder(getattr(self.sae, "architecture", "")) else self.site


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
        return feature_link(self.report_root, self.site, self.layer, self.sae_name, feature)


@torch.inference_mode()
def top_features(encoder: Any, acts: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of `acts [T, d_in]`: the `k` largest positive latents of `encoder.encode(acts) [T, d_sae]`."""
    latents = encoder.encode(acts.float())
    values, ids = latents.topk(min(k, latents.shape[-1]), dim=-1)
    return [[(int(i), float(v)) for i, v in zip(row_i, row_v, strict=True) if v > 0] for row_i, row_v in zip(ids, values, strict=True)]


def load_saes(saes_root: Path | None, sites: list[dict[str, torch.Tensor]]) -> tuple[list[LayerSAE], str]:
    """Every SAE under `saes_root` that fits these activations, and a note saying what was (not) found.

    `sites[L]` maps a site name to its `[T, d_model]` activation at layer L (for the layer count,
    the site names, the width and the device).
    """
    if saes_root is None or not Path(saes_root).is_dir():
        return [], f"no SAEs at {saes_root}; run the pipeline (dvc repro) to train them and see features here"
    from token_journey.sae.io import find_saes, load_sae

    found = []
    for layer, acts in enumerate(sites):
        for site, tensor in acts.items():
            for folder in find_saes(Path(saes_root), site, layer):
                sae = load_sae(folder, device=tensor.device)
                if sae.cfg.d_in != tensor.shape[-1]:
                    log.warning("skipping %s: d_in %d != d_model %d", folder, sae.cfg.d_in, tensor.shape[-1])
                    continue
                found.append(LayerSAE(site, layer, folder.name, sae))
    note = f"{len(found)} SAE(s) found under {saes_root}" if found else f"no SAE folders under {saes_root} yet"
    return found, note


def sae_features(saes: list[LayerSAE], sites: list[dict[str, torch.Tensor]], k: int, report_root: str) -> list[FeatureHits]:
    """The `k` strongest latents of each SAE on each token of the activation it reads (a transcoder: mlp_in)."""
    return [FeatureHits(s.site, s.layer, s.name, top_features(s.sae, sites[s.layer][s.reads], k), report_root) for s in saes]
