"""circuit-tracer and Neuronpedia interop: our transcoders in the form circuit-tracer loads, our graphs in the JSON its viewer reads.

Transcoders: one `layer_{i}.safetensors` per layer with circuit-tracer's `SingleLayerTranscoder`
names and orientation (`W_enc [d_sae, d]`, `W_dec [d_sae, d]`, `b_enc`, `b_dec`, optional `W_skip
[d, d]` and `activation_function.threshold`), plus the `config.yaml` its `load_transcoder_from_hub`
reads, hooked at `mlp.hook_in` / `mlp.hook_out` (the MLP's normed input and its output: our `mlp_in`
and `mlp_out` sites). Locally, `circuit_tracer.transcoder.single_layer_transcoder.load_transcoder_set
({i: path})` loads the files; uploaded to a Hugging Face repository, the folder loads by its name.
circuit-tracer has no TopK single-layer loader (a file without a threshold loads as ReLU), so only
JumpReLU transcoders are exported.

Graph JSON: the schema of circuit-tracer's `create_graph_files` (its pydantic `Model`: `metadata`,
`qParams`, `nodes`, `links`), which its local server and Neuronpedia's graph viewer open. Node ids
follow its conventions: latent `"{layer}_{index}_{pos}"`, embedding `"E_{token}_{pos}"`, logit
`"{n_layers + 1}_{token}_{pos}"`, and error `"{layer}_-1_{pos}"` (jsNodeId `"{layer}_-1-{pos}"`): the form
circuit-tracer adopted after 0.5.0 (its issue #78), because 0.5.0's `"0_{layer}_{pos}"` collides with the
latent `index = layer` of layer 0 at the same position.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from token_journey.circuits.graph import Graph, Pruned
from token_journey.errors import TokenJourneyError
from token_journey.layout import atomic_write_text, fresh_temp_folder, replace_folder
from token_journey.sae.base import SAE

INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOK = "mlp.hook_out"


def transcoder_tensors(tc: SAE) -> dict[str, torch.Tensor]:
    """One transcoder's weights under circuit-tracer's names (float32, contiguous)."""
    if tc.cfg.architecture not in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        raise TokenJourneyError(
            f"circuit-tracer loads JumpReLU (or ReLU) transcoders only; {tc.cfg.architecture!r} cannot be exported: train sae=skip-transcoder"
        )
    if tc.apply_b_dec_to_input:
        raise TokenJourneyError("circuit-tracer's encoder reads x as it is; a transcoder that subtracts b_dec from its input cannot be exported")
    out = {
        "W_enc": tc.W_enc.detach().float().t().contiguous(),
        "W_dec": tc.W_dec.detach().float().contiguous(),
        "b_enc": tc.b_enc.detach().float().contiguous(),
        "b_dec": tc.b_dec.detach().float().contiguous(),
        "activation_function.threshold": tc.threshold.detach().float().contiguous(),
    }
    if getattr(tc, "skip", False):
        out["W_skip"] = tc.W_skip.detach().float().contiguous()
    return out


def export_transcoders(transcoders: Sequence[SAE], folder: Path, model_name: str, scan: str) -> dict[int, Path]:
    """Write the transcoder set to `folder` (replaced whole, atomically); returns {layer: file}."""
    folder = Path(folder)
    tmp = fresh_temp_folder(folder)
    names = []
    for layer, tc in enumerate(transcoders):
        name = f"layer_{layer}.safetensors"
        save_file(transcoder_tensors(tc), str(tmp / name))
        names.append(name)
    config = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "scan": scan,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "transcoders": names,
    }
    (tmp / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML: circuit-tracer's yaml.safe_load reads it
    replace_folder(tmp, folder)
    return {layer: folder / name for layer, name in enumerate(names)}


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's feature number of (layer, index): the Cantor pairing, unique per pair."""
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(
    graph: Graph,
    pruned: Pruned,
    tokens: Sequence[str],
    logit_tokens: Sequence[str],
    slug: str,
    scan: str,
    prompt: str,
    node_threshold: float,
    feature_links: dict[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The pruned graph in circuit-tracer's viewer schema.

    `tokens`: each prompt position as text; `logit_tokens`: each logit target as text.
    `feature_links`: optional page of each (layer, latent), kept on the node as `"url"` (the viewer
    ignores unknown keys; our page links it).
    """
    T, F, L = graph.n_pos, graph.n_features, graph.n_layers
    influence = pruned.cumulative.tolist()
    nodes: dict[int, dict[str, Any]] = {}
    for i in pruned.node_mask.nonzero(as_tuple=True)[0].tolist():
        base = {"influence": influence[i], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "activation": None}
        if i < F:
            layer, pos, index = graph.features[i].tolist()
            node = {
                "node_id": f"{layer}_{index}_{pos}",
                "feature": _cantor(layer, index),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{index}-0",
                "activation": float(graph.activations[i]),
            }
            if feature_links and (layer, index) in feature_links:
                node["url"] = feature_links[layer, index]
        elif i < graph.token_slice.start:
            layer, pos = divmod(i - F, T)
            node = {
                "node_id": f"{layer}_-1_{pos}",
                "feature": -1,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{layer}_-1-{pos}",
            }
        elif i < graph.logit_slice.start:
            pos = i - graph.token_slice.start
            token_id = graph.token_ids[pos]
            node = {
                "node_id": f"E_{token_id}_{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "jsNodeId": f"E_{token_id}-{pos}",
                "clerp": tokens[pos],
            }
        else:
            j = i - graph.logit_slice.start
            token_id, prob = graph.logit_ids[j], float(graph.logit_probs[j])
            node = {
                "node_id": f"{L + 1}_{token_id}_{T - 1}",
                "feature": token_id,
                "layer": str(L + 1),
                "ctx_idx": T - 1,
                "feature_type": "logit",
                "jsNodeId": f"L_{token_id}-{T - 1}",
                "token_prob": prob,
                "is_target_logit": j == 0,
                "clerp": f'Output "{logit_tokens[j]}" (p={prob:.3f})',
            }
        nodes[i] = {**base, **node}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
        if s in nodes and t in nodes
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    kept = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": list(tokens),
            "prompt": prompt,
            "node_threshold": node_threshold,
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": kept,
        "links": links,
    }


def write_graph_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the graph JSON atomically (strict JSON: a non-finite weight is an error, not NaN)."""
    atomic_write_text(path, json.dumps(payload, allow_nan=False) + "\n")
