"""Where activations live in each architecture, and how to read or replace them.

Conventions, stated once for the whole project:

- ``layer`` is a 0-based decoder-layer index.
- ``resid_post`` at layer L is the output of decoder layer L, i.e. the residual stream after
  the layer's attention and MLP have been added. For L < n_layers - 1 it equals
  ``output_hidden_states[L + 1]`` of transformers; for the last layer transformers reports the
  stream *after* the final norm, while ``resid_post`` is always before it.
- ``attn_out`` and ``mlp_out`` are the sublayer outputs exactly as they are added to the
  residual stream. For Llama-like models that is the attention output projection and the MLP
  output; for Gemma 2/3 it is the output of the post-attention / post-feedforward norm. So in
  every family ``resid_post[L] = resid_pre[L] + attn_out[L] + mlp_out[L]``.
- ``mlp_in`` is the MLP's input: the output of the pre-MLP norm (Llama's post_attention_layernorm,
  Gemma's pre_feedforward_layernorm), read (and spliced) by a forward pre-hook on the ``mlp``
  module. A transcoder maps ``mlp_in`` to ``mlp_out`` of the same layer.

Capture uses forward hooks and stops the forward pass right after the deepest decoder layer
needed, so no work is spent on later layers or on the LM head.

`record_layer_inputs` + `resume` rerun only the end of a pass: one pass records what the decoder
hands to each layer from some layer on, and later passes that differ only from there (an ablation
or a splice at that layer) start from it instead of recomputing the layers before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from token_journey.errors import TokenJourneyError

SITES = ("resid_post", "attn_out", "mlp_in", "mlp_out")
INPUT_SITES = frozenset({"mlp_in"})
"""Sites read as a module's input (forward pre-hook) rather than its output."""


@dataclass(frozen=True)
class Family:
    """Names of the decoder-layer submodules whose outputs are the `attn_out`/`mlp_out` sites
    (and whose input is `mlp_in`)."""

    name: str
    attn_out_module: str
    mlp_out_module: str
    mlp_module: str = "mlp"


_LLAMA = Family("llama", attn_out_module="self_attn", mlp_out_module="mlp")
_GEMMA = Family("gemma", attn_out_module="post_attention_layernorm", mlp_out_module="post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gemma3_text": _GEMMA,
}


def family_of(model: nn.Module) -> Family:
    """The site family of a transformers causal LM, or a clear error naming the supported ones."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in FAMILIES:
        raise TokenJourneyError(f"architecture {model_type!r} has no activation-site map; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (Llama/Gemma layouts, text or multimodal)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TokenJourneyError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def check_point(model: nn.Module, site: str, layer: int) -> None:
    """Reject an unknown site or an out-of-range layer with the valid choices."""
    if site not in SITES:
        raise TokenJourneyError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    n_layers = len(decoder_layers(model))
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise TokenJourneyError(f"layer {layer!r} is out of range; this model has layers 0..{n_layers - 1}")


def _site_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    check_point(model, site, layer)
    block = decoder_layers(model)[layer]
    if site == "resid_post":
        return block
    family = family_of(model)
    name = {"attn_out": family.attn_out_module, "mlp_in": family.mlp_module, "mlp_out": family.mlp_out_module}[site]
    return getattr(block, name)


def _main_tensor(output: Any) -> torch.Tensor:
    """Attention modules return (output, weights); decoder layers return a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by a hook once everything needed has been captured, to skip the rest of the model."""


def _stop(*_: Any) -> None:
    raise _StopForward


def _base_model(model: nn.Module) -> nn.Module:
    """The decoder without the LM head, so a capture never computes logits."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


@torch.inference_mode()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    points: Iterable[tuple[str, int]],
    attention_mask: torch.Tensor | None = None,
) -> dict[tuple[str, int], torch.Tensor]:
    """Run one forward pass and return the activations at every (site, layer) in `points`.

    Shapes: `input_ids` [batch, seq] -> each activation [batch, seq, d_model]. The pass stops
    after the deepest decoder layer named in `points`.
    """
    points = sorted(set(points), key=lambda p: (p[1], SITES.index(p[0]) if p[0] in SITES else -1))
    if not points:
        raise TokenJourneyError("nothing to capture: give at least one (site, layer)")
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    deepest = max(layer for _, layer in points)

    def make_hook(point: tuple[str, int]) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[point] = _main_tensor(output).detach()

        return hook

    def make_pre_hook(point: tuple[str, int]) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: Any) -> None:
            captured[point] = inputs[0].detach()

        return hook

    try:
        for site, layer in points:
            module = _site_module(model, site, layer)
            if site in INPUT_SITES:
                handles.append(module.register_forward_pre_hook(make_pre_hook((site, layer))))
            else:
                handles.append(module.register_forward_hook(make_hook((site, layer))))
        # Registered last, so it runs after any capture hook on the same block.
        handles.append(decoder_layers(model)[deepest].register_forward_hook(_stop))
        try:
            _base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in points if p not in captured]
    if missing:
        raise TokenJourneyError(f"forward pass did not reach {missing}; is the model a supported decoder?")
    return captured


@contextlib.contextmanager
def splice(model: nn.Module, site: str, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the activation at (site, layer) is replaced by `replace(activation)`.

    Used to measure the LM loss with an SAE reconstruction in place of the real activation.
    `replace` maps [batch, seq, d_model] to the same shape.
    """
    module = _site_module(model, site, layer)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        new = replace(_main_tensor(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def pre_hook(_module: nn.Module, inputs: Any) -> Any:
        return (replace(inputs[0]), *inputs[1:])

    if site in INPUT_SITES:
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class LayerInputs:
    """What one forward pass handed to the decoder layers from `first` on, so later passes can resume there.

    `hidden`: the hidden state [batch, seq, d_model] entering layer `first`; `calls[i]`: the positional
    arguments after the hidden state and the keyword arguments (mask, position embeddings, ...) of layer
    `first + i`, exactly as the decoder built them: Gemma's per-layer sliding or global mask and rotary
    table included, and Gemma's embedding scale already inside `hidden`.
    """

    first: int
    hidden: torch.Tensor | None = None
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


@contextlib.contextmanager
def record_layer_inputs(model: nn.Module, first: int) -> Iterator[LayerInputs]:
    """Within the block, a forward pass records what decoder layers `first`.. receive (see `LayerInputs`)."""
    layers = decoder_layers(model)
    record = LayerInputs(first, calls=[((), {})] * (len(layers) - first))

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
            if index == first:
                record.hidden = hidden
            record.calls[index - first] = (rest, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in range(first, len(layers))]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def resume(model: nn.Module, inputs: LayerInputs, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """The decoder's final (normed) hidden state [batch, seq, d_model] when `hidden` enters layer `start`.

    Runs only layers `start`.. (`start` >= `inputs.first`; `start` = n_layers runs none) with the
    arguments the recorded pass gave them, then the final norm: the rest of that pass, from a new
    hidden state, without recomputing the layers before `start`. Hooks on the layers (a `splice`) apply.
    """
    layers = decoder_layers(model)
    if not inputs.first <= start <= len(layers):
        raise TokenJourneyError(f"cannot resume at layer {start}: the pass was recorded from layer {inputs.first}")
    for index in range(start, len(layers)):
        args, kwargs = inputs.calls[index - inputs.first]
        hidden = _main_tensor(layers[index](hidden, *args, **kwargs))
    return _final_norm(model)(hidden)


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder applies after its last layer (next to `decoder_layers`)."""
    base = _base_model(model)
    norm = getattr(getattr(base, "language_model", base), "norm", None)
    if not isinstance(norm, nn.Module):
        raise TokenJourneyError(f"cannot find the final norm of {type(model).__name__}")
    return norm
