"""SAE features active on each token at each layer, when the pipeline has trained SAEs.

`load_saes` opens the SAE folders under `<paths.saes>` whose (site, layer) the model has and whose
name is asked for (the stage asks for the run's `sae`, plus `journey.saes`), reading no weights:
each is a `LazySAE`. `sae_features` encodes the recomputed activation `[T, d_model]` with one SAE at a
time (a transcoder at mlp_out: the recomputed MLP input), its encoder mapped only while it runs, and
keeps the strongest latents per token, each with the link to its dashboard in the report
(`layout.report_page`, relative to the journey page's folder). Steering and attribution read the same
SAEs' encoders and only the decoder rows of the latents they use, so the journey's memory is the
model plus one encoder (while steering, the edited layers'), whatever the family's size or the SAEs' width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from token_journey.layout import report_page
from token_journey.sae.io import LazySAE, find_saes
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, is_transcoder

log = logging.getLogger(__name__)


def feature_link(report_root: str, site: str, layer: int, sae_name: str, feature: int) -> str:
    """Relative link from a journey page to one feature's report dashboard."""
    return f"{report_root}/{report_page(site, layer, sae_name)}#feature-{feature}"


@dataclass(frozen=True)
class LayerSAE:
    """One SAE found for the model: where it reads, and its weights, read when used."""

    site: str
    layer: int
    name: str
    sae: LazySAE

    @property
    def reads(self) -> str:
        """The site its latents are computed from: `site`, or for a transcoder (at mlp_out) the MLP's input."""
        return TRANSCODER_INPUT_SITE if is_transcoder(self.sae.spec.architecture) else self.site


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


def load_saes(saes_root: Path | None, sites: list[dict[str, torch.Tensor]], names: Sequence[str] | None = None) -> tuple[list[LayerSAE], str]:
    """The SAEs under `saes_root` called `names` (None or `"all"` among them: every one) that fit these
    activations, opened without reading their weights, and a note saying what was (not) found.

    `sites[L]` maps a site name to its `[T, d_model]` activation at layer L (for the layer count,
    the site names and the width).
    """
    if saes_root is None or not Path(saes_root).is_dir():
        return [], f"no SAEs at {saes_root}; run the pipeline (dvc repro) to train them and see features here"
    every = names is None or "all" in names
    found, skipped = [], set()
    for layer, acts in enumerate(sites):
        for site, tensor in acts.items():
            for folder in find_saes(Path(saes_root), site, layer):
                if not every and folder.name not in names:
                    skipped.add(folder.name)
                    continue
                sae = LazySAE.open(folder)
                if sae.spec.d_in != tensor.shape[-1]:
                    log.warning("skipping %s: d_in %d != d_model %d", folder, sae.spec.d_in, tensor.shape[-1])
                    continue
                found.append(LayerSAE(site, layer, folder.name, sae))
    if found:
        note = f"{len(found)} SAE(s) found under {saes_root}"
        return found, note + (f"; also there, not shown: {', '.join(sorted(skipped))} (journey.saes / --saes)" if skipped else "")
    if skipped:
        return [], f"no SAE named {', '.join(names)} under {saes_root}; there are {', '.join(sorted(skipped))} (show them with journey.saes / --saes)"
    return [], f"no SAE folders under {saes_root} yet"


def sae_features(saes: list[LayerSAE], sites: list[dict[str, torch.Tensor]], k: int, report_root: str) -> list[FeatureHits]:
    """The `k` strongest latents of each SAE on each token of the activation it reads (a transcoder: mlp_in).

    One encoder is mapped at a time and dropped before the next, so the peak holds a single encoder.
    """
    hits = []
    for s in saes:
        acts = sites[s.layer][s.reads]
        hits.append(FeatureHits(s.site, s.layer, s.name, top_features(s.sae.encoder(acts.device), acts, k), report_root))
    return hits
