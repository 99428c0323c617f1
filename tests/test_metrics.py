"""Each metric against a hand computation on tiny tensors, and streaming against one shot."""

from __future__ import annotations

import math

import pytest
import torch

from token_journey.eval import metrics

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
X_HAT = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
# 3 tokens x 4 latents: token 0 fires latent 1; token 1 latents 0, 2; token 2 latent 2; latent 3 never.
F = torch.tensor([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.5, 0.0]])


def test_fvu_by_hand():
    # errors: 1 + 1 + 1 = 3; mean x = (3, 2); deviations (-2,0), (0,2), (2,-2) -> 4 + 4 + 8 = 16
    assert metrics.fvu(X, X_HAT) == pytest.approx(3 / 16)
    assert metrics.fvu(X, X) == 0.0
    assert metrics.fvu(X, X.mean(0).expand_as(X)) == pytest.approx(1.0)


def test_mse_cosine_relative_norm_by_hand():
    assert metrics.mse(X, X_HAT) == pytest.approx(3 / 6)
    cos = [(1 + 2) / (math.sqrt(5) * math.sqrt(2)), (9 + 12) / (5 * math.sqrt(18)), 1.0]
    assert metrics.cosine(X, X_HAT) == pytest.approx(sum(cos) / 3)
    ratios = [math.sqrt(2) / math.sqrt(5), math.sqrt(18) / 5, 4 / 5]
    assert metrics.relative_norm(X, X_HAT) == pytest.approx(sum(ratios) / 3)
    assert metrics.cosine(X, torch.zeros_like(X)) == 0.0


def test_l0_dead_dense_by_hand():
    assert metrics.l0(F) == pytest.approx((1 + 2 + 1) / 3)
    density = metrics.firing_density((F != 0).sum(0), 3)
    assert density.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 0.0])
    assert metrics.dead_fraction(density) == 0.25
    assert metrics.dense_fraction(density) == 0.75
    assert metrics.dense_fraction(density, threshold=0.5) == 0.25


def test_density_histogram_by_hand():
    hist = metrics.density_histogram(torch.tensor([1 / 3, 1 / 3, 2 / 3, 0.0, 1e-9]))
    edges = hist["log10_edges"]
    assert edges[0] == -7 and edges[-1] == 0 and len(hist["counts"]) == len(edges) - 1
    counts = dict(zip(edges[:-1], hist["counts"]))
    assert counts[-0.5] == 2  # log10(1/3) = -0.477
    assert counts[-0.25] == 1  # log10(2/3) = -0.176
    assert counts[-7.0] == 1  # 1e-9 is below the first edge: clamped into the first bin
    assert hist["dead"] == 1 and sum(hist["counts"]) == 4


def test_cross_entropy_kl_loss_recovered_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    log_q = metrics.log_probs(logits)
    ce = metrics.token_cross_entropy(log_q, torch.tensor([1, 0]))
    assert ce.tolist() == pytest.approx([-math.log(3 / 4), math.log(4)])
    kl = metrics.token_kl(metrics.log_probs(torch.zeros(1, 2)), log_q[:1])  # p = (1/2, 1/2), q = (1/4, 3/4)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert metrics.token_kl(log_q, log_q).abs().max() < 1e-7
    assert metrics.loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=3.0) == pytest.approx(0.5)
    assert math.isnan(metrics.loss_recovered(2.0, 2.0, 2.0))


def _random_batch(n: int, d: int, d_sae: int, seed: int, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    f = torch.relu(torch.randn(n, d_sae, generator=g) - 1.0)
    positions = torch.randint(0, 5, (n,), generator=g)
    return x, x_hat, f, positions


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_streaming_tally_equals_one_shot(offset):
    x, x_hat, f, positions = _random_batch(50, 6, 9, seed=0, offset=offset)
    tally = metrics.ReconstructionTally(d_sae=9, context_size=5)
    for lo, hi in [(0, 7), (7, 8), (8, 31), (31, 50)]:  # uneven batches
        tally.update(x[lo:hi], x_hat[lo:hi], f[lo:hi], positions[lo:hi])
    got = tally.result()
    # independent two-pass reference for FVU, in float64
    x64, xh64 = x.double(), x_hat.double()
    reference_fvu = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(reference_fvu.item(), rel=1e-9)
    assert got["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-9)
    assert got["l0"] == pytest.approx(metrics.l0(f))
    assert got["mse"] == pytest.approx(metrics.mse(x, x_hat))
    assert got["cosine"] == pytest.approx(metrics.cosine(x, x_hat))
    assert got["relative_norm"] == pytest.approx(metrics.relative_norm(x, x_hat))
    density = metrics.firing_density((f != 0).sum(0), 50)
    assert got["dead_fraction"] == metrics.dead_fraction(density)
    assert got["dense_fraction"] == metrics.dense_fraction(density)
    assert got["density_hist"] == metrics.density_histogram(density)


def test_error_by_position_by_hand():
    tally = metrics.ReconstructionTally(d_sae=4, context_size=4)
    tally.update(X, X_HAT, F, torch.tensor([1, 1, 3]))
    # position 1: errors 1 + 1 over norms 5 + 25; position 3: 1 / 25; positions 0, 2 unseen
    assert tally.result()["error_by_position"] == pytest.approx([None, 2 / 30, None, 1 / 25])


def test_pareto_front_by_hand():
    # (1, 5) and (2, 3) and (4, 1) trade off; (3, 4) is beaten by (2, 3); (2, 3) twice: both stay
    costs = [1.0, 2.0, 3.0, 4.0, 2.0, float("nan")]
    errors = [5.0, 3.0, 4.0, 1.0, 3.0, 0.0]
    assert metrics.pareto_front(costs, errors) == [True, True, False, True, True, False]
