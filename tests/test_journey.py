"""The journey's recomputation agrees with the model at every step (tiny models and SmolLM2)."""

from __future__ import annotations

import math

import pytest
import torch

from support.configs import make
from support.tiny import tiny_model, tiny_tokenizer
from token_journey.config.journey import GenerationConfig, JourneyConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey import UnsupportedArchitecture, rope, run_journey
from token_journey.journey.forward import recompute
from token_journey.journey.generate import filter_probs

TEXT = "The capital of France is Paris, and"  # longer than the tiny sliding window (4)
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _checked(run):
    return [s for s in run.steps if s.max_abs_diff is not None]


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("gemma2", {}),
        ("gemma3", {}),
        # One global layer, so Gemma 3's second RoPE base is exercised too.
        ("gemma3", {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ],
)
def test_every_step_matches_tiny_model(tokenizer, family, overrides):
    model = tiny_model(family, **overrides)
    run = recompute(model, tokenizer, TEXT, progress=False)
    checked = _checked(run)
    per_layer = len([s for s in checked if s.layer == 0])
    assert per_layer >= (20 if family == "llama" else 22)
    assert all(s.max_abs_diff <= TOL for s in checked), [(s.layer, s.name, s.max_abs_diff) for s in checked if s.max_abs_diff > TOL]
    assert all(s.drift <= TOL for s in checked), [(s.layer, s.name, s.drift) for s in checked if s.drift > TOL]
    # Final logits equal the model's own forward pass (not just the hooked copy).
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    assert torch.allclose(run.logits, logits, atol=TOL)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "aitana-2b-s"])
def test_every_step_matches_rehearsal_shapes(tokenizer, name):
    """The rehearsal models' code path (llama3 RoPE scaling and tied embeddings; untied, 4:1 GQA) scaled down.

    The vocabulary is larger than the tokenizer's, as with the real shapes (128,256 / 256,000 rows).
    """
    import dataclasses

    from token_journey.rehearsal import SHAPES, build_rehearsal

    real = SHAPES[name]
    heads = 8 if real.n_heads // real.n_kv_heads == 4 else 4
    shape = dataclasses.replace(
        real,
        n_layers=2,
        d_model=64,
        n_heads=heads,
        n_kv_heads=heads * real.n_kv_heads // real.n_heads,
        head_dim=8,
        d_mlp=96,
        vocab_size=len(tokenizer) + 64,
        max_position_embeddings=256,
    )
    model = build_rehearsal(shape, tokenizer, torch.float32)
    run = recompute(model, tokenizer, TEXT, progress=False)
    checked = _checked(run)
    assert {s.layer for s in checked} >= {0, 1}
    assert all(s.max_abs_diff <= TOL for s in checked), [(s.layer, s.name, s.max_abs_diff) for s in checked if s.max_abs_diff > TOL]
    assert run.logits.shape[-1] == shape.vocab_size


def test_checks_can_fail(tokenizer):
    """A wrong weight must show up as a difference at exactly the step that reads it."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    good = tiny_model("llama")
    run = recompute(model, tokenizer, TEXT, progress=False)
    assert all(s.max_abs_diff <= TOL for s in _checked(run))  # both sides read the same weights
    # Recompute `model`'s steps but compare with `good`'s tensors: the first mismatch is layer 1 up_proj.
    from token_journey.journey import forward
    from token_journey.journey.hooks import capture_references
    from token_journey.journey.spec import spec_of

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    refs = capture_references(good, spec_of(good), ids)
    with torch.inference_mode():
        out = forward._run(model, spec_of(model), ids, refs, local=True, progress=False)
    first_bad = next(s for s in out["steps"] if s.max_abs_diff is not None and s.max_abs_diff > TOL)
    assert (first_bad.layer, first_bad.name) == (1, "up_proj")


def test_llama3_rope_scaling_matches_formula():
    """Hand check of llama3 scaling on three frequencies: kept, divided by factor, blended."""
    params = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    freqs = rope.inv_freq(params, 8)
    base = [10000.0 ** (-i / 8) for i in (0, 2, 4, 6)]
    for f, b in zip(freqs.tolist(), base, strict=True):
        wavelen = 2 * math.pi / b
        if wavelen < 64 / 4:
            expected = b
        elif wavelen > 64 / 1:
            expected = b / 8
        else:
            s = (64 / wavelen - 1) / (4 - 1)
            expected = (1 - s) * b / 8 + s * b
        assert f == pytest.approx(expected, rel=1e-6)


def test_parameters_and_flops_add_up(tokenizer):
    for family in ("llama", "gemma2"):
        model = tiny_model(family)
        journey = run_journey(model, tokenizer, make(JourneyConfig, text=TEXT), progress=False)
        T = len(journey.run.tokens)
        assert journey.totals["params"] == sum(p.numel() for p in model.parameters())
        cfg = model.config
        proj = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
        head = cfg.vocab_size * cfg.hidden_size
        attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * T * T * cfg.head_dim
        assert journey.totals["matmul_flops"] == 2 * T * (proj + head) + attn
        layer_sums = journey.per_layer
        assert sum(v["flops"] for v in layer_sums.values()) == journey.totals["flops"]
        assert set(k for k in layer_sums if k is not None) == set(range(cfg.num_hidden_layers))


def test_logit_lens_last_layer_is_the_prediction(tokenizer):
    model = tiny_model("gemma2")
    journey = run_journey(model, tokenizer, make(JourneyConfig, text=TEXT, lens_top=3), progress=False)
    assert len(journey.lens) == model.config.num_hidden_layers
    last = journey.lens[-1].top[-1]
    assert [i for i, _ in last] == [i for i, _ in journey.next_tokens[:3]]
    assert last[0][1] == pytest.approx(journey.next_tokens[0][1], abs=1e-5)


def test_sampling_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    p = torch.softmax(logits, dim=0)
    assert filter_probs(logits, 0.0, 0, 1.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(filter_probs(logits, 1.0, 0, 1.0), p)
    top2 = filter_probs(logits, 1.0, 2, 1.0)
    assert torch.allclose(top2[:2], p[:2] / p[:2].sum()) and top2[2:].sum() == 0
    # top_p just above p[0]: the second token is needed to reach it, the third is not.
    nucleus = filter_probs(logits, 1.0, 0, float(p[0]) + 1e-3)
    assert (nucleus > 0).tolist() == [True, True, False, False]
    hot = filter_probs(logits, 2.0, 0, 1.0)
    assert torch.allclose(hot, torch.softmax(logits / 2, dim=0))


def test_generation_is_seeded(tokenizer):
    model = tiny_model("llama")
    cfg = make(JourneyConfig, text=TEXT, generation=make(GenerationConfig, temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=5))
    a = run_journey(model, tokenizer, cfg, seed=3, progress=False).generated
    b = run_journey(model, tokenizer, cfg, seed=3, progress=False).generated
    assert a == b and len(a.token_ids) == 5
    greedy = make(JourneyConfig, text=TEXT, generation=make(GenerationConfig, temperature=0.0, max_new_tokens=1))
    g = run_journey(model, tokenizer, greedy, progress=False)
    assert g.generated.token_ids[0] == g.next_tokens[0][0]


def test_bad_input(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(TokenJourneyError, match="empty"):
        recompute(model, tokenizer, "   ", progress=False)
    with pytest.raises(TokenJourneyError, match="context is 256"):
        recompute(model, tokenizer, "word " * 300, progress=False)
    with pytest.raises(TokenJourneyError, match="empty"):
        make(JourneyConfig, text="")


def test_unsupported_architecture_names_it_and_keeps_captures(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'") as err:
        run_journey(model, tokenizer, make(JourneyConfig, text=TEXT), progress=False)
    names = [name for name, _ in err.value.captured]
    assert "transformer.wte" in names and "lm_head" in names


@pytest.mark.slow
def test_smollm2_every_step(smollm2):
    run = recompute(smollm2.model, smollm2.tokenizer, "The capital of France is", progress=False)
    checked = _checked(run)
    assert len(checked) > 30 * 20
    assert all(s.max_abs_diff <= TOL for s in checked), max(checked, key=lambda s: s.max_abs_diff)
    # Chained over 30 layers, float32 rounding accumulates; relative to the tensor's scale it stays tiny.
    assert all(s.drift <= TOL * max(1.0, s.max_abs) for s in checked), max(checked, key=lambda s: s.drift / max(1.0, s.max_abs))
    assert smollm2.tokenizer.decode(run.logits[-1].argmax()).strip() == "Paris"
