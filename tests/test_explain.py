"""LLM feature explanations (token_journey.report.explain): prompts, context split, detection arithmetic, cache.

The arithmetic is checked on P(Yes) values given by hand; the model path runs on a tiny random
Llama, which proves the plumbing (prompt, generation, Yes/No logits, key/value reuse, cache), not
the quality of an explanation.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from markupsafe import Markup

from support.configs import make
from token_journey.config.report import ReportConfig
from token_journey.errors import TokenJourneyError
from token_journey.report.explain import (
    Detection,
    Explainer,
    Explanation,
    LocalLM,
    context_text,
    detection_request,
    detection_scores,
    explainer_request,
    first_sentence,
    heldout_rows,
    silent_rows,
)
from token_journey.report.feature_stats import RowIndex

WORDS = ["<bos>", "The", " capital", " is", " Paris", " a < b", ' & "c"', "\n", " end", " of"]


def _decode(ids) -> str:
    return "".join(WORDS[int(i)] for i in ids)


def test_prompt_marks_the_activating_token_and_keeps_text_verbatim():
    tokens = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    marked = context_text(tokens, 4, 2, _decode, mark=True)
    assert marked == ' capital is<< Paris>> a < b & "c"'
    assert context_text(tokens, 4, 2, _decode, mark=False) == ' capital is Paris a < b & "c"'
    assert context_text(tokens, 8, 1, _decode, mark=True) == "\u21b5<< end>> of"  # a newline stays on one line
    assert context_text(tokens, 0, 1, _decode, mark=True) == "<<<bos>>>The"  # clipped at the sequence start
    request = explainer_request([marked, "second"], [" Paris", " "])
    assert f"\n1. {marked}\n2. second\n" in request  # no HTML escaping: the model reads the raw text
    assert "\nMarked words: Paris, ' '\n" in request
    assert first_sentence("They are all cities, e.g. Paris. More\nstuff") == "They are all cities, e.g."
    assert first_sentence("They are all  3.5\tm long\nand") == "They are all 3.5 m long"
    assert 'Text:\nthe <x> & "y"\n' in detection_request("feature", 'the <x> & "y"')


def test_detection_scores_match_a_hand_count():
    # said Yes (> 0.5): T T F | T F T -> recall 2/3, specificity 1/3, accuracy 3/6.
    # AUROC pairs (pos > neg, ties 1/2): 0.9 beats 3; 0.6 beats 0.2 and ties 0.6 (1.5); 0.4 beats 0.2 -> 5.5 / 9.
    d = detection_scores([0.9, 0.6, 0.4, 0.7, 0.2, 0.6], [True, True, True, False, False, False])
    assert (d.accuracy, d.balanced_accuracy, d.n_activating, d.n_non_activating) == (0.5, 0.5, 3, 3)
    assert d.auroc == pytest.approx(5.5 / 9)
    # Unbalanced: 1 of 1 activating said Yes, 2 of 3 silent said No -> balanced (1 + 2/3) / 2, accuracy 3/4.
    d = detection_scores([0.8, 0.9, 0.1, 0.3], [True, False, False, False])
    assert d.balanced_accuracy == pytest.approx(5 / 6) and d.accuracy == 0.75 and d.auroc == pytest.approx(2 / 3)
    with pytest.raises(TokenJourneyError, match="both activating and non-activating"):
        detection_scores([0.9, 0.8], [True, True])


def _toy_rows(n_seq: int = 6, length: int = 40, seed: int = 0):
    """A RowIndex over every position >= 1 of `n_seq` sequences and a sparse non-negative feature column."""
    seq, pos = np.meshgrid(np.arange(n_seq), np.arange(1, length), indexing="ij")
    rng = np.random.default_rng(seed)
    column = np.where(rng.random(seq.size) < 0.15, rng.random(seq.size) + 0.01, 0.0)
    index = RowIndex(token_id=rng.integers(3, 9, seq.size), sequence_id=seq.reshape(-1) + 100, position=pos.reshape(-1))
    sequences = {s + 100: np.concatenate([[0], index.token_id[s * (length - 1) : (s + 1) * (length - 1)]]) for s in range(n_seq)}
    return index, column, sequences


def test_heldout_contexts_share_no_token_with_the_explainers_and_silent_ones_are_silent():
    index, column, _ = _toy_rows()
    window = 3
    shown = [int(r) for r in np.argsort(-column, kind="stable")[:5]]
    held = heldout_rows(column, index, shown, 8, window, np.random.default_rng(1))
    assert len(held) == 8 and not set(held) & set(shown) and all(column[r] > 0 for r in held)
    for r in held:
        for s in shown:
            same = index.sequence_id[r] == index.sequence_id[s]
            assert not same or abs(int(index.position[r]) - int(index.position[s])) > 2 * window
    values = sorted(column[held])
    candidates = sorted(column[r] for r in np.nonzero(column > 0)[0] if r not in shown)
    assert values[0] <= np.quantile(candidates, 1 / 8) and values[-1] >= np.quantile(candidates, 7 / 8)
    assert held == heldout_rows(column, index, shown, 8, window, np.random.default_rng(1))  # seeded
    silent = silent_rows(column, index, 8, window, np.random.default_rng(2))
    assert len(silent) == 8
    for r in silent:
        s, p = int(index.sequence_id[r]), int(index.position[r])
        neighbours = [index.row(s, q) for q in range(p - window, p + window + 1)]
        assert all(column[q] == 0 for q in neighbours if q >= 0)


@pytest.fixture(scope="module")
def tiny_lm() -> LocalLM:
    """A tiny random Llama and its byte-level tokenizer (no chat template: the plain prompt form)."""
    from support.tiny import tiny_model, tiny_tokenizer

    return LocalLM(tiny_model("llama"), tiny_tokenizer(), "tiny@f00d")


@pytest.fixture
def tiny_explainer(tmp_path):
    """A prepared-model folder as far as the Explainer looks before loading: its manifest."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"name": "tiny", "dtype": "float32", "fingerprint": "f00d"}))
    return folder


def test_reused_prompt_cache_gives_the_full_forward_logits(tiny_lm):
    lm = tiny_lm
    texts = ["The capital of France is Paris.", "Sparse autoencoders find features."]
    got = lm.yes_probabilities("cities", texts)
    head, tail = lm.prompt(detection_request("cities", "\x00")).split("\x00")
    for text, p in zip(texts, got):
        ids = torch.tensor([lm.tokenizer.encode(head, add_special_tokens=False) + lm.tokenizer.encode(text + tail, add_special_tokens=False)])
        with torch.no_grad():
            log_p = torch.log_softmax(lm.model(ids).logits[0, -1], -1)
        yes, no = log_p[lm.yes_ids].exp().sum(), log_p[lm.no_ids].exp().sum()
        assert p == pytest.approx(float(yes / (yes + no)), abs=1e-5)


def test_explainer_end_to_end_then_from_cache(tiny_lm, tiny_explainer, tmp_path):
    index, column, sequences = _toy_rows()
    cfg = dataclasses.replace(
        make(ReportConfig).explainer,
        model=str(tiny_explainer),
        n_examples=3,
        n_heldout=4,
        window=2,
        max_new_tokens=6,
        cache=str(tmp_path / "cache" / "explanations.json"),
    )
    calls = {"load": 0, "explain": 0, "score": 0}

    class Counting(LocalLM):
        def explain(self, examples, marked, max_new_tokens):
            calls["explain"] += 1
            assert len(examples) == len(marked) == 3 and all(f"<<{m}>>" in e for e, m in zip(examples, marked))
            return super().explain(examples, marked, max_new_tokens)

        def yes_probabilities(self, explanation, texts):
            calls["score"] += len(texts)
            return super().yes_probabilities(explanation, texts)

    def load(folder, device):
        calls["load"] += 1
        return Counting(tiny_lm.model, tiny_lm.tokenizer, tiny_lm.name)

    def decode(ids):
        return tiny_lm.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    top = [int(r) for r in np.argsort(-column, kind="stable")[:5]]
    first = Explainer(cfg, tiny_explainer, "cpu", load).explain("sae1", 7, column, top, index, sequences, decode, 0)
    assert first.text.startswith("They are") and first.model == "tiny@f00d"
    d = first.detection
    assert d is not None and d.n_activating == d.n_non_activating == 4 and 0 <= d.balanced_accuracy <= 1
    assert 0 <= d.auroc <= 1 and calls == {"load": 1, "explain": 1, "score": 8}
    assert not (tmp_path / "cache").exists()  # written by save(), once per page
    explainer = Explainer(cfg, tiny_explainer, "cpu", load)
    again = explainer.explain("sae1", 7, column, top, index, sequences, decode, 0)
    assert dataclasses.replace(again, seconds=first.seconds) == first  # deterministic
    assert calls["load"] == 2
    explainer.cache.save()
    # A fresh Explainer reads the saved file and answers without loading the model; another SAE misses.
    cold = Explainer(cfg, tiny_explainer, "cpu", load)
    assert cold.explain("sae1", 7, column, top, index, sequences, decode, 0) == again
    assert calls == {"load": 2, "explain": 2, "score": 16}
    cold.explain("sae2", 7, column, top, index, sequences, decode, 0)
    assert calls["load"] == 3
    saved = json.loads((tmp_path / "cache" / "explanations.json").read_text())
    assert any("feature=7 " in k and "model=tiny@f00d" in k for k in saved["entries"])


def test_explanation_is_escaped_on_the_page():
    from token_journey.report.dashboards import Dashboard
    from token_journey.report.gather import SaeEntry
    from token_journey.report.render import environment, render_sae

    hostile = '<img src=x onerror=alert(1)> & "q"'
    dash = Dashboard(
        3, "most active", 0.01, 1.0, 2.0, [], [], Markup("<svg></svg>"), explanation=Explanation(hostile, "tiny@f00d", Detection(0.75, 0.625, 0.8, 4, 4), 1.5)
    )
    html = render_sae(environment(), SaeEntry("resid_post", 1, "relu-1"), [dash], [], {}, 100, 0.1)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;q&#34;" in html
    assert "8 held-out contexts: balanced accuracy 0.62, AUROC 0.80" in html


def test_explainer_config_is_checked():
    from token_journey.config import build

    section = dict(make(ReportConfig).__dict__, explainer={"modle": "x"})
    with pytest.raises(TokenJourneyError, match="report.explainer.modle"):
        build(ReportConfig, section, "report")
    explainer = dataclasses.asdict(make(ReportConfig).explainer)
    with pytest.raises(TokenJourneyError, match="exceeds report.top_k"):
        make(ReportConfig, top_k=2, explainer={**explainer, "model": "smollm2", "n_examples": 3})
    assert make(ReportConfig).explainer.model == ""  # off by default
