"""The whole journey: tokens -> embedding -> every layer -> final norm -> logits -> next token.

`recompute` runs the model once with hooks (the reference) and then recomputes every step from
the weights alone, recording each with its difference from the reference. Everything later
(logit lens, SAE features, renderings) reads the recomputed tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from token_journey.errors import TokenJourneyError
from token_journey.journey import ops, rope
from token_journey.journey.flops import linear, rms_norm
from token_journey.journey.hooks import capture_references, text_base
from token_journey.journey.layer import decoder_layer
from token_journey.journey.spec import Spec, spec_of, text_config
from token_journey.journey.steps import Recorder, Step
from token_journey.sites import decoder_layers

log = logging.getLogger(__name__)


@dataclass
class Pass:
    """The recomputed forward pass of one text."""

    spec: Spec
    token_ids: list[int]
    tokens: list[str]
    """Each token as text (special tokens by name)."""
    steps: list[Step]
    sites: list[dict[str, torch.Tensor]]
    """Per layer: resid_post / attn_out / mlp_out, each `[T, d_model]` (float32)."""
    attention: list[torch.Tensor]
    """Per layer: attention probabilities `[H, T, T]` (float32)."""
    logits: torch.Tensor
    """`[T, vocab]` (float32, after soft-capping where the model has it)."""
    rope_types: dict[str, dict[str, Any]] = field(default_factory=dict)
    """RoPE settings per layer type, for the page."""

    @property
    def max_abs_diff(self) -> float:
        """The worst step difference from the model (each step fed the model's own input)."""
        return max((s.max_abs_diff for s in self.steps if s.max_abs_diff is not None), default=0.0)

    @property
    def max_drift(self) -> float:
        """The worst difference of our chained recomputation from the model."""
        return max((s.drift for s in self.steps if s.drift is not None), default=0.0)


def tokenize(tokenizer: Any, text: str, spec: Spec) -> tuple[torch.Tensor, list[str]]:
    """Token ids `[1, T]` and token strings; empty or over-long text is rejected with the limit."""
    if not text or not text.strip():
        raise TokenJourneyError("journey text is empty; pass a sentence, e.g. --text 'The capital of France is'")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise TokenJourneyError(f"text {text[:40]!r} produced no tokens; pass ordinary text")
    if int(ids.max()) >= spec.vocab_size:
        raise TokenJourneyError(
            f"the tokenizer gave id {int(ids.max())} but the model's vocabulary has {spec.vocab_size} entries; use the tokenizer that belongs to this model"
        )
    limit = spec.max_positions
    if limit and ids.shape[1] > limit:
        raise TokenJourneyError(f"text has {ids.shape[1]} tokens but the model's context is {limit}; shorten the text to at most {limit} tokens")
    return ids, token_strings(tokenizer, ids[0].tolist())


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Readable text of each token (decoded one by one, so 'Ġ'/'▁' prefixes become spaces).

    A model's vocabulary may be larger than its tokenizer's (padded embedding tables, or rehearsal
    weights on another model's tokenizer): ids the tokenizer lacks read `<id N>`.
    """
    size = len(tokenizer)
    return [tokenizer.decode([i]) if 0 <= i < size else f"<id {i}>" for i in ids]


def _rope_tables(spec: Spec, config: Any, T: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """cos/sin `[T, head_dim]` per layer type (Gemma 3: local and global bases differ)."""
    tables = {}
    for layer_type in sorted(set(spec.layer_types)):
        params = rope.rope_parameters(config, layer_type)
        freqs = rope.inv_freq(params, spec.head_dim).to(device)
        tables[layer_type] = (params, rope.cos_sin(freqs, T, dtype))
    return tables


def _rope_ref(refs: dict[str, torch.Tensor], layer_type: str) -> str:
    return f"rope_cos.{layer_type}" if f"rope_cos.{layer_type}" in refs else "rope_cos.all"


def _embed(rec: Recorder, spec: Spec, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    weight = text_base(model).embed_tokens.weight
    T, d = ids.shape[1], spec.d_model
    if not spec.gemma:
        return rec.add("embedding", "x = W_E[token]", weight[ids[0]], "embed", None, weight.numel(), 0)
    x = rec.add("embedding lookup", "x = W_E[token]", weight[ids[0]], None, None, weight.numel(), 0)
    # As transformers does: sqrt(d_model) is rounded to the weights' dtype before multiplying.
    scale = torch.tensor(d**0.5, dtype=torch.float32).to(weight.dtype)
    return rec.add("embedding scale", f"x = x · √{d} ({float(scale):.4g})", x * scale, "embed", None, 0, T * d)


def _head(rec: Recorder, spec: Spec, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head, optional soft-capping -> logits `[T, vocab]`."""
    base, head = text_base(model), model.get_output_embeddings()
    T, d, V = x.shape[0], spec.d_model, spec.vocab_size
    formula = "x / sqrt(mean(x²) + ε) · (1 + w)" if spec.gemma else "x / sqrt(mean(x²) + ε) · w"
    x = rec.add("final RMSNorm", formula, ops.rms_norm(x, base.norm.weight, spec.eps, spec.gemma), "final_norm", None, base.norm.weight.numel(), rms_norm(T, d))
    tied = head.weight is base.embed_tokens.weight
    logits = rec.add(
        "LM head",
        "logits = x · W_Uᵀ" + ("   (W_U = W_E, tied)" if tied else ""),
        ops.linear(x, head.weight, getattr(head, "bias", None)),
        "lm_head",
        None,
        0 if tied else sum(p.numel() for p in head.parameters()),
        linear(T, d, V),
        "matmul",
    )
    if spec.final_softcap:
        cap = spec.final_softcap
        logits = rec.add("logit soft-capping", f"logits = {cap:g}·tanh(logits/{cap:g})", ops.softcap(logits, cap), "logits", None, 0, 3 * T * V)
    return logits


def _run(model: nn.Module, spec: Spec, ids: torch.Tensor, refs: dict[str, torch.Tensor], local: bool, progress: bool) -> dict:
    """One recomputation of the whole pass; `local` feeds every step the model's own input."""
    rec = Recorder(refs, local=local)
    T = ids.shape[1]
    rec.add("tokenize", f"text -> {T} token ids", ids[0].float(), None, None)
    x = _embed(rec, spec, model, ids)
    tables = _rope_tables(spec, text_config(model), T, x.dtype, x.device)
    for layer_type, (params, (cos, _sin)) in tables.items():
        rec.add(
            f"RoPE table ({layer_type})",
            f"cos(p · θ_i), θ_i = inv_freq ({params.get('rope_type')}, base {params['rope_theta']:g})",
            cos,
            _rope_ref(refs, layer_type),
            None,
        )
    sites, attention = [], []
    layers = decoder_layers(model)
    desc = "journey layers (local checks)" if local else "journey layers"
    for layer, block in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        out, probs = decoder_layer(rec, spec, block, x, layer, tables[spec.layer_types[layer]][1])
        x = out["resid_post"]
        sites.append({k: v.float() for k, v in out.items()})
        attention.append(probs.float())
    logits = _head(rec, spec, model, x)
    probs = ops.softmax(logits[-1:].float())
    # The model never applies softmax: compare with torch.softmax of the model's own logits.
    rec.refs["probs"] = torch.softmax(refs["logits"][-1:].float(), dim=-1)
    rec.add("softmax", "p = exp(logits) / Σ exp(logits)   (last position)", probs, "probs", None, 0, 3 * spec.vocab_size)
    return {"steps": rec.steps, "sites": sites, "attention": attention, "logits": logits.float(), "rope": {k: v[0] for k, v in tables.items()}}


@torch.inference_mode()
def recompute(model: nn.Module, tokenizer: Any, text: str, progress: bool = True) -> Pass:
    """Recompute the forward pass of `text` from the weights, checking every step against hooks.

    Two runs: the journey proper (each step reads our previous result; its distance from the
    model is the `drift`) and a local run (each step reads the model's own input; its distance
    is `max_abs_diff`, the check of that step's formula, free of accumulated rounding).
    """
    spec = spec_of(model)
    device = next(model.parameters()).device
    ids, tokens = tokenize(tokenizer, text, spec)
    ids = ids.to(device)
    refs = capture_references(model, spec, ids)
    chained = _run(model, spec, ids, refs, local=False, progress=progress)
    local = _run(model, spec, ids, refs, local=True, progress=progress)
    steps = [replace(ours, max_abs_diff=check.max_abs_diff, drift=ours.max_abs_diff) for ours, check in zip(chained["steps"], local["steps"], strict=True)]
    log.info(
        "recomputed %d steps over %d tokens; worst step difference %.3g, worst drift %.3g",
        len(steps),
        len(tokens),
        max((s.max_abs_diff or 0.0) for s in steps),
        max((s.drift or 0.0) for s in steps),
    )
    return Pass(
        spec=spec,
        token_ids=ids[0].tolist(),
        tokens=tokens,
        steps=steps,
        sites=chained["sites"],
        attention=chained["attention"],
        logits=chained["logits"],
        rope_types=chained["rope"],
    )
