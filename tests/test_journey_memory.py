"""The journey's memory follows what it shows: one SAE per layer by default, one encoder at a time, and
the decoder rows of the latents it uses; never the whole family or the SAEs' full width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.peak import grown_bytes
from token_journey.sae.base import SAESpec
from token_journey.sae.io import LazySAE, save_sae
from token_journey.sae.registry import build_sae

D_MODEL = 32
"""The tiny models' width (tests/support/tiny.py)."""
MEMBERS = ("jumprelu-a", "jumprelu-b", "jumprelu-c")


def _family(root: Path, width: int, members: int) -> Path:
    """`members` JumpReLU SAEs of `width` at every layer of the 3-layer tiny model, the first called `MEMBERS[0]`."""
    for layer in range(3):
        for i, name in enumerate(MEMBERS[:members]):
            sae = build_sae(SAESpec("jumprelu", D_MODEL, width, name=name, site="resid_post", layer=layer))
            sae.init_weights(torch.Generator().manual_seed(10 * layer + i))
            save_sae(sae, root / "resid_post" / f"layer_{layer}" / name)
    return root


def _journey_peak(root: Path, names: list[str] | None) -> int:
    """Peak bytes of one journey (features, attribution, a steer and an ablation) over what a first one left."""
    setup = f"""
import gc
from pathlib import Path
from support.configs import make
from support.tiny import tiny_model, tiny_tokenizer
from token_journey.config.journey import GenerationConfig, JourneyConfig
from token_journey.journey import run_journey
model, tok = tiny_model("llama"), tiny_tokenizer()
cfg = make(JourneyConfig, text="The capital of France is Paris, and", generation=make(GenerationConfig, max_new_tokens=3), steer=("1:3=6",), ablate=("2:5",))
def journey():
    return run_journey(model, tok, cfg, saes_root=Path({str(root)!r}), progress=False, sae_names={names!r})
journey()
gc.collect()
"""
    return grown_bytes(setup, "j = journey()\nassert j.attribution.layers and j.steering.kl >= 0")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[tuple[int, int], Path]:
    return {(w, m): _family(tmp_path_factory.mktemp(f"saes-{w}-{m}"), w, m) for w, m in ((65536, 1), (65536, 3), (8192, 1))}


def test_journey_memory_does_not_grow_with_the_family(roots):
    one, three = _journey_peak(roots[(65536, 1)], [MEMBERS[0]]), _journey_peak(roots[(65536, 3)], [MEMBERS[0]])
    matrix = D_MODEL * 65536 * 4  # one W_enc or W_dec: 8 MiB; the three layers' family holds 18 of them
    # The encoders of the steered and the ablated layer (held while the edits run) and [tokens, width]
    # activations; the whole SAEs of one member would be 6 matrices, of the family 18.
    assert one < 5 * matrix, (one, matrix)
    assert abs(three - one) <= 0.05 * one + (1 << 20), (one, three)


def test_journey_memory_grows_with_the_width_only_by_what_it_shows(roots):
    wide, narrow = _journey_peak(roots[(65536, 1)], [MEMBERS[0]]), _journey_peak(roots[(8192, 1)], [MEMBERS[0]])
    encoder_growth = D_MODEL * (65536 - 8192) * 4
    # What the page shows grows with the width: the encoders of the two edited layers, held while the edits
    # run (2 matrices), and the [tokens, width] latents (about 2 more). Every SAE read whole adds 6 matrices
    # (3 layers x encoder and decoder) on top of those: about 8 in all.
    assert wide - narrow <= 5 * encoder_growth, (wide, narrow, encoder_growth)


def test_shown_saes_are_the_runs_sae_and_the_asked_members(roots):
    from token_journey.config.journey import shown_saes
    from token_journey.journey.sae_hits import load_saes

    sites = [{"resid_post": torch.zeros(2, D_MODEL)}] * 3
    family = {"member": {"name": MEMBERS[2]}}
    names = shown_saes(("member",), {"name": MEMBERS[0]}, family)
    assert names == [MEMBERS[0], MEMBERS[2]]
    found, note = load_saes(roots[(65536, 3)], sites, names)
    assert [(s.layer, s.name) for s in found] == [(layer, name) for layer in range(3) for name in (MEMBERS[0], MEMBERS[2])]
    assert "not shown: jumprelu-b" in note
    assert len(load_saes(roots[(65536, 3)], sites, ["all"])[0]) == 9
    none, note = load_saes(roots[(65536, 3)], sites, ["topk-k16"])
    assert not none and "no SAE named topk-k16" in note and "jumprelu-a" in note


def test_lazy_sae_reads_what_load_sae_reads(roots):
    from token_journey.sae.io import load_sae

    folder = roots[(8192, 1)] / "resid_post" / "layer_1" / MEMBERS[0]
    lazy, whole = LazySAE.open(folder), load_sae(folder)
    x = torch.randn(5, D_MODEL)
    assert torch.allclose(lazy.encoder().encode(x), whole.encode(x).detach(), atol=1e-5)  # one matmul, another memory layout
    ids = [7, 0, 8191, 7]
    assert torch.equal(lazy.decoder_rows(ids), whole.W_dec[ids]) and torch.equal(lazy.tensor("b_dec"), whole.b_dec)
    assert lazy.encoder().W_dec.is_meta  # the decoder is never read for encoding
