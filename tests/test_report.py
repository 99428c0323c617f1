"""The HTML report: streaming feature statistics, logit lens, plots, escaping, the whole build.

Inputs are small fixtures in the contract's on-disk shapes: a tiny Llama folder whose
tokenizer has hostile added tokens, an eval corpus split, eval activation shards, a ReLU SAE of the real package saved with `save_sae`, and metrics JSONs.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from support.configs import make
from token_journey.config.report import ReportConfig
from token_journey.layout import Layout, sha256_file
from token_journey.report import build_report, plots
from token_journey.report.feature_stats import feature_stats, merge_topk, select_features
from token_journey.report.tokens import logit_effects, visible

HOSTILE = ["<script>alert(1)</script>", "\"q'uote", "a&amp;b", "bell\x07esc\x1b"]
D_MODEL, D_SAE, CONTEXT, N_SEQ = 32, 48, 16, 10


def make_sae(seed: int = 0):
    """A ReLU SAE of the real package with random weights; features 40.. are dead (very negative bias)."""
    from token_journey.sae.base import SAESpec
    from token_journey.sae.registry import build_sae

    sae = build_sae(SAESpec("relu", D_MODEL, D_SAE, name="relu-1", model="tiny", site="resid_post", layer=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5)
        bias = -torch.rand(D_SAE, generator=g)
        bias[40:] = -1e4
        sae.b_enc.copy_(bias)
    return sae.eval()


def _tables(x: np.ndarray, meta: dict[str, np.ndarray], chunk: int) -> list[pa.Table]:
    """Activation rows as shard-shaped tables of `chunk` rows."""
    out = []
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        act = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), D_MODEL)
        out.append(pa.table({"activation": act, "token_id": pa.array(meta["token_id"][start : start + chunk], pa.int32()),
                             "sequence_id": pa.array(meta["sequence_id"][start : start + chunk], pa.int64()),
                             "position": pa.array(meta["position"][start : start + chunk], pa.int32())}))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Layout:
    """A complete set of report inputs on disk (see the module docstring)."""
    from support.tiny import save_tiny, tiny_tokenizer

    root = tmp_path_factory.mktemp("report")
    base = save_tiny("llama", root / "base")
    tok = tiny_tokenizer()
    tok.add_tokens(HOSTILE)
    tok.save_pretrained(base)
    (base / "manifest.json").write_text(json.dumps({"name": "tiny<b>", "source": "local", "dtype": "float32",
                                                    "n_params": 1234, "n_layers": 3}))
    hostile_ids = tok.convert_tokens_to_ids(HOSTILE)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, size=(N_SEQ, CONTEXT)).astype(np.int32)
    ids[:, 0] = 0  # BOS: never an activation row
    ids[:, 5] = hostile_ids[0]
    ids[::2, 7:7 + len(hostile_ids)] = hostile_ids
    corpus = root / "corpus"
    corpus.mkdir()
    seq_ids = np.arange(100, 100 + N_SEQ)
    pq.write_table(pa.table({"sequence_id": pa.array(seq_ids, pa.int64()), "doc_id": pa.array(seq_ids, pa.int64()),
                             "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), CONTEXT)}),
                   corpus / "eval.parquet")
    (corpus / "stats.json").write_text(json.dumps({"eval_tokens": int(ids.size), "source": "fixture"}))
    seq, pos = np.meshgrid(np.arange(N_SEQ), np.arange(1, CONTEXT), indexing="ij")
    seq, pos = seq.reshape(-1), pos.reshape(-1)
    x = rng.normal(size=(len(seq), D_MODEL)).astype(np.float32)
    meta = {"token_id": ids[seq, pos], "sequence_id": seq_ids[seq], "position": pos}
    layer_dir = root / "acts" / "resid_post" / "layer_1" / "eval"
    layer_dir.mkdir(parents=True)
    shards = []
    for i, table in enumerate(_tables(x, meta, 64)):
        pq.write_table(table, layer_dir / f"shard-{i:05d}.parquet")
        shards.append({"file": f"shard-{i:05d}.parquet", "rows": table.num_rows,
                       "sha256": sha256_file(layer_dir / f"shard-{i:05d}.parquet")})
    (layer_dir / "manifest.json").write_text(json.dumps({"rows": len(x), "d_model": D_MODEL, "dtype": "float32",
                                                         "site": "resid_post", "layer": 1, "shards": shards,
                                                         "excluded_counts": {"special": N_SEQ, "first_positions": 0,
                                                                             "max_norm": 3}}))
    metrics = root / "metrics" / "resid_post"
    metrics.mkdir(parents=True)
    for layer in (1, 2):
        saes = {f"relu-{k}": {"architecture": "relu", "width": D_SAE, "l0": 10.0 * k + layer, "fvu": 0.5 / k,
                              "delta_loss": 0.3 / k + 0.01 * layer, "loss_recovered": 0.9, "dead_fraction": 0.1,
                              "dense_fraction": 0.0, "train_tokens_per_s": 1e5,
                              "error_by_position": [None] + [0.2 + 0.01 * p for p in range(1, CONTEXT)]}
                for k in (1, 2)}
        if layer == 2:
            saes["<img src=x onerror=alert(1)>|x"] = {"l0": 3.0, "fvu": 0.9, "delta_loss": 1.0}
        (metrics / f"layer_{layer}.json").write_text(json.dumps({"model": "tiny", "site": "resid_post", "layer": layer,
                                                                  "saes": saes}))
    from token_journey.sae.io import save_sae

    save_sae(make_sae(), root / "saes" / "resid_post" / "layer_1" / "relu-1", {"tokens_per_s": 5e4, "tokens": 1000})
    return Layout(base_model=base, corpus=corpus, activations=root / "acts", saes=root / "saes", metrics=root / "metrics",
                  html=root / "html", journey=root / "journey", summary=root / "summary.md", timings=root / "timings")


def _all_rows(paths: Layout) -> tuple[torch.Tensor, pa.Table]:
    table = pa.concat_tables(pq.read_table(f) for f in sorted((paths.activations / "resid_post/layer_1/eval").glob("*.parquet")))
    x = torch.from_numpy(table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, D_MODEL).copy())
    return x, table


def test_streaming_stats_match_a_full_pass(inputs):
    sae = make_sae()
    x, table = _all_rows(inputs)
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


def test_merge_topk_keeps_the_best_rows():
    values = torch.tensor([[5.0, 1.0], [3.0, 0.0]])
    rows = torch.tensor([[0, 0], [1, 1]])
    merged_values, merged_rows = merge_topk(values, rows, torch.tensor([[4.0, 2.0]]), torch.tensor([[7, 7]]), k=2)
    assert merged_values.tolist() == [[5.0, 2.0], [4.0, 1.0]]
    assert merged_rows.tolist() == [[0, 7], [7, 0]]


def test_select_features_skips_dead_and_is_seeded(inputs):
    tables = [_all_rows(inputs)[1]]
    stats = feature_stats(make_sae(), lambda: tables, "float32", 64, 10_000, 3)
    top, sample = select_features(stats, 4, 5, seed=1)
    assert stats.counts[top].tolist() == sorted(stats.counts[stats.counts > 0].tolist(), reverse=True)[:4]
    assert not set(top) & set(sample) and all(f < 40 for f in top + sample)
    assert select_features(stats, 4, 5, seed=1) == (top, sample)


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
    """Collects start tags (with attributes), element ids and the text inside every `script`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.texts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.texts).append(data)

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.tags if a.get("id")]


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    """The report built once from the fixture."""
    cfg = make(ReportConfig, n_features=3, n_random=2, top_k=6, n_quantile_contexts=4, window=3, n_logit_tokens=5)
    return build_report(cfg, inputs, seed=0), cfg


def test_report_writes_every_page(built, inputs):
    result, _ = built
    assert {p.relative_to(inputs.html).as_posix() for p in result.files if p.suffix == ".html"} == {
        "index.html", "resid_post/layer_1/relu-1.html"}
    assert result.bytes == sum(p.stat().st_size for p in result.files)
    names = [(e.layer, e.name) for e in result.entries]
    assert names == sorted(names) and len(names) == 5


def test_overview_tables_and_pareto_plots(built, inputs):
    doc = _Doc((inputs.html / "index.html").read_text())
    circles = [t for t, _ in doc.tags if t == "circle"]
    # Two Pareto plots of 5 SAEs each, plus one vertex per finite position per error line (4 SAEs x 15).
    assert len(circles) == 2 * 5 + 4 * (CONTEXT - 1)
    assert sum(t == "svg" for t, _ in doc.tags) == 4
    metrics = json.loads((inputs.metrics / "resid_post/layer_2.json").read_text())["saes"]["relu-2"]
    summary = inputs.summary.read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| resid_post | 2 | relu-2 |"))
    assert f"| {metrics['l0']:.1f} | {metrics['fvu']:.4f} | {metrics['delta_loss']:.4f} |" in row
    assert "\\<img src=x onerror=alert(1)\\>\\|x" in summary  # a name cannot break the table or become HTML
    manifest = json.loads((inputs.activations / "resid_post/layer_1/eval/manifest.json").read_text())
    dropped = manifest["excluded_counts"]
    assert (f"eval {manifest['rows']:,} tokens (not rows: {dropped['special']:,} special, "
            f"{dropped['first_positions']:,} first positions, {dropped['max_norm']:,} norm outliers)") in summary


def test_feature_dashboards_are_anchored_and_consistent(built, inputs):
    result, cfg = built
    text = (inputs.html / "resid_post/layer_1/relu-1.html").read_text()
    doc = _Doc(text)
    ids = doc.ids()
    assert len(ids) == len(set(ids))
    sae = make_sae()
    x, table = _all_rows(inputs)
    with torch.no_grad():
        f = sae.encode(x)
    alive = torch.nonzero((f != 0).sum(0)).flatten().tolist()
    assert {f"feature-{i}" for i in alive} <= set(ids)
    assert not {f"feature-{i}" for i in range(40, D_SAE)} & set(ids)
    sections = [a["id"] for t, a in doc.tags if t == "section"]
    assert len(sections) == cfg.n_features + cfg.n_random
    # The best context of the first dashboard shows the true top activation of that feature.
    first = int(sections[0].split("-")[1])
    best = float(f[:, first].max())
    assert f'title="activation {best:.4g}"' in text


def test_corpus_text_renders_as_text(built, inputs):
    for page in ("index.html", "resid_post/layer_1/relu-1.html"):
        text = (inputs.html / page).read_text()
        doc = _Doc(text)
        assert not any(t in ("img", "b") for t, _ in doc.tags)
        assert not any(k.startswith("on") for _, a in doc.tags for k in a)
        assert all("alert" not in s for s in doc.scripts)
        assert sum(t == "script" for t, _ in doc.tags) == (1 if page != "index.html" else 0)
        assert "\x07" not in text and "\x1b" not in text
    page = _Doc((inputs.html / "resid_post/layer_1/relu-1.html").read_text())
    shown = "".join(page.texts)
    for token in ("<script>alert(1)</script>", "\"q'uote", "a&amp;b", "bell\\x07esc\\x1b"):
        assert token in shown
    assert "<img src=x onerror=alert(1)>|x" in "".join(_Doc((inputs.html / "index.html").read_text()).texts)


def test_explanations_appear_on_the_first_dashboards_and_are_cached(inputs, tmp_path):
    """With report.explainer.model set (a tiny random Llama here), the first features get an explanation line."""
    import dataclasses

    from support.tiny import save_tiny

    explainer = save_tiny("llama", tmp_path / "explainer")
    (explainer / "manifest.json").write_text(json.dumps({"name": "tiny", "dtype": "float32", "fingerprint": "f00d"}))
    settings = {**dataclasses.asdict(make(ReportConfig).explainer), "model": str(explainer), "n_features": 2,
                "n_examples": 3, "n_heldout": 2, "window": 2, "max_new_tokens": 3, "cache": str(tmp_path / "e.json")}
    cfg = make(ReportConfig, n_features=3, n_random=0, top_k=6, n_quantile_contexts=0, window=3, n_logit_tokens=3,
               explainer=settings)
    paths = dataclasses.replace(inputs, html=tmp_path / "html", summary=tmp_path / "summary.md")
    build_report(cfg, paths, seed=0)
    text = (paths.html / "resid_post/layer_1/relu-1.html").read_text()
    sections = text.split("<section")[1:]
    assert ['class="explanation"' in s for s in sections] == [True, True, False]
    entries = json.loads((tmp_path / "e.json").read_text())["entries"]
    assert len(entries) == 2 and all("model=tiny@f00d" in k for k in entries)
