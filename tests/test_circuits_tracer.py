"""Our attribution graph against circuit-tracer 0.5.0's on the same tiny Llama, prompt and transcoders.

circuit-tracer 0.5.0 needs transformers <= 4.57.3, so it lives in a venv of its own (the
`circuit-tracer` extra of pyproject.toml, installed beside the project's transformers 5): point
TOKEN_JOURNEY_CIRCUIT_TRACER_PYTHON at that venv's python. The test is skipped where neither that
nor the current interpreter can import circuit_tracer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from support.ct_graph import legacy_model_folder
from support.tiny import save_tiny, tiny_model, tiny_tokenizer
from support.transcoders import random_transcoders
from token_journey.circuits.graph import NODE_THRESHOLD, build_graph, prune, scores
from token_journey.circuits.interop import export_transcoders, graph_json, write_graph_json

SCRIPT = Path(__file__).parent / "support" / "ct_graph.py"
TEXT = "The capital of France is Paris, and"


def _tracer_python() -> str | None:
    for python in (os.environ.get("TOKEN_JOURNEY_CIRCUIT_TRACER_PYTHON"), sys.executable):
        if python and subprocess.run([python, "-c", "import circuit_tracer"], capture_output=True).returncode == 0:
            return python
    return None


PYTHON = _tracer_python()


@pytest.mark.skipif(PYTHON is None, reason="circuit-tracer not installed (set TOKEN_JOURNEY_CIRCUIT_TRACER_PYTHON to a venv with circuit-tracer==0.5.0)")
def test_same_graph_as_circuit_tracer(tmp_path):
    ids = [0] + tiny_tokenizer()(TEXT, add_special_tokens=False).input_ids
    transcoders = random_transcoders(3)
    export_transcoders(transcoders, tmp_path / "transcoders", "tiny-llama", "tiny-llama-random")
    ours = build_graph(tiny_model("llama"), ids, transcoders, progress=False)
    pruned = prune(ours)
    ours_json = graph_json(ours, pruned, [str(i) for i in ids], [str(i) for i in ours.logit_ids], "ours", "tiny-llama-random", TEXT, NODE_THRESHOLD)
    write_graph_json(tmp_path / "ours.json", ours_json)
    out = tmp_path / "ct.safetensors"
    folder = legacy_model_folder(save_tiny("llama", tmp_path / "tiny"), tmp_path / "model")
    args = [str(folder), str(tmp_path / "transcoders"), json.dumps(ids), str(out), str(tmp_path / "ours.json")]
    run = subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    theirs = load_file(out)
    with safe_open(out, "pt") as f:
        their_scores = f.metadata()

    assert torch.equal(theirs["active_features"], ours.features)
    assert torch.equal(theirs["selected_features"], torch.arange(ours.n_features))
    assert theirs["logit_ids"].tolist() == ours.logit_ids
    torch.testing.assert_close(theirs["logit_probabilities"], ours.logit_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs["activation_values"], ours.activations, atol=1e-4, rtol=0)
    assert theirs["adjacency"].shape == ours.adjacency.shape
    largest = float(ours.adjacency.abs().max())
    assert float((theirs["adjacency"] - ours.adjacency).abs().max()) <= 1e-3 * largest
    mine = scores(ours)
    assert float(their_scores["replacement"]) == pytest.approx(mine["replacement"], abs=1e-4)
    assert float(their_scores["completeness"]) == pytest.approx(mine["completeness"], abs=1e-4)

    # The pruned graph in the viewer's JSON: the same nodes and links (our JSON also passed its schema
    # above). 0.5.0 names error nodes "0_{layer}_{pos}", which later versions changed to ours because it
    # collides with latent `layer` of layer 0 at that position; links at such an id are ambiguous there.
    theirs_json = json.loads((tmp_path / "ct-graph.json").read_text())

    def renamed(node):
        if node["feature_type"] == "mlp reconstruction error":
            _, layer, pos = node["node_id"].split("_")
            return f"{layer}_-1_{pos}"
        return node["node_id"]

    def old_name(our_id):
        layer, index, pos = our_id.split("_")
        return f"0_{layer}_{pos}" if index == "-1" else our_id

    assert {renamed(n) for n in theirs_json["nodes"]} == {n["node_id"] for n in ours_json["nodes"]}
    counts = Counter(n["node_id"] for n in theirs_json["nodes"])
    ambiguous = {i for i, c in counts.items() if c > 1}
    their_links = {(x["source"], x["target"]): x["weight"] for x in theirs_json["links"] if not {x["source"], x["target"]} & ambiguous}
    our_links = {(old_name(x["source"]), old_name(x["target"])): x["weight"] for x in ours_json["links"]}
    our_links = {k: w for k, w in our_links.items() if not set(k) & ambiguous}
    assert their_links.keys() == our_links.keys() and len(our_links) > 100
    assert max(abs(their_links[k] - our_links[k]) for k in our_links) <= 1e-3 * largest
