"""The local replacement model of one prompt: the model made linear from its nodes to its targets.

Following Ameisen et al. (2025, "Circuit Tracing"): one clean pass of the real model records every
nonlinearity that is not a transcoder (the attention patterns and the scale 1/rms(x) of every
RMSNorm) on a `Tape`; the replacement model then runs with those frozen, each MLP replaced by its
transcoder, and every transcoder latent's activation held at its clean value. What is left is affine
in the token embeddings, the latents' writes (a · W_dec[k]) and the error nodes (the MLP's true
output minus the transcoder's), so the gradient of a target with respect to a node's write, dotted
with that write, is the node's direct effect on the target, and all direct effects plus the constant
terms (biases, b_dec, the first position's MLP writes) sum to the target exactly.

The clean pass is computed here from the weights with the journey's operations (`journey.ops`,
`journey.rope`), in float32, so a bfloat16 model is traced in float32; its logits are checked against
the model's own forward pass (`check_logits`). A skip transcoder's linear map x W_skip^T stays inside
the replacement model (it is linear, like the residual stream), exactly as circuit-tracer keeps it.

Shapes: T tokens, d = d_model, H query heads, K key/value heads, hd = head_dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from token_journey.errors import TokenJourneyError
from token_journey.journey import ops, rope
from token_journey.journey.hooks import text_base
from token_journey.journey.spec import Spec, spec_of, text_config
from token_journey.sae.base import SAE
from token_journey.sae.registry import is_transcoder
from token_journey.sites import decoder_layers


@dataclass
class Tape:
    """The clean pass's frozen nonlinearities, keyed like ``("attn_norm", 3)`` or ``("probs", 3)``.

    While `recording`, a missing entry is computed from the current input and stored; once the clean
    pass is over the tape is complete and every later pass reads it, which is what freezes them.
    """

    values: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    recording: bool = True

    def get(self, key: tuple[str, int], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.values:
            return self.values[key]
        value = compute()
        if self.recording:
            self.values[key] = value.detach()
        return value


@dataclass
class CleanPass:
    """What the real model computed on one prompt, and the transcoders' view of it (all float32).

    `mlp_in[L]`, `mlp_out[L]`: `[T, d]` the MLP's input and its true output (Gemma: after the post-MLP
    norm), as at the sites of `token_journey.sites`; `latents[L]`: `[T, d_sae]` the transcoder's
    activations of `mlp_in[L]`; `errors[L]`: `[T, d]` true output minus the transcoder's output.
    `logits`: `[T, vocab]` before any soft-capping (the targets are pre-cap logits).
    """

    spec: Spec
    token_ids: list[int]
    embeds: torch.Tensor
    mlp_in: list[torch.Tensor]
    mlp_out: list[torch.Tensor]
    latents: list[torch.Tensor]
    errors: list[torch.Tensor]
    logits: torch.Tensor
    tape: Tape


def _w(module: nn.Module) -> torch.Tensor:
    return module.weight.float()


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.float()


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm scale 1/sqrt(mean(x²) + ε) `[..., T, 1]`: the nonlinear part of a norm, frozen by the tape."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _norm(spec: Spec, x: torch.Tensor, module: nn.Module, tape: Tape, key: tuple[str, int]) -> torch.Tensor:
    """RMSNorm with its scale from the tape: x · s · w (Gemma: · (1 + w)), linear in x once s is frozen."""
    scale = tape.get(key, lambda: _inv_rms(x, spec.eps))
    weight = 1.0 + _w(module) if spec.gemma else _w(module)
    return x * scale * weight


def _probs(spec: Spec, attn: nn.Module, normed: torch.Tensor, layer: int, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention probabilities `[..., H, T, T]` of the normed input `[..., T, d]` (the eager kernel's formula)."""
    T, H, K, hd = normed.shape[-2], spec.n_heads, spec.n_kv_heads, spec.head_dim
    q = ops.linear(normed, _w(attn.q_proj), _bias(attn.q_proj)).unflatten(-1, (H, hd)).transpose(-3, -2)
    k = ops.linear(normed, _w(attn.k_proj), _bias(attn.k_proj)).unflatten(-1, (K, hd)).transpose(-3, -2)
    if spec.qk_norm:
        q = ops.rms_norm(q, attn.q_norm.weight.float(), spec.eps, True)
        k = ops.rms_norm(k, attn.k_norm.weight.float(), spec.eps, True)
    cos, sin = cos_sin
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin).repeat_interleave(spec.n_rep, dim=-3)
    scores = (q @ k.transpose(-1, -2)) * spec.scaling
    if spec.attn_softcap:
        scores = ops.softcap(scores, spec.attn_softcap)
    window = spec.sliding_window if spec.layer_types[layer] == "sliding_attention" else None
    scores = scores.masked_fill(~ops.allowed_positions(T, window, normed.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _attention(spec: Spec, attn: nn.Module, normed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention output `[..., T, d]` with the probabilities given: linear in `normed` (the V path only)."""
    K, hd = spec.n_kv_heads, spec.head_dim
    v = ops.linear(normed, _w(attn.v_proj), _bias(attn.v_proj)).unflatten(-1, (K, hd)).transpose(-3, -2)
    z = probs @ v.repeat_interleave(spec.n_rep, dim=-3)  # [..., H, T, hd]
    z = z.transpose(-3, -2).flatten(-2)  # [..., T, H·hd]
    return ops.linear(z, _w(attn.o_proj), _bias(attn.o_proj))


def _mlp(spec: Spec, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The real gated MLP of its input `[T, d]` (Gemma: followed by the post-MLP norm, unfrozen)."""
    m = block.mlp
    gate = ops.linear(x, _w(m.gate_proj), _bias(m.gate_proj))
    up = ops.linear(x, _w(m.up_proj), _bias(m.up_proj))
    out = ops.linear(ops.activation(gate, spec.activation) * up, _w(m.down_proj), _bias(m.down_proj))
    if spec.gemma:
        out = ops.rms_norm(out, block.post_feedforward_layernorm.weight.float(), spec.eps, True)
    return out


def _rope_tables(spec: Spec, model: nn.Module, T: int, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    config = text_config(model)
    return {t: rope.cos_sin(rope.inv_freq(rope.rope_parameters(config, t), spec.head_dim).to(device), T, torch.float32) for t in set(spec.layer_types)}


def embed(model: nn.Module, spec: Spec, token_ids: Sequence[int]) -> torch.Tensor:
    """Token embeddings `[T, d]` as they enter the residual stream (Gemma: times √d rounded to the weights' dtype)."""
    weight = text_base(model).embed_tokens.weight
    x = weight[torch.as_tensor(list(token_ids), device=weight.device)]
    if spec.gemma:
        x = x * torch.tensor(spec.d_model**0.5, dtype=torch.float32).to(weight.dtype)
    return x.float()


def unembed(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight `[vocab, d]` and bias (float32)."""
    head = model.get_output_embeddings()
    return _w(head), _bias(head)


@dataclass
class Outputs:
    """One pass of the replacement model: what each target reads.

    `mlp_in[L]` `[..., T, d]` (the transcoder's input, which a latent's pre-activation reads through
    W_enc) and `final` `[..., T, d]` (the normed last hidden state the LM head reads).
    """

    mlp_in: list[torch.Tensor]
    final: torch.Tensor


def run(
    model: nn.Module,
    spec: Spec,
    tape: Tape,
    x0: torch.Tensor,
    writes: Sequence[torch.Tensor | Callable[[torch.Tensor], torch.Tensor]],
    skips: Sequence[torch.Tensor | None],
) -> Outputs:
    """The decoder from the embeddings `x0 [..., T, d]`, with the MLP of layer L replaced by `writes[L]`.

    `writes[L]` is the MLP's output `[..., T, d]`, or a function of its input (the clean pass runs
    the real MLP that way); `skips[L]` `[d, d]` adds mlp_in · W_skipᵀ (a skip transcoder's linear
    map) to it. Attention patterns and norm scales come from `tape` (computed and recorded while it
    is recording). Leading dimensions of `x0` and the writes broadcast, for batched passes.
    """
    layers = decoder_layers(model)
    tables = _rope_tables(spec, model, x0.shape[-2], x0.device)
    x, mlp_in = x0, []
    for layer, block in enumerate(layers):
        attn = block.self_attn
        normed = _norm(spec, x, block.input_layernorm, tape, ("attn_norm", layer))
        table = tables[spec.layer_types[layer]]
        probs = tape.get(("probs", layer), lambda attn=attn, normed=normed, layer=layer, table=table: _probs(spec, attn, normed, layer, table))
        out = _attention(spec, attn, normed, probs)
        if spec.gemma:
            out = _norm(spec, out, block.post_attention_layernorm, tape, ("attn_post_norm", layer))
        x = x + out
        pre_mlp = block.pre_feedforward_layernorm if spec.gemma else block.post_attention_layernorm
        m = _norm(spec, x, pre_mlp, tape, ("mlp_norm", layer))
        mlp_in.append(m)
        write = writes[layer]
        y = write(m) if callable(write) else write
        if skips[layer] is not None:
            y = y + m @ skips[layer].T
        x = x + y
    final = _norm(spec, x, text_base(model).norm, tape, ("final_norm", 0))
    return Outputs(mlp_in, final)


def check_transcoders(model: nn.Module, transcoders: Sequence[SAE]) -> None:
    """One transcoder per layer, each reading mlp_in of its layer at the model's width, or a clear error."""
    n_layers, d = len(decoder_layers(model)), text_config(model).hidden_size
    if len(transcoders) != n_layers:
        raise TokenJourneyError(
            f"the replacement model needs one transcoder per layer: got {len(transcoders)} for {n_layers} layers; train the circuits branch"
        )
    for layer, tc in enumerate(transcoders):
        if not is_transcoder(tc.cfg.architecture):
            raise TokenJourneyError(f"layer {layer}: {tc.cfg.architecture!r} is not a transcoder; the replacement model needs mlp_in -> mlp_out transcoders")
        if tc.cfg.d_in != d:
            raise TokenJourneyError(f"layer {layer}: transcoder width d_in={tc.cfg.d_in} but the model's d_model is {d}; use transcoders trained on this model")
        if tc.cfg.layer not in (-1, layer):
            raise TokenJourneyError(f"transcoder number {layer} was trained for layer {tc.cfg.layer}; pass them in layer order 0..{n_layers - 1}")


def skip_weights(transcoders: Sequence[SAE]) -> list[torch.Tensor | None]:
    """Each transcoder's W_skip `[d, d]` (float32), or None where it has no skip connection."""
    return [tc.W_skip.detach().float() if getattr(tc, "skip", False) else None for tc in transcoders]


@torch.no_grad()
def clean_pass(model: nn.Module, token_ids: Sequence[int], transcoders: Sequence[SAE]) -> CleanPass:
    """Run the real model on `token_ids` from its weights, recording the tape and the transcoders' latents and errors."""
    spec = spec_of(model)
    check_transcoders(model, transcoders)
    layers = decoder_layers(model)
    tape = Tape()
    x0 = embed(model, spec, token_ids)
    mlp_out: list[torch.Tensor] = []

    def real_mlp(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def mlp(m: torch.Tensor) -> torch.Tensor:
            out = _mlp(spec, layers[layer], m)
            mlp_out.append(out)
            return out

        return mlp

    # The real MLP's output already contains the skip term's effect: no skips in the clean pass.
    outputs = run(model, spec, tape, x0, [real_mlp(i) for i in range(len(layers))], [None] * len(layers))
    tape.recording = False
    weight, bias = unembed(model)
    logits = ops.linear(outputs.final, weight, bias)
    latents, errors = [], []
    for layer, tc in enumerate(transcoders):
        m = outputs.mlp_in[layer].to(tc.W_enc.dtype)
        f = tc.encode(m)
        latents.append(f.float())
        errors.append(mlp_out[layer] - tc.output(f, m).float())
    return CleanPass(spec, list(token_ids), x0, outputs.mlp_in, mlp_out, latents, errors, logits, tape)


def softcapped(spec: Spec, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logits from pre-cap logits (Gemma 2 soft-caps them; others return them as they are)."""
    return ops.softcap(logits, spec.final_softcap) if spec.final_softcap else logits
