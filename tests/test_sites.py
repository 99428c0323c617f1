"""Activation capture and splicing, checked against transformers' own hidden states."""

from __future__ import annotations

import pytest
import torch

from token_journey.errors import TokenJourneyError
from token_journey.sites import SITES, capture, decoder_layers, splice


def _ids(model, batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


def test_resid_post_matches_hidden_states_exactly(tiny):
    ids = _ids(tiny)
    n = len(decoder_layers(tiny))
    with torch.inference_mode():
        hidden = tiny(input_ids=ids, output_hidden_states=True).hidden_states
    got = capture(tiny, ids, [("resid_post", layer) for layer in range(n - 1)])
    for layer in range(n - 1):
        assert torch.equal(got[("resid_post", layer)], hidden[layer + 1])


def test_last_layer_resid_post_is_before_final_norm(tiny):
    ids = _ids(tiny)
    last = len(decoder_layers(tiny)) - 1
    with torch.inference_mode():
        out = tiny(input_ids=ids, output_hidden_states=True)
    resid = capture(tiny, ids, [("resid_post", last)])[("resid_post", last)]
    norm = tiny.get_decoder().norm
    with torch.inference_mode():
        assert torch.allclose(norm(resid), out.hidden_states[-1], atol=1e-6)


def test_sublayers_add_up_to_the_residual(tiny):
    ids = _ids(tiny)
    points = [(site, layer) for layer in (0, 1) for site in SITES]
    got = capture(tiny, ids, points)
    with torch.inference_mode():
        hidden = tiny(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        pre = hidden[layer]
        total = pre + got[("attn_out", layer)] + got[("mlp_out", layer)]
        assert torch.allclose(total, got[("resid_post", layer)], atol=1e-5)
        assert not torch.allclose(got[("attn_out", layer)], torch.zeros_like(pre))


def test_capture_stops_after_the_deepest_layer(tiny):
    calls = []
    layers = decoder_layers(tiny)
    handles = [block.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, block in enumerate(layers)]
    head_calls = []
    handles.append(tiny.lm_head.register_forward_hook(lambda *_a: head_calls.append(1)))
    try:
        capture(tiny, _ids(tiny), [("mlp_out", 0), ("resid_post", 1)])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    assert head_calls == []


def test_capture_twice_gives_the_same_numbers(tiny):
    ids = _ids(tiny)
    a = capture(tiny, ids, [("resid_post", 1)])
    b = capture(tiny, ids, [("resid_post", 1)])
    assert torch.equal(a[("resid_post", 1)], b[("resid_post", 1)])


def test_splice_changes_downstream_and_identity_does_not(tiny):
    ids = _ids(tiny)
    with torch.inference_mode():
        clean = tiny(input_ids=ids).logits
        with splice(tiny, "resid_post", 0, lambda x: x):
            same = tiny(input_ids=ids).logits
        with splice(tiny, "mlp_out", 1, torch.zeros_like):
            ablated = tiny(input_ids=ids).logits
        after = tiny(input_ids=ids).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, ablated)
    assert torch.equal(clean, after)  # the hook is gone


@pytest.mark.parametrize(
    "site, layer, message",
    [
        ("resid_mid", 0, "unknown site 'resid_mid'; valid sites: resid_post, attn_out, mlp_in, mlp_out"),
        ("resid_post", 3, "layer 3 is out of range; this model has layers 0..2"),
        ("resid_post", -1, "layer -1 is out of range"),
    ],
)
def test_bad_points_are_named(tiny, site, layer, message):
    with pytest.raises(TokenJourneyError, match=message.replace("(", r"\(").replace(".", r"\.")):
        capture(tiny, _ids(tiny), [(site, layer)])


def _perturb(act: torch.Tensor) -> torch.Tensor:
    """A splice that changes every position differently (so a wrong mask or rotary table shows)."""
    g = torch.Generator().manual_seed(5)
    return act + torch.randn(act.shape, generator=g) * act.abs().mean()


@pytest.mark.parametrize(
    "family, attention", [("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager"), ("gemma3", "eager"), ("gemma3", "sdpa")]
)  # Gemma 2 has no sdpa
def test_resume_equals_the_full_spliced_pass(family, attention):
    """Resuming a recorded pass at the site gives the decoder output of a full pass with the splice.

    Gemma 3 gets a global layer between sliding ones (sliding window 4 < 9 tokens), so each layer
    must get its own mask and rotary table; Gemma 2 has its logit soft-capping and alternating layers.
    """
    from support.tiny import tiny_model
    from token_journey.sites import record_layer_inputs, resume

    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]} if family == "gemma3" else {}
    model = tiny_model(family, **extra)
    model.set_attn_implementation(attention)
    ids = _ids(model, batch=3, seq=9)
    decoder = model.get_decoder()
    n = len(decoder_layers(model))
    for site in SITES:
        for layer in range(n):
            recorded = {}

            def record(act, recorded=recorded):
                recorded["act"] = act
                return act

            start = layer + 1 if site == "resid_post" else layer
            with torch.inference_mode():
                with record_layer_inputs(model, start) as inputs, splice(model, site, layer, record):
                    clean = decoder(input_ids=ids, use_cache=False).last_hidden_state
                with splice(model, site, layer, _perturb):
                    full = decoder(input_ids=ids, use_cache=False).last_hidden_state
                if site == "resid_post":
                    fast = resume(model, inputs, _perturb(recorded["act"]), start)
                    again = resume(model, inputs, recorded["act"], start)
                else:
                    with splice(model, site, layer, _perturb):
                        fast = resume(model, inputs, inputs.hidden, start)
                    again = resume(model, inputs, inputs.hidden, start)
            assert not torch.allclose(full, clean, atol=1e-3), (site, layer)  # the splice matters downstream
            torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6, msg=f"{family} {site} {layer}")
            torch.testing.assert_close(again, clean, rtol=1e-6, atol=1e-6, msg=f"{family} {site} {layer} clean")


def test_resume_refuses_a_layer_before_the_recording(tiny):
    from token_journey.sites import record_layer_inputs, resume

    with torch.inference_mode(), record_layer_inputs(tiny, 2) as inputs:
        tiny.get_decoder()(input_ids=_ids(tiny), use_cache=False)
    with pytest.raises(TokenJourneyError, match="cannot resume at layer 1: the pass was recorded from layer 2"):
        resume(tiny, inputs, inputs.hidden, 1)
