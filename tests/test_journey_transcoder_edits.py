"""The journey's edits on transcoder latents (`tc:`) and on one position (`@POS`), against hooks written here."""

from __future__ import annotations

import pytest
import torch

from support.configs import make
from support.tiny import tiny_model, tiny_tokenizer
from support.transcoders import random_transcoder
from token_journey.config.journey import Edit, GenerationConfig, JourneyConfig, parse_edit
from token_journey.errors import TokenJourneyError
from token_journey.journey import run_journey
from token_journey.journey.sae_hits import LayerSAE
from token_journey.journey.steer import edited, last_position, plan_edits
from token_journey.layout import sae_folder
from token_journey.sae.io import LazySAE, save_sae
from token_journey.sites import capture, splice

TEXT = "The capital of France is Paris, and"
GEN = make(GenerationConfig, temperature=1.0, max_new_tokens=2)
LAYER = 1


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    tc = random_transcoder(LAYER, width=64)
    with torch.no_grad():
        tc.threshold.fill_(0.5)  # more latents on, so every position has one to edit
    mlp_in = capture(model, ids, [("mlp_in", LAYER)])[("mlp_in", LAYER)][0]
    with torch.no_grad():
        return model, ids, tc, mlp_in, tc.encode(mlp_in)


def _with_hook(model, ids, position, vector):
    """Logits and resid_post with `vector` added to mlp_out of LAYER at `position` by a plain hook."""

    def add(out):
        out = out.clone()
        out[:, position] += vector
        return out

    with splice(model, "mlp_out", LAYER, add):
        return last_position(model, ids)


@pytest.mark.parametrize("value", [0.0, 3.0])
def test_a_transcoder_edit_at_one_position_moves_mlp_out_by_its_decoder_row(setup, value):
    model, ids, tc, mlp_in, f = setup
    position = 3
    latent = int(f[position].argmax())
    assert f[position, latent] > 0
    saes = [LayerSAE("mlp_out", LAYER, "tc", LazySAE.holding(tc))]
    plan = plan_edits([Edit(LAYER, latent, value, "x", position, transcoder=True)], saes, 3, ids.shape[1])
    with edited(model, plan):
        logits, resid = last_position(model, ids)
        edited_out = capture(model, ids, [("mlp_out", LAYER)])[("mlp_out", LAYER)][0]
    want_logits, want_resid = _with_hook(model, ids, position, (value - f[position, latent]) * tc.W_dec[latent].detach())
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resid, want_resid, atol=1e-5, rtol=1e-5)
    clean_out = capture(model, ids, [("mlp_out", LAYER)])[("mlp_out", LAYER)][0]
    others = [p for p in range(ids.shape[1]) if p != position]
    assert torch.equal(edited_out[others], clean_out[others]) and not torch.equal(edited_out[position], clean_out[position])


def test_an_edit_on_every_position_and_the_last_of_two_wins(setup):
    model, ids, tc, _, f = setup
    latent = int(f.sum(0).argmax())
    saes = [LayerSAE("mlp_out", LAYER, "tc", LazySAE.holding(tc))]
    edits = [Edit(LAYER, latent, 5.0, "a", None, True), Edit(LAYER, latent, 1.0, "b", 2, True)]
    with edited(model, plan_edits(edits, saes, 3, ids.shape[1])):
        got = capture(model, ids, [("mlp_out", LAYER)])[("mlp_out", LAYER)][0]
    clean = capture(model, ids, [("mlp_out", LAYER)])[("mlp_out", LAYER)][0]
    target = torch.full((ids.shape[1],), 5.0)
    target[2] = 1.0
    want = clean + (target - f[:, latent])[:, None] * tc.W_dec[latent].detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_journey_takes_tc_edits_from_the_transcoder_root(setup, tmp_path):
    model, ids, tc, _, f = setup
    latent = int(f[3].argmax())
    save_sae(tc, sae_folder(tmp_path, "mlp_out", LAYER, "tc-test"))
    cfg = make(JourneyConfig, text=TEXT, generation=GEN, ablate=(f"tc:{LAYER}:{latent}@3",))
    journey = run_journey(model, tiny_tokenizer(), cfg, progress=False, transcoders=(tmp_path, "tc-test"))
    assert journey.steering.edits == [(f"tc:{LAYER}:{latent}@3", "tc-test", 0.0, "mlp_out")] and journey.steering.kl > 0
    assert journey.features == []  # shown features stay the SAEs' (none here)
    with pytest.raises(TokenJourneyError, match="layer 1 has no transcoder; layers with transcoders: none .*dvc repro circuits/dvc.yaml") as err:
        run_journey(model, tiny_tokenizer(), cfg, progress=False, transcoders=(tmp_path / "empty", "tc-test"))
    assert "\n" not in str(err.value)
    far = make(JourneyConfig, text=TEXT, generation=GEN, ablate=(f"tc:{LAYER}:{latent}@99",))
    with pytest.raises(TokenJourneyError, match=f"position 99 is out of range; the text has positions 0..{ids.shape[1] - 1}"):
        run_journey(model, tiny_tokenizer(), far, progress=False, transcoders=(tmp_path, "tc-test"))


def test_parse_transcoder_and_position_edits():
    assert parse_edit("tc:5:77@3", True) == Edit(5, 77, 0.0, "tc:5:77@3", 3, True)
    assert parse_edit("15:1234@2=8", False) == Edit(15, 1234, 8.0, "15:1234@2=8", 2, False)
    assert parse_edit(" tc : 1:2 = -1 ", False) == Edit(1, 2, -1.0, "tc : 1:2 = -1", None, True)
    for bad, ablate in (("tc:5:77=1", True), ("tc:5", True), ("5:77@", True), ("x:5:77", True)):
        with pytest.raises(TokenJourneyError, match="malformed"):
            parse_edit(bad, ablate)
