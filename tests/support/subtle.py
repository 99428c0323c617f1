"""Tiny Gemma models whose weights are scaled so that every subtle step changes the numbers a lot.

With the random initialisation (std 0.02) a tiny model's logits and attention scores are far below
Gemma's soft-caps (30 and 50), its MLP gates sit where tanh-GELU and exact GELU agree to 1e-5, and
a missing soft-cap or the wrong GELU would pass a 1e-4 check. Scaled as below:
- final norm gain (1 + w) = 100: pre-cap logits of order 40, so 30·tanh(z/30) differs by ~10;
- q/k projections × 200 (Gemma 2): scores q·k/16 of order 100, far past the attention cap of 50;
- gate projection × 27: gates of order ±3, where the tanh approximation is off by up to 4.7e-4;
- up projection × 100: that error grows to ~0.05 in the MLP output along the chain.
The sliding window (4) is shorter than the test text, so ignoring it changes which keys are read.
"""

from __future__ import annotations

from typing import Any

import torch

from support.tiny import tiny_model


def scaled_model(family: str, **overrides: Any) -> Any:
    """A tiny model of `family` with the scalings above (Llama: only the final norm and MLP)."""
    model = tiny_model(family, **overrides)
    with torch.no_grad():
        model.model.norm.weight.fill_(99.0 if family != "llama" else 100.0)
        for block in model.model.layers:
            if family == "gemma2":
                block.self_attn.q_proj.weight.mul_(200.0)
                block.self_attn.k_proj.weight.mul_(200.0)
            block.mlp.gate_proj.weight.mul_(27.0)
            block.mlp.up_proj.weight.mul_(100.0)
    return model
