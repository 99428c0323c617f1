"""Attribution of the prediction: which SAE latents wrote the target token's logit.

The explained quantity is the target's logit *before* any final soft-capping (Gemma 2 applies
`cap·tanh(z/cap)` afterwards; the page shows both), or the difference of two such logits. With the
final RMSNorm's scale frozen at its value for this token, `s = 1/sqrt(mean(x²) + ε)`, the logit is
linear in the final residual stream `x` (the output of the last decoder layer, before the norm):

    z = x · u + b,   u = s · g ⊙ W_U[target]   (g = w, Gemma: 1 + w; b = the LM head's bias, if any)

and at this token it is exact, not an approximation. For an SAE reading resid_post at layer L:

    x = resid_post[L] + Σ_{l>L} (attn_out[l] + mlp_out[l])                     (residual adds)
    resid_post[L] = Σ_j f_j · W_dec[j] + b_dec + error                          (the SAE)

so `z = Σ_j f_j (W_dec[j] · u) + b_dec · u + error · u + Σ_{l>L} attn_out[l] · u + Σ_{l>L} mlp_out[l] · u + b`.
A latent's *direct* contribution `f_j (W_dec[j] · u)` is what it adds to the logit through the
residual stream alone; its effect through later layers is inside their terms. The parts sum to
the logit up to float32 rounding (`check`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from token_journey.errors import TokenJourneyError
from token_journey.journey import ops
from token_journey.journey.hooks import text_base
from token_journey.journey.sae_hits import LayerSAE, feature_link
from token_journey.journey.spec import Spec


@dataclass(frozen=True)
class Part:
    """One term of the decomposition of the logit."""

    name: str
    value: float
    latent: int | None = None
    activation: float | None = None
    """For a latent: its activation f_j at the position."""
    link: str | None = None
    """For a latent: its dashboard in the report."""


@dataclass(frozen=True)
class LayerAttribution:
    """The logit decomposed through one resid_post SAE."""

    layer: int
    sae_name: str
    top: list[Part]
    """The latents with the largest |direct contribution|, strongest first."""
    parts: list[Part]
    """Every term, the top latents included: the remaining latents summed, b_dec, error, later layers, bias."""

    @property
    def total(self) -> float:
        return sum(p.value for p in self.parts)


@dataclass(frozen=True)
class Attribution:
    """The explained logit (or logit difference) and its decomposition per SAE layer."""

    target: int
    versus: int | None
    position: int
    logit: float
    """The pre-cap logit (difference) computed the ordinary way: final norm, then the LM head."""
    capped: float | None
    """The target's logit after the final soft-cap (Gemma 2), where the model has one."""
    layers: list[LayerAttribution]

    @property
    def check(self) -> float:
        """The worst |Σ parts - logit| over the layers (0 when no SAE)."""
        return max((abs(layer.total - self.logit) for layer in self.layers), default=0.0)


def token_id(tokenizer: object, token: str, vocab_size: int, key: str) -> int:
    """The id of `token` (e.g. `" Paris"`), which must be one token the model's vocabulary holds."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise TokenJourneyError(f"journey.{key}={token!r} is {len(ids)} tokens ({ids}); give a single token, e.g. ' Paris'")
    if not 0 <= ids[0] < vocab_size:
        raise TokenJourneyError(f"journey.{key}={token!r} is token {ids[0]}, outside the model's vocabulary of {vocab_size}")
    return ids[0]


def readout(model: nn.Module, spec: Spec, x: torch.Tensor, target: int, versus: int | None) -> tuple[torch.Tensor, float]:
    """(u [d_model], b): the target logit (minus versus's) is `x · u + b` with the final norm's scale frozen at `x [d_model]`."""
    base, head = text_base(model), model.get_output_embeddings()
    x = x.float()
    scale = torch.rsqrt(x.pow(2).mean() + spec.eps)
    gain = base.norm.weight.float() + (1.0 if spec.gemma else 0.0)
    row = head.weight[target].float()
    bias = getattr(head, "bias", None)
    b = float(bias[target]) if bias is not None else 0.0
    if versus is not None:
        row = row - head.weight[versus].float()
        b -= float(bias[versus]) if bias is not None else 0.0
    return scale * gain * row, b


def _layer_parts(
    layer_sae: LayerSAE, sites: list[dict[str, torch.Tensor]], position: int, u: torch.Tensor, b: float, top: int, report_root: str
) -> LayerAttribution:
    """The parts through one SAE. A latent that is off contributes exactly 0, so only the decoder rows of the
    active latents are read: `x = Σ_active f_j W_dec[j] + b_dec + error` needs no other row."""
    sae, layer = layer_sae.sae, layer_sae.layer
    x = sites[layer]["resid_post"][position].float()
    f = sae.encoder(x.device).encode(x[None])[0]  # (d_sae,); the encoder is dropped at once
    active = torch.nonzero(f).flatten()  # (n,)
    rows = sae.decoder_rows(active, x.device)  # (n, d_in)
    values = f[active]
    direct = values * (rows @ u)  # (n,): f_j · (W_dec[j] · u)
    b_dec = sae.tensor("b_dec", x.device)
    error = x - (values @ rows + b_dec)
    order = direct.abs().argsort(descending=True)[:top]
    chosen = [
        Part(
            f"latent {int(active[i])}",
            float(direct[i]),
            int(active[i]),
            float(values[i]),
            feature_link(report_root, layer_sae.site, layer, layer_sae.name, int(active[i])),
        )
        for i in order
    ]
    rest = direct.clone()
    rest[order] = 0
    later_attn = sum((float(sites[lay]["attn_out"][position].float() @ u) for lay in range(layer + 1, len(sites))), 0.0)
    later_mlp = sum((float(sites[lay]["mlp_out"][position].float() @ u) for lay in range(layer + 1, len(sites))), 0.0)
    parts = chosen + [
        Part("other latents", float(rest.sum())),
        Part("SAE b_dec", float(b_dec @ u)),
        Part("SAE error", float(error @ u)),
        Part(f"attention of layers {layer + 1}+", later_attn),
        Part(f"MLPs of layers {layer + 1}+", later_mlp),
    ]
    if b:
        parts.append(Part("LM head bias", b))
    return LayerAttribution(layer, layer_sae.name, chosen, parts)


@torch.inference_mode()
def attribute(
    model: nn.Module, spec: Spec, sites: list[dict[str, torch.Tensor]], saes: list[LayerSAE], target: int, versus: int | None, top: int, report_root: str
) -> Attribution:
    """Decompose the last position's pre-cap logit of `target` (minus `versus`) through every resid_post SAE.

    `sites[L]` holds the recomputed resid_post, attn_out and mlp_out `[T, d_model]` of layer L.
    """
    position = len(sites[-1]["resid_post"]) - 1
    x = sites[-1]["resid_post"][position]
    u, b = readout(model, spec, x, target, versus)
    head = model.get_output_embeddings()
    rows = [target] + ([versus] if versus is not None else [])  # the head's rows of the explained logits, not a copy of all of them
    bias = getattr(head, "bias", None)
    logits = ops.linear(
        ops.rms_norm(x.float()[None], text_base(model).norm.weight.float(), spec.eps, spec.gemma),
        head.weight[rows].float(),
        bias[rows].float() if bias is not None else None,
    )[0]  # (1 or 2,) the ordinary way: final norm, then the LM head
    logit = float(logits[0] - (logits[1] if versus is not None else 0.0))
    capped = float(ops.softcap(logits[0], spec.final_softcap)) if spec.final_softcap else None
    layers = [_layer_parts(s, sites, position, u, b, top, report_root) for s in saes if s.site == "resid_post"]
    return Attribution(target, versus, position, logit, capped, sorted(layers, key=lambda a: (a.layer, a.sae_name)))
