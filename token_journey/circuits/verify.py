"""The graph's two checks against the real model, like the journey's step checks.

1. With its error nodes the replacement model reproduces the model's logits (its own forward pass,
   not our recomputation), at every position.
2. Every target's incoming edges plus its constant terms equal its value in the real model.
A frozen nonlinearity that is wrong (a missing norm scale) fails the first and the second; one left
unfrozen (an attention pattern that follows its input) fails the second, since the model is no
longer linear in the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from token_journey.circuits.graph import Graph
from token_journey.errors import TokenJourneyError

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verification:
    logits_max_abs_diff: float
    """max |replacement logits − model logits| over every position and token."""
    completeness_error: float
    """max |bias + Σ incoming edges − value| over targets, relative to max(1, max |value|)."""

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.logits_max_abs_diff <= tolerance and self.completeness_error <= tolerance


@torch.no_grad()
def verify(graph: Graph, model: nn.Module) -> Verification:
    """Both checks of `graph` against `model`'s own forward pass."""
    device = next(model.parameters()).device
    ids = torch.tensor([graph.token_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float().cpu()
    diff = float((graph.replacement_logits.cpu() - logits).abs().max())
    return Verification(diff, graph.completeness_error())


def require(verification: Verification, tolerance: float = TOLERANCE) -> None:
    """Stop with one clear line when a check fails: a graph that does not add up must not be shown."""
    if not verification.ok(tolerance):
        raise TokenJourneyError(
            f"the attribution graph fails its checks (logits differ by {verification.logits_max_abs_diff:.3g}, "
            f"completeness error {verification.completeness_error:.3g}, tolerance {tolerance:g}); "
            "the model's architecture is not replaced exactly: report it with the model's config"
        )
