"""SAE folders: our format round trip, SAELens / Gemma Scope / sparsify imports, find_saes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from token_journey.errors import TokenJourneyError
from token_journey.sae.base import SAESpec
from token_journey.sae.io import find_saes, load_sae, save_sae
from token_journey.sae.registry import build_sae

D_IN, D_SAE = 5, 12


def _random(arch: str, k: int = 0):
    prefixes = (3, 6, D_SAE) if arch == "matryoshka" else ()
    sae = build_sae(SAESpec(arch, D_IN, D_SAE, k=k, prefixes=prefixes, name=f"{arch}-x", model="m", site="resid_post", layer=3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 - 0.1)
    return sae


@pytest.mark.parametrize("arch,k", [("jumprelu", 0), ("topk", 3), ("batchtopk", 3), ("matryoshka", 3), ("relu", 0)])
def test_round_trip_keeps_weights_and_function(tmp_path, arch, k):
    sae = _random(arch, k)
    folder = save_sae(sae, tmp_path / "resid_post" / "layer_3" / sae.cfg.name, {"fvu": 0.1})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["hook_name"] == "blocks.3.hook_resid_post"
    assert (folder / "sae_weights.safetensors").is_file() and json.loads((folder / "train.json").read_text())["fvu"] == 0.1
    back = load_sae(folder)
    assert back.cfg == sae.cfg and back.W_enc.shape == (D_IN, D_SAE)
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x))
    assert find_saes(tmp_path, "resid_post", 3) == [folder]


def _saved_with_a_threshold(arch: str, folder):
    """A random BatchTopK-style SAE (threshold 0.3: some latents on, some off) saved to `folder`."""
    sae = _random(arch, 3)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    return sae, save_sae(sae, folder)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_global_threshold_saes_follow_saelens_jumprelu_rules(tmp_path, arch):
    """What SAELens's `SAE.load_from_disk` does with the folder, restated from its JumpReLU code (sae-lens 6.x):
    cfg.json's architecture picks the class, sae_weights.safetensors must hold exactly its parameters
    (strict load_state_dict), and encode is relu(pre) * (pre > threshold) with pre = (x - b_dec) W_enc + b_enc
    when apply_b_dec_to_input; decode is f W_dec + b_dec. Our own loader must still see matryoshka and its prefixes."""
    sae, folder = _saved_with_a_threshold(arch, tmp_path / arch)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == ("jumprelu", True, "none")
    t = load_file(str(folder / "sae_weights.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"])
    assert 0 < int((f != 0).sum()) < f.numel()
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ t["W_dec"] + t["b_dec"])
    back = load_sae(folder)
    assert back.architecture == arch and back.cfg.prefixes == sae.cfg.prefixes


def test_matryoshka_folder_loads_in_saelens_itself(tmp_path):
    """Where sae-lens is installed: its own loader gives our encoder and decoder."""
    sae_lens = pytest.importorskip("sae_lens")
    sae, folder = _saved_with_a_threshold("matryoshka", tmp_path / "m")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x))


def _random_transcoder(arch: str):
    sae = build_sae(SAESpec(arch, D_IN, D_SAE, k=3 if arch.startswith("topk") else 0, name=f"{arch}-x", model="m", site="mlp_out", layer=3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 - 0.1)
        if sae.has_threshold:
            sae.threshold.fill_(0.3)
    return sae


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_transcoders_follow_saelens_transcoder_rules(tmp_path, arch):
    """What SAELens's `SAE.load_from_disk` does with a transcoder folder, restated from its transcoder code
    (sae-lens 6.54.12, `sae_lens/saes/transcoder.py`): cfg.json's architecture picks `JumpReLUTranscoder` or
    `JumpReLUSkipTranscoder`; its config refuses apply_b_dec_to_input=True and reads d_out; the weights must be
    exactly its parameters (strict load_state_dict): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
    b_dec [d_out], threshold [d_sae], and for the skip one W_skip [d_out, d_in]. It encodes
    relu(pre) * (pre > threshold) with pre = x W_enc + b_enc (x never shifted by b_dec), decodes f W_dec + b_dec,
    and the skip transcoder's forward adds x W_skip^T. hook_name is where it reads, hook_name_out where it writes."""
    sae = _random_transcoder(arch)
    folder = save_sae(sae, tmp_path / arch)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (arch, False, "none")
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (D_IN, D_IN, D_SAE)
    assert (cfg["hook_name"], cfg["hook_name_out"]) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    t = load_file(str(folder / "sae_weights.safetensors"))
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,), "threshold": (D_SAE,)}
    if "skip" in arch:
        shapes["W_skip"] = (D_IN, D_IN)
    assert {k: tuple(v.shape) for k, v in t.items()} == shapes
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"])
    assert 0 < int((f != 0).sum()) < f.numel()
    out = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "skip" in arch else 0)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae(x), out)
    back = load_sae(folder)
    assert back.cfg == sae.cfg
    with torch.no_grad():
        torch.testing.assert_close(back(x), out)


def test_topk_transcoders_round_trip_through_our_loader(tmp_path):
    """SAELens has no TopK transcoder: the folder keeps our name, and our loader gives the same function back."""
    sae = _random_transcoder("topk_skip_transcoder")
    folder = save_sae(sae, tmp_path / "t")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(load_sae(folder)(x), sae(x))
        assert int((sae.encode(x) != 0).sum(1).max()) <= 3


def test_a_saelens_skip_transcoder_folder_loads_with_its_function(tmp_path):
    g = torch.Generator().manual_seed(6)
    t = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
        "threshold": torch.rand(D_SAE, generator=g),
        "W_skip": torch.randn(D_IN, D_IN, generator=g),
    }
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "architecture": "jumprelu_skip_transcoder",
        "d_in": D_IN,
        "d_out": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "model_name": "gemma-2-2b",
        "hook_name": "blocks.7.ln2.hook_normalized",
        "hook_name_out": "blocks.7.hook_mlp_out",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = torch.randn(5, D_IN)
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(sae(x), f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.architecture) == ("mlp_out", 7, "jumprelu_skip_transcoder")


def test_skip_transcoder_folder_loads_in_saelens_itself(tmp_path):
    """Where sae-lens is installed: its own loader gives our transcoder's encoder and output."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_transcoder("jumprelu_skip_transcoder")
    folder = save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert type(theirs).__name__ == "JumpReLUSkipTranscoder"
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs(x), sae(x))


def test_saving_nan_weights_is_refused(tmp_path):
    sae = _random("relu")
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    with pytest.raises(TokenJourneyError, match="non-finite"):
        save_sae(sae, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_saelens_folder_loads_with_its_encoder(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = torch.randn(4, D_IN)
    want = torch.relu(x @ t["W_enc"] + t["b_enc"])  # apply_b_dec_to_input False: x not shifted
    torch.testing.assert_close(sae.encode(x), want)
    assert sae.cfg.architecture == "relu" and sae.cfg.layer == 8 and sae.cfg.model == "gpt2"


def test_gemma_scope_params_npz(tmp_path):
    rng = np.random.default_rng(0)
    p = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE),
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.uniform(0, 1, D_SAE),
    }
    np.savez(tmp_path / "params.npz", **p)
    sae = load_sae(tmp_path)
    x = rng.normal(size=(3, D_IN))
    pre = x @ p["W_enc"] + p["b_enc"]
    f = pre * (pre > p["threshold"])
    torch.testing.assert_close(sae.encode(torch.tensor(x, dtype=torch.float32)), torch.tensor(f, dtype=torch.float32))
    torch.testing.assert_close(load_sae(tmp_path / "params.npz").W_dec, sae.W_dec)


def test_sparsify_folder(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    save_file(t, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": D_SAE, "d_in": D_IN}))
    sae = load_sae(tmp_path)
    x = torch.randn(6, D_IN)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"])
    top = pre.topk(4, dim=1)
    want = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae(x), want @ t["W_dec"] + t["b_dec"])


def test_not_an_sae_folder(tmp_path):
    with pytest.raises(TokenJourneyError, match="cfg.json"):
        load_sae(tmp_path)


def test_damaged_weights_are_refused_with_one_line(tmp_path):
    """load_sae checks sae.safetensors against the sha256 recorded when it was saved."""
    folder = save_sae(_random("relu"), tmp_path / "relu-x")
    data = bytearray((folder / "sae.safetensors").read_bytes())
    data[-5] ^= 0x10  # a weight's bits: safetensors itself would load this silently
    (folder / "sae.safetensors").unlink()  # break the hard link so only this copy changes
    (folder / "sae.safetensors").write_bytes(bytes(data))
    with pytest.raises(TokenJourneyError, match=r"SAE weights .*sae.safetensors are damaged or missing .*retrain"):
        load_sae(folder)
