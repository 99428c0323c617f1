"""Interventions that test a graph: remove a latent's write in the real model and compare with the graph's prediction.

For each of the graph's most influential latents (layer L, position p, latent k, activation a), the real
model runs again with a·W_dec[k] subtracted from the MLP output at (L, p), everything else free
(attention, norms, every later MLP), and the change of the top logit target (the logit minus the mean
logit, before soft-capping) is measured. The graph predicts that change two ways:

- *direct*: minus the edge from the latent to the logit (what the graph draws);
- *total*: the change through every path of the graph, with each active latent's activation following
  its pre-activation (JumpReLU's slope is 1 above threshold) and attention, norms and error nodes frozen:
  with D[t, s] = edge(s -> t) / a_s, the derivative of every target by every latent's activation, the
  total derivative of the logit is d = D_logit (I - D_latents)^-1, and the prediction -a · d.

The difference between total and measured is what the freezes and the transcoders' errors leave out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from token_journey.circuits.graph import Graph, Pruned
from token_journey.sae.base import SAE
from token_journey.sites import splice


@dataclass(frozen=True)
class Intervention:
    layer: int
    position: int
    latent: int
    activation: float
    direct: float
    """The graph's direct edge prediction of the logit's change (minus the edge)."""
    total: float
    """The graph's prediction through every path."""
    measured: float
    """The real model's change of the logit with the latent's write removed."""


def total_derivatives(graph: Graph, target_row: int) -> torch.Tensor:
    """d(target) / d(activation of each latent) `[F]` through every path of the graph (see the module docstring)."""
    F = graph.n_features
    a = graph.activations.double()
    per_unit = graph.adjacency[:, :F].double() / a  # D[t, s] = edge(s -> t) / a_s
    latents = per_unit[:F]
    identity = torch.eye(F, dtype=torch.float64)
    return torch.linalg.solve((identity - latents).T, per_unit[target_row]).float()


@torch.no_grad()
def target_value(model: nn.Module, token_ids: Sequence[int], token: int, edit: tuple[int, int, torch.Tensor] | None = None) -> float:
    """The last position's logit of `token` minus the mean logit, before soft-capping; `edit` = (layer, position, vector subtracted from mlp_out)."""
    captured = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("logits", out[0, -1].float()))
    ids = torch.tensor([list(token_ids)], device=head.weight.device)
    try:
        if edit is None:
            model(input_ids=ids, use_cache=False)
        else:
            layer, pos, vector = edit

            def remove(out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[:, pos] -= vector.to(out.dtype)
                return out

            with splice(model, "mlp_out", layer, remove):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    logits = captured["logits"]
    return float(logits[token] - logits.mean())


def intervene(model: nn.Module, graph: Graph, pruned: Pruned, transcoders: Sequence[SAE], top: int = 10) -> list[Intervention]:
    """Ablate each of the `top` most influential latents in the real model; measured beside the graph's predictions."""
    F, row = graph.n_features, graph.logit_slice.start
    token = graph.logit_ids[0]
    order = pruned.influence[:F].argsort(descending=True)[:top].tolist()
    totals = total_derivatives(graph, row)
    clean = target_value(model, graph.token_ids, token)
    out = []
    for i in order:
        layer, pos, k = graph.features[i].tolist()
        a = float(graph.activations[i])
        write = a * transcoders[layer].W_dec[k].detach().float()
        measured = target_value(model, graph.token_ids, token, (layer, pos, write)) - clean
        out.append(Intervention(layer, pos, k, a, -float(graph.adjacency[row, i]), -a * float(totals[i]), measured))
    return out


def agreement(interventions: Sequence[Intervention]) -> dict[str, float]:
    """How well the graph's predictions match the measured changes: correlation and relative error of each."""
    measured = torch.tensor([x.measured for x in interventions], dtype=torch.float64)
    result = {}
    for name in ("direct", "total"):
        predicted = torch.tensor([getattr(x, name) for x in interventions], dtype=torch.float64)
        both = torch.stack([predicted, measured])
        result[f"{name}_correlation"] = float(torch.corrcoef(both)[0, 1]) if len(measured) > 1 else float("nan")
        result[f"{name}_relative_error"] = float((predicted - measured).norm() / measured.norm().clamp(min=1e-12))
    return result
