"""SAE training loop: learning, exact resume, NaN stop, config errors."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import pytest
import torch

from support.configs import make, make_sae
from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError
from token_journey.eval.metrics import sae_reconstruction
from token_journey.sae.base import StepContext
from token_journey.sae.member import match_grad_layout
from token_journey.sae.schedules import lr_at, sparsity_at, threshold_weight_at
from token_journey.sae.target_l0 import calibrate_thresholds, next_coefficient
from token_journey.sae.train import DataStats, new_sae, train

D_IN, N_FEAT = 8, 24


def _data(seed: int, n: int) -> torch.Tensor:
    """Sparse ground truth: each row a few of N_FEAT fixed directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(N_FEAT, D_IN, generator=torch.Generator().manual_seed(0)), dim=1)
    on = torch.rand(n, N_FEAT, generator=g) < 0.1
    return (on * torch.rand(n, N_FEAT, generator=g) * 4) @ dirs + 2.0


def _batches_of(data, batch: int):
    """`batches(start)` of `data(seed, batch)`, one seed per step, so a resumed run reads the same batches."""

    def batches(start: int):
        step = start
        while True:
            yield data(1000 + step, batch)
            step += 1

    return batches


def _batches(batch: int):
    return _batches_of(_data, batch)


def _cfg(arch: str = "topk", **kw) -> SAEConfig:
    base = dict(
        name=arch,
        width=32,
        batch_size=64,
        train_tokens=64 * 30,
        lr=0.01,
        lr_warmup_steps=3,
        checkpoint_every=7,
        dead_window_tokens=640,
        log_every=5,
        sparsity_warmup_steps=5,
    )
    base.update(kw)
    arch = base.pop("architecture", arch)
    return make_sae(arch, k=base.pop("k", 3), coefficient=base.pop("sparsity_coefficient", 0.02 if arch == "jumprelu" else 0.05), **base)


STATS = DataStats(_data(7, 4096).mean(0), float(_data(7, 4096).pow(2).sum(1).mean()))


@functools.cache
def _trained(arch: str) -> tuple[SAEConfig, Any, dict[str, Any]]:
    """(config, SAE, train info) of `arch` trained with `_cfg`'s recipe, once per test session (tests only read it)."""
    cfg = _cfg(arch)
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    return cfg, sae, train(sae, _batches(64), STATS, cfg)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_training_reduces_fvu_below_the_mean_predictor(arch):
    cfg, sae, info = _trained(arch)
    metrics = sae_reconstruction(sae, _data(99, 2048))
    assert info["steps"] == cfg.steps
    assert metrics["fvu"] < 0.6, metrics
    assert 0 < metrics["l0"] < cfg.width


@pytest.mark.parametrize(
    "arch,stop", [("topk", 10), ("jumprelu", 10), ("relu", 10), ("batchtopk", 10), ("batchtopk", 29)]
)  # 29: checkpoint 28 is inside the threshold's final quarter
def test_resumed_training_ends_with_the_same_weights(tmp_path, arch, stop):
    """Kill after `stop` steps (checkpoints every 7), resume: same weights as one uninterrupted run."""
    cfg = _cfg(arch)
    full = new_sae(cfg, D_IN, STATS, seed=0)
    train(full, _batches(64), STATS, cfg)
    part = new_sae(cfg, D_IN, STATS, seed=0)
    train(part, _batches(64), STATS, cfg, checkpoint_dir=tmp_path / "ckpt", stop_after=stop)
    assert (tmp_path / "ckpt" / "state.json").is_file()
    resumed = new_sae(cfg, D_IN, STATS, seed=1)  # different init: everything must come from the checkpoint
    info = train(resumed, _batches(64), STATS, cfg, checkpoint_dir=tmp_path / "ckpt")
    assert info["steps"] == cfg.steps
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _with_sink_rows(seed: int, n: int) -> torch.Tensor:
    """`_data` rows with every 128th row replaced by one huge vector (~1,000x the norm), like position 0's."""
    x = _data(seed, n)
    x[::128] = torch.full((D_IN,), 1500.0)
    return x


def test_statistics_from_rows_leave_out_the_rows_far_above_the_median_norm():
    x = _with_sink_rows(3, 1024)
    ordinary = torch.ones(1024, dtype=torch.bool)
    ordinary[::128] = False
    stats = DataStats.from_rows(x)
    torch.testing.assert_close(stats.mean, x[ordinary].mean(0))
    assert stats.mean_sq_norm == pytest.approx(float(x[ordinary].pow(2).sum(1).mean()), rel=1e-6)
    assert DataStats.from_rows(x, outlier_ratio=0).mean_sq_norm == pytest.approx(float(x.pow(2).sum(1).mean()), rel=1e-6)


def test_a_fixed_geometric_median_b_dec_keeps_latents_alive_beside_sink_rows():
    """With rows 1,000x the others' norm in every batch, a trained b_dec is dragged towards them and every
    ordinary row then picks the same few latents; b_dec fixed at the geometric median keeps them all in use."""
    batches = _batches_of(_with_sink_rows, 256)
    stats = DataStats.from_rows(_with_sink_rows(7, 4096))
    fired = {}
    for fixed in (False, True):
        cfg = _cfg("topk", width=64, batch_size=256, train_tokens=256 * 120, b_dec_init="geometric_median", train_b_dec=not fixed, dead_window_tokens=100_000)
        sae = new_sae(cfg, D_IN, stats, seed=0, first_batch=next(batches(0)))
        start = sae.b_dec.detach().clone()
        train(sae, batches, stats, cfg)
        if fixed:
            torch.testing.assert_close(sae.b_dec.detach() * stats.scale, start)
        f = sae.encode(_data(99, 4096))
        fired[fixed] = int(((f != 0).sum(0) > 0).sum())
    assert fired[True] >= fired[False] + 10, fired  # measured: 50 against 35 of 64


def test_a_geometric_median_b_dec_needs_the_first_batch():
    with pytest.raises(ValueError, match="first_batch"):
        new_sae(_cfg("topk", b_dec_init="geometric_median"), D_IN, STATS, seed=0)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = _cfg("topk")
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    train(sae, _batches(64), STATS, cfg, checkpoint_dir=tmp_path / "ckpt", stop_after=8)
    other = dataclasses.replace(cfg, lr=0.5)
    with pytest.raises(TokenJourneyError, match="different config"):
        train(new_sae(other, D_IN, STATS, seed=0), _batches(64), STATS, other, checkpoint_dir=tmp_path / "ckpt")


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
    cfg = _cfg("topk")

    def poisoned(start: int):
        for step, x in enumerate(_batches(64)(start), start):
            yield x * float("nan") if step == 9 else x

    sae = new_sae(cfg, D_IN, STATS, seed=0)
    with pytest.raises(TokenJourneyError, match=r"step 9.*ckpt"):
        train(sae, poisoned, STATS, cfg, checkpoint_dir=tmp_path / "ckpt")
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_schedules():
    cfg = _cfg("jumprelu", lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.5, train_tokens=64 * 40, sparsity_warmup_steps=20, sparsity_coefficient=2.0)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == 1.0 and lr_at(cfg, 19) == 1.0
    assert lr_at(cfg, 30) == pytest.approx(0.5) and lr_at(cfg, 39) == pytest.approx(1 / 20)
    assert sparsity_at(cfg, 0) == 0 and sparsity_at(cfg, 10) == pytest.approx(1.0) and sparsity_at(cfg, 99) == 2.0


def test_fused_adam_sees_gradients_in_the_parameters_layout():
    """W_enc is a transposed view; a contiguous gradient must still update the right elements."""
    results = []
    for fused in (False, True):
        sae = new_sae(_cfg(), D_IN, STATS, seed=0)
        opt = torch.optim.Adam(sae.parameters(), lr=0.01, fused=fused, foreach=not fused)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in sae.parameters():
                p.grad = torch.randn(p.shape, generator=g)  # contiguous, unlike W_enc
            match_grad_layout(sae)
            opt.step()
        results.append(sae.W_enc.detach().clone())
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("steps", [1, 3, 30, 41])
def test_threshold_weights_end_as_the_plain_mean_of_the_final_quarter(steps):
    cfg = _cfg(train_tokens=64 * steps)
    sae = new_sae(_cfg("batchtopk"), D_IN, STATS, seed=0)
    cuts = torch.linspace(5.0, 1.0, steps) ** 2  # a cut that falls as training goes on
    for step in range(steps):  # the smallest kept activation of each batch is its cut
        sae._update_threshold(torch.stack([cuts[step], cuts[step] + 1]), threshold_weight_at(cfg, step))
    window = max(1, steps // 4)
    threshold = sae.threshold.detach()
    assert float(threshold[0]) == pytest.approx(float(cuts[-window:].mean()), rel=1e-5)
    assert (threshold == threshold[0]).all()


@pytest.mark.parametrize("k", [3, 6])
def test_batchtopk_threshold_gives_about_k_latents_per_token_at_inference(k):
    cfg = _cfg("batchtopk", k=k)
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    train(sae, _batches(64), STATS, cfg)
    assert sae_reconstruction(sae, _data(99, 2048))["l0"] == pytest.approx(k, rel=0.2)


def test_matryoshka_first_prefix_reconstructs_alone_where_batchtopks_does_not():
    """Same data, recipe and seed: Matryoshka's loss falls, and the first 1/16 of the latents (2 of 32)
    reconstructs far better when trained to do so on its own; the whole SAE stays close to BatchTopK's."""
    held_out = _data(99, 2048)
    results = {}
    for arch in ("batchtopk", "matryoshka"):
        _, sae, info = _trained(arch)
        results[arch] = (sae_reconstruction(sae, held_out)["fvu"], sae_reconstruction(sae, held_out, latents=2)["fvu"])
    (full_b, first_b), (full_m, first_m) = results["batchtopk"], results["matryoshka"]
    assert first_m < 0.9 * first_b, results
    assert full_m < full_b + 0.1, results
    cfg, sae, info = _trained("matryoshka")
    assert sae.cfg.prefixes == (2, 4, 8, 16, 32)
    fresh = new_sae(cfg, D_IN, STATS, seed=0)
    before = fresh.training_step(_data(1000, 64) * STATS.scale, StepContext(extra={"auxk_alpha": 1 / 32}))
    assert info["final_loss"] < 0.6 * float(before.loss.detach()), info


@pytest.mark.parametrize(
    "prefixes,match",
    [
        ((0.25, 0.5), "ending with 1"),
        ((), "ending with 1"),
        ((0.5, 0.25, 1.0), r"sizes \[16, 8, 32\] at width 32; they must be strictly increasing"),
        ((0.01, 1.0), r"sizes \[0, 32\]"),
        ((0.0, 1.0), "in \\(0, 1\\]"),
    ],
)
def test_bad_matryoshka_prefixes_are_refused(prefixes, match):
    with pytest.raises(TokenJourneyError, match=match):
        _cfg("matryoshka", prefixes=prefixes)


def test_prefixes_from_a_stages_dictconfig_become_a_json_ready_tuple():
    """Stages build SAEConfig from Hydra's DictConfig, whose lists are ListConfigs; the checkpoint fingerprint is JSON."""
    import json

    from omegaconf import OmegaConf

    from support.configs import composed
    from token_journey.config import build

    cfg = build(SAEConfig, OmegaConf.create(composed("sae=matryoshka"))["sae"], "sae")
    assert cfg.prefixes == (0.0625, 0.125, 0.25, 0.5, 1.0) and type(cfg.prefixes) is tuple
    json.dumps(dataclasses.asdict(cfg))


@pytest.mark.parametrize("kw", [dict(width=0), dict(k=33), dict(k=0), dict(architecture="gated"), dict(train_tokens=10), dict(b_dec_init="median")])
def test_bad_config_is_rejected(kw):
    with pytest.raises(TokenJourneyError):
        _cfg(**kw)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk", "batchtopk"])
def test_training_is_bit_identical_run_to_run_on_two_threads(arch):
    """Repeated latent ids in a batch must not meet a racy accumulation (indexing's backward did)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d_in, width, rows = 32, 512, 1024
        data = torch.randn(rows * 4, d_in, generator=torch.Generator().manual_seed(5))
        stats = DataStats(data.mean(0), float(data.pow(2).sum(1).mean()))
        cfg = make_sae(
            arch,
            name=arch,
            width=width,
            k=64,
            batch_size=rows,
            train_tokens=rows * 4,
            coefficient=1e-4,
            threshold_init=0.01,
            lr_warmup_steps=1,
            sparsity_warmup_steps=1,
        )
        runs = []
        for _ in range(2):
            sae = new_sae(cfg, d_in, stats, seed=0)
            train(sae, lambda start: iter(data.split(rows)[start:]), stats, cfg)
            runs.append(sae.tensors())
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), arch
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("topk_warmup_fraction,warmup_architecture", [(0.0, "topk"), (0.5, "topk"), (0.5, "batchtopk")])
@pytest.mark.parametrize("target", [3.0, 6.0])
def test_jumprelu_trains_to_the_requested_l0(target, topk_warmup_fraction, warmup_architecture):
    """The same data and recipe end at either target on held-out rows, with no coefficient to tune, whatever the warm start."""
    cfg = _cfg(
        "jumprelu",
        target_l0=target,
        target_l0_gain=0.1,
        train_tokens=64 * 120,
        sparsity_warmup_steps=0,
        topk_warmup_fraction=topk_warmup_fraction,
        warmup_architecture=warmup_architecture,
    )
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    info = train(sae, _batches(64), STATS, cfg)
    held_out = sae_reconstruction(sae, _data(99, 4096))["l0"]
    assert held_out == pytest.approx(target, rel=0.1), (held_out, info)
    assert info["final_sparsity_coefficient"] != cfg.sparsity_coefficient  # the controller moved it


def test_the_controller_raises_the_coefficient_above_the_target_and_lowers_it_below():
    assert next_coefficient(1e-3, 40.0, 20.0, 0.1) == pytest.approx(1e-3 * math.exp(0.1 * math.log(2)))
    assert next_coefficient(1e-3, 10.0, 20.0, 0.1) == pytest.approx(1e-3 * math.exp(-0.1 * math.log(2)))
    assert next_coefficient(1e-3, 2000.0, 20.0, 0.1) == pytest.approx(1e-3 * math.exp(0.1))  # clipped at e
    assert next_coefficient(1e-3, 0.0, 20.0, 0.1) == pytest.approx(1e-3 * math.exp(-0.1))
    assert next_coefficient(1e-3, 20.0, 20.0, 0.1) == 1e-3


@pytest.mark.parametrize("chunks,target", [(1, 5.0), (3, 5.0), (30, 5.0), (30, 1.0)])
def test_threshold_calibration_hits_the_target_exactly_on_its_rows(chunks, target):
    """Against a count by hand: after scaling, exactly target x rows (row, latent) pairs have pre > theta, and the
    scale is the midpoint of the M-th and (M+1)-th largest ratio of one sort of them all, however the rows are
    chunked (30 chunks at target 1: the kept set is pruned and the floor cuts chunks many times)."""
    cfg = _cfg("jumprelu", width=32)
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(32, generator=torch.Generator().manual_seed(1)) * 0.5)
        sae.threshold[3] = 0.0  # a latent with threshold 0 fires whenever pre > 0, whatever the scale
    x = torch.cat([_data(50 + i, 100) * STATS.scale for i in range(3)])
    before = sae.threshold.detach().clone()
    pre = sae.pre_acts(x).detach()
    ratios = (pre / before)[pre > 0].sort(descending=True).values
    m = int(target * 300)
    scale = calibrate_thresholds(sae, list(x.chunk(chunks)), target=target)
    assert scale == pytest.approx(float((ratios[m - 1] + ratios[m]) / 2), rel=1e-6)
    assert torch.allclose(sae.threshold.detach(), before * scale)
    assert int((pre > sae.threshold.detach()).sum()) == m


@pytest.mark.parametrize("topk_warmup_fraction,warmup_architecture", [(0.0, "topk"), (0.4, "topk"), (0.4, "batchtopk")])
def test_the_controllers_coefficient_resumes_from_the_checkpoint(tmp_path, topk_warmup_fraction, warmup_architecture):
    """Killed and resumed, a target_l0 run ends bit-identical to one run straight through.

    With a warm start of 8 steps, the resumed part (from the checkpoint at step 7) crosses into the JumpReLU steps.
    """
    cfg = _cfg(
        "jumprelu",
        target_l0=6.0,
        target_l0_gain=0.2,
        train_tokens=64 * 20,
        sparsity_warmup_steps=0,
        checkpoint_every=7,
        topk_warmup_fraction=topk_warmup_fraction,
        warmup_architecture=warmup_architecture,
    )
    straight = new_sae(cfg, D_IN, STATS, seed=0)
    train(straight, _batches(64), STATS, cfg)
    resumed = new_sae(cfg, D_IN, STATS, seed=0)
    train(resumed, _batches(64), STATS, cfg, checkpoint_dir=tmp_path, stop_after=10)
    resumed = new_sae(cfg, D_IN, STATS, seed=0)
    train(resumed, _batches(64), STATS, cfg, checkpoint_dir=tmp_path)
    assert all(torch.equal(straight.tensors()[k], resumed.tensors()[k]) for k in straight.tensors())


@pytest.mark.parametrize("warmup_architecture", ["topk", "batchtopk"])
def test_a_warm_start_step_is_topk_at_the_target_against_a_dense_reference(warmup_architecture):
    """A warm-start step keeps each token's k largest pre-activations (TopK) or the k x batch largest of the
    whole batch (BatchTopK), sets every threshold to the batch's cut for a mean L0 of k (the TopK warm start on
    its last step only), and gives the gradients of the dense reconstruction loss of exactly those latents
    (hand-written)."""
    cfg = _cfg("jumprelu", target_l0=4.0, target_l0_gain=0.1, topk_warmup_fraction=0.5, warmup_architecture=warmup_architecture)
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    x = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(5)) * 0.3  # no repeated rows, so no ties
    pre = sae.pre_acts(x).detach()
    cut = pre.flatten().topk(4 * 100).values.min()
    if warmup_architecture == "topk":
        kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(4, dim=1).indices, True) & (pre > 0)
    else:
        kept = (pre >= cut) & (pre > 0)
        assert kept.sum(1).min() < 4 < kept.sum(1).max()  # a token's L0 varies around k: not TopK's set
    ctx = StepContext(warmup_k=4.0, extra={"auxk_alpha": 0.0}, warmup_batch=warmup_architecture == "batchtopk")
    initial = sae.threshold.detach().clone()
    before_last = sae.training_step(x, ctx)
    assert before_last.l0 == float(kept.sum()) / 100
    if warmup_architecture == "batchtopk":  # its steps need the cut anyway
        assert torch.all(sae.threshold.detach() == cut)
    else:  # the TopK steps never read the thresholds: the cut waits for the last one
        assert torch.equal(sae.threshold.detach(), initial) and not torch.any(initial == cut)
    out = sae.training_step(x, dataclasses.replace(ctx, warmup_last=True))
    assert out.l0 == float(kept.sum()) / 100
    assert torch.all(sae.threshold.detach() == cut)
    if warmup_architecture == "batchtopk":  # the handover's thresholds give exactly the warm start's active set
        assert torch.equal(sae.encode(x).detach() != 0, kept & (pre > cut))
    out.loss.backward()
    assert sae.threshold.grad is None  # the thresholds are set, not trained, during the warm start
    ours = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    z = x @ sae.W_enc + sae.b_enc
    mse = (((z * kept).relu()) @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    if warmup_architecture == "batchtopk":  # BatchTopK's loss, the FVU: the error over the batch's variance
        mse = mse / (x - x.mean(0)).pow(2).sum(-1).mean()
    mse.backward()
    assert set(ours) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, grad in ours.items():
        assert torch.allclose(grad, getattr(sae, name).grad, rtol=1e-4, atol=1e-6), name


def test_a_centred_jumprelu_trains_on_x_minus_b_dec_and_is_saved_reading_x():
    """With center_encoder_input the encoder reads x - b_dec while training (checked by hand on a fresh SAE);
    the trained SAE reads x and encodes exactly what the centred one would (b_dec's part is in b_enc)."""
    cfg = _cfg("jumprelu", target_l0=4.0, target_l0_gain=0.1, topk_warmup_fraction=0.5, center_encoder_input=True)
    x = _data(7, 256)
    fresh = new_sae(cfg, D_IN, STATS, seed=0)
    assert not torch.allclose(fresh.b_dec, torch.zeros(D_IN))
    assert torch.allclose(fresh.pre_acts(x), (x - fresh.b_dec) @ fresh.W_enc + fresh.b_enc)
    plain = new_sae(dataclasses.replace(cfg, center_encoder_input=False), D_IN, STATS, seed=0)
    assert not torch.allclose(fresh.pre_acts(x), plain.pre_acts(x))
    sae = new_sae(cfg, D_IN, STATS, seed=0)
    train(sae, _batches(64), STATS, cfg, stop_after=20)  # stopped early: still centred, scale not folded
    centred = {k: v.clone() for k, v in sae.tensors().items()}
    z = (x * STATS.scale - centred["b_dec"]) @ centred["W_enc"] + centred["b_enc"]
    expected = z * (z > centred["threshold"])
    sae.stop_centering_input()
    assert not sae.apply_b_dec_to_input and not torch.allclose(sae.b_enc, centred["b_enc"])
    assert torch.allclose(sae.encode(x * STATS.scale), expected, atol=1e-5)
    finished = new_sae(cfg, D_IN, STATS, seed=0)
    train(finished, _batches(64), STATS, cfg)
    assert not finished.apply_b_dec_to_input


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(architecture="topk", center_encoder_input=True), "applies to jumprelu only"),
        (dict(architecture="jumprelu", topk_warmup_fraction=0.5), "applies only with sae.target_l0"),
        (dict(architecture="jumprelu", target_l0=8.0, target_l0_gain=0.1, topk_warmup_fraction=1.0), r"must be in \[0, 1\)"),
        (dict(architecture="jumprelu", target_l0=8.0, target_l0_gain=0.1, topk_warmup_fraction=0.5, warmup_architecture="relu"), "is not one of topk"),
        (dict(architecture="topk", target_l0=8.0), "set sae.k instead"),
        (dict(architecture="relu", target_l0=8.0), "applies to jumprelu only"),
        (dict(architecture="jumprelu", target_l0=99.0), "between 0"),
        (dict(architecture="jumprelu", target_l0=8.0, target_l0_gain=0.0), "must be > 0"),
        (dict(architecture="jumprelu", target_l0=8.0, target_l0_gain=0.1, sparsity_coefficient=0.0), "must be > 0"),
    ],
)
def test_target_l0_where_it_does_not_apply_is_refused(kw, match):
    with pytest.raises(TokenJourneyError, match=match):
        _cfg(**kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(architecture="jumprelu", k=16), "sae.k=16 does not apply to jumprelu"),
        (dict(architecture="relu", k=16), "sae.k=16 does not apply to relu"),
        (dict(architecture="topk", sparsity_coefficient=0.001), "does not apply to topk"),
        (dict(architecture="jumprelu", target_l0_gain=0.1), "applies only with sae.target_l0"),
        (dict(architecture="batchtopk", prefixes=(0.5, 1.0)), r"sae.prefixes=\[0.5, 1.0\] does not apply to batchtopk"),
        (dict(architecture="matryoshka", sparsity_coefficient=0.001), "does not apply to matryoshka"),
    ],
)
def test_a_sparsity_key_the_architecture_ignores_is_refused(kw, match):
    """A sweep over such a key (`dvc exp run --queue -S 'sae.k=16,32'` on JumpReLU) would train identical SAEs."""
    with pytest.raises(TokenJourneyError, match=match):
        make(SAEConfig, **kw)
