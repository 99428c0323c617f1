"""Build circuit-tracer's attribution graph of a prompt; run with the Python of a venv that has circuit-tracer 0.5.0.

    python ct_graph.py MODEL_FOLDER TRANSCODER_FOLDER TOKEN_IDS_JSON OUT.safetensors [OUR_GRAPH.json]

Loads the exported transcoders (`layer_{i}.safetensors`, hooked at mlp.hook_in / mlp.hook_out) into a
`TranscoderSet`, the model folder with the nnsight backend on the CPU in float32, and writes the
unpruned graph's tensors (adjacency, active features, activations, logit targets and their
probabilities) plus its scores, and its viewer JSON (`create_graph_files`, default thresholds) beside
OUT as `ct-graph.json`, for `tests/test_circuits_tracer.py` to compare with ours. Given OUR_GRAPH.json,
it also validates that file against circuit-tracer's pydantic model of the viewer schema.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def legacy_model_folder(source: Path, folder: Path) -> Path:
    """A copy of the model folder `source` (weights linked, not copied) that transformers 4.57 reads as 5.x wrote it.

    Transformers 5 names the RoPE settings `rope_parameters` and the tokenizer class `TokenizersBackend`;
    4.57 reads `rope_theta`/`rope_scaling` (without them it silently runs RoPE with base 10,000, and
    every attention pattern differs) and `PreTrainedTokenizerFast`.
    """
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path.resolve()) if path.suffix == ".safetensors" else (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = dict(rope)
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def main() -> None:
    model_dir, tc_dir, ids_json, out = sys.argv[1:5]
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.frontend.graph_models import Model
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from circuit_tracer.utils.create_graph_files import create_graph_files

    config = json.loads((Path(tc_dir) / "config.yaml").read_text())
    paths = {i: str(Path(tc_dir) / name) for i, name in enumerate(config["transcoders"])}
    transcoders = load_transcoder_set(
        paths,
        scan=config["scan"],
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    model = ReplacementModel.from_pretrained_and_transcoders(model_dir, transcoders, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)
    start = time.perf_counter()
    graph = attribute(torch.tensor(json.loads(ids_json)), model, batch_size=256)
    seconds = time.perf_counter() - start
    replacement, completeness = compute_graph_scores(graph)
    save_file(
        {
            "adjacency": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.long().contiguous(),
            "selected_features": graph.selected_features.long().contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "logit_ids": graph.logit_token_ids.long().contiguous(),
            "logit_probabilities": graph.logit_probabilities.float().contiguous(),
        },
        out,
        metadata={"seconds": f"{seconds:.4f}", "replacement": f"{float(replacement):.6f}", "completeness": f"{float(completeness):.6f}"},
    )
    create_graph_files(graph, slug="ct-graph", output_path=str(Path(out).parent), scan=config["scan"])
    if len(sys.argv) > 5:
        Model.model_validate_json(Path(sys.argv[5]).read_text())


if __name__ == "__main__":
    main()
