"""The traced prompt's files: viewer JSON in circuit-tracer's schema, a self-contained page, metrics; hostile text stays text."""

from __future__ import annotations

import json
import re

import pytest
import torch

from support.configs import make
from support.tiny import tiny_model, tiny_tokenizer
from support.transcoders import random_transcoders
from token_journey.circuits.page import MAX_DRAWN_EDGES
from token_journey.circuits.trace import load_transcoders, prompt_ids, trace, write_outputs
from token_journey.config.circuits import CircuitsConfig
from token_journey.config.sae import SAEConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey.follow import slug
from token_journey.layout import sae_folder
from token_journey.sae.io import save_sae

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'

NODE_KEYS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp"}


def _config(**overrides):
    return make(CircuitsConfig, **{"max_prompt_tokens": 64, **overrides})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    traced = trace(tiny_model("llama"), tiny_tokenizer(), random_transcoders(3), _config(text=HOSTILE), "tiny-llama", progress=False)
    (root / "journey").mkdir()
    (root / "journey" / f"{slug('tiny-llama', HOSTILE)}.html").write_text("<html></html>")  # the journey page of the same prompt
    return traced, write_outputs(traced, root / "circuits", scan="tiny/random", journey=root / "journey")


def test_graph_json_follows_the_viewer_schema(written):
    traced, paths = written
    payload = json.loads(paths["graph"].read_text())
    meta = payload["metadata"]
    assert meta["prompt"] == HOSTILE and meta["scan"] == "tiny/random" and meta["node_threshold"] == 0.8 and meta["schema_version"] == 1
    assert meta["prompt_tokens"] == traced.tokens and "".join(traced.tokens[1:]) == HOSTILE  # BOS, then the text
    assert set(payload["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    ids = {n["node_id"] for n in payload["nodes"]}
    assert len(ids) == len(payload["nodes"])
    assert all(NODE_KEYS <= set(n) for n in payload["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in payload["links"])
    kinds = {n["feature_type"] for n in payload["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    logits = [n for n in payload["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == len(traced.graph.logit_ids) and sum(n["is_target_logit"] for n in logits) == 1
    assert sum(1 for n in payload["nodes"] if n["feature_type"] == "embedding") == len(traced.tokens)
    # A link's weight is the graph's edge between those nodes.
    g = traced.graph
    for n in payload["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, index, pos = map(int, n["node_id"].split("_"))
            assert n["feature"] == (layer + index) * (layer + index + 1) // 2 + index
            assert (g.features == g.features.new_tensor([layer, pos, index])).all(1).any()


def test_metrics_state_the_checks_and_scores(written):
    traced, paths = written
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["logits_max_abs_diff"] <= 1e-4 and metrics["completeness_error"] <= 1e-4
    assert 0 <= metrics["replacement_score"] <= 1 and 0 <= metrics["completeness_score"] <= 1
    assert metrics["kept_nodes"] == int(traced.pruned.node_mask.sum())
    assert "seconds" not in metrics  # run-to-run figures stay out of tracked outputs
    assert len(metrics["interventions"]) == 10 and set(metrics["intervention_agreement"]) >= {"direct_correlation", "total_correlation"}


def test_page_is_self_contained_and_hostile_text_is_inert(written):
    _, paths = written
    page = paths["page"].read_text()
    lowered = page.lower()
    assert "<script" not in lowered and "<img" not in lowered  # the text's tags arrive as text
    assert "&lt;script&gt;" in page and "&lt;img" in page
    assert "http://" not in page and "https://" not in page and not re.search(r"<[^>]*\ssrc=", lowered)  # nothing to fetch
    stem = slug("tiny-llama", HOSTILE)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(re.fullmatch(rf"\.\./journey/{re.escape(stem)}\.html#layer-\d+", h) for h in hrefs)  # only the journey's steps
    assert "<h2>Interventions</h2>" in page
    links = json.loads(paths["graph"].read_text())["links"]
    assert page.count("<svg") == 1 and page.count("<line") == min(len(links), MAX_DRAWN_EDGES)


def test_each_latent_links_to_its_layers_step_in_the_journey(written, tmp_path):
    traced, paths = written
    page = paths["page"].read_text()
    stem = slug("tiny-llama", HOSTILE)
    nodes = [n for n in json.loads(paths["graph"].read_text())["nodes"] if n["feature_type"] == "cross layer transcoder"]
    drawn = re.findall(r'<a href="\.\./journey/[^"#]*#layer-(\d+)"><circle class="feature"', page)
    assert sorted(map(int, drawn)) == sorted(int(n["layer"]) for n in nodes)  # every latent node, to its own layer
    assert f'<td><a href="../journey/{stem}.html#layer-' in page  # the table of latents too
    alone = write_outputs(traced, tmp_path / "circuits", scan="tiny/random", journey=tmp_path / "no-journey")
    assert "href=" not in alone["page"].read_text()  # no journey page of this prompt: no dead links


def test_prompt_ids_prepend_bos_and_refuse_long_prompts():
    tok = tiny_tokenizer()
    ids = prompt_ids(tok, "The capital", True, 16)
    assert ids[0] == tok.bos_token_id and ids[1:] == tok("The capital", add_special_tokens=False).input_ids
    assert prompt_ids(tok, "The capital", False, 16) == ids[1:]
    assert prompt_ids(tok, "<bos>The capital", True, 16)[0] == tok.bos_token_id  # already there: not twice
    assert prompt_ids(tok, "<bos>The capital", True, 16).count(tok.bos_token_id) == 1
    with pytest.raises(TokenJourneyError, match="max_prompt_tokens=3"):
        prompt_ids(tok, "The capital of France is", True, 3)


def test_config_errors_name_the_key():
    with pytest.raises(TokenJourneyError, match="circuits.node_threshold=1.5"):
        _config(node_threshold=1.5)
    with pytest.raises(TokenJourneyError, match="'topk' is not a transcoder"):
        _config(transcoder=make(SAEConfig, architecture="topk"))


def test_transcoders_load_for_every_layer_or_say_which_is_missing(tmp_path):
    for layer, tc in enumerate(random_transcoders(3)):
        if layer != 2:
            save_sae(tc, sae_folder(tmp_path, "mlp_out", layer, "tc"))
    with pytest.raises(TokenJourneyError, match="no transcoder 'tc' for layer 2"):
        load_transcoders(tmp_path, "tc", 3)
    assert len(load_transcoders(tmp_path, "tc", 2)) == 2


@pytest.mark.parametrize("width,height", [(1366, 900), (1920, 1080)])
def test_page_in_headless_chromium(written, tmp_path, width, height):
    """Laid out at both widths: no script error, no sideways scroll, no overlapping or overflowing boxes."""
    from support.browser import measure, require_browser

    _, paths = written
    found = measure(require_browser(), paths["page"], width, height, tmp_path / "profile")
    assert not found["console"], found["console"]
    assert found["viewport"] == width and found["boxes"] > 50
    assert found["scroll_width"] <= width, "the page scrolls sideways"
    assert found["overlaps"] == [], found["overlaps"]
    assert found["overflows"] == [], found["overflows"]


def test_export_refuses_what_circuit_tracer_cannot_load(tmp_path):
    from safetensors.torch import load_file

    from token_journey.circuits.interop import export_transcoders

    with pytest.raises(TokenJourneyError, match="'topk_transcoder' cannot be exported"):
        export_transcoders(random_transcoders(2, architecture="topk_transcoder"), tmp_path / "x", "m", "s")
    files = export_transcoders(random_transcoders(2), tmp_path / "tc", "m", "s")
    weights = load_file(files[1])
    tc = random_transcoders(2)[1]
    assert set(weights) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold"}
    assert torch.equal(weights["W_enc"], tc.W_enc.detach().t()) and weights["W_enc"].shape == (64, 32)  # [d_sae, d]
    assert json.loads((tmp_path / "tc/config.yaml").read_text())["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]


def test_corpus_slice_keeps_whole_sequences_within_the_budget(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from token_journey.circuits.branch import slice_corpus

    ids = pa.array([[i] * 8 for i in range(10)], type=pa.list_(pa.int32(), 8))
    for split in ("train", "eval"):
        pq.write_table(pa.table({"sequence_id": list(range(10)), "input_ids": ids}), tmp_path / f"{split}.parquet")
    assert slice_corpus(tmp_path, tmp_path / "out", {"train": 20, "eval": 1000}) == {"train": 24, "eval": 80}
    assert pq.read_table(tmp_path / "out/train.parquet").column("sequence_id").to_pylist() == [0, 1, 2]
    with pytest.raises(TokenJourneyError, match="no corpus split"):
        slice_corpus(tmp_path / "nowhere", tmp_path / "out2", {"train": 8})


def test_page_draws_only_the_strongest_edges(written, monkeypatch):
    from token_journey.circuits import page

    traced, paths = written
    payload = json.loads(paths["graph"].read_text())
    monkeypatch.setattr(page, "MAX_DRAWN_EDGES", 5)
    html = page.render_page(traced, payload)
    strongest = sorted(abs(link["weight"]) for link in payload["links"])[-5:]
    drawn = sorted(abs(float(w)) for w in re.findall(r"<line [^>]*><title>[^<]*: ([-+0-9.e]+)</title>", html))
    assert len(drawn) == 5 and drawn == pytest.approx(strongest, rel=1e-3)
    assert f"the strongest 5\nof its {len(payload['links'])} edges are drawn" in html
