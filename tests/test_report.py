"""The HTML report: streaming feature statistics, logit lens, plots, escaping, the whole build.

Inputs are small fixtures in the contract's on-disk shapes (`support/report_inputs.py`), and the
report is built from them once per session (`report_built` in conftest.py).
"""

from __future__ import annotations

import json
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from support.configs import make
from support.report_inputs import CONTEXT, D_MODEL, D_SAE, DEAD, HOSTILE, MULTIBYTE, all_rows, make_sae
from token_journey.config.report import ReportConfig
from token_journey.report import plots
from token_journey.report.build import build_report
from token_journey.report.dashboards import ContextBuilder, indexed_features
from token_journey.report.feature_stats import FeatureStats, RowIndex, feature_stats, merge_topk, select_features, selected_activations
from token_journey.report.labels import feature_label, frequent_tokens
from token_journey.report.search import TokenFeatureIndex
from token_journey.report.tokens import TokenStrings, logit_effects, visible

PAGE = "resid_post/layer_1/relu-1.html"


def test_streaming_stats_match_a_full_pass(report_inputs):
    sae = make_sae()
    x, table = all_rows(report_inputs)
    tables = [table.slice(s, 37) for s in range(0, table.num_rows, 37)]
    stats = feature_stats(sae, lambda: tables, "float32", batch_size=16, max_tokens=10_000, top_k=5)
    with torch.no_grad():
        f = sae.encode(x)
    assert stats.rows == len(x)
    assert torch.equal(stats.counts, (f != 0).sum(0))
    torch.testing.assert_close(stats.top_values, f.topk(5, dim=0).values)
    torch.testing.assert_close(f.gather(0, stats.top_rows), stats.top_values)  # the rows really hold those values
    torch.testing.assert_close(stats.maxima, f.max(0).values)
    bounded = feature_stats(sae, lambda: tables, "float32", batch_size=16, max_tokens=50, top_k=5)
    assert bounded.rows == 50 and len(bounded.index) == 50
    # A stream whose latents fit keep_bytes is encoded once: pass 2 reads pass 1's latents and gets the same columns.
    d_sae = f.shape[1]
    kept = feature_stats(sae, lambda: tables, "float32", batch_size=16, max_tokens=10_000, top_k=5, keep_bytes=len(x) * d_sae * 4)
    assert kept.latents is not None
    torch.testing.assert_close(torch.cat(kept.latents), f.detach())
    assert feature_stats(sae, lambda: tables, "float32", batch_size=16, max_tokens=10_000, top_k=5, keep_bytes=len(x) * d_sae * 4 - 1).latents is None
    columns = [0, 3, 5]
    again = selected_activations(sae, lambda: tables, "float32", columns, 16, 10_000)
    assert torch.equal(selected_activations(sae, lambda: tables, "float32", columns, 16, 10_000, latents=kept.latents), again)
    torch.testing.assert_close(again, f.detach()[:, columns])


def test_merge_topk_keeps_the_best_rows():
    values = torch.tensor([[5.0, 1.0], [3.0, 0.0]])
    rows = torch.tensor([[0, 0], [1, 1]])
    merged_values, merged_rows = merge_topk(values, rows, torch.tensor([[4.0, 2.0]]), torch.tensor([[7, 7]]), k=2)
    assert merged_values.tolist() == [[5.0, 2.0], [4.0, 1.0]]
    assert merged_rows.tolist() == [[0, 7], [7, 0]]


def _stats(counts: list[int], maxima: list[float], rows: int = 100) -> FeatureStats:
    """Feature statistics with the given firing counts and maxima (the rest is not used by the selection)."""
    n = len(counts)
    empty = np.zeros(0, dtype=np.int64)
    return FeatureStats(
        rows, torch.tensor(counts), torch.zeros(n), torch.tensor(maxima), torch.zeros(1, n), torch.zeros(1, n, dtype=torch.long), RowIndex(empty, empty, empty)
    )


def test_select_features_leads_with_readable_ones_and_puts_dense_apart():
    # Densities over 100 rows: feature 2 (50%) and 4 (20%) are dense at 10%, 0 is dead, 8 sits on the threshold.
    stats = _stats([0, 5, 50, 3, 20, 1, 7, 2, 10], [0, 1, 9, 2, 8, 9, 1, 4, 3])
    chosen = select_features(stats, n_index=2, n_random=1, n_strongest=2, n_dense=1, dense_threshold=0.1, seed=3)
    groups = {g: [f for f, kind in chosen if kind == g] for g in ("by index", "random", "strongest", "dense")}
    assert groups["by index"] == [1, 3]  # lowest ids that are alive and not dense
    assert groups["strongest"] == [5, 7]  # largest maxima among the rest (9, 4), dense 2 and 4 left out
    assert len(groups["random"]) == 1 and groups["random"][0] in {6, 8}
    assert groups["dense"] == [2]  # the densest
    assert [kind for _, kind in chosen] == ["by index"] * 2 + ["random", "strongest", "strongest", "dense"]
    assert select_features(stats, 2, 1, 2, 1, 0.1, seed=3) == chosen
    everything = select_features(stats, 9, 9, 9, 9, 0.1, seed=0)
    assert sorted(f for f, _ in everything) == [1, 2, 3, 4, 5, 6, 7, 8]  # every alive feature once, the dead one never


def _reference_index(f: torch.Tensor, token_ids: np.ndarray, excluded: set[int], k: int) -> dict[int, list[int]]:
    """token id -> the k features of largest activation on it (ties by id), computed from all rows at once."""
    out = {}
    for token in np.unique(token_ids).tolist():
        best = f[torch.from_numpy(token_ids == token)].max(0).values
        ranked = sorted((i for i in range(f.shape[1]) if best[i] > 0 and i not in excluded), key=lambda i: (-float(best[i]), i))
        if ranked:
            out[token] = ranked[:k]
    return out


def test_token_index_matches_a_full_pass(report_inputs):
    x, table = all_rows(report_inputs)
    token_ids = table.column("token_id").to_numpy()
    with torch.no_grad():
        f = make_sae().encode(x)
    excluded = {20, 21, 22}
    index = TokenFeatureIndex(D_SAE, 3, excluded, buffer=20)
    for start in range(0, len(x), 7):  # small batches and buffer: the repeated cuts to 3 must lose nothing
        index.add(token_ids[start : start + 7], f[start : start + 7])
    ours = index.result()
    assert {t: [feature for feature, _ in pairs] for t, pairs in ours.items()} == _reference_index(f, token_ids, excluded, 3)
    token, pairs = next(iter(ours.items()))
    assert pairs[0][1] == pytest.approx(float(f[torch.from_numpy(token_ids == token), pairs[0][0]].max()))


def test_labels_by_hand():
    assert frequent_tokens([5, 7, 5, 9, 7, 5]) == [5, 7, 9]
    assert frequent_tokens([9, 7, 7, 9, 4], n=2) == [9, 7]  # a tie goes to the token of the stronger context
    assert (
        feature_label([" Paris", " France"], [" city", " capital", " town", " village"])
        == "fires on ' Paris', ' France'; promotes ' city', ' capital', ' town'"
    )
    assert feature_label([], [" city"]) == "promotes ' city'"


def test_multibyte_tokens_show_the_characters_they_form():
    from support.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    strings = TokenStrings(tok)
    ids = tok.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE)  # é, 😀 and € are split over byte tokens
    spans = strings.spans(ids)
    assert "".join(text for _, _, text in spans) == MULTIBYTE
    assert [text for _, _, text in spans if len(text.strip()) == 1 and not text.isascii()] == ["é", "😀", "€"]
    assert [(a, b) for a, b, _ in spans] == [(a, b) for a, b, _ in spans if b > a] and spans[-1][1] == len(ids)
    lone = [strings(i) for i in ids if "\\x" in strings(i)]
    assert lone and all("\ufffd" not in s for s in lone)  # alone, a byte token shows its bytes: "\xc3"
    assert strings(tok.encode("é")[0]) == "\\xc3"
    # A window whose edge cuts the emoji still shows it whole.
    emoji = next(a for a, b, text in spans if text == "😀")
    sequence = np.array([0, *ids])
    index = RowIndex(np.array(ids), np.zeros(len(ids), dtype=np.int64), np.arange(1, len(ids) + 1))
    context = ContextBuilder(index, {0: sequence}, strings, window=1).build(emoji + 1, None, 1.0, 1.0)
    assert "😀" in [c.text for c in context.cells] and "\ufffd" not in "".join(c.text for c in context.cells)


@pytest.mark.slow
def test_multibyte_tokens_join_with_the_smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "café 😀 naïve 東京 €"
    ids = tok.encode(text)
    spans = TokenStrings(tok).spans(ids)
    assert "".join(t for _, _, t in spans) == text
    assert len(spans) < len(ids)  # some characters did span several tokens


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logit_effects_rank_like_the_models_own_head(family):
    """(d * g) @ W_U.T equals the model's final norm + LM head on d, up to the positive RMS scale."""
    from support.tiny import tiny_model

    model = tiny_model(family)
    with torch.no_grad():
        model.model.norm.weight.normal_()
        directions = torch.randn(3, model.config.hidden_size)
        ours = next(iter(logit_effects(model, directions)))
        theirs = model.lm_head(model.model.norm(directions[:, None, :]))[:, 0]
    scale = ours.norm(dim=1, keepdim=True) / theirs.norm(dim=1, keepdim=True)  # the RMS we ignore, > 0
    torch.testing.assert_close(ours, theirs * scale, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.topk(5).indices, theirs.topk(5).indices)


def test_visible_makes_control_characters_readable():
    assert visible("a\nb\tc\x07\x1b\u200b") == "a\u21b5b\u21e5c\\x07\\x1b\\u200b"
    assert visible(" <&>\"'") == " <&>\"'"


def test_pareto_front_and_ticks():
    assert plots.front_path([1, 2, 3, 4], [4, 1, 2, 0.5]) == [0, 1, 3]
    ticks = plots.nice_ticks(0.03, 0.87)
    assert ticks[0] <= 0.03 and ticks[-1] >= 0.87 and len(ticks) <= 20


class _Doc(HTMLParser):
    """Collects start tags (with attributes), element ids, the text inside every `script` (by type) and the rest."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.data: dict[str, str] = {}
        self.texts: list[str] = []
        self._script: dict[str, str | None] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._script = dict(attrs) if tag == "script" else None

    def handle_endtag(self, tag):
        self._script = None

    def handle_data(self, data):
        if self._script is None:
            self.texts.append(data)
        elif self._script.get("type") == "application/json":
            self.data[self._script["id"]] = self.data.get(self._script["id"], "") + data
        else:
            self.scripts.append(data)

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.tags if a.get("id")]


def _full_pass(paths) -> tuple[torch.Tensor, np.ndarray]:
    """The fixture SAE's activations on every eval row `[rows, d_sae]` and the rows' token ids."""
    x, table = all_rows(paths)
    with torch.no_grad():
        return make_sae().encode(x), table.column("token_id").to_numpy()


def test_report_writes_every_page(report_built, report_inputs):
    result, _ = report_built
    assert {p.relative_to(report_inputs.html).as_posix() for p in result.files if p.suffix == ".html"} == {"index.html", PAGE}
    assert result.bytes == sum(p.stat().st_size for p in result.files)
    names = [(e.layer, e.name) for e in result.entries]
    assert names == sorted(names) and len(names) == 5


def test_overview_tables_and_pareto_plots(report_built, report_inputs):
    doc = _Doc((report_inputs.html / "index.html").read_text())
    circles = [t for t, _ in doc.tags if t == "circle"]
    # Two Pareto plots of 5 SAEs each, plus one vertex per finite position per error line (4 SAEs x 15).
    assert len(circles) == 2 * 5 + 4 * (CONTEXT - 1)
    assert sum(t == "svg" for t, _ in doc.tags) == 4
    metrics = json.loads((report_inputs.metrics / "resid_post/layer_2.json").read_text())["saes"]["relu-2"]
    summary = report_inputs.summary.read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| resid_post | 2 | relu-2 |"))
    assert f"| {metrics['l0']:.1f} | {metrics['fvu']:.4f} | {metrics['delta_loss']:.4f} |" in row
    assert "\\<img src=x onerror=alert(1)\\>\\|x" in summary  # a name cannot break the table or become HTML
    manifest = json.loads((report_inputs.activations / "resid_post/layer_1/eval/manifest.json").read_text())
    dropped = manifest["excluded_counts"]
    assert (
        f"eval {manifest['rows']:,} tokens (not rows: {dropped['special']:,} special, "
        f"{dropped['first_positions']:,} first positions, {dropped['max_norm']:,} norm outliers)"
    ) in summary


def test_feature_dashboards_are_anchored_and_consistent(report_built, report_inputs):
    _, cfg = report_built
    text = (report_inputs.html / PAGE).read_text()
    doc = _Doc(text)
    ids = doc.ids()
    assert len(ids) == len(set(ids))
    f, _ = _full_pass(report_inputs)
    alive = torch.nonzero((f != 0).sum(0)).flatten().tolist()
    assert {f"feature-{i}" for i in alive} <= set(ids)
    assert not {f"feature-{i}" for i in range(DEAD, D_SAE)} & set(ids)
    sections = [a["id"] for t, a in doc.tags if t == "section"]
    assert len(sections) == cfg.n_index + cfg.n_random + cfg.n_strongest + cfg.n_dense
    # The best context of the first dashboard shows the true top activation of that feature.
    first = int(sections[0].split("-")[1])
    best = float(f[:, first].max())
    assert f'title="activation {best:.4g}"' in text


def test_readable_features_lead_and_dense_ones_are_flagged_apart(report_built, report_inputs):
    _, cfg = report_built
    doc = _Doc((report_inputs.html / PAGE).read_text())
    f, _ = _full_pass(report_inputs)
    density = (f != 0).double().mean(0)
    dense = torch.nonzero(density > cfg.dense_threshold).flatten().tolist()
    assert dense and len(dense) < (density > 0).sum()  # the fixture has both kinds
    sections = [(int(a["id"].split("-")[1]), "dense" in a["class"]) for t, a in doc.tags if t == "section"]
    readable = [s for s, flagged in sections if not flagged]
    assert readable[: cfg.n_index] == sorted(i for i in range(D_SAE) if 0 < density[i] <= cfg.dense_threshold)[: cfg.n_index]
    assert all(density[s] <= cfg.dense_threshold for s in readable)
    densest = sorted(dense, key=lambda i: (-float(density[i]), i))[: cfg.n_dense]
    assert [s for s, flagged in sections if flagged] == densest
    assert sections[-len(densest) :] == [(s, True) for s in densest]  # listed last, apart
    rows = _FeatureRows((report_inputs.html / PAGE).read_text()).rows[1:]  # after the header row
    assert {int(first) for first, flagged in rows if flagged} == set(dense)  # exactly the dense latents are flagged


class _FeatureRows(HTMLParser):
    """The all-features table's rows: (first cell's text, whether the row carries the dense flag)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[tuple[str, bool]] = []
        self._inside = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._inside = attrs.get("id") == "all-features"
        elif self._inside and tag == "tr":
            self.rows.append(("", False))
        elif self._inside and self.rows and attrs.get("class") == "flag":
            self.rows[-1] = (self.rows[-1][0], True)

    def handle_data(self, data):
        if self._inside and self.rows and not self.rows[-1][0] and data.strip():
            self.rows[-1] = (data.strip(), self.rows[-1][1])


def test_page_search_index_is_the_full_pass_index(report_built, report_inputs):
    _, cfg = report_built
    doc = _Doc((report_inputs.html / PAGE).read_text())
    page = json.loads(doc.data["token-index"])
    f, token_ids = _full_pass(report_inputs)
    density = (f != 0).double().mean(0)
    excluded = set(torch.nonzero(density > cfg.dense_threshold).flatten().tolist())
    reference = _reference_index(f, token_ids, excluded, cfg.search_features)
    from transformers import AutoTokenizer

    strings = TokenStrings(AutoTokenizer.from_pretrained(report_inputs.base_model))
    assert len(page) == len({strings(t) for t in reference})
    hostile = strings(AutoTokenizer.from_pretrained(report_inputs.base_model).convert_tokens_to_ids(HOSTILE[0]))
    for token, features in reference.items():
        shown = page[strings(token)]
        assert [feature for feature, _ in shown] == features, strings(token)
        best = float(f[torch.from_numpy(token_ids == token), features[0]].max())
        assert shown[0][1] == pytest.approx(best, rel=5e-3)
    assert hostile in page


def test_labels_name_the_frequent_tokens_and_the_promoted_ones(report_built, report_inputs):
    _, cfg = report_built
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (report_inputs.html / PAGE).read_text()
    f, token_ids = _full_pass(report_inputs)
    strings = TokenStrings(AutoTokenizer.from_pretrained(report_inputs.base_model))
    model = AutoModelForCausalLM.from_pretrained(report_inputs.base_model)
    sections = [int(a["id"].split("-")[1]) for t, a in _Doc(text).tags if t == "section"]
    for feature in sections[:3]:
        values, rows = f[:, feature].topk(cfg.top_k)
        counts = Counter(token_ids[rows[values > 0].numpy()].tolist())
        top_count = max(counts.values())
        fires_on = [strings(t) for t, c in counts.items() if c == top_count]
        promoted = next(iter(logit_effects(model, make_sae().W_dec.detach()[feature : feature + 1])))[0].topk(3).indices
        label = _Doc(text.split(f'id="feature-{feature}"')[1].split("</section>")[0]).texts
        line = next(t for t in label if t.startswith("fires on"))
        assert line.startswith(f"fires on '{fires_on[0]}'") or any(line.startswith(f"fires on '{t}'") for t in fires_on)
        assert line.endswith("; promotes " + ", ".join(f"'{strings(int(i))}'" for i in promoted))


def test_corpus_text_renders_as_text(report_built, report_inputs):
    for page in ("index.html", PAGE):
        text = (report_inputs.html / page).read_text()
        doc = _Doc(text)
        assert not any(t in ("img", "b") for t, _ in doc.tags)
        assert not any(k.startswith("on") for _, a in doc.tags for k in a)
        assert all("alert" not in s for s in doc.scripts)
        assert sum(t == "script" for t, _ in doc.tags) == (2 if page != "index.html" else 0)
        assert all("<" not in data for data in doc.data.values())  # no token can end the JSON's script element
        assert "\x07" not in text and "\x1b" not in text
    page = _Doc((report_inputs.html / PAGE).read_text())
    shown = "".join(page.texts)
    for token in ("<script>alert(1)</script>", "\"q'uote", "a&amp;b", "bell\\x07esc\\x1b"):
        assert token in shown
    assert HOSTILE[0] in json.loads(page.data["token-index"])
    assert "<img src=x onerror=alert(1)>|x" in "".join(_Doc((report_inputs.html / "index.html").read_text()).texts)


def test_rendered_contexts_show_characters_not_replacement_marks(report_built, report_inputs):
    text = (report_inputs.html / PAGE).read_text()
    assert "\ufffd" not in text
    assert "😀" in "".join(_Doc(text).texts)  # the fixture's emoji, joined from its 4 byte tokens, is in some context


def test_indexed_features_by_hand():
    counts = torch.tensor([0, 5, 2, 0, 5, 9, 1])
    assert indexed_features(counts, 10) == [1, 2, 4, 5, 6]  # every alive one, in id order
    assert indexed_features(counts, 3) == [1, 4, 5]  # the 3 most frequent; 1 and 4 tie at 5 and both fit
    assert indexed_features(counts, 2) == [1, 5]  # the tie goes to the lower id


def test_a_capped_index_lists_the_most_frequent_features_and_says_so(report_inputs, tmp_path):
    import dataclasses

    cfg = make(ReportConfig, n_index=1, n_random=0, n_strongest=1, n_dense=0, top_k=4, n_quantile_contexts=0, window=2, n_logit_tokens=2, max_index_rows=5)
    paths = dataclasses.replace(report_inputs, html=tmp_path / "html", summary=tmp_path / "summary.md")
    build_report(cfg, paths, seed=0)
    text = (paths.html / PAGE).read_text()
    f, _ = _full_pass(report_inputs)
    counts = (f != 0).sum(0)
    alive = int((counts > 0).sum())
    assert alive > 5  # the fixture has more alive features than the cap
    frequent = sorted(range(D_SAE), key=lambda i: (-int(counts[i]), i))[:5]
    rows = _FeatureRows(text).rows[1:]
    assert [int(first) for first, _ in rows] == sorted(frequent)
    assert f"The 5 of {alive} alive features that fire most" in " ".join(_Doc(text).texts).replace("\n", " ")
    assert 'id="jump-note"' in text


def test_a_matryoshka_sae_is_listed_as_matryoshka(tmp_path):
    """Its cfg.json says `jumprelu` for SAELens; the overview must show our architecture from our own block."""
    from token_journey.report.gather import gather_saes
    from token_journey.sae.base import SAESpec
    from token_journey.sae.io import save_sae
    from token_journey.sae.registry import build_sae

    sae = build_sae(SAESpec("matryoshka", D_MODEL, D_SAE, k=4, prefixes=(3, 12, D_SAE), name="m", site="resid_post", layer=2))
    save_sae(sae, tmp_path / "saes" / "resid_post" / "layer_2" / "m")
    (tmp_path / "metrics").mkdir()
    entries = gather_saes(tmp_path / "saes", tmp_path / "metrics")
    assert [(e.layer, e.name, e.cells()[:2]) for e in entries] == [(2, "m", ["matryoshka", f"{D_SAE}"])]


def test_explanations_appear_on_the_first_dashboards_and_are_cached(report_inputs, tmp_path):
    """With report.explainer.model set (a tiny random Llama here), the first features get an explanation line."""
    import dataclasses

    from support.tiny import save_tiny

    explainer = save_tiny("llama", tmp_path / "explainer")
    (explainer / "manifest.json").write_text(json.dumps({"name": "tiny", "dtype": "float32", "fingerprint": "f00d"}))
    settings = {
        **dataclasses.asdict(make(ReportConfig).explainer),
        "model": str(explainer),
        "n_features": 2,
        "n_examples": 3,
        "n_heldout": 2,
        "window": 2,
        "max_new_tokens": 3,
        "cache": str(tmp_path / "e.json"),
    }
    cfg = make(ReportConfig, n_index=0, n_strongest=3, n_dense=0, n_random=0, top_k=6, n_quantile_contexts=0, window=3, n_logit_tokens=3, explainer=settings)
    paths = dataclasses.replace(report_inputs, html=tmp_path / "html", summary=tmp_path / "summary.md")
    build_report(cfg, paths, seed=0)
    text = (paths.html / "resid_post/layer_1/relu-1.html").read_text()
    sections = text.split("<section")[1:]
    assert ['class="explanation"' in s for s in sections] == [True, True, False]
    entries = json.loads((tmp_path / "e.json").read_text())["entries"]
    assert len(entries) == 2 and all("model=tiny@f00d" in k for k in entries)


def test_pages_are_the_same_from_one_process_or_several(report_inputs, tmp_path):
    """Pages rendered by forked workers (report.workers) are byte for byte the pages of one process."""
    import dataclasses
    import shutil

    saes = tmp_path / "saes"
    shutil.copytree(report_inputs.saes, saes)
    first = next(saes.rglob("cfg.json")).parent
    shutil.copytree(first, first.parent / "relu-copy")  # a second page of the same layer
    built = {}
    for workers in (1, 2):
        paths = dataclasses.replace(report_inputs, saes=saes, html=tmp_path / f"html-{workers}", summary=tmp_path / f"summary-{workers}.md")
        result = build_report(make(ReportConfig, workers=workers), paths, seed=0)
        built[workers] = {p.relative_to(paths.html).as_posix(): p.read_bytes() for p in result.files if p.suffix == ".html"}
    assert len(built[1]) == 3 and built[1] == built[2]


def _worker_signal_state(_entry):
    """What a page worker makes of SIGTERM and SIGUSR1 (module level, so the pool can name it)."""
    import signal

    return [signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGUSR1)]


def test_page_workers_die_of_sigterm_while_the_stage_catches_it():
    """Forked page workers drop the stage's stop handlers (else the pool's terminate can wait on a worker forever)."""
    import signal

    from token_journey.preemption import stop_requests
    from token_journey.report.build import _pages

    with stop_requests(listen=False):
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        states = list(_pages(_worker_signal_state, list(range(4)), workers=2))
    assert states == [[True, True]] * 4
