"""Rehearsal models: the requested architecture exactly, reproducible weights, the real shapes' numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from support.configs import composed, make
from support.tiny import tiny_tokenizer
from token_journey.config import build
from token_journey.config.model import ModelConfig
from token_journey.errors import TokenJourneyError
from token_journey.lm import load_prepared, prepare_model
from token_journey.rehearsal import SHAPES, build_rehearsal, rehearsal_shape

# The two real shapes scaled down through the same code path: Llama (llama3 RoPE, tied) and Aitana (plain, untied).
SMALL = {
    "llama-3.2-1b": dataclasses.replace(
        SHAPES["llama-3.2-1b"],
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_mlp=96,
        vocab_size=512,
        max_position_embeddings=512,
        rope_scaling={**SHAPES["llama-3.2-1b"].rope_scaling, "original_max_position_embeddings": 64},
    ),
    "aitana-2b-s": dataclasses.replace(
        SHAPES["aitana-2b-s"], n_layers=3, d_model=48, n_heads=4, n_kv_heads=1, head_dim=12, d_mlp=80, vocab_size=400, max_position_embeddings=128
    ),
}


def _expected_inv_freq(shape) -> torch.Tensor:
    """RoPE inverse frequencies written out by hand, with Llama 3's piecewise scaling when asked."""
    base = [1.0 / shape.rope_theta ** (2 * i / shape.head_dim) for i in range(shape.head_dim // 2)]
    if not shape.rope_scaling:
        return torch.tensor(base)
    s = shape.rope_scaling
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return torch.tensor(out)


@pytest.mark.parametrize("name", list(SMALL))
def test_built_model_has_exactly_the_requested_architecture(name):
    shape = SMALL[name]
    model = build_rehearsal(shape, tiny_tokenizer(), torch.bfloat16)
    layers = model.model.layers
    assert len(layers) == shape.n_layers
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert attn.q_proj.weight.shape == (shape.n_heads * shape.head_dim, shape.d_model)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (shape.n_kv_heads * shape.head_dim, shape.d_model)
    assert attn.o_proj.weight.shape == (shape.d_model, shape.n_heads * shape.head_dim)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (shape.d_mlp, shape.d_model)
    assert mlp.down_proj.weight.shape == (shape.d_model, shape.d_mlp)
    assert model.model.embed_tokens.weight.shape == (shape.vocab_size, shape.d_model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shape.tie_word_embeddings
    assert model.config.rms_norm_eps == shape.rms_norm_eps
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in layers)
    assert abs(float(attn.q_proj.weight.detach().float().std()) - 0.02) < 0.002
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, _expected_inv_freq(shape), rtol=1e-5, atol=0)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[0, 5, 9, 11]])).logits
    assert logits.shape == (1, 4, shape.vocab_size) and torch.isfinite(logits).all()


def test_weights_depend_only_on_the_seed():
    shape, tokenizer = SMALL["aitana-2b-s"], tiny_tokenizer()
    first = build_rehearsal(shape, tokenizer, torch.float32).state_dict()
    torch.manual_seed(123)  # the global RNG must not matter
    again = build_rehearsal(shape, tokenizer, torch.float32).state_dict()
    other = build_rehearsal(dataclasses.replace(shape, seed=1), tokenizer, torch.float32).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
    # The bf16 model is the float32 draw rounded: the same weights whatever the dtype.
    half = build_rehearsal(shape, tokenizer, torch.bfloat16).state_dict()
    assert torch.equal(half["lm_head.weight"], first["lm_head.weight"].bfloat16())


def test_the_config_files_name_the_real_shapes():
    """The numbers of the published configs, typed out independently of token_journey/rehearsal.py."""
    llama_cfg = build(ModelConfig, composed("model=llama-3.2-1b-rehearsal")["model"], "model")
    aitana_cfg = build(ModelConfig, composed("model=aitana-2b-s-rehearsal")["model"], "model")
    assert llama_cfg.name.endswith("-rehearsal") and "REHEARSAL" in llama_cfg.notes
    assert aitana_cfg.name.endswith("-rehearsal") and "REHEARSAL" in aitana_cfg.notes
    llama, aitana = rehearsal_shape(llama_cfg.id), rehearsal_shape(aitana_cfg.id)
    assert (
        llama.n_layers,
        llama.d_model,
        llama.n_heads,
        llama.n_kv_heads,
        llama.head_dim,
        llama.d_mlp,
        llama.vocab_size,
        llama.rope_theta,
        llama.tie_word_embeddings,
    ) == (16, 2048, 32, 8, 64, 8192, 128256, 500000.0, True)
    assert llama.rope_scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert (
        aitana.n_layers,
        aitana.d_model,
        aitana.n_heads,
        aitana.n_kv_heads,
        aitana.d_mlp,
        aitana.vocab_size,
        aitana.rope_theta,
        aitana.rope_scaling,
        aitana.tie_word_embeddings,
    ) == (24, 2048, 16, 4, 5440, 256000, 10000.0, None, False)
    with pytest.raises(TokenJourneyError, match="must end in -rehearsal"):
        build(ModelConfig, {**composed("model=llama-3.2-1b-rehearsal")["model"], "name": "llama-3.2-1b"}, "model")
    with pytest.raises(TokenJourneyError, match="not a rehearsal shape"):
        rehearsal_shape("llama-9b")


def test_prepare_writes_the_shape_with_the_packaged_tokenizer(tmp_path, monkeypatch):
    """source=rehearsal through prepare_model and load_prepared, with a vocabulary above SmolLM2's 49,152 ids."""
    small = dataclasses.replace(SMALL["llama-3.2-1b"], vocab_size=49280)
    monkeypatch.setitem(SHAPES, "small", small)
    cfg = make(ModelConfig, **{**composed("model=llama-3.2-1b-rehearsal")["model"], "id": "small"})
    manifest = prepare_model(cfg, tmp_path / "out")
    arch = manifest["architecture"]
    assert (
        arch["n_layers"],
        arch["d_model"],
        arch["n_heads"],
        arch["n_kv_heads"],
        arch["head_dim"],
        arch["d_mlp"],
        arch["vocab_size"],
        arch["tie_word_embeddings"],
    ) == (2, 64, 4, 2, 16, 96, 49280, True)
    assert arch["rope"]["rope_type"] == "llama3" and manifest["dtype"] == "bfloat16" and "rehearsal" in manifest
    loaded = load_prepared(tmp_path / "out", device="cpu")
    assert len(loaded.tokenizer) == 49152
    ids = loaded.tokenizer("The capital of France", return_tensors="pt").input_ids
    built = build_rehearsal(small, loaded.tokenizer, torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, built(input_ids=ids).logits)
