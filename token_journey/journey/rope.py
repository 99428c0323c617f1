"""Rotary position embeddings, computed from the config alone (not from the model's buffers).

RoPE rotates each pair of query/key dimensions (i, i + head_dim/2) by the angle
`position · inv_freq[i]`, so the dot product of a query and a key depends on their distance.
`inv_freq[i] = theta^(-2i/head_dim)`; Llama 3 rescales the low frequencies ("llama3" scaling),
Gemma 3 uses a small theta on local (sliding) layers and a large one on global layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from token_journey.errors import TokenJourneyError

SUPPORTED = ("default", "linear", "llama3")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE settings of one layer: Gemma 3 keys them by layer type, other models have one dict."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    if "rope_theta" not in params:
        params = {**params, "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return {"rope_type": "default", **params}


def inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies `[head_dim / 2]` in float32 for `default`, `linear` and `llama3` RoPE."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED:
        raise TokenJourneyError(f"RoPE type {rope_type!r} is not recomputed; supported: {', '.join(SUPPORTED)}")
    base = float(params["rope_theta"])
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return freqs / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_scaling(freqs, params)
    return freqs


def _llama3_scaling(freqs: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1+ scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > old_context / low, freqs / factor, freqs)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def cos_sin(freqs: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[seq, head_dim]`: angles in float32 (as the model does), cast to `dtype`."""
    positions = torch.arange(seq_len, device=freqs.device).float()
    angles = positions[:, None] * freqs[None, :]  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to `x [heads, seq, head_dim]`: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
