"""One attribution graph at full depth: time, memory and the checks, on the prepared model or a rehearsal shape.

Transcoders are random (no trained set is needed to time the graph) but sized and thresholded like
trained ones: width `--width`, decoder rows scaled to the MLP output's typical norm, and each latent's
JumpReLU threshold set so about `--l0` latents fire per token on the prompt itself. The cost of a graph
is driven by the number of active latents (tokens x layers x L0), which this fixes.

    python benchmarks/attribution.py [--model models/base/smollm2-135m] [--tokens 16] [--l0 32]
    python benchmarks/attribution.py --rehearsal llama-3.2-1b --width 8192     # Llama 3.2 1B shapes
    python benchmarks/attribution.py --circuit-tracer /path/to/venv/bin/python  # also circuit-tracer's graph
    python benchmarks/attribution.py --transcoders models/circuits/smollm2-135m   # the circuits branch's trained ones

Prints figures, then ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

from token_journey.circuits import replacement  # noqa: E402
from token_journey.circuits.graph import build_graph, prune, scores  # noqa: E402
from token_journey.circuits.interop import export_transcoders  # noqa: E402
from token_journey.circuits.verify import verify  # noqa: E402
from token_journey.sae.base import SAE, SAESpec  # noqa: E402
from token_journey.sae.registry import build_sae  # noqa: E402

TEXT = "The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def fitted_random_transcoders(model: Any, ids: list[int], width: int, l0: int, seed: int = 0) -> list[SAE]:
    """Random skip transcoders whose writes have the MLP output's scale and whose thresholds give ~l0 latents per token."""
    d = model.config.hidden_size
    identity = [build_sae(SAESpec("jumprelu_skip_transcoder", d, 1, site="mlp_out", layer=i)) for i in range(model.config.num_hidden_layers)]
    clean = replacement.clean_pass(model, ids, identity)  # zero transcoders: just the real mlp_in / mlp_out
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer, (x, y) in enumerate(zip(clean.mlp_in, clean.mlp_out, strict=True)):
        tc = build_sae(SAESpec("jumprelu_skip_transcoder", d, width, site="mlp_out", layer=layer))
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / x[1:].norm(dim=-1).mean())
            scale = y[1:].norm(dim=-1).mean() / max(l0, 1) ** 0.5
            tc.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=-1) * scale)
            tc.W_skip.copy_(torch.randn(d, d, generator=g) * 0.01 / d**0.5)
            pre = tc.pre_acts(x[1:])
            tc.threshold.copy_(torch.quantile(pre.flatten(), 1 - l0 / width).clamp(min=0).expand(width))
        out.append(tc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "models/base/smollm2-135m"), help="a prepared model folder")
    parser.add_argument("--rehearsal", default="", help="a rehearsal shape (token_journey.rehearsal.SHAPES) instead of --model")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length, BOS included")
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=8192, help="circuits.max_feature_nodes (0: every active latent)")
    parser.add_argument("--batch-size", type=int, default=256, help="targets per transpose pass (circuits.batch_size)")
    parser.add_argument("--transcoders", default="", help="the circuits branch's folder (paths.circuits): its trained transcoders instead of random ones")
    parser.add_argument("--name", default="", help="with --transcoders: their name (default: circuits.transcoder.name of the composed config)")
    parser.add_argument("--circuit-tracer", default="", help="python of a venv with circuit-tracer 0.5.0: also build its graph and compare")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.rehearsal:  # random weights in the exact architecture, on the prepared model's tokenizer
        from transformers import AutoTokenizer

        from token_journey.rehearsal import build_rehearsal, rehearsal_shape

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = build_rehearsal(rehearsal_shape(args.rehearsal), tokenizer, torch.float32)
        name = args.rehearsal
    else:
        from token_journey.lm import load_prepared

        loaded = load_prepared(args.model, dtype="float32", device="cpu")
        model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id, *ids][: args.tokens]
    if args.transcoders:
        from token_journey.circuits.trace import load_transcoders
        from token_journey.config import compose

        transcoder_name = args.name or compose()["circuits"]["transcoder"]["name"]
        transcoders = load_transcoders(Path(args.transcoders), transcoder_name, model.config.num_hidden_layers)
        args.width, args.l0 = transcoders[0].cfg.d_sae, 0
    else:
        transcoders = fitted_random_transcoders(model, ids, args.width, args.l0)
    rss_before = peak_rss_gb()
    start = time.perf_counter()
    graph = build_graph(model, ids, transcoders, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes or None)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    pruned = prune(graph)
    prune_seconds = time.perf_counter() - start
    check = verify(graph, model)
    result: dict[str, Any] = {
        "model": name,
        "layers": graph.n_layers,
        "tokens": graph.n_pos,
        "width": args.width,
        "transcoders": args.transcoders or "random",
        "active_latents": graph.n_features + graph.folded_latents,
        "latent_nodes": graph.n_features,
        "logit_targets": len(graph.logit_ids),
        "graph_seconds": round(seconds, 2),
        "prune_seconds": round(prune_seconds, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "peak_rss_before_graph_gb": round(rss_before, 2),
        "logits_max_abs_diff": check.logits_max_abs_diff,
        "completeness_error": check.completeness_error,
        "kept_nodes": int(pruned.node_mask.sum()),
        "kept_edges": int(pruned.edge_mask.sum()),
        **{f"{k}_score": v for k, v in scores(graph).items()},
        "torch_threads": torch.get_num_threads(),
    }
    kind = f"trained, {args.transcoders}" if args.transcoders else f"random, L0 ~{args.l0}"
    active = graph.n_features + graph.folded_latents
    print(f"{name}: {graph.n_layers} layers, {graph.n_pos} tokens, {active} active latents, {graph.n_features} as nodes (width {args.width}, {kind})")
    print(f"graph {seconds:.1f} s, pruning {prune_seconds:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    print(f"checks: logits {check.logits_max_abs_diff:.2e}, completeness {check.completeness_error:.2e}")
    if args.circuit_tracer and not args.rehearsal:
        result.update(compare_with_circuit_tracer(args.circuit_tracer, Path(args.model), transcoders, ids, graph))
        print(f"circuit-tracer: same latents {result['ct_same_features']}, max edge difference {result['ct_max_edge_diff_relative']:.2e} of the largest edge")
    print(json.dumps(result))


def compare_with_circuit_tracer(python: str, model_dir: Path, transcoders: list[SAE], ids: list[int], graph: Any) -> dict[str, Any]:
    """circuit-tracer's graph of the same prompt and transcoders (tests/support/ct_graph.py), compared with ours."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "tests"))
    from support.ct_graph import legacy_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_transcoders(transcoders, tmp / "tc", "model", "random")
        folder = legacy_model_folder(model_dir, tmp / "model")
        out = tmp / "ct.safetensors"
        start = time.perf_counter()
        script = str(REPO / "tests/support/ct_graph.py")
        run = subprocess.run([python, script, str(folder), str(tmp / "tc"), json.dumps(ids), str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        theirs = load_file(out)
        with safe_open(out, "pt") as f:
            meta = f.metadata()
    same = torch.equal(theirs["active_features"], graph.features) and theirs["logit_ids"].tolist() == graph.logit_ids
    largest = float(graph.adjacency.abs().max())
    diff = float((theirs["adjacency"] - graph.adjacency).abs().max()) if same else float("nan")
    return {
        "ct_same_features": same,
        "ct_max_edge_diff_relative": diff / largest,
        "ct_graph_seconds": float(meta["seconds"]),
        "ct_wall_seconds_with_load": round(wall, 1),
        "ct_replacement_score": float(meta["replacement"]),
        "ct_completeness_score": float(meta["completeness"]),
    }


if __name__ == "__main__":
    main()
