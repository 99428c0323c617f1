"""Interventions: the graph's total-effect prediction against the frozen replacement model run again, and the real model's change."""

from __future__ import annotations

import pytest
import torch

from support.tiny import tiny_model, tiny_tokenizer
from support.transcoders import random_transcoders
from token_journey.circuits import replacement
from token_journey.circuits.graph import build_graph, prune
from token_journey.circuits.intervene import Intervention, agreement, intervene, target_value, total_derivatives
from token_journey.journey import ops
from token_journey.sites import splice

TEXT = "The capital of France is Paris, and"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3")
    ids = [0] + tiny_tokenizer()(TEXT, add_special_tokens=False).input_ids
    tcs = random_transcoders(3)
    graph = build_graph(model, ids, tcs, progress=False)
    return model, ids, tcs, graph


@torch.no_grad()
def _replacement_value(model, ids, tcs, graph, edit=None):
    """The logit target in the replacement model with attention, norms and errors frozen but every latent recomputed (JumpReLU, not linearised)."""
    clean = replacement.clean_pass(model, ids, tcs)

    def write(layer):
        def mlp(m):
            out = tcs[layer](m) + clean.errors[layer]
            if edit is not None and edit[0] == layer:
                out = out.clone()
                out[edit[1]] -= edit[2]
            return out

        return mlp

    outputs = replacement.run(model, clean.spec, clean.tape, clean.embeds, [write(L) for L in range(3)], [None] * 3)
    head, _ = replacement.unembed(model)
    logits = ops.linear(outputs.final[-1], head)
    return float(logits[graph.logit_ids[0]] - logits.mean())


def test_total_effect_is_the_frozen_model_run_again(setup):
    """A small ablation (5% of the write), so no latent crosses its threshold: the graph's total prediction is exact."""
    model, ids, tcs, graph = setup
    totals = total_derivatives(graph, graph.logit_slice.start)
    base = _replacement_value(model, ids, tcs, graph)
    assert base == pytest.approx(float(graph.values[graph.logit_slice.start]), abs=1e-4)
    checked = 0
    for i in range(0, graph.n_features, max(1, graph.n_features // 12)):
        layer, pos, k = graph.features[i].tolist()
        a = float(graph.activations[i])
        eps = 0.05
        moved = _replacement_value(model, ids, tcs, graph, (layer, pos, eps * a * tcs[layer].W_dec[k]))
        assert moved - base == pytest.approx(-eps * a * float(totals[i]), abs=2e-5, rel=1e-3)
        checked += 1
    assert checked >= 10


def test_interventions_measure_the_real_model(setup):
    model, ids, tcs, graph = setup
    found = intervene(model, graph, prune(graph), tcs, top=5)
    assert len(found) == 5
    token = graph.logit_ids[0]
    clean = target_value(model, ids, token)
    for x in found:
        i = ((graph.features == torch.tensor([x.layer, x.position, x.latent])).all(1)).nonzero()[0, 0]
        assert x.direct == pytest.approx(-float(graph.adjacency[graph.logit_slice.start, i]))
        assert x.spec == f"tc:{x.layer}:{x.latent}@{x.position}"
        # Independently of the journey's edit: the real model with ∓a·W_dec[k] added to mlp_out at (layer, position) by a hook.
        for change, measured in ((-x.activation, x.measured), (x.activation, x.doubled)):
            with splice(model, "mlp_out", x.layer, _add_at(x.position, change * tcs[x.layer].W_dec[x.latent].detach())):
                assert target_value(model, ids, token) - clean == pytest.approx(measured, abs=1e-4)
    summary = agreement(found)
    assert set(summary) == {f"{n}_{m}" for n in ("direct", "total", "doubled") for m in ("correlation", "relative_error")}


def _add_at(position, vector):
    def add(out):
        out = out.clone()
        out[:, position] += vector
        return out

    return add


def test_agreement_of_perfect_and_of_opposite_predictions():
    same = [Intervention(0, 1, 2, 1.0, d, d, d, -d, "tc:0:2@1") for d in (1.0, -2.0, 0.5)]
    assert agreement(same)["total_correlation"] == pytest.approx(1.0) and agreement(same)["total_relative_error"] == pytest.approx(0.0)
    assert agreement(same)["doubled_correlation"] == pytest.approx(1.0) and agreement(same)["doubled_relative_error"] == pytest.approx(0.0)
    opposite = [Intervention(0, 1, 2, 1.0, -d, -d, d, -d, "tc:0:2@1") for d in (1.0, -2.0, 0.5)]
    assert agreement(opposite)["direct_correlation"] == pytest.approx(-1.0) and agreement(opposite)["doubled_correlation"] == pytest.approx(-1.0)
