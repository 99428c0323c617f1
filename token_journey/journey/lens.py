"""The logit lens: what the residual stream would predict if the model stopped at layer L.

Each layer's `resid_post [T, d_model]` goes through the final norm and the LM head (and Gemma 2's
soft-capping) exactly as the last layer's output does; the top tokens per position show how the
prediction forms across depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from token_journey.journey import ops
from token_journey.journey.hooks import text_base
from token_journey.journey.spec import Spec


@dataclass(frozen=True)
class LensRow:
    """Top predictions at one layer for every position."""

    layer: int
    top: list[list[tuple[int, float]]]
    """Per position: [(token id, probability), ...] best first."""


@torch.inference_mode()
def logit_lens(model: nn.Module, spec: Spec, resid: list[torch.Tensor], k: int = 3) -> list[LensRow]:
    """Top-`k` next tokens with probabilities at every layer and position; `resid[L]` is `[T, d_model]`."""
    base, head = text_base(model), model.get_output_embeddings()
    rows = []
    for layer, x in enumerate(resid):
        x = x.to(head.weight.dtype)
        logits = ops.linear(ops.rms_norm(x, base.norm.weight, spec.eps, spec.gemma), head.weight, getattr(head, "bias", None)).float()  # (T, V)
        if spec.final_softcap:
            logits = ops.softcap(logits, spec.final_softcap)
        probs, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        rows.append(LensRow(layer, [list(zip(i.tolist(), p.tolist(), strict=True)) for i, p in zip(ids, probs, strict=True)]))
    return rows
