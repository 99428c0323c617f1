"""Random transcoders for every layer of a tiny model, sized like fitted ones.

A fitted transcoder's writes are about as large as the MLP output it replaces; random decoder rows
of unit norm would write hundreds of times more, and the error nodes would cancel them with
rounding errors far above the checks' 1e-4. So decoder rows, b_dec and W_skip are scaled down, and
the JumpReLU threshold leaves roughly a fifth of the latents active.
"""

from __future__ import annotations

import torch

from token_journey.sae.base import SAE, SAESpec
from token_journey.sae.registry import build_sae


def random_transcoder(layer: int, d: int = 32, width: int = 64, architecture: str = "jumprelu_skip_transcoder", seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(1000 * seed + layer)
    tc = build_sae(SAESpec(architecture, d, width, k=8 if "topk" in architecture else 0, site="mlp_out", layer=layer))
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d, width, generator=g) * 0.5)
        tc.b_enc.copy_(torch.randn(width, generator=g) * 0.1)
        tc.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=-1) * 0.01)
        tc.b_dec.copy_(torch.randn(d, generator=g) * 0.01)
        if getattr(tc, "skip", False):
            tc.W_skip.copy_(torch.randn(d, d, generator=g) * 0.002)
        if tc.has_threshold:
            tc.threshold.fill_(2.0)
    return tc


def random_transcoders(n_layers: int, **kwargs) -> list[SAE]:
    return [random_transcoder(layer, **kwargs) for layer in range(n_layers)]
