"""The model's own tensors at every step, captured by hooks during one ordinary forward pass.

Module outputs (norms, projections, activation, layers) come from forward hooks; the inputs of
`o_proj` and `down_proj` (concatenated heads, gated product) from pre-hooks. What the eager
attention function computes between modules (queries after RoPE, the expanded K/V heads, q·kᵀ,
the masked scores, the probabilities, the weighted sum) is read by a `TorchFunctionMode` that is
active only while a layer's attention runs, watching its two `matmul` calls and its `softmax`.
Every tensor is stored without the batch dimension, in the layout the recomputation uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from token_journey.journey.spec import Spec
from token_journey.sites import decoder_layers

# (path inside a decoder layer, reference key, "out" = module output | "in" = first input)
_LAYER_POINTS = (
    ("input_layernorm", "norm_attn", "out"),
    ("self_attn.q_proj", "q", "out"),
    ("self_attn.k_proj", "k", "out"),
    ("self_attn.v_proj", "v", "out"),
    ("self_attn.q_norm", "q_norm", "out"),
    ("self_attn.k_norm", "k_norm", "out"),
    ("self_attn.o_proj", "heads_concat", "in"),
    ("self_attn.o_proj", "o_proj", "out"),
    ("mlp.gate_proj", "gate", "out"),
    ("mlp.up_proj", "up", "out"),
    ("mlp.act_fn", "act", "out"),
    ("mlp.down_proj", "product", "in"),
    ("mlp.down_proj", "down", "out"),
    ("", "resid_post", "out"),
)
_LLAMA_POINTS = (
    ("post_attention_layernorm", "resid_mid", "in"),
    ("post_attention_layernorm", "norm_mlp", "out"),
)
_GEMMA_POINTS = (
    ("post_attention_layernorm", "attn_post_norm", "out"),
    ("pre_feedforward_layernorm", "resid_mid", "in"),
    ("pre_feedforward_layernorm", "norm_mlp", "out"),
    ("post_feedforward_layernorm", "mlp_post_norm", "out"),
)


def text_base(model: nn.Module) -> nn.Module:
    """The decoder stack holding `embed_tokens`, `layers`, `norm` and `rotary_emb`."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return getattr(base, "language_model", base)


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


class _AttentionWatch(TorchFunctionMode):
    """Records the eager attention's matmuls and softmax for the layer currently running."""

    def __init__(self, refs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.refs = refs
        self.layer: int | None = None
        self.matmuls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.layer is None:
            return out
        key = f"L{self.layer}."
        if func is torch.matmul and self.matmuls == 0:
            self.refs[key + "q_rope"] = args[0][0].detach()  # (H, T, hd)
            self.refs[key + "k_expanded"] = args[1][0].transpose(-1, -2).detach()  # (H, T, hd)
            self.refs[key + "qk"] = out[0].detach()  # (H, T, T)
            self.matmuls = 1
        elif func is torch.nn.functional.softmax:
            self.refs[key + "scores"] = args[0][0].detach()
            self.refs[key + "probs"] = out[0].detach()
        elif func is torch.matmul and self.matmuls == 1:
            self.refs[key + "v_expanded"] = args[1][0].detach()
            self.refs[key + "weighted"] = out[0].detach()
            self.matmuls = 2
        return out


def _module(root: nn.Module, path: str) -> nn.Module | None:
    """A submodule by dotted path, or None where this architecture has no such module."""
    module = root
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@contextlib.contextmanager
def _hooks(model: nn.Module, spec: Spec, refs: dict[str, torch.Tensor], watch: _AttentionWatch) -> Iterator[None]:
    handles = []

    def out_hook(key: str):
        return lambda _m, _i, output: refs.__setitem__(key, _first(output)[0].detach())

    def in_hook(key: str):
        return lambda _m, inputs: refs.__setitem__(key, inputs[0][0].detach())

    def attn_pre(layer: int):
        def hook(_m: nn.Module, _inputs: Any) -> None:
            watch.layer, watch.matmuls = layer, 0

        return hook

    def attn_post(_m: nn.Module, _inputs: Any, _output: Any) -> None:
        watch.layer = None

    def rope_hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else "all")
        refs[f"rope_cos.{layer_type}"], refs[f"rope_sin.{layer_type}"] = output[0][0].detach(), output[1][0].detach()

    base = text_base(model)
    points = _LAYER_POINTS + (_GEMMA_POINTS if spec.gemma else _LLAMA_POINTS)
    try:
        handles.append(base.embed_tokens.register_forward_hook(out_hook("embed")))
        handles.append(base.norm.register_forward_hook(out_hook("final_norm")))
        handles.append(model.get_output_embeddings().register_forward_hook(out_hook("lm_head")))
        handles.append(base.rotary_emb.register_forward_hook(rope_hook, with_kwargs=True))
        for layer, block in enumerate(decoder_layers(model)):
            handles.append(block.self_attn.register_forward_pre_hook(attn_pre(layer)))
            handles.append(block.self_attn.register_forward_hook(attn_post))
            for path, key, where in points:
                module = _module(block, path)
                if module is not None:
                    hook = out_hook(f"L{layer}.{key}") if where == "out" else in_hook(f"L{layer}.{key}")
                    handle = module.register_forward_hook(hook) if where == "out" else module.register_forward_pre_hook(hook)
                    handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with the eager attention kernel, whose matmuls and softmax the watch can see."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@torch.inference_mode()
def capture_references(model: nn.Module, spec: Spec, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of `input_ids [1, seq]`; every hooked tensor keyed like ``"L3.q"`` plus ``"logits"``."""
    refs: dict[str, torch.Tensor] = {}
    watch = _AttentionWatch(refs)
    with eager_attention(model), _hooks(model, spec, refs, watch), watch:
        output = model(input_ids=input_ids, use_cache=False)
    refs["logits"] = output.logits[0].detach()
    for layer in range(spec.n_layers):
        if f"L{layer}.k_expanded" in refs:
            # repeat_kv repeats each K/V head n_rep times in a row; every n_rep-th is the original.
            refs[f"L{layer}.k_rope"] = refs[f"L{layer}.k_expanded"][:: spec.n_rep]
    return refs


@torch.inference_mode()
def capture_modules(model: nn.Module, input_ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Outputs of every leaf module in call order: what can still be shown for an unsupported model."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(
                module.register_forward_hook(
                    lambda _m, _i, out, name=name: seen.append((name, _first(out)[0].detach())) if isinstance(_first(out), torch.Tensor) else None
                )
            )
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen
