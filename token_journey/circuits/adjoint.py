"""The transpose of the local replacement model: the gradients of many targets in one pass, written out.

With its tape frozen the replacement model (`replacement.run`) is linear, so the gradient of a target's
value with respect to every node's write comes from running the model's transpose backwards from the
target's read. Autograd could do that, but it makes every target of a batch pay for the deepest layer
and the longest prefix in it. Written out, a batch *grows* as it descends: a target read at layer L joins
at layer L, and the targets of one position p carry only positions 0..p (attention is causal and its
patterns frozen, so later positions receive nothing). Each target then costs (layer + 1) x (p + 1)
layer-positions, the least a dense pass can do.

Per layer, transposing `run` (s = a frozen norm scale, w' = its weight, 1 + w in Gemma):

    x' = h + write + m W_skipᵀ,  m = h s w'           ->  g_write = g',  g_m = g' W_skip (+ the seeds read here)
    h  = x + o(P v(x s w')) [Gemma: · s w']            ->  g_h = g' + g_m s w',  g_x = g_h + vᵀ(Pᵀ oᵀ(g_h [s w'])) s w'

`tests/test_circuits_adjoint.py` checks it against autograd's vector-Jacobian products of `replacement.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from token_journey.circuits.replacement import Tape
from token_journey.journey.hooks import text_base
from token_journey.journey.spec import Spec
from token_journey.sites import decoder_layers


@dataclass
class _Layer:
    """What the transpose of one layer needs: frozen scales (already times the norm weights) and weights."""

    attn_scale: torch.Tensor
    """`[T, d]` s·w' of the input norm."""
    post_scale: torch.Tensor | None
    """`[T, d]` Gemma's post-attention norm, else None."""
    mlp_scale: torch.Tensor
    """`[T, d]` the pre-MLP norm (mlp_in = h · mlp_scale)."""
    pattern: torch.Tensor
    """`[K, T, n_rep, T]` the frozen attention pattern, transposed and grouped by K/V head (`transposed_pattern`)."""
    W_o: torch.Tensor
    """`[d, H·hd]`."""
    W_v: torch.Tensor
    """`[K·hd, d]`."""
    skip: torch.Tensor | None
    """`[d, d]` W_skip of a skip transcoder, else None."""


def transposed_pattern(probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """`[H, q, s]` attention probabilities -> `[K, s, n_rep, q]`: entry (k, s, r, q) is how much query q of head k·n_rep + r read key s.

    Laid out so that, for a prefix of t positions, one product per K/V head both applies the transposed
    pattern of its n_rep query heads and adds them up (grouped-query attention)."""
    H, T, _ = probs.shape
    return probs.view(n_kv_heads, H // n_kv_heads, T, T).permute(0, 3, 1, 2).contiguous()


def _scale(spec: Spec, tape: Tape, key: tuple[str, int], module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return tape.values[key] * (1.0 + weight if spec.gemma else weight)


class Adjoint:
    """The transpose of the replacement model frozen on `tape` (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: Spec, tape: Tape, skips: list[torch.Tensor | None]) -> None:
        self.spec = spec
        self.layers = []
        for layer, block in enumerate(decoder_layers(model)):
            attn = block.self_attn
            pre_mlp = block.pre_feedforward_layernorm if spec.gemma else block.post_attention_layernorm
            self.layers.append(
                _Layer(
                    attn_scale=_scale(spec, tape, ("attn_norm", layer), block.input_layernorm),
                    post_scale=_scale(spec, tape, ("attn_post_norm", layer), block.post_attention_layernorm) if spec.gemma else None,
                    mlp_scale=_scale(spec, tape, ("mlp_norm", layer), pre_mlp),
                    pattern=transposed_pattern(tape.values["probs", layer], spec.n_kv_heads),
                    W_o=attn.o_proj.weight.detach().float(),
                    W_v=attn.v_proj.weight.detach().float(),
                    skip=skips[layer],
                )
            )
        self.final_scale = _scale(spec, tape, ("final_norm", 0), text_base(model).norm)

    def _attention(self, layer: _Layer, g: torch.Tensor) -> torch.Tensor:
        """The transpose of the V/O path with the pattern frozen: `[R, t, d]` at the output -> `[R, t, d]` at the normed input.

        The rows ride along in the matrix dimension (`[K, n_rep·t, R·hd]`), so the pattern costs one
        large product per K/V head rather than R·H small ones."""
        R, t, _ = g.shape
        K, n_rep, hd = self.spec.n_kv_heads, self.spec.n_rep, self.spec.head_dim
        g_z = (g @ layer.W_o).view(R, t, K, n_rep, hd).permute(2, 3, 1, 0, 4).reshape(K, n_rep * t, R * hd)
        pattern = layer.pattern[:, :t, :, :t].reshape(K, t, n_rep * t)
        g_v = (pattern @ g_z).view(K, t, R, hd)  # the gradient at each K/V head's values, its query heads added up
        return g_v.permute(2, 1, 0, 3).reshape(R, t, K * hd) @ layer.W_v

    @torch.no_grad()
    def descend(self, t: int, joins: Mapping[int, torch.Tensor], on_write: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
        """Gradients of targets read at position t - 1, from their layers down to the embeddings.

        `joins[L]` `[n_L, d]`: the read vectors (a latent's encoder column) of targets read at mlp_in
        of layer L, or at the normed final state for L = n_layers (a logit's unembedding direction).
        Rows are ordered as they join, deepest layer first. `on_write(L, g)` receives `g` `[R, t, d]`,
        the gradient of the R rows joined so far with respect to layer L's MLP write (the targets of
        layer L itself are not among them: a layer's write comes after its own read); it must not keep
        `g`, which the pass goes on updating in place. Returns the gradient `[R, t, d]` of every row with
        respect to the embeddings.
        """
        n_layers, d = len(self.layers), self.spec.d_model
        total = sum(len(v) for v in joins.values())
        g = self.final_scale.new_zeros(total, t, d)  # at the residual stream; rows that have not joined stay zero
        g_m = torch.empty_like(g)  # at mlp_in
        R = 0
        if n_layers in joins:
            R = len(joins[n_layers])
            g[:R, t - 1] = joins[n_layers] * self.final_scale[t - 1]
        for index in range(min(max(joins), n_layers - 1), -1, -1):
            layer = self.layers[index]
            if R:
                on_write(index, g[:R])
            if layer.skip is None:
                g_m[:R].zero_()
            else:
                torch.matmul(g[:R], layer.skip, out=g_m[:R])
            if index in joins:
                new = slice(R, R + len(joins[index]))
                g_m[new].zero_()
                g_m[new, t - 1] = joins[index]
                R = new.stop
            g[:R].addcmul_(g_m[:R], layer.mlp_scale[:t])  # g_h
            out = g[:R] if layer.post_scale is None else g[:R] * layer.post_scale[:t]
            g[:R].addcmul_(self._attention(layer, out), layer.attn_scale[:t])
        return g
