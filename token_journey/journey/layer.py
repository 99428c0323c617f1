"""One decoder layer recomputed from its weights, step by step, each step checked by the recorder.

Llama:  h = x + o_proj(attn(norm(x)));            out = h + down(act(gate(norm(h))) · up(norm(h)))
Gemma:  h = x + norm(o_proj(attn(norm(x))));      out = h + norm(down(act(gate(norm(h))) · up(norm(h))))
Only `module.weight` tensors are read from the model; no module's forward is called.
"""

from __future__ import annotations

import torch
from torch import nn

from token_journey.journey import ops, rope
from token_journey.journey.flops import ACT_FLOPS, linear, rms_norm
from token_journey.journey.spec import Spec
from token_journey.journey.steps import Recorder


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def attention(
    rec: Recorder, spec: Spec, block: nn.Module, x: torch.Tensor, layer: int, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of `x [T, d_model]` (already normed) -> (output [T, d_model], probabilities [H, T, T])."""
    attn, T = block.self_attn, x.shape[0]
    H, K, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
    L = f"L{layer}."
    q = rec.add(
        "q_proj", "q = x · W_qᵀ", ops.linear(x, attn.q_proj.weight, _bias(attn.q_proj)), L + "q", layer, _n(attn.q_proj), linear(T, d, H * hd), "matmul"
    )
    k = rec.add(
        "k_proj", "k = x · W_kᵀ", ops.linear(x, attn.k_proj.weight, _bias(attn.k_proj)), L + "k", layer, _n(attn.k_proj), linear(T, d, K * hd), "matmul"
    )
    v = rec.add(
        "v_proj", "v = x · W_vᵀ", ops.linear(x, attn.v_proj.weight, _bias(attn.v_proj)), L + "v", layer, _n(attn.v_proj), linear(T, d, K * hd), "matmul"
    )
    q = q.view(T, H, hd).transpose(0, 1)  # (H, T, hd)
    k = k.view(T, K, hd).transpose(0, 1)  # (K, T, hd)
    v = v.view(T, K, hd).transpose(0, 1)  # (K, T, hd)
    if spec.qk_norm:
        q = rec.add(
            "q_norm", "q = q / rms(q) · (1 + w)   per head", ops.rms_norm(q, attn.q_norm.weight, spec.eps, True), L + "q_norm", layer, hd, rms_norm(T * H, hd)
        )
        k = rec.add(
            "k_norm", "k = k / rms(k) · (1 + w)   per head", ops.rms_norm(k, attn.k_norm.weight, spec.eps, True), L + "k_norm", layer, hd, rms_norm(T * K, hd)
        )
    cos, sin = cos_sin
    q = rec.add("RoPE q", "q' = q·cos(pθ) + rotate_half(q)·sin(pθ)", rope.rotate(q, cos, sin), L + "q_rope", layer, 0, 3 * T * H * hd)
    k = rec.add("RoPE k", "k' = k·cos(pθ) + rotate_half(k)·sin(pθ)", rope.rotate(k, cos, sin), L + "k_rope", layer, 0, 3 * T * K * hd)
    k = rec.add("GQA expand K", f"each of {K} K heads serves {spec.n_rep} query heads", k.repeat_interleave(spec.n_rep, dim=0), L + "k_expanded", layer)
    v = rec.add("GQA expand V", f"each of {K} V heads serves {spec.n_rep} query heads", v.repeat_interleave(spec.n_rep, dim=0), L + "v_expanded", layer)
    qk = rec.add("q·kᵀ", "s_ij = q_i · k_j", q @ k.transpose(-1, -2), L + "qk", layer, 0, 2 * H * T * T * hd, "matmul")
    scores, formula, flops = qk * spec.scaling, f"s · {spec.scaling:.4g}", H * T * T
    if spec.attn_softcap:
        scores = ops.softcap(scores, spec.attn_softcap)
        formula, flops = f"{spec.attn_softcap:g}·tanh(s·{spec.scaling:.4g}/{spec.attn_softcap:g})", 4 * H * T * T
    window = spec.sliding_window if spec.layer_types[layer] == "sliding_attention" else None
    allowed = ops.allowed_positions(T, window, x.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    mask_text = f"j ≤ i and i - j < {window}" if window else "j ≤ i"
    rec.masks[L + "scores"] = allowed
    scores = rec.add("scores + mask", f"{formula}, -inf unless {mask_text}", scores, L + "scores", layer, 0, flops + H * T * T)
    probs = rec.add("softmax", "a_ij = exp(s_ij) / Σ_j exp(s_ij)", ops.softmax(scores), L + "probs", layer, 0, 3 * H * T * T)
    out = rec.add("weighted sum", "z_i = Σ_j a_ij · v_j", probs @ v, L + "weighted", layer, 0, 2 * H * T * T * hd, "matmul")
    out = rec.add("concat heads", "z = [z_1 … z_H]", out.transpose(0, 1).reshape(T, H * hd), L + "heads_concat", layer)
    out = rec.add(
        "o_proj",
        "attn = z · W_oᵀ",
        ops.linear(out, attn.o_proj.weight, _bias(attn.o_proj)),
        L + "o_proj",
        layer,
        _n(attn.o_proj),
        linear(T, H * hd, d),
        "matmul",
    )
    return out, probs


def mlp(rec: Recorder, spec: Spec, block: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Gated MLP of `x [T, d_model]` (already normed): down(act(gate(x)) · up(x)) -> [T, d_model]."""
    m, T, d, F, L = block.mlp, x.shape[0], spec.d_model, spec.d_mlp, f"L{layer}."
    act_name = {"silu": "SiLU", "gelu_tanh": "GELU(tanh)", "gelu": "GELU"}[spec.activation]
    gate = rec.add(
        "gate_proj", "g = x · W_gateᵀ", ops.linear(x, m.gate_proj.weight, _bias(m.gate_proj)), L + "gate", layer, _n(m.gate_proj), linear(T, d, F), "matmul"
    )
    up = rec.add("up_proj", "u = x · W_upᵀ", ops.linear(x, m.up_proj.weight, _bias(m.up_proj)), L + "up", layer, _n(m.up_proj), linear(T, d, F), "matmul")
    act = rec.add(act_name, f"{act_name}(g)", ops.activation(gate, spec.activation), L + "act", layer, 0, ACT_FLOPS[spec.activation] * T * F)
    prod = rec.add("gate · up", f"h = {act_name}(g) ⊙ u", act * up, L + "product", layer, 0, T * F)
    return rec.add(
        "down_proj",
        "mlp = h · W_downᵀ",
        ops.linear(prod, m.down_proj.weight, _bias(m.down_proj)),
        L + "down",
        layer,
        _n(m.down_proj),
        linear(T, F, d),
        "matmul",
    )


def _norm(rec: Recorder, spec: Spec, name: str, module: nn.Module, x: torch.Tensor, ref: str, layer: int) -> torch.Tensor:
    formula = "x / sqrt(mean(x²) + ε) · (1 + w)" if spec.gemma else "x / sqrt(mean(x²) + ε) · w"
    return rec.add(name, formula, ops.rms_norm(x, module.weight, spec.eps, spec.gemma), ref, layer, module.weight.numel(), rms_norm(x.shape[0], x.shape[-1]))


def decoder_layer(
    rec: Recorder, spec: Spec, block: nn.Module, x: torch.Tensor, layer: int, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Layer `layer` on the residual stream `x [T, d_model]` -> ({site: [T, d_model]}, attention probs [H, T, T])."""
    L, T, d = f"L{layer}.", x.shape[0], spec.d_model
    normed = _norm(rec, spec, "input RMSNorm", block.input_layernorm, x, L + "norm_attn", layer)
    attn_out, probs = attention(rec, spec, block, normed, layer, cos_sin)
    if spec.gemma:
        attn_out = _norm(rec, spec, "post-attention RMSNorm", block.post_attention_layernorm, attn_out, L + "attn_post_norm", layer)
        mlp_norm = block.pre_feedforward_layernorm
    else:
        mlp_norm = block.post_attention_layernorm
    mid = rec.add("residual add", "h = x + attn", x + attn_out, L + "resid_mid", layer, 0, T * d)
    name = "pre-feedforward RMSNorm" if spec.gemma else "post-attention RMSNorm"
    mlp_in = _norm(rec, spec, name, mlp_norm, mid, L + "norm_mlp", layer)
    mlp_out = mlp(rec, spec, block, mlp_in, layer)
    if spec.gemma:
        mlp_out = _norm(rec, spec, "post-feedforward RMSNorm", block.post_feedforward_layernorm, mlp_out, L + "mlp_post_norm", layer)
    out = rec.add("residual add", "out = h + mlp", mid + mlp_out, L + "resid_post", layer, 0, T * d)
    return {"attn_out": attn_out, "mlp_in": mlp_in, "mlp_out": mlp_out, "resid_post": out}, probs
