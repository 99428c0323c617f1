"""Interventions that test a graph: edit a latent in the real model and compare with the graph's prediction.

For each of the graph's most influential latents (layer L, position p, latent k, activation a), the real
model runs again with the journey's transcoder edit (`journey.steer`): the latent set to 0 (the ablation,
`tc:L:k@p`) and to 2a (`tc:L:k@p=2a`), i.e. (0 − a)·W_dec[k] or (+a)·W_dec[k] added to the MLP output at
(L, p), everything else free (attention, norms, every later MLP). The change of the top logit target (the
logit minus the mean logit, before soft-capping) is measured. The graph predicts the ablation's change two
ways (and the doubling's as minus the ablation's, being linear):

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
from token_journey.config.journey import Edit
from token_journey.journey.sae_hits import LayerSAE
from token_journey.journey.steer import edited, plan_edits
from token_journey.sae.base import SAE
from token_journey.sae.io import LazySAE


@dataclass(frozen=True)
class Intervention:
    layer: int
    position: int
    latent: int
    activation: float
    direct: float
    """The graph's direct edge prediction of the logit's change when ablated (minus the edge)."""
    total: float
    """The graph's prediction through every path, when ablated."""
    measured: float
    """The real model's change of the logit with the latent ablated."""
    doubled: float
    """The real model's change with the latent steered to twice its activation (the graph predicts -total)."""
    spec: str
    """The journey's `--ablate` for this latent (`tc:LAYER:LATENT@POSITION`), to see the whole pass."""


def total_derivatives(graph: Graph, target_row: int) -> torch.Tensor:
    """d(target) / d(activation of each latent) `[F]` through every path of the graph (see the module docstring)."""
    F = graph.n_features
    a = graph.activations.double()
    per_unit = graph.adjacency[:, :F].double() / a  # D[t, s] = edge(s -> t) / a_s
    latents = per_unit[:F]
    identity = torch.eye(F, dtype=torch.float64)
    return torch.linalg.solve((identity - latents).T, per_unit[target_row]).float()


@torch.no_grad()
def target_value(model: nn.Module, token_ids: Sequence[int], token: int, plan: list[tuple[LayerSAE, list[Edit]]] | None = None) -> float:
    """The last position's logit of `token` minus the mean logit, before soft-capping, with the journey's edits in `plan`."""
    captured = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("logits", out[0, -1].float()))
    ids = torch.tensor([list(token_ids)], device=head.weight.device)
    try:
        with edited(model, plan or []):
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    logits = captured["logits"]
    return float(logits[token] - logits.mean())


def intervene(model: nn.Module, graph: Graph, pruned: Pruned, transcoders: Sequence[SAE], top: int = 10) -> list[Intervention]:
    """Ablate, then double, each of the `top` most influential latents in the real model; measured beside the graph's predictions."""
    F, row = graph.n_features, graph.logit_slice.start
    token = graph.logit_ids[0]
    order = pruned.influence[:F].argsort(descending=True)[:top].tolist()
    totals = total_derivatives(graph, row)
    clean = target_value(model, graph.token_ids, token)
    saes = [LayerSAE("mlp_out", layer, tc.cfg.name or "transcoder", LazySAE.holding(tc)) for layer, tc in enumerate(transcoders)]
    out = []
    for i in order:
        layer, pos, k = graph.features[i].tolist()
        a = float(graph.activations[i])
        spec = f"tc:{layer}:{k}@{pos}"
        changes = []
        for value in (0.0, 2 * a):
            plan = plan_edits([Edit(layer, k, value, spec, pos, transcoder=True)], saes, graph.n_layers, graph.n_pos)
            changes.append(target_value(model, graph.token_ids, token, plan) - clean)
        out.append(Intervention(layer, pos, k, a, -float(graph.adjacency[row, i]), -a * float(totals[i]), changes[0], changes[1], spec))
    return out


def agreement(interventions: Sequence[Intervention]) -> dict[str, float]:
    """How well the graph's predictions match the measured changes: correlation and relative error of each.

    `direct` and `total`: the ablations against the direct-edge and all-path predictions; `doubled`: the
    doublings against the all-path prediction (minus the ablation's)."""
    pairs = {
        "direct": ([x.direct for x in interventions], [x.measured for x in interventions]),
        "total": ([x.total for x in interventions], [x.measured for x in interventions]),
        "doubled": ([-x.total for x in interventions], [x.doubled for x in interventions]),
    }
    result = {}
    for name, (predicted, measured) in pairs.items():
        p, m = torch.tensor(predicted, dtype=torch.float64), torch.tensor(measured, dtype=torch.float64)
        result[f"{name}_correlation"] = float(torch.corrcoef(torch.stack([p, m]))[0, 1]) if len(m) > 1 else float("nan")
        result[f"{name}_relative_error"] = float((p - m).norm() / m.norm().clamp(min=1e-12))
    return result
