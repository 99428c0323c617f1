"""MLP transcoders: the mlp_in site, paired harvest rows, training, the splice, and the pipeline end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from support.configs import make, make_sae
from support.tiny import tiny_model
from support.tiny_corpus import tiny_llama_with_corpus
from token_journey.data.corpus import row_mask
from token_journey.errors import TokenJourneyError
from token_journey.eval.evaluate import evaluate_saes
from token_journey.sae.base import SAESpec
from token_journey.sae.registry import build_sae, check_site
from token_journey.sites import capture, decoder_layers, family_of, splice

D = 32  # the tiny models' width
SPECIAL = (0, 1, 2)


def _post_mlp_norm(block: nn.Module, family: str) -> nn.Module:
    return nn.Identity() if family == "llama" else block.post_feedforward_layernorm


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_mlp_in_is_the_normed_input_of_the_mlp(family):
    """mlp_in = pre-MLP norm(resid_post[L-1] + attn_out[L]), and mlp_out = (Gemma: post-norm of) mlp(mlp_in)."""
    model = tiny_model(family)
    block = decoder_layers(model)[1]
    pre_norm = block.post_attention_layernorm if family == "llama" else block.pre_feedforward_layernorm
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    got = capture(model, ids, [("resid_post", 0), ("attn_out", 1), ("mlp_in", 1), ("mlp_out", 1)])
    with torch.no_grad():
        torch.testing.assert_close(got["mlp_in", 1], pre_norm(got["resid_post", 0] + got["attn_out", 1]))
        torch.testing.assert_close(got["mlp_out", 1], _post_mlp_norm(block, family)(block.mlp(got["mlp_in", 1])))
        with splice(model, "mlp_in", 1, torch.zeros_like):  # splicing the input is the MLP of zeros
            zeroed = capture(model, ids, [("mlp_out", 1)])["mlp_out", 1]
        want = _post_mlp_norm(block, family)(block.mlp(torch.zeros_like(got["mlp_in", 1])))
    torch.testing.assert_close(zeroed, want)


def test_a_transcoder_runs_at_mlp_out_only():
    check_site("jumprelu_skip_transcoder", "mlp_out")
    with pytest.raises(TokenJourneyError, match="site=mlp_out .*not site=resid_post"):
        check_site("jumprelu_skip_transcoder", "resid_post")


# ---- paired harvest rows -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A tiny Llama and corpus, harvested at layer 1 (mlp_in and mlp_out) with a strict norm rule (ratio 1.3),
    which drops different tokens at the two sites."""
    from token_journey.config.harvest import HarvestConfig
    from token_journey.data.harvest import harvest

    root = tmp_path_factory.mktemp("transcoder")
    lm = tiny_llama_with_corpus(root, n_docs=120, max_tokens=2048)
    cfg = make(HarvestConfig, layers=(1,), sites=("mlp_in", "mlp_out"), batch_size=5, shard_rows=64, row_group_rows=16, max_norm_ratio=1.3)
    harvest(lm, cfg, root / "corpus", root / "acts", torch.device("cpu"))
    return root, lm


def _keys(acts) -> set[tuple[int, int]]:
    table = acts.read_all(["sequence_id", "position"])
    return set(zip(table.column("sequence_id").to_pylist(), table.column("position").to_pylist()))


def test_paired_rows_are_one_token_each_and_the_mlp_maps_one_to_the_other(harvested):
    from token_journey.data.loader import PairedLoader, paired_tensors
    from token_journey.data.shards import open_activations

    root, lm = harvested
    acts_in, acts_out = (open_activations(root / "acts", site, 1, "train") for site in ("mlp_in", "mlp_out"))
    keys_in, keys_out = _keys(acts_in), _keys(acts_out)
    assert keys_in != keys_out  # the norm rule dropped different tokens, so row i of one is not row i of the other
    loader = PairedLoader(acts_in, acts_out, batch_size=32, seed=0, buffer_rows=256)
    assert loader.epoch_rows == len(keys_in & keys_out)
    stream = loader.batches()
    rows = torch.cat([next(stream) for _ in range(-(-loader.epoch_rows // 32))])[: loader.epoch_rows]
    x, y = rows[:, :D], rows[:, D:]
    every = torch.cat(paired_tensors(acts_in, acts_out, 10**6), 1)  # all pairs, in shard order
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, every.tolist()))  # an epoch: each pair once
    mlp = decoder_layers(lm.model)[1].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5)  # each target is the MLP of its own input
    resumed = PairedLoader(acts_in, acts_out, batch_size=32, seed=0, buffer_rows=256).batches(start_batch=3)
    torch.testing.assert_close(next(resumed), rows[96:128])
    held_in, held_out = (open_activations(root / "acts", site, 1, "eval") for site in ("mlp_in", "mlp_out"))
    hx, hy = paired_tensors(held_in, held_out, 10_000)
    assert len(hx) == len(_keys(held_in) & _keys(held_out))
    with torch.no_grad():
        torch.testing.assert_close(mlp(hx), hy, rtol=1e-5, atol=1e-5)


def test_sites_of_different_harvests_are_not_paired(harvested):
    from token_journey.data.loader import PairedLoader
    from token_journey.data.shards import Activations, open_activations

    root, _ = harvested
    acts_in, acts_out = (open_activations(root / "acts", site, 1, "train") for site in ("mlp_in", "mlp_out"))
    other = Activations(acts_in.folder, {**acts_in.manifest, "run_key": "another-run"})
    with pytest.raises(TokenJourneyError, match="not harvested by the same run"):
        PairedLoader(other, acts_out, batch_size=8, seed=0)


# ---- training ------------------------------------------------------------------------------------


def _synthetic(seed: int, n: int, a: torch.Tensor, bumps: torch.Tensor, bump_scale: float) -> torch.Tensor:
    """Rows [n, 2 d]: x, then y = x A^T + `bump_scale` x a few sparse bumps relu(|x . u_j| - 1.5) v_j.

    The bumps are even in x (x is symmetric), so they hold no linear part: the best linear map is A."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a.shape[0], generator=g)
    u, v = bumps
    y = x @ a.T + bump_scale * ((x @ u.T).abs() - 1.5).relu() @ v
    return torch.cat([x, y], 1)


def _train_synthetic(arch: str, steps: int = 150, coefficient: float = 1e-3, bump_scale: float = 1.0):
    """Train `arch` (width 32, d 8) on `_synthetic` rows: (the SAE, A, held-out FVU before training, figures after)."""
    from token_journey.eval.metrics import sae_reconstruction
    from token_journey.sae.train import DataStats, new_sae, train

    d, batch = 8, 256
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, generator=g) / d**0.5
    bumps = torch.nn.functional.normalize(torch.randn(2, 6, d, generator=g), dim=-1)
    data = [_synthetic(100 + i, batch, a, bumps, bump_scale) for i in range(steps)]
    held = _synthetic(7, 2048, a, bumps, bump_scale)
    x, y = held[:, :d], held[:, d:]
    stats = DataStats(y.mean(0), float(y.pow(2).sum(1).mean()))
    in_stats = DataStats(x.mean(0), float(x.pow(2).sum(1).mean()))
    cfg = make_sae(
        arch,
        k=4,
        coefficient=coefficient,
        name=arch,
        width=32,
        batch_size=batch,
        train_tokens=batch * steps,
        lr=0.01,
        lr_warmup_steps=10,
        sparsity_warmup_steps=20,
        checkpoint_every=0,
        dead_window_tokens=batch * 20,
        log_every=50,
        k_aux=8,
    )
    sae = new_sae(cfg, d, stats, seed=0)
    sae.fold_scale(stats.scale, in_stats.scale)  # the untrained start, in raw units
    before = sae_reconstruction(sae, x, target=y)["fvu"]
    sae = new_sae(cfg, d, stats, seed=0)
    train(sae, lambda start: iter(data[start:]), stats, cfg, in_stats=in_stats)
    return sae, a, before, sae_reconstruction(sae, x, target=y)


@pytest.mark.parametrize("encoder", ["jumprelu", "topk"])
def test_training_lowers_the_fvu_of_the_mlp_output_and_the_skip_helps(encoder):
    """On y = x A^T + sparse bumps of x: both transcoders learn to predict y; the skip one does better,
    since its latents are left only the bumps."""
    _, _, plain_before, plain_after = _train_synthetic(f"{encoder}_transcoder")
    _, _, skip_before, skip_after = _train_synthetic(f"{encoder}_skip_transcoder")
    assert plain_after["fvu"] < 0.2 * plain_before and skip_after["fvu"] < 0.2 * skip_before
    assert skip_after["fvu"] < 0.05 and skip_after["fvu"] < plain_after["fvu"]
    assert 0 < skip_after["l0"] <= 8


def test_w_skip_learns_a_linear_map():
    """On y = x A^T with latents made costly (a large L0 coefficient), W_skip alone carries the map: W_skip = A."""
    sae, a, _, after = _train_synthetic("jumprelu_skip_transcoder", steps=200, coefficient=0.05, bump_scale=0.0)
    assert after["l0"] < 0.5 and after["fvu"] < 0.01
    assert float((sae.W_skip.detach() - a).norm() / a.norm()) < 0.05


# ---- evaluation: the transcoder spliced in place of the MLP ---------------------------------------


def _transcoder(arch: str, d_sae: int = 16, seed: int = 0) -> nn.Module:
    sae = build_sae(SAESpec(arch, D, d_sae, k=4 if arch.startswith("topk") else 0, name=arch, site="mlp_out", layer=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if sae.has_threshold:
            sae.threshold.uniform_(0.0, 0.5, generator=g)
    return sae.eval()


def _ids(seed: int = 3) -> torch.Tensor:
    ids = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    ids[2, 8:] = 2
    return ids


def _linear_mlp_model(family: str) -> tuple[nn.Module, nn.Linear]:
    """A tiny model whose layer-1 MLP is an affine map (and whose post-MLP norm, for Gemma, is the identity)."""
    model = tiny_model(family)
    block = decoder_layers(model)[1]
    torch.manual_seed(4)
    block.mlp = nn.Linear(D, D)
    if family != "llama":
        block.post_feedforward_layernorm = nn.Identity()
    return model.eval(), block.mlp


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_exact_affine_transcoder_costs_nothing_and_a_zero_one_is_the_zero_ablation(family):
    model, linear = _linear_mlp_model(family)
    exact = _transcoder("jumprelu_skip_transcoder")
    zero = _transcoder("jumprelu_transcoder")
    with torch.no_grad():
        exact.W_skip.copy_(linear.weight)  # W_skip [d_out, d_in], as nn.Linear's weight
        exact.b_dec.copy_(linear.bias)
        exact.threshold.fill_(1e9)  # no latent ever fires: the output is the affine map alone
        for p in zero.parameters():
            p.zero_()
    ids = _ids()
    rows = row_mask(ids, SPECIAL, 1)
    result = evaluate_saes(model, ids, rows, "mlp_out", 1, {"exact": exact, "zero": zero}, batch_size=2, max_norm_ratio=3.0)
    e, z = result.saes["exact"], result.saes["zero"]
    assert e["delta_loss"] == pytest.approx(0.0, abs=1e-5) and e["fvu"] < 1e-10 and e["l0"] == 0
    assert e["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and e["kl"] == pytest.approx(0.0, abs=1e-6)
    assert z["ce_sae"] == pytest.approx(z["ce_zero"], rel=1e-6) and z["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert abs(z["ce_zero"] - z["ce_clean"]) > 1e-3  # the zero ablation does change the loss


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_spliced_loss_matches_a_hook_that_computes_from_the_mlps_live_input(family):
    """Reference: the full logits of a pass whose MLP output (at the evaluated rows) is the transcoder of the
    input the MLP receives in that same pass, and an FVU against the captured MLP output."""
    model = tiny_model(family)
    tc = _transcoder("topk_skip_transcoder")
    ids = _ids()
    rows = row_mask(ids, SPECIAL, 1)
    result = evaluate_saes(model, ids, rows, "mlp_out", 1, {"tc": tc}, batch_size=4).saes["tc"]
    block = decoder_layers(model)[1]
    out_module = getattr(block, family_of(model).mlp_out_module)
    seen = {}
    with torch.no_grad():
        pre = block.mlp.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("in", inputs[0]))

        def replace(_m, _inputs, output):
            new = output.clone()
            new[rows] = tc(seen["in"][rows])
            return new

        post = out_module.register_forward_hook(replace)
        logits = model(ids).logits.float()
        pre.remove(), post.remove()
        clean = capture(model, ids, [("mlp_in", 1), ("mlp_out", 1)])
        y, y_hat = clean["mlp_out", 1][rows].double(), tc(clean["mlp_in", 1][rows]).double()
    counted = rows[:, 1:]
    log_p = logits[:, :-1].log_softmax(-1)[counted]
    ce = -log_p.gather(1, ids[:, 1:][counted][:, None]).mean()
    assert result["ce_sae"] == pytest.approx(float(ce), rel=1e-5)
    fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert result["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert result["l0"] == pytest.approx(4.0, abs=0.5)


# ---- the pipeline: train_layer, evaluate_layer and the report on the harvested layer -----------------


def test_pipeline_trains_evaluates_and_reports_a_skip_transcoder(harvested, tmp_path):
    from token_journey.config.eval import EvalConfig
    from token_journey.config.report import ReportConfig
    from token_journey.config.tracking import TrackingConfig
    from token_journey.data.shards import open_activations
    from token_journey.eval.evaluate import evaluate_layer
    from token_journey.layout import Layout
    from token_journey.lm import load_prepared
    from token_journey.report.build import sae_page
    from token_journey.report.gather import gather_saes
    from token_journey.report.render import environment
    from token_journey.sae.io import load_sae
    from token_journey.sae.train_layer import train_layer

    root, _ = harvested
    layout = Layout(
        base_model=root / "base",
        corpus=root / "corpus",
        activations=root / "acts",
        saes=tmp_path / "saes",
        metrics=tmp_path / "metrics",
        html=tmp_path / "html",
        journey=tmp_path / "journey",
        circuits_data=tmp_path / "circuits_data",
        circuits=tmp_path / "circuits",
        graphs=tmp_path / "graphs",
        summary=tmp_path / "summary.md",
        timings=tmp_path / "timings",
    )
    cfg = make_sae(
        "jumprelu_skip_transcoder", k=0, coefficient=1e-3, name="skip-tc", width=24, batch_size=32, train_tokens=32 * 30, checkpoint_every=0, eval_tokens=10_000
    )
    common = dict(
        activations=layout.activations,
        saes=layout.saes,
        timings=layout.timings,
        layer=1,
        model="tiny",
        seed=0,
        tracking=make(TrackingConfig, mode="disabled"),
        name=cfg.name,
        device="cpu",
    )
    with pytest.raises(TokenJourneyError, match="site=mlp_out"):
        train_layer(cfg, site="resid_post", **common)
    with pytest.raises(TokenJourneyError, match=r"reads mlp_in at layer 1, which was not harvested; .*harvest.sites"):
        train_layer(cfg, site="mlp_out", **{**common, "activations": tmp_path / "no-acts"})
    folder = train_layer(cfg, site="mlp_out", **common)
    sae = load_sae(folder)
    assert sae.architecture == "jumprelu_skip_transcoder" and sae.W_skip.abs().sum() > 0
    document, _ = evaluate_layer(make(EvalConfig, saebench_rows=256), layout, "mlp_out", 1, device="cpu")
    m = document["saes"]["skip-tc"]
    assert "absorption_rate" not in m  # SAEBench's metrics are for SAEs
    assert m["architecture"] == "jumprelu_skip_transcoder" and 0 <= m["fvu"] < 1 and m["l0"] > 0
    assert np.isfinite(m["delta_loss"]) and m["ce_zero"] != m["ce_clean"]
    [entry] = gather_saes(layout.saes, layout.metrics)
    loaded = load_prepared(layout.base_model, device="cpu")
    html, density = sae_page(entry, make(ReportConfig), layout, loaded, environment(), 0, "cpu")
    x_in = open_activations(layout.activations, "mlp_in", 1, "eval").tensor()  # its features fire on the MLP's input
    with torch.no_grad():
        want = (sae.encode(x_in) != 0).float().mean(0).numpy()
    np.testing.assert_allclose(density, want, rtol=1e-6)
    assert 'id="feature-' in html


def test_journey_shows_a_transcoders_features_on_the_mlp_input_and_never_steers_with_it(tmp_path):
    from support.tiny import tiny_tokenizer
    from token_journey.config.journey import GenerationConfig, JourneyConfig
    from token_journey.journey import run_journey
    from token_journey.journey.sae_hits import top_features
    from token_journey.sae.io import save_sae

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    tc = _transcoder("jumprelu_skip_transcoder")
    with torch.no_grad():
        tc.threshold.fill_(0.05)
    save_sae(tc, tmp_path / "mlp_out" / "layer_1" / "tc")
    gen = make(GenerationConfig, temperature=1.0, max_new_tokens=2)
    journey = run_journey(model, tokenizer, make(JourneyConfig, text="The word travelled", generation=gen), saes_root=tmp_path, progress=False)
    [hits] = journey.features
    ids = tokenizer("The word travelled", return_tensors="pt").input_ids
    mlp_in = capture(model, ids, [("mlp_in", 1)])["mlp_in", 1][0]
    want = top_features(tc, mlp_in, 5)  # journey.feature_top
    assert (hits.site, hits.layer) == ("mlp_out", 1) and any(want)
    assert [[i for i, _ in row] for row in hits.top] == [[i for i, _ in row] for row in want]
    with pytest.raises(TokenJourneyError, match="layer 1 has no SAE; layers with SAEs: none"):
        run_journey(model, tokenizer, make(JourneyConfig, text="The word", generation=gen, steer=("1:3=6",)), saes_root=tmp_path, progress=False)
