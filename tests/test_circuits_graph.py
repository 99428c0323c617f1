"""The local replacement model and its attribution graph, checked against the real model (tiny models of each family)."""

from __future__ import annotations

import pytest
import torch

from support.tiny import tiny_model, tiny_tokenizer
from support.transcoders import random_transcoders
from token_journey.circuits import graph as graph_module
from token_journey.circuits import replacement
from token_journey.circuits.graph import Graph, build_graph, prune, scores, select_logits
from token_journey.circuits.verify import TOLERANCE, verify
from token_journey.errors import TokenJourneyError
from token_journey.sae.base import SAESpec
from token_journey.sae.registry import build_sae
from token_journey.sites import capture

TEXT = "The capital of France is Paris, and"  # longer than the tiny sliding window (4)


@pytest.fixture(scope="module")
def ids():
    return [0] + tiny_tokenizer()(TEXT, add_special_tokens=False).input_ids  # BOS first, as circuit-tracer prompts are


def _graph(family, ids, **kwargs):
    model = tiny_model(family)
    tcs = random_transcoders(3, **kwargs)
    return model, tcs, build_graph(model, ids, tcs, batch_size=50, progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("architecture", ["jumprelu_skip_transcoder", "topk_transcoder"])
@torch.no_grad()
def test_replacement_model_reproduces_the_model_and_edges_add_up(family, architecture, ids):
    model, tcs, graph = _graph(family, ids, architecture=architecture)
    assert graph.n_features > 50 and len(graph.logit_ids) >= 1
    check = verify(graph, model)
    assert check.logits_max_abs_diff <= TOLERANCE and check.completeness_error <= TOLERANCE, check
    # The values themselves, from the model's own hooks rather than our clean pass.
    got = capture(model, torch.tensor([ids]), [("mlp_in", L) for L in range(3)])
    for i, (L, p, k) in enumerate(graph.features.tolist()):
        got["mlp_in", L] = got["mlp_in", L].clone()
        assert abs(float(tcs[L].pre_acts(got["mlp_in", L][0, p : p + 1])[0, k]) - float(graph.values[i])) <= TOLERANCE
        assert float(graph.activations[i]) == pytest.approx(float(tcs[L].encode(got["mlp_in", L][0, p : p + 1])[0, k]), abs=TOLERANCE)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    if family == "gemma2":  # the targets are the logits before soft-capping: undo it
        cap = model.config.final_logit_softcapping
        logits = torch.atanh(logits / cap) * cap
    want = logits[graph.logit_ids] - logits.mean()
    assert torch.allclose(graph.values[graph.logit_slice], want, atol=1e-3)  # atanh amplifies rounding near the cap
    # No latent or error node at the BOS position, and no edge from a later position or layer.
    assert int(graph.features[:, 1].min()) >= 1
    A, F = graph.adjacency, graph.n_features
    later = (graph.features[:, None, 1] < graph.features[None, :, 1]) | (graph.features[:, None, 0] <= graph.features[None, :, 0])
    assert A[:F, :F][later].abs().max() == 0
    assert A[graph.error_slice].abs().max() == 0 and A[graph.token_slice].abs().max() == 0


def test_an_edge_into_a_logit_equals_its_formula(ids):
    """A last-layer latent at the last position reaches the logits only through the final norm: a·W_dec[k]·s·w·(u_t − ū)."""
    model, tcs, graph = _graph("llama", ids)
    clean = replacement.clean_pass(model, ids, tcs)
    scale = clean.tape.values["final_norm", 0][-1]
    w = model.model.norm.weight
    u = model.lm_head.weight
    rows = graph.logit_slice
    last = ((graph.features[:, 0] == 2) & (graph.features[:, 1] == graph.n_pos - 1)).nonzero(as_tuple=True)[0]
    assert len(last) > 0
    for i in last.tolist():
        k = int(graph.features[i, 2])
        write = graph.activations[i] * tcs[2].W_dec[k]
        want = (write * scale * w) @ (u[graph.logit_ids] - u.mean(0)).T
        torch.testing.assert_close(graph.adjacency[rows, i], want.detach(), atol=1e-6, rtol=1e-4)
    # The same latent at an earlier position cannot reach the last position's logits after the last attention.
    early = ((graph.features[:, 0] == 2) & (graph.features[:, 1] < graph.n_pos - 1)).nonzero(as_tuple=True)[0]
    assert graph.adjacency[rows][:, early].abs().max() == 0


def _planted(monkeypatch, change):
    """Build graphs whose tape is altered by `change(tape)` after the clean pass."""
    real = replacement.clean_pass

    def faulty(*args, **kwargs):
        clean = real(*args, **kwargs)
        change(clean.tape.values, clean.spec)
        return clean

    monkeypatch.setattr(replacement, "clean_pass", faulty)


@pytest.mark.parametrize(
    "family,norm", [("llama", "attn_norm"), ("llama", "mlp_norm"), ("llama", "final_norm"), ("gemma2", "attn_post_norm"), ("gemma3", "mlp_norm")]
)
def test_a_missing_norm_scale_fails_both_checks(monkeypatch, ids, family, norm):
    layer = 0 if norm == "final_norm" else 1
    _planted(monkeypatch, lambda tape, spec: tape.__setitem__((norm, layer), torch.ones_like(tape[norm, layer])))
    model, _, graph = _graph(family, ids)
    check = verify(graph, model)
    assert check.logits_max_abs_diff > 10 * TOLERANCE and check.completeness_error > 10 * TOLERANCE, check


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_an_unfrozen_attention_pattern_fails_completeness(monkeypatch, ids, family):
    """A replacement model whose attention follows its input is the real model again (logits agree) but not linear:
    the bias it gives with every node zeroed no longer completes the edges (which the transpose reads off the tape)."""
    model, _, honest = _graph(family, ids)
    assert verify(honest, model).completeness_error < TOLERANCE / 10
    frozen = replacement.Tape.get

    def unfrozen(self, key, compute):
        return compute() if key[0] == "probs" and not self.recording else frozen(self, key, compute)

    monkeypatch.setattr(replacement.Tape, "get", unfrozen)
    model, _, graph = _graph(family, ids)
    check = verify(graph, model)
    assert check.logits_max_abs_diff <= TOLERANCE
    assert check.completeness_error > TOLERANCE, check  # the stage refuses it (checks.require)


def test_bad_transcoder_sets_are_refused(ids):
    model = tiny_model("llama")
    with pytest.raises(TokenJourneyError, match="one transcoder per layer: got 2 for 3 layers"):
        build_graph(model, ids, random_transcoders(2), progress=False)
    sae = build_sae(SAESpec("jumprelu", 32, 64, site="resid_post", layer=1))
    with pytest.raises(TokenJourneyError, match="'jumprelu' is not a transcoder"):
        build_graph(model, ids, [*random_transcoders(1), sae, *random_transcoders(1)], progress=False)
    with pytest.raises(TokenJourneyError, match="width d_in=16 but the model's d_model is 32"):
        build_graph(model, ids, random_transcoders(3, d=16), progress=False)
    with pytest.raises(TokenJourneyError, match="constant_positions=9"):
        build_graph(model, ids[:9], random_transcoders(3), constant_positions=9, progress=False)


# ---- influence and pruning on a graph small enough to work out by hand -----------------------


def _toy() -> Graph:
    """Nodes: latents a (0), b (1); errors (2, 3: one layer, two positions); tokens (4, 5); one logit (6).

    logit <- a (3), b (-1), error@1 (0.5), token@1 (0.5); a <- token@0 (2); b <- token@1 (1), a (1).
    """
    A = torch.zeros(7, 7)
    A[6, 0], A[6, 1], A[6, 3], A[6, 5] = 3.0, -1.0, 0.5, 0.5
    A[0, 4] = 2.0
    A[1, 5], A[1, 0] = 1.0, 1.0
    return Graph(
        token_ids=[5, 6],
        features=torch.tensor([[0, 1, 3], [0, 1, 4]]),
        activations=torch.ones(2),
        n_layers=1,
        logit_ids=[9],
        logit_probs=torch.tensor([1.0]),
        adjacency=A,
        bias=torch.zeros(7),
        values=torch.zeros(7),
        replacement_logits=torch.zeros(2, 10),
        constant_positions=0,
    )


def test_influence_pruning_and_scores_by_hand():
    graph = _toy()
    full = prune(graph, 1.0, 1.0)
    # Row shares: logit: a 0.6, b 0.2, err1 0.1, tok1 0.1; a: tok0 1; b: tok1 0.5, a 0.5.
    # Influence: a = 0.6 + 0.2·0.5 = 0.7; b = 0.2; err1 = 0.1; tok0 = 0.7; tok1 = 0.1 + 0.2·0.5 = 0.2.
    torch.testing.assert_close(full.influence, torch.tensor([0.7, 0.2, 0.0, 0.1, 0.7, 0.2, 0.0]))
    s = scores(graph)
    assert s["replacement"] == pytest.approx(0.9 / 1.0)  # tokens 0.9 of tokens + errors 1.0
    # Non-error share 1 everywhere but the logit (0.9); weights influence + logit weight: 0.7, 0.2, 0, 0.1, 0.7, 0.2, 1.
    assert s["completeness"] == pytest.approx((2.9 - 0.1 * 1.0) / 2.9)
    # At 0.5 of the influence only a and tok0 (0.7 each) are needed; b and the error node go.
    half = prune(graph, 0.5, 1.0)
    assert half.node_mask.tolist() == [True, False, False, False, True, True, True]
    assert half.edge_mask[6, 0] and half.edge_mask[0, 4] and not half.edge_mask[6, 1]
    with pytest.raises(TokenJourneyError, match="node_threshold=1.5 must be between 0 and 1"):
        prune(graph, 1.5)


def test_select_logits_takes_the_smallest_set_reaching_the_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert select_logits(logits, 10, 0.96)[0] == [0, 1, 2, 3]
    assert select_logits(logits, 10, 0.81)[0] == [0, 1, 2]
    assert select_logits(logits, 10, 0.79)[0] == [0, 1]
    assert select_logits(logits, 2, 0.99)[0] == [0, 1]


@pytest.mark.parametrize("family,round_rows", [("llama", 2048), ("gemma2", 16)])
def test_max_feature_nodes_folds_the_other_latents_into_the_error_nodes(monkeypatch, ids, family, round_rows):
    """With a cap, the kept latents' edges are the full graph's, each error column gains its folded latents' columns, and the checks still hold
    (in one ranking round, and in many)."""
    monkeypatch.setattr(graph_module, "ROUND_ROWS", round_rows)
    model, tcs, full = _graph(family, ids)
    cap = full.n_features // 3
    capped = build_graph(model, ids, tcs, batch_size=7, progress=False, max_feature_nodes=cap)
    assert capped.n_features == cap and capped.folded_latents == full.n_features - cap
    assert torch.equal(build_graph(model, ids, tcs, batch_size=50, progress=False, max_feature_nodes=10**6).adjacency, full.adjacency)
    check = verify(capped, model)
    assert check.logits_max_abs_diff <= TOLERANCE and check.completeness_error <= TOLERANCE, check
    index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    kept = torch.tensor([index[tuple(f)] for f in capped.features.tolist()])
    rows = torch.cat([kept, torch.arange(full.logit_slice.start, full.logit_slice.stop)])
    capped_rows = capped.target_rows
    torch.testing.assert_close(capped.adjacency[capped_rows][:, :cap], full.adjacency[rows][:, kept], atol=1e-6, rtol=1e-5)
    dropped = torch.tensor(sorted(set(range(full.n_features)) - set(kept.tolist())))
    folded = full.adjacency[rows][:, full.error_slice].clone()
    T = full.n_pos
    for i in dropped.tolist():
        L, p, _ = full.features[i].tolist()
        folded[:, L * T + p] += full.adjacency[rows, i]
    torch.testing.assert_close(capped.adjacency[capped_rows][:, capped.error_slice], folded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(capped.values[capped_rows], full.values[rows])
    # The latent with the largest direct effect on the top logit is among the kept ones (rows go by influence).
    top = int(full.adjacency[full.logit_slice.start, : full.n_features].abs().argmax())
    assert top in kept.tolist()
    with pytest.raises(TokenJourneyError, match="max_feature_nodes=0 must be >= 1"):
        build_graph(model, ids, tcs, progress=False, max_feature_nodes=0)
