"""The on-disk layout and the helpers that write it whole."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest

from support.imports import REPO
from token_journey.errors import TokenJourneyError
from token_journey.layout import (
    Layout,
    Uri,
    activations_folder,
    atomic_write_text,
    checkpoint_folder,
    layers_under,
    metrics_file,
    pareto_file,
    replace_folder,
    report_page,
    sae_folder,
    sha256_file,
    short_hash,
    write_json,
)


def _layout(**changes: str) -> Layout:
    paths = {
        "base_model": "models/base/m",
        "corpus": "data/corpus/c",
        "activations": "data/activations/m",
        "saes": "models/saes/m",
        "metrics": "reports/metrics/m",
        "html": "reports/html",
        "journey": "reports/journey",
        "circuits_data": "data/circuits/m",
        "circuits": "models/circuits/m",
        "graphs": "reports/circuits",
        "summary": "reports/summary.md",
        "timings": "reports/timings/m",
        **changes,
    }
    return Layout.from_config(paths)


def test_every_path_of_a_layer_follows_the_paths_config():
    layout = _layout()
    assert activations_folder(layout.activations, "resid_post", 5) == Path("data/activations/m/resid_post/layer_5")
    assert activations_folder(layout.activations, "mlp_out", 5, "eval") == Path("data/activations/m/mlp_out/layer_5/eval")
    sae = sae_folder(layout.saes, "resid_post", 5, "topk-k32")
    assert sae == Path("models/saes/m/resid_post/layer_5/topk-k32")
    assert checkpoint_folder(sae) == Path("models/saes/m/resid_post/layer_5/.topk-k32.ckpt")
    assert metrics_file(layout.metrics, "resid_post", 5) == Path("reports/metrics/m/resid_post/layer_5.json")
    assert pareto_file(layout.metrics, "resid_post", 5) == Path("reports/metrics/m/resid_post/pareto/layer_5.json")
    assert report_page("resid_post", 5, "topk-k32") == "resid_post/layer_5/topk-k32.html"
    assert layout.corpus_file("eval") == Path("data/corpus/c/eval.parquet")


def test_an_object_store_activations_root_keeps_its_uri():
    layout = _layout(activations="s3://bucket/acts/m")
    assert isinstance(layout.activations, Uri) and isinstance(_layout().activations, Path)
    folder = activations_folder(layout.activations, "resid_post", 5, "eval")
    assert isinstance(folder, Uri) and folder == "s3://bucket/acts/m/resid_post/layer_5/eval"
    assert folder / "shard-00000.parquet" == "s3://bucket/acts/m/resid_post/layer_5/eval/shard-00000.parquet"
    assert (folder / "manifest.json").name == "manifest.json"
    # a query (e.g. the endpoint of an S3-compatible server) stays at the end
    queried = activations_folder("s3://b/acts/?endpoint_override=127.0.0.1:9000&scheme=http", "mlp_out", 2)
    assert queried == "s3://b/acts/mlp_out/layer_2?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (queried / "manifest.json").name == "manifest.json"
    with pytest.raises(TokenJourneyError, match=r"paths.saes=s3://bucket/saes is a URI.*only paths.activations"):
        _layout(saes="s3://bucket/saes")


def test_journey_links_follow_where_the_report_and_journey_live():
    assert _layout().journey_to_report() == "../html"
    assert _layout(html="site/report", journey="site/pages/journey").journey_to_report() == "../../report"


def test_paths_config_rejects_unknown_and_missing_keys():
    with pytest.raises(TokenJourneyError, match="unknown key.*paths.htm"):
        _layout(htm="x")
    paths = {"base_model": "a"}
    with pytest.raises(TokenJourneyError, match="missing config key `paths.corpus`"):
        Layout.from_config(paths)


def test_layers_under_finds_layer_folders_and_files(tmp_path):
    (tmp_path / "resid_post/layer_3").mkdir(parents=True)
    (tmp_path / "resid_post/layer_12").mkdir()
    (tmp_path / "resid_post/layer_12.json").write_text("{}")
    (tmp_path / "resid_post/pareto").mkdir()
    (tmp_path / "mlp_out/layer_x").mkdir(parents=True)
    found = [(site, layer, path.name) for site, layer, path in layers_under(tmp_path)]
    assert sorted(found) == [("resid_post", 3, "layer_3"), ("resid_post", 12, "layer_12"), ("resid_post", 12, "layer_12.json")]


def test_atomic_writers_leave_no_temporary_file_and_write_strict_json(tmp_path):
    target = tmp_path / "deep/er/metrics.json"
    write_json(target, {"ratio": math.nan, "rows": [1, 2.5], "tuple": (1, 2)})
    assert json.loads(target.read_text()) == {"ratio": None, "rows": [1, 2.5], "tuple": [1, 2]}
    assert target.read_text().endswith("\n")
    assert atomic_write_text(tmp_path / "page.html", "é") == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["metrics.json", "page.html"]


def test_replace_folder_swaps_a_whole_folder(tmp_path):
    old, new = tmp_path / "sae", tmp_path / f".sae.tmp-{os.getpid()}"
    old.mkdir()
    (old / "stale.txt").write_text("old")
    new.mkdir()
    (new / "fresh.txt").write_text("new")
    replace_folder(new, old)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"] and [p.name for p in old.iterdir()] == ["fresh.txt"]


def test_hashes_match_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    payload = {"b": [1, 2], "a": "x"}
    assert short_hash(payload) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_only_the_layout_module_spells_the_layer_folder_name():
    """`layer_<L>` is built in token_journey/layout.py and nowhere else in the package.

    Except circuit-tracer's own file names (`layer_{i}.safetensors`), which follow its format, not our layout.
    """
    spelled = [str(p.relative_to(REPO)) for p in (REPO / "token_journey").rglob("*.py") if re.search(r"layer_\{", p.read_text())]
    assert sorted(spelled) == ["token_journey/circuits/interop.py", "token_journey/layout.py"]
