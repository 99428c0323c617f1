"""The journey meets the SAEs: steering/ablation, attribution of the prediction, token timelines,
and checks that catch Gemma's subtle steps when they are computed the plain way."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from support.configs import make
from support.subtle import scaled_model
from support.tiny import tiny_model, tiny_tokenizer
from token_journey.config.journey import Edit, GenerationConfig, JourneyConfig, parse_edit
from token_journey.errors import TokenJourneyError
from token_journey.journey import ops, run_journey
from token_journey.journey.forward import recompute, token_strings
from token_journey.journey.hooks import capture_references
from token_journey.journey.render_html import write_journey
from token_journey.journey.render_terminal import render
from token_journey.journey.sae_hits import LayerSAE
from token_journey.journey.spec import spec_of
from token_journey.journey.steer import edited, last_position, plan_edits, run_steering
from token_journey.sae.base import SAESpec
from token_journey.sae.io import LazySAE, save_sae
from token_journey.sae.registry import build_sae

TEXT = "The capital of France is Paris, and"  # longer than the tiny sliding window (4)
TOL = 1e-4
GEN = make(GenerationConfig, temperature=1.0, max_new_tokens=3)
SAE_LAYERS = (0, 1)
DEAD = 15
"""A latent whose encoder bias keeps it off everywhere: ablating it must change nothing."""


def _sae(layer: int, d_in: int = 32, d_sae: int = 16):
    """A ReLU SAE with random weights, a non-zero b_dec (so its term is exercised) and one dead latent."""
    sae = build_sae(SAESpec(architecture="relu", d_in=d_in, d_sae=d_sae, name="tiny-relu", site="resid_post", layer=layer))
    gen = torch.Generator().manual_seed(layer)
    sae.init_weights(gen, b_dec=0.1 * torch.randn(d_in, generator=gen))
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e6
    return sae


@pytest.fixture(scope="module")
def saes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saes")
    for layer in SAE_LAYERS:
        save_sae(_sae(layer), root / "resid_post" / f"layer_{layer}" / "tiny-relu")
    return root


@pytest.fixture(scope="module")
def journeys(saes_root):
    """One journey per family on the scaled tiny models, with SAEs, a steer and an ablation."""
    cfg = make(JourneyConfig, text=TEXT, generation=GEN, steer=("1:3=6",), ablate=("0:2",))
    out = {}
    for family in ("llama", "gemma2", "gemma3"):
        model = scaled_model(family)
        out[family] = (model, run_journey(model, tiny_tokenizer(), cfg, saes_root=saes_root, progress=False, report_root="../report"))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_attribution_adds_up_to_the_models_pre_cap_logit(journeys, family):
    model, journey = journeys[family]
    a = journey.attribution
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids
    refs = capture_references(model, spec_of(model), ids)
    pre_cap = float(refs["lm_head"][-1, a.target])  # the model's own LM head output, before any soft-cap
    assert a.target == journey.next_tokens[0][0]
    assert abs(a.logit - pre_cap) <= TOL
    assert [layer.layer for layer in a.layers] == list(SAE_LAYERS)
    for layer in a.layers:
        assert abs(layer.total - pre_cap) <= TOL, (layer.layer, layer.total, pre_cap)
        names = [p.name for p in layer.parts]
        assert {"SAE b_dec", "SAE error", "other latents"} <= set(names) and layer.top
        assert all(p.link.endswith(f"resid_post/layer_{layer.layer}/tiny-relu.html#feature-{p.latent}") for p in layer.top)
        assert abs(next(p.value for p in layer.parts if p.name == "SAE b_dec")) > 1e-3
    if family == "gemma2":
        capped = float(refs["logits"][-1, a.target])
        assert abs(a.capped - capped) <= TOL
        assert abs(a.layers[0].total - capped) > 1.0  # the post-cap logit is not what the parts explain


def test_attribution_of_a_logit_difference(saes_root):
    model, tok = scaled_model("gemma2"), tiny_tokenizer()
    a_id, b_id = tok(" Paris", add_special_tokens=False).input_ids[:1] + tok(" of", add_special_tokens=False).input_ids[:1]
    cfg = make(JourneyConfig, text=TEXT, generation=make(GenerationConfig, max_new_tokens=0), target=tok.decode([a_id]), versus=tok.decode([b_id]))
    a = run_journey(model, tok, cfg, saes_root=saes_root, progress=False).attribution
    refs = capture_references(model, spec_of(model), tok(TEXT, return_tensors="pt").input_ids)
    expected = float(refs["lm_head"][-1, a_id] - refs["lm_head"][-1, b_id])
    assert (a.target, a.versus) == (a_id, b_id)
    assert all(abs(layer.total - expected) <= TOL for layer in a.layers)


def test_no_edit_is_the_clean_pass_bit_for_bit(journeys, saes_root):
    model, journey = journeys["gemma2"]
    ids = torch.tensor([journey.run.token_ids])
    saes = [LayerSAE("resid_post", layer, "tiny-relu", LazySAE.holding(_sae(layer))) for layer in SAE_LAYERS]
    clean_logits, clean_resid = last_position(model, ids)
    for edits in ([], [Edit(1, DEAD, 0.0, f"1:{DEAD}")]):  # nothing, and an ablated latent that never fires
        with edited(model, plan_edits(edits, saes, 3, ids.shape[1])):
            logits, resid = last_position(model, ids)
        assert torch.equal(logits, clean_logits) and torch.equal(resid, clean_resid)
    quiet = run_steering(model, ids, [Edit(1, DEAD, 0.0, "x")], saes, 5, GEN, 0, None, None)
    assert quiet.kl == 0.0 and quiet.before == quiet.after and quiet.generated == journey.generated


def test_steering_moves_the_stream_by_the_decoder_direction(journeys):
    model, journey = journeys["llama"]
    s = journey.steering
    assert [e[0] for e in s.edits] == ["0:2", "1:3=6"] and s.kl > 0
    assert [n[0] for n in s.norms] == [0, 1, 2] and all(n[3] > 0 for n in s.norms[1:])
    # Independently: resid_post[1] after the edits = the edited stream's x + (6 - f_3(x)) · W_dec[3].
    ids = torch.tensor([journey.run.token_ids])
    sae0, sae1 = _sae(0), _sae(1)
    saes = [LayerSAE("resid_post", 0, "tiny-relu", LazySAE.holding(sae0)), LayerSAE("resid_post", 1, "tiny-relu", LazySAE.holding(sae1))]
    from token_journey.sites import capture

    with edited(model, plan_edits([Edit(0, 2, 0.0, "0:2")], saes, 3, ids.shape[1])):
        x = capture(model, ids, [("resid_post", 1)])[("resid_post", 1)][0, -1]
    with edited(model, plan_edits([Edit(0, 2, 0.0, "0:2"), Edit(1, 3, 6.0, "1:3=6")], saes, 3, ids.shape[1])):
        _, resid = last_position(model, ids)
    f3 = float(sae1.encode(x[None]).detach()[0, 3])
    assert torch.allclose(resid[1], x + (6.0 - f3) * sae1.W_dec[3], atol=1e-5)
    assert journey.steered_continuation and len(s.generated.token_ids) == 3


@pytest.mark.parametrize(
    "steer,ablate,message",
    [
        (("15:1234",), (), "malformed"),
        (("a:b=c",), (), "malformed"),
        ((), ("5:77=3",), "malformed"),
        (("9:1=2",), (), "out of range; this model has layers 0..2"),
        (("2:1=2",), (), "layer 2 has no SAE; layers with SAEs: 0, 1"),
        ((), ("1:16",), "latent 16 is out of range"),
    ],
)
def test_bad_edit_specs_are_one_line(saes_root, steer, ablate, message):
    with pytest.raises(TokenJourneyError, match=message) as err:
        cfg = make(JourneyConfig, text=TEXT, generation=GEN, steer=steer, ablate=ablate)
        run_journey(tiny_model("llama"), tiny_tokenizer(), cfg, saes_root=saes_root, progress=False)
    assert "\n" not in str(err.value)


def test_parse_edit():
    assert parse_edit("15:1234=8", False) == Edit(15, 1234, 8.0, "15:1234=8")
    assert parse_edit(" 5:77 ", True) == Edit(5, 77, 0.0, "5:77")
    assert parse_edit("3:4=-1.5e1", False).value == -15.0


def test_model_vocab_larger_than_tokenizer():
    """Rehearsal weights (vocab 256,000) on a smaller tokenizer: ids the tokenizer lacks still render."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=400)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():  # make an id the tokenizer lacks the likeliest next token (its logit doubles the top one)
        top = int(model(input_ids=ids).logits[0, -1].argmax())
        model.lm_head.weight[399] = 2 * model.lm_head.weight[top]
    journey = run_journey(model, tok, make(JourneyConfig, text=TEXT, generation=GEN), progress=False)
    assert journey.run.spec.vocab_size == 400 and len(tok) == 320
    assert all(s.max_abs_diff <= TOL for s in journey.run.steps if s.max_abs_diff is not None)
    assert token_strings(tok, [5, 399]) == [tok.decode([5]), "<id 399>"]
    assert journey.vocab[399] == "<id 399>" and 399 in dict(journey.next_tokens)


def test_page_and_terminal_show_attribution_steering_and_timeline(journeys, tmp_path):
    _, journey = journeys["gemma2"]
    html = write_journey(journey, tmp_path).read_text()
    for anchor in ('id="attribution"', 'id="steering"', 'id="timeline"', 'id="timeline-0"'):
        assert anchor in html
    assert html.count('class="check"') == len(SAE_LAYERS) and 'class="bad"' not in html
    top = journey.attribution.layers[0].top[0]
    assert f'href="../report/resid_post/layer_0/tiny-relu.html#feature-{top.latent}"' in html
    assert "KL(before ‖ after)" in html and "soft-cap 30.0·tanh(z/30.0)" in html
    out = io.StringIO()
    render(journey, Console(file=out, width=220), layer=0)
    text = out.getvalue()
    assert "attribution of the logit" in text and "steering: 0:2" in text and "the path of token" in text


# ---- checks that catch the subtle steps ------------------------------------------------------------------


def _worst(run, name: str, what: str = "max_abs_diff") -> float:
    return max(getattr(s, what) for s in run.steps if s.name == name and getattr(s, what) is not None)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_scaled_models_pass_every_step(family):
    run = recompute(scaled_model(family), tiny_tokenizer(), TEXT, progress=False)
    checked = [s for s in run.steps if s.max_abs_diff is not None]
    assert all(s.max_abs_diff <= TOL for s in checked), max(checked, key=lambda s: s.max_abs_diff)


def _plain(monkeypatch, step: str, spec) -> None:
    """Replace one subtle step of the journey's recomputation by its plain version."""
    real_softcap, real_act, real_allowed, real_norm = ops.softcap, ops.activation, ops.allowed_positions, ops.rms_norm
    if step == "final soft-cap":
        monkeypatch.setattr(ops, "softcap", lambda x, cap: x if cap == spec.final_softcap else real_softcap(x, cap))
    elif step == "attention soft-cap":
        monkeypatch.setattr(ops, "softcap", lambda x, cap: x if cap == spec.attn_softcap else real_softcap(x, cap))
    elif step == "tanh-GELU":
        monkeypatch.setattr(ops, "activation", lambda x, name: real_act(x, "gelu" if name == "gelu_tanh" else name))
    elif step == "sliding window":
        monkeypatch.setattr(ops, "allowed_positions", lambda n, window, device=None: real_allowed(n, None, device))
    elif step == "(1 + w) norm":
        monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps, gemma: real_norm(x, w, eps, False))


@pytest.mark.parametrize(
    "family,step,checked_at,factor",
    [
        ("gemma2", "final soft-cap", "logit soft-capping", 1e4),
        ("gemma2", "attention soft-cap", "scores + mask", 1e4),
        # tanh-GELU and exact GELU differ by at most 4.7e-4 (at |x| ≈ 2.7): the step check sees it at
        # ~4x the tolerance; the chain, through up_proj x 100, at the MLP output by 20x or more.
        ("gemma2", "tanh-GELU", "GELU(tanh)", 3),
        ("gemma3", "tanh-GELU", "GELU(tanh)", 3),
        ("gemma2", "sliding window", "scores + mask", 1e4),
        ("gemma3", "sliding window", "scores + mask", 1e4),
        ("gemma3", "(1 + w) norm", "input RMSNorm", 1e3),
    ],
)
def test_each_check_fails_when_the_step_is_computed_plainly(monkeypatch, family, step, checked_at, factor):
    model, tok = scaled_model(family), tiny_tokenizer()
    good = recompute(model, tok, TEXT, progress=False)
    assert _worst(good, checked_at) <= TOL
    _plain(monkeypatch, step, spec_of(model))
    bad = recompute(model, tok, TEXT, progress=False)
    assert _worst(bad, checked_at) > factor * TOL, _worst(bad, checked_at)
    if step == "tanh-GELU":
        assert _worst(bad, "down_proj", "drift") > 10 * TOL


# ---- the default model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablating_the_top_attributed_latent_lowers_the_prediction(smollm2):
    """SmolLM2 on the default text, with a fixture SAE at layer 15 whose latent 0 reads the stream's own
    direction at the last token and writes the direction that raises the predicted token's logit."""
    from token_journey.journey.attribution import attribute, readout
    from token_journey.sites import SITES, capture

    model, tok = smollm2.model, smollm2.tokenizer
    spec, layer = spec_of(model), 15
    ids = tok(make(JourneyConfig).text, return_tensors="pt").input_ids
    acts = capture(model, ids, [(site, lay) for lay in range(spec.n_layers) for site in SITES])
    sites = [{site: acts[(site, lay)][0].float() for site in SITES} for lay in range(spec.n_layers)]
    clean, _ = last_position(model, ids)
    predicted = int(clean.argmax())
    assert tok.decode([predicted]) == " Paris"
    u, _ = readout(model, spec, sites[-1]["resid_post"][-1], predicted, None)
    x = sites[layer]["resid_post"][-1]
    sae = _sae(layer, d_in=spec.d_model, d_sae=64)
    with torch.no_grad():
        sae.W_dec[0] = u / u.norm()
        sae.W_enc[:, 0] = 4 * x / x.norm() ** 2
        sae.b_enc[0] = 0.0
    saes = [LayerSAE("resid_post", layer, "fixture", LazySAE.holding(sae))]
    a = attribute(model, spec, sites, saes, predicted, None, 5, "../report")
    assert abs(a.logit - float(clean[predicted])) <= TOL * max(1.0, abs(a.logit))
    assert abs(a.layers[0].total - a.logit) <= TOL * max(1.0, abs(a.logit))
    top = a.layers[0].top[0]
    assert top.value > 0
    with edited(model, plan_edits([Edit(layer, top.latent, 0.0, f"{layer}:{top.latent}")], saes, spec.n_layers, ids.shape[1])):
        ablated, _ = last_position(model, ids)
    before, after = torch.softmax(clean, -1)[predicted], torch.softmax(ablated, -1)[predicted]
    assert after < before - 0.01, (float(before), float(after))
