"""The written-out transpose of the replacement model against autograd's vector-Jacobian products of `replacement.run`."""

from __future__ import annotations

import pytest
import torch

from support.tiny import tiny_model, tiny_tokenizer
from support.transcoders import random_transcoders
from token_journey.circuits import adjoint as adjoint_module
from token_journey.circuits import replacement
from token_journey.circuits.adjoint import Adjoint

TEXT = "The capital of France is Paris, and"  # longer than the tiny sliding window (4)


def _setup(family: str, with_skip: bool):
    model = tiny_model(family)
    ids = [0] + tiny_tokenizer()(TEXT, add_special_tokens=False).input_ids
    clean = replacement.clean_pass(model, ids, random_transcoders(3))
    d, g = clean.spec.d_model, torch.Generator().manual_seed(1)
    # Skip maps large enough that a wrong transpose of them shows (the fitted-looking ones are tiny).
    skips = [torch.randn(d, d, generator=g) * 0.3 if with_skip else None for _ in range(clean.spec.n_layers)]
    return model, clean, skips, g


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of the largest entry (gradients here span several orders of magnitude)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max() / want.abs().max())


def _reference(model, clean, skips, t, joins):
    """Autograd: for each row (in join order) the gradients of its read with respect to x0 and every layer's write, positions < t."""
    spec, T = clean.spec, len(clean.token_ids)
    x0 = clean.embeds.clone().requires_grad_(True)
    writes = [w.clone().requires_grad_(True) for w in clean.mlp_out]
    out = replacement.run(model, spec, clean.tape, x0, writes, skips)
    rows = []
    for layer in sorted(joins, reverse=True):
        read = out.final if layer == spec.n_layers else out.mlp_in[layer]
        for vector in joins[layer]:
            grads = torch.autograd.grad(read[t - 1] @ vector, [x0, *writes], retain_graph=True, allow_unused=True)
            grads = [torch.zeros(T, spec.d_model) if g is None else g for g in grads]
            for g in grads:  # causal: nothing reaches a later position
                assert g[t:].abs().max() == 0
            rows.append([g[:t] for g in grads])
    return rows


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("with_skip", [True, False])
@pytest.mark.parametrize("t", [8, 3, 1])
def test_the_transpose_matches_autograd(family, with_skip, t):
    model, clean, skips, g = _setup(family, with_skip)
    spec = clean.spec
    t = min(t, len(clean.token_ids))
    # Targets read at layers 2 and 0 and at the final norm (a logit), two of each.
    joins = {L: torch.randn(2, spec.d_model, generator=g) for L in (spec.n_layers, 2, 0)}
    seen: dict[int, torch.Tensor] = {}
    g_x0 = Adjoint(model, spec, clean.tape, skips).descend(t, joins, lambda layer, grad: seen.__setitem__(layer, grad.clone()))
    want = _reference(model, clean, skips, t, joins)
    _assert_close(g_x0, torch.stack([row[0] for row in want]))
    joined_above = {L: 2 * sum(1 for j in joins if j > L) for L in range(spec.n_layers)}
    for layer in range(spec.n_layers):
        n = joined_above[layer]
        _assert_close(seen[layer], torch.stack([row[1 + layer] for row in want[:n]]))
        # Rows that join at or below this layer get nothing from its write (it comes after their read).
        assert all(row[1 + layer].abs().max() == 0 for row in want[n:])


@pytest.mark.parametrize("fault", ["pattern not transposed", "skip not transposed"])
def test_a_wrong_transpose_is_caught(monkeypatch, fault):
    model, clean, skips, g = _setup("llama", True)
    adjoint_skips = skips
    if fault == "pattern not transposed":
        real = adjoint_module.transposed_pattern
        monkeypatch.setattr(adjoint_module, "transposed_pattern", lambda probs, k: real(probs.transpose(-1, -2), k))
    else:
        adjoint_skips = [s.T.contiguous() for s in skips]
    t, joins = 8, {clean.spec.n_layers: torch.randn(2, clean.spec.d_model, generator=g)}
    g_x0 = Adjoint(model, clean.spec, clean.tape, adjoint_skips).descend(t, joins, lambda *_: None)
    want = torch.stack([row[0] for row in _reference(model, clean, skips, t, joins)])
    assert (g_x0 - want).abs().max() > 1e-2 * want.abs().max()
