"""SAE architectures: sparse kernels against dense autograd references, STE formulas, scale folding."""

from __future__ import annotations

import pytest
import torch

from token_journey.errors import TokenJourneyError
from token_journey.sae.base import SAESpec, StepContext
from token_journey.sae.batchtopk import kth_largest
from token_journey.sae.jumprelu import heaviside, jumprelu
from token_journey.sae.registry import ARCHITECTURES, USES_K, build_sae, encoder_of, is_transcoder
from token_journey.sae.sparse import DENSE_ABOVE, Active, decode_at, encode_at

D_IN, D_SAE, N = 6, 16, 10
PREFIXES = (2, 5, 16)  # uneven bands, so a slip at a band's edge shows


def _sae(arch: str, k: int = 3, seed: int = 0):
    prefixes = PREFIXES if arch == "matryoshka" else ()
    sae = build_sae(SAESpec(arch, D_IN, D_SAE, k=k if arch in USES_K else 0, prefixes=prefixes))
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g, torch.randn(D_IN, generator=g) * 0.1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        if sae.has_threshold:
            sae.threshold.uniform_(0.05, 0.3, generator=g)
        if getattr(sae, "skip", False):  # a skip transcoder's linear map, away from its zero start
            sae.W_skip.normal_(0, 0.3, generator=g)
    return sae


@pytest.mark.parametrize("dense", [False, True])
def test_sparse_kernels_match_dense_autograd(dense, monkeypatch):
    """encode_at/decode_at give the dense computation's values and gradients, in both code paths."""
    monkeypatch.setitem(DENSE_ABOVE, "cpu", -1.0 if dense else 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, requires_grad=True)
    W_enc = torch.randn(D_SAE, D_IN, generator=g).t().requires_grad_()
    b_enc = torch.randn(D_SAE, generator=g, requires_grad=True)
    W_dec = torch.randn(D_SAE, D_IN, generator=g, requires_grad=True)
    mask = torch.rand(N, D_SAE, generator=g) < 0.3
    target = torch.randn(N, D_IN, generator=g)

    pre = x @ W_enc + b_enc
    ref = (((pre * mask) ** 2) @ W_dec - target).pow(2).sum()
    ref_grads = torch.autograd.grad(ref, (x, W_enc, b_enc, W_dec))

    active = Active.from_mask(mask)
    values = (x @ W_enc + b_enc).detach()[active.rows, active.cols]
    z = encode_at(x, W_enc, b_enc, values, active)
    out = (decode_at(z**2, W_dec, active) - target).pow(2).sum()
    grads = torch.autograd.grad(out, (x, W_enc, b_enc, W_dec))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_jumprelu_ste_gradients_follow_the_rectangle_kernel():
    z = torch.tensor([0.10, 0.1004, 0.0996, 0.5, 0.0990], requires_grad=True)
    theta = torch.full((5,), 0.1, requires_grad=True)
    eps = 0.002
    f = jumprelu(z, theta, eps)
    assert torch.equal(f.detach(), torch.where(z > theta, z, torch.zeros_like(z)).detach())
    gz, gt = torch.autograd.grad(f.sum(), (z, theta))
    inside = ((z - theta).abs() < eps / 2).float()
    torch.testing.assert_close(gz, (z > theta).float())
    torch.testing.assert_close(gt, -(theta / eps) * inside)
    (gt0,) = torch.autograd.grad(heaviside(z, theta, eps).sum(), theta)
    torch.testing.assert_close(gt0, -(1 / eps) * inside)
    assert inside.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_training_step_equals_dense_loss_and_gradients(arch):
    """The sparse training step has the loss and parameter gradients of a dense re-implementation
    (a transcoder's against a target y that is not its input x)."""
    sae = _sae(arch)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(2))
    y = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(5)) + 0.5 if is_transcoder(arch) else None
    ctx = StepContext(sparsity_coefficient=0.05, dead=torch.arange(D_SAE) % 3 == 0, bandwidth=0.05, extra={"auxk_alpha": 0.5, "k_aux": 2})
    out = sae.training_step(x, ctx) if y is None else sae.training_step(x, ctx, y)
    grads = torch.autograd.grad(out.loss, list(sae.parameters()), allow_unused=True)
    ref = _dense_loss(sae, x, ctx, y)
    ref_grads = torch.autograd.grad(ref, list(sae.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip([n for n, _ in sae.named_parameters()], grads, ref_grads):
        got = torch.zeros_like(want) if got is None and want is not None else got
        if want is None:
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{arch} grad {name}")


@pytest.mark.parametrize("arch", sorted(a for a in ARCHITECTURES if encoder_of(a) == "jumprelu"))
def test_the_pre_activation_loss_has_the_loss_and_gradients_of_its_dense_form(arch):
    """sum over every (token, latent) of relu(theta - z), computed without the dense backward, against the dense sum."""
    sae = _sae(arch)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 1.5, D_SAE))  # some latents fire on most tokens, some on none
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    y = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(4)) if is_transcoder(arch) else None
    for weight, encoder in ((0.0, 1.0), (0.3, 1.0), (0.3, 0.0)):
        ctx = StepContext(sparsity_coefficient=0.05, bandwidth=0.05, extra={"pre_act_coefficient": weight, "pre_act_moves_encoder": encoder})
        out = sae.training_step(x, ctx) if y is None else sae.training_step(x, ctx, y)
        ref = _dense_loss(sae, x, ctx, y)
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.loss, list(sae.parameters()), allow_unused=True)
        ref_grads = torch.autograd.grad(ref, list(sae.parameters()), allow_unused=True)
        for name, got, want in zip([n for n, _ in sae.named_parameters()], grads, ref_grads):
            if want is not None:
                got = torch.zeros_like(want) if got is None else got
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{arch} grad {name}, weight {weight}, encoder {encoder}")
    # The bias-only form leaves the encoder weights the gradient of the loss without the term.
    plain = StepContext(sparsity_coefficient=0.05, bandwidth=0.05)
    biased = StepContext(sparsity_coefficient=0.05, bandwidth=0.05, extra={"pre_act_coefficient": 0.3, "pre_act_moves_encoder": 0.0})
    w_plain, b_plain = torch.autograd.grad(_dense_loss(sae, x, plain, y), [sae.W_enc, sae.b_enc])
    w_biased, b_biased = torch.autograd.grad(_dense_loss(sae, x, biased, y), [sae.W_enc, sae.b_enc])
    torch.testing.assert_close(w_biased, w_plain)
    assert not torch.allclose(b_biased, b_plain)
    assert float(ref) > float(_dense_loss(sae, x, StepContext(sparsity_coefficient=0.05, bandwidth=0.05), y)), "the term adds nothing"


def _dense_loss(sae, x, ctx, y=None):
    """Hand-written dense losses of each architecture (independent of the sparse kernels).

    y: a transcoder's target (None: x); a skip transcoder adds x W_skip^T to its output."""
    y = x if y is None else y
    skip = x @ sae.W_skip.t() if getattr(sae, "skip", False) else 0.0
    x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = x_in @ sae.W_enc + sae.b_enc
    arch = encoder_of(sae.architecture)
    if arch == "jumprelu":
        f = jumprelu(pre, sae.threshold.expand_as(pre), ctx.bandwidth)
        l0 = heaviside(pre, sae.threshold.expand_as(pre), ctx.bandwidth).sum() / x.shape[0]
        # the pre-activation loss, over every (token, latent); without the encoder, its gradient reaches b_enc and theta only
        moved = pre if ctx.extra.get("pre_act_moves_encoder", 1.0) else (pre - sae.b_enc).detach() + sae.b_enc
        below = (sae.threshold - moved).relu().sum() / x.shape[0]
        mse = (f @ sae.W_dec + sae.b_dec + skip - y).pow(2).sum(-1).mean()
        return mse + ctx.sparsity_coefficient * l0 + ctx.extra.get("pre_act_coefficient", 0.0) * below
    if arch == "relu":
        f = pre.relu()
        l1 = (f * sae.W_dec.norm(dim=1)).sum() / x.shape[0]
        return (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean() + ctx.sparsity_coefficient * l1
    if arch == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(sae.cfg.k, dim=1).indices, True)
    else:  # batchtopk, matryoshka: the k*N largest values of the whole batch
        cut = pre.flatten().topk(sae.cfg.k * x.shape[0]).values.min()
        keep = pre >= cut
    f = (pre * keep).relu()
    x_hat = f @ sae.W_dec + sae.b_dec + skip
    total_var = (y - y.mean(0)).pow(2).sum(-1).mean()
    fvu = (x_hat - y).pow(2).sum(-1).mean() / total_var
    if arch == "matryoshka":  # the mean FVU of the prefixes, each decoded from its own latents
        fvu = sum((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean() / total_var for m in PREFIXES) / len(PREFIXES)
    dead_pre = pre.masked_fill(~ctx.dead, float("-inf"))
    aux_keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, dead_pre.topk(2, dim=1).indices, True)
    residual = (y - x_hat).detach()
    e_hat = (pre * aux_keep).relu() @ sae.W_dec
    aux = (e_hat - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return fvu + ctx.extra["auxk_alpha"] * aux


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fold_scale_gives_the_same_function_on_raw_inputs(arch):
    sae = _sae(arch)
    if arch in ("batchtopk", "matryoshka"):
        with torch.no_grad():
            sae.threshold.fill_(0.1)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3)) * 7.0
    c = 0.25
    f_norm = sae.encode(c * x)
    x_hat_norm = sae(c * x)
    sae.fold_scale(c)
    torch.testing.assert_close(sae.encode(x), f_norm / c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), x_hat_norm / c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["jumprelu_skip_transcoder", "topk_skip_transcoder"])
def test_transcoder_fold_scale_takes_input_and_target_scales_apart(arch):
    """Trained on (a x, c y), folded with (c, a): the same prediction of y from raw x, W_dec rows still unit norm."""
    sae = _sae(arch)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3)) * 7.0
    a, c = 0.25, 3.0
    f_scaled, y_scaled = sae.encode(a * x), sae(a * x)
    sae.fold_scale(c, in_scale=a)
    torch.testing.assert_close(sae(x), y_scaled / c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), f_scaled / c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_topk_encode_keeps_k_and_batchtopk_encodes_per_token():
    sae = _sae("topk", k=4)
    x = torch.randn(N, D_IN)
    f = sae.encode(x)
    assert ((f != 0).sum(1) <= 4).all()
    pre = sae.pre_acts(x)
    top = pre.topk(4, dim=1)
    torch.testing.assert_close(f.gather(1, top.indices), top.values.relu())
    bt = _sae("batchtopk")
    with torch.no_grad():
        bt.threshold.fill_(0.2)
    one = bt.encode(x[:1])
    torch.testing.assert_close(one, bt.encode(x)[:1])
    pre = bt.pre_acts(x[:1])
    torch.testing.assert_close(one, pre * (pre > 0.2))


def _hand_set_matryoshka(prefixes: tuple[int, ...], order: list[int]):
    """d_in 2, three latents: encoder columns e1, e2, (e1 + e2)/2 and decoder rows e1, e2, e1 (zero biases),
    permuted by `order` (latent i of the SAE is latent order[i] of that list)."""
    sae = build_sae(SAESpec("matryoshka", 2, 3, k=1, prefixes=prefixes))
    enc = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])[order]
    dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])[order]
    with torch.no_grad():
        sae.W_enc.copy_(enc.t())
        sae.W_dec.copy_(dec)
    return sae


@pytest.mark.parametrize("order,prefix_mse", [([0, 1, 2], 8.0), ([1, 0, 2], 4.5)])
def test_matryoshka_loss_is_the_mean_fvu_of_the_prefixes_by_hand(order, prefix_mse):
    """x = (3, 0) and (0, 4), k = 1: the batch keeps the 2 largest pre-activations (3 at e1, 4 at e2; the
    mixed latent reads 1.5 and 2), so all latents reconstruct x exactly. The one-latent prefix holds e1
    (order 0, 1, 2: errors 0 and 16, MSE 8) or e2 (order 1, 0, 2: errors 9 and 0, MSE 4.5). Total
    variance: x's mean is (1.5, 2), each row 1.5^2 + 2^2 = 6.25 away. Loss = (prefix MSE / 6.25 + 0) / 2."""
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    sae = _hand_set_matryoshka((1, 3), order)
    out = sae.training_step(x, StepContext())
    assert float(out.loss.detach()) == pytest.approx(prefix_mse / 6.25 / 2)
    assert float(out.mse) == pytest.approx(0.0) and out.l0 == 1.0  # the whole SAE's reconstruction
    assert float(sae.threshold.detach()[0]) == pytest.approx(3.0)  # the smallest kept activation, as in BatchTopK
    with_all = _hand_set_matryoshka((3,), order).training_step(x, StepContext())  # one prefix: BatchTopK's loss
    assert float(with_all.loss.detach()) == pytest.approx(0.0)


def _batches_for_kth_largest() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(512, 96, generator=g)
    # Large values exactly at the strided sample's points (stride 49 for 49,152 values and a
    # 1,024 sample): the sample overstates the top, so large k must take the fallback.
    sampled = normal.clone()
    sampled.view(-1)[::49] += 50.0
    return {"normal": normal, "sampled": sampled, "ties": torch.randint(0, 4, (512, 96), generator=g).float(), "tiny": torch.randn(3, 5, generator=g)}


@pytest.mark.parametrize("name", ["normal", "sampled", "ties", "tiny"])
@pytest.mark.parametrize("k", [1, 7, 1000, 2000, 512 * 96])
def test_kth_largest_is_exact(name, k):
    values = _batches_for_kth_largest()[name]
    k = min(k, values.numel())
    expected = values.reshape(-1).sort(descending=True).values[k - 1]
    assert kth_largest(values, k, sample_size=1024) == expected


@pytest.mark.parametrize("width,k", [(0, 1), (8, 9), (8, 0)])
def test_bad_shapes_are_rejected(width, k):
    with pytest.raises(TokenJourneyError):
        build_sae(SAESpec("topk", 4, width, k=k))


def test_registry_names_each_class_by_its_own_architecture():
    from token_journey.sae.registry import sae_class

    assert {name: sae_class(name).architecture for name in ARCHITECTURES} == {name: name for name in ARCHITECTURES}
    with pytest.raises(TokenJourneyError, match="sae.architecture='gated' is not one of jumprelu"):
        sae_class("gated")
