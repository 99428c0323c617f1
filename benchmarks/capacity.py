"""Capacity at the true model shapes: what the GPU profile's run will cost in disk, time and memory.

Per rehearsal shape (random weights in the exact architecture, `token_journey.rehearsal`), on this
machine and measured:
- bytes per token per layer on disk, from a real small harvest of every layer in the GPU profile's
  storage dtype (a real text corpus, so Parquet compresses what it really would);
- harvest tokens/s (one forward pass recording every layer, shards written);
- SAE training step time at the GPU profile's width (16,384) and d_model, JumpReLU (its default);
- evaluate tokens/s (clean + zero-ablation + one spliced pass, chunked loss over the full vocab);
- peak RAM of this process.
Then the extrapolation to the GPU profile's budget (conf/profile/gpu.yaml: corpus tokens, layers,
SAE train tokens, eval tokens): disk per layer and in total, and hours on one GPU from an
ASSUMED FLOP rate (stated, not measured: no GPU was available), with the arithmetic printed.

    python benchmarks/capacity.py [--shapes llama-3.2-1b aitana-2b-s] [--tokens 1024] ...
Prints figures, then ONE JSON object on the last line. Default run: Llama 3.2 1B only, < 8 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_smoke import new_device_sae, step_fn, time_steps  # noqa: E402  (the exact training step, shared)

from token_journey.config import build, compose  # noqa: E402
from token_journey.config.corpus import CorpusConfig  # noqa: E402
from token_journey.config.harvest import HarvestConfig  # noqa: E402
from token_journey.data.corpus import collect_corpus, read_sequences, row_mask, special_ids  # noqa: E402
from token_journey.data.harvest import harvest_split  # noqa: E402
from token_journey.eval.evaluate import evaluate_saes  # noqa: E402
from token_journey.lm import LoadedModel, architecture_facts, locate_packaged_file  # noqa: E402
from token_journey.rehearsal import build_rehearsal, rehearsal_shape  # noqa: E402

CONFIGS = {"llama-3.2-1b": "llama-3.2-1b-rehearsal", "aitana-2b-s": "aitana-2b-s-rehearsal"}

# ASSUMED, not measured: an H100/H200 SXM's dense bf16 peak and a model FLOP utilisation typical of
# well-fed transformer inference/training kernels. Replace both with measured figures from a GPU.
GPU_PEAK_FLOPS = 989e12
GPU_MFU = 0.4


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def forward_flops_per_token(arch: dict[str, Any], context: int, with_head: bool) -> float:
    """2 x (matmul weights) + causal attention 2 x context x (heads x head_dim) per layer; the LM head optional.

    The embedding lookup is no matmul; a tied head still costs its matmul when logits are computed.
    """
    d, h, kv, hd, f, n = (arch[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "n_layers"))
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k, v, o, gate/up/down
    flops = 2 * n * per_layer + n * 2 * context * h * hd
    return flops + (2 * d * arch["vocab_size"] if with_head else 0)


def sae_train_flops_per_token(d_in: int, width: int) -> float:
    """Dense encoder + decoder, forward (2 x 2 x d_in x width) and backward (twice the forward)."""
    return 3 * 2 * 2 * d_in * width


def measure(shape_name: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Build the rehearsal model in float32 and measure harvest, SAE step and evaluate on it."""
    from transformers import AutoTokenizer

    shape = rehearsal_shape(shape_name)
    every_layer = ",".join(str(layer) for layer in range(shape.n_layers))
    overrides = [
        "profile=gpu",
        f"model={CONFIGS[shape_name]}",
        "corpus=offline",
        "device=cpu",
        f"corpus.context_size={args.context}",
        f"corpus.max_tokens={args.tokens}",
        f"corpus.eval_tokens={args.eval_tokens}",
        "harvest.forward_dtype=float32",
        f"harvest.batch_size={args.batch}",
        f"harvest.layers=[{every_layer}]",
    ]
    cfg = compose(overrides)
    gguf = locate_packaged_file(cfg["model"]["package"], cfg["model"]["gguf_file"])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    start = time.perf_counter()
    model = build_rehearsal(shape, tokenizer, torch.float32)
    build_s = time.perf_counter() - start
    arch = architecture_facts(model.config)
    lm = LoadedModel(model=model, tokenizer=tokenizer, manifest={"name": cfg["model"]["name"], "fingerprint": f"rehearsal-{shape_name}", "dtype": "float32"})
    print(f"\n== {cfg['model']['name']}: {sum(p.numel() for p in model.parameters()):,} parameters, built in {build_s:.0f} s (float32 on the CPU)", flush=True)

    corpus_dir = scratch / shape_name / "corpus"
    collect_corpus(build(CorpusConfig, cfg["corpus"], "corpus"), tokenizer, None, corpus_dir, seed=0)
    hcfg = build(HarvestConfig, cfg["harvest"], "harvest")
    out = scratch / shape_name / "activations"
    device = torch.device("cpu")
    start = time.perf_counter()
    manifests = harvest_split(lm, hcfg, corpus_dir / "train.parquet", out, "train", device)
    harvest_s = time.perf_counter() - start
    tokens = read_sequences(corpus_dir / "train.parquet").input_ids.numel()
    per_layer = []
    for (site, layer), m in manifests.items():
        folder = out / site / f"layer_{layer}"
        per_layer.append(sum((folder / s["file"]).stat().st_size for s in m["shards"]) / tokens)
    bytes_per_token_layer = sum(per_layer) / len(per_layer)
    harvest_tps = tokens / harvest_s
    print(
        f"harvest: {tokens} tokens x {len(hcfg.layers)} layers in {harvest_s:.1f} s = {harvest_tps:.1f} tokens/s; "
        f"{bytes_per_token_layer:.0f} bytes per token per layer on disk ({hcfg.dtype}; "
        f"raw values {arch['d_model'] * 2} bytes)",
        flush=True,
    )

    width = int(cfg["sae"]["width"])
    sae, sae_cfg = new_device_sae(cfg["sae"]["architecture"], width, arch["d_model"], args.sae_batch, device)
    x = torch.randn(args.sae_batch, arch["d_model"], generator=torch.Generator().manual_seed(0)) / arch["d_model"] ** 0.5
    step_s, _ = time_steps(step_fn(sae, sae_cfg, device, sae_cfg.lr), x, device, 1, args.sae_steps)
    sae_tps = args.sae_batch / step_s
    print(
        f"SAE step ({sae_cfg.architecture}, width {width}, d_in {arch['d_model']}, batch {args.sae_batch}): {step_s:.2f} s = {sae_tps:.0f} tokens/s", flush=True
    )

    eval_ids = read_sequences(corpus_dir / "eval.parquet").input_ids
    rows = row_mask(eval_ids, special_ids(tokenizer), 1)
    with torch.no_grad():
        sae.eval()
        sweep = evaluate_saes(model, eval_ids, rows, "resid_post", arch["n_layers"] // 2, {"sae": sae}, batch_size=args.batch)
    eval_tps = sweep.sweep["tokens_per_s"]
    print(
        f"evaluate (3 forward passes, vocab {arch['vocab_size']:,}): {eval_ids.numel()} tokens in {sweep.sweep['seconds']:.1f} s = {eval_tps:.1f} tokens/s",
        flush=True,
    )
    result = {
        "model": cfg["model"]["name"],
        "architecture": arch,
        "n_params": sum(p.numel() for p in model.parameters()),
        "build_s": round(build_s, 1),
        "context": args.context,
        "harvest_tokens": tokens,
        "harvest_layers": len(hcfg.layers),
        "storage_dtype": hcfg.dtype,
        "bytes_per_token_per_layer": round(bytes_per_token_layer, 1),
        "harvest_tokens_per_s": round(harvest_tps, 2),
        "sae_width": width,
        "sae_batch": args.sae_batch,
        "sae_step_s": round(step_s, 3),
        "sae_tokens_per_s": round(sae_tps, 1),
        "eval_tokens": eval_ids.numel(),
        "eval_tokens_per_s": round(eval_tps, 2),
        "peak_rss_gb_so_far": round(peak_rss_gb(), 2),
    }
    del model, lm, sae
    return result


def extrapolate(m: dict[str, Any], gpu: dict[str, Any]) -> dict[str, Any]:
    """Disk, FLOPs and hours for the GPU profile's budget from the measured figures; prints the arithmetic."""
    arch = m["architecture"]
    layers = arch["n_layers"]  # every layer, as the GPU profile harvests Llama 3.2 1B's 16
    train_tok, eval_tok = int(gpu["corpus"]["max_tokens"]), int(gpu["corpus"]["eval_tokens"])
    sae_tok, sae_eval_tok = int(gpu["sae"]["train_tokens"]), int(gpu["eval"]["max_tokens"])
    context, width = int(gpu["corpus"]["context_size"]), int(gpu["sae"]["width"])
    bpt = m["bytes_per_token_per_layer"]
    disk_layer = bpt * (train_tok + eval_tok)
    disk_total = disk_layer * layers
    rate = GPU_PEAK_FLOPS * GPU_MFU
    f_harvest = forward_flops_per_token(arch, context, with_head=False)
    f_eval = 3 * forward_flops_per_token(arch, context, with_head=True)  # clean + zero + one SAE
    f_sae = sae_train_flops_per_token(arch["d_model"], width)
    harvest_flops = f_harvest * (train_tok + eval_tok)
    sae_flops = f_sae * sae_tok * layers
    eval_flops = f_eval * sae_eval_tok * layers
    hours = {k: v / rate / 3600 for k, v in (("harvest", harvest_flops), ("train_sae", sae_flops), ("evaluate", eval_flops))}
    cpu_hours = {
        "harvest": (train_tok + eval_tok) / m["harvest_tokens_per_s"] / 3600,
        "train_sae": sae_tok * layers / m["sae_tokens_per_s"] / 3600,
        "evaluate": sae_eval_tok * layers / m["eval_tokens_per_s"] / 3600,
    }
    buffer_gib = int(gpu["sae"]["buffer_rows"]) * arch["d_model"] * 2 / 2**30
    name = m["model"]
    print(f"\n== extrapolation for {name} to the GPU profile: {train_tok:,} + {eval_tok:,} eval tokens x {layers} layers")
    print(f"disk per layer : {bpt:.0f} B/token x {train_tok + eval_tok:,} tokens = {disk_layer / 2**30:,.1f} GiB")
    print(
        f"disk in total  : {disk_layer / 2**30:,.1f} GiB x {layers} layers = {disk_total / 2**40:,.2f} TiB "
        "(DVC's cache links the shards, it does not copy them)"
    )
    print(f"GPU rate (ASSUMED, not measured): {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 dense peak x MFU {GPU_MFU} = {rate / 1e12:.0f} TFLOP/s")
    print(
        f"harvest  : {f_harvest / 1e9:.2f} GFLOP/token (forward to the last layer, context {context}) x "
        f"{train_tok + eval_tok:,} tokens = {harvest_flops:.2e} FLOP -> {hours['harvest']:.2f} h"
    )
    print(
        f"train_sae: {f_sae / 1e9:.3f} GFLOP/token (12 x {arch['d_model']} x {width}) x {sae_tok:,} tokens x "
        f"{layers} layers = {sae_flops:.2e} FLOP -> {hours['train_sae']:.2f} h"
    )
    print(
        f"evaluate : {f_eval / 1e9:.2f} GFLOP/token (3 full passes with the head) x {sae_eval_tok:,} tokens x "
        f"{layers} layers = {eval_flops:.2e} FLOP -> {hours['evaluate']:.2f} h"
    )
    total_h = sum(hours.values())
    print(
        f"total    : {total_h:.2f} h on one GPU at the assumed rate (compute only; SAE training also reads "
        f"{disk_total / 1e12:.1f} TB of shards: at an ASSUMED 2 GB/s that is {disk_total / 2e9 / 3600:.1f} h)"
    )
    measured_cpu_rate = f_harvest * m["harvest_tokens_per_s"]
    print(
        f"this CPU (measured throughputs): harvest {cpu_hours['harvest']:,.0f} h, train_sae {cpu_hours['train_sae']:,.0f} h, "
        f"evaluate {cpu_hours['evaluate']:,.0f} h; its harvest ran at {measured_cpu_rate / 1e9:.1f} GFLOP/s effective"
    )
    print(
        f"host RAM for the SAE shuffle buffer: {int(gpu['sae']['buffer_rows']):,} rows x {arch['d_model']} x 2 bytes = {buffer_gib:.1f} GiB (sae.buffer_rows)"
    )
    return {
        "layers": layers,
        "disk_per_layer_gib": round(disk_layer / 2**30, 1),
        "disk_total_tib": round(disk_total / 2**40, 2),
        "assumed_gpu_flops": rate,
        "gpu_hours_assumed": {k: round(v, 3) for k, v in hours.items()},
        "gpu_hours_total_assumed": round(total_h, 2),
        "cpu_hours_measured": {k: round(v) for k, v in cpu_hours.items()},
        "flops_per_token": {"harvest": f_harvest, "train_sae": f_sae, "evaluate": f_eval},
        "sae_buffer_gib": round(buffer_gib, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"], choices=sorted(CONFIGS))
    ap.add_argument("--tokens", type=int, default=1024, help="corpus tokens harvested (train split)")
    ap.add_argument("--eval-tokens", type=int, default=256, help="tokens evaluated")
    ap.add_argument("--context", type=int, default=256, help="sequence length of the measurement (GPU profile: 1024)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward pass")
    ap.add_argument("--sae-batch", type=int, default=512, help="rows per timed SAE step (GPU profile: 4096)")
    ap.add_argument("--sae-steps", type=int, default=2, help="timed SAE steps (after one warm-up)")
    args = ap.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; figures are measured here unless marked ASSUMED", flush=True)
    gpu = compose(["profile=gpu"])
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        for shape in args.shapes:
            measured = measure(shape, args, Path(tmp))
            results.append({**measured, "extrapolation": extrapolate(measured, gpu)})
    total_s = time.perf_counter() - start
    print(f"\npeak RAM of this run: {peak_rss_gb():.2f} GB; wall time {total_s:.0f} s")
    print(
        json.dumps(
            {
                "benchmark": "capacity",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "peak_rss_gb": round(peak_rss_gb(), 2),
                "seconds": round(total_s, 1),
                "gpu_rate_assumed": {"peak_flops": GPU_PEAK_FLOPS, "mfu": GPU_MFU},
                "shapes": results,
            }
        )
    )


if __name__ == "__main__":
    main()
