"""Benchmark SAE training: tokens/s per architecture at width 4608, quality on held-out tokens.

Usage:
  python benchmarks/train_sae.py [ACTS] [--eval EVAL] [--site resid_post --layer 15] [--tokens 1000000]
ACTS (default: the pipeline's data/activations/smollm2-135m) is a harvest root (uses
<site>/layer_<L>/ and its eval/ split),
a folder of `train-*.pt` / `eval-*.pt` tensors, or one .pt/.npy file of [rows, d_in] activations
(then the last 100k rows are held out). Harvested shards already went through the harvest's
outlier rules; loose tensors carry no sequences, so there rows above `--max-norm-ratio` x the
median norm of all rows are dropped (the harvest judges each sequence on its own). Per architecture it prints training tokens/s, the ratio
to the ceiling (measured fp32 matmul peak / (2 * d_in * d_sae) FLOPs per token) and the ratio
to a plain dense implementation of the same step timed in the same run, then FVU, L0 and dead
fraction on the held-out rows against the issue's quality bars (TopK: FVU <= 0.16, dead < 10%;
JumpReLU: 24 <= L0 <= 48, FVU <= 0.20), and the FVU of the first 1/16 of the latents alone (what
Matryoshka trains for: `--archs batchtopk,matryoshka` compares it with plain BatchTopK).
`--peers sparsify[,saelens]` also trains that library's TopK SAE with its own trainer on the same rows in the
same order (see benchmarks/peers.py; a peer that is not importable is skipped with one line), scores it
with our FVU on the same held-out rows, and prints our tokens/s and FVU as ratios to its (issue bar: TopK
tokens/s >= 1.5x, FVU <= 0.9x, dead < 5%). `--peer-batches 1024,4096` trains the peer at each of those batch
sizes and judges the bar against its best-FVU run. `--peer-set key=value` changes one of the peer's settings.
With `--archs topk,jumprelu-l0` it also judges the issue's bar for JumpReLU on request: FVU at
`sae.target_l0` no worse than TopK's at k = that target, each at its own preset. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from token_journey.config import build, compose
from token_journey.config.sae import SAEConfig
from token_journey.data.corpus import drop_norm_outliers
from token_journey.eval.metrics import sae_reconstruction
from token_journey.sae.jumprelu import heaviside, jumprelu
from token_journey.sae.schedules import lr_at, sparsity_at
from token_journey.sae.train import DataStats, new_sae, train

try:
    from peers import PEERS, importable, run_sparsify  # run as a script: benchmarks/ is on sys.path
except ImportError:
    from benchmarks.peers import PEERS, importable, run_sparsify

BARS = {"topk": 3.5, "jumprelu": 2.0, "batchtopk": 2.0, "matryoshka": 2.0, "relu": 0.0}
PEER_BAR = {"tokens_per_s_ratio_min": 1.5, "fvu_ratio_max": 0.9, "dead_max": 0.05}
NOT_K_KEYS = (
    "sae.sparsity_coefficient",
    "sae.target_l0",
    "sae.pre_act_coefficient",
    "sae.topk_warmup_fraction",
    "sae.warmup_architecture",
    "sae.center_encoder_input",
)
"""`--set` keys of the architectures whose L0 is not k (the JumpReLU's): left out of the TopK-like ones, which refuse them."""
QUALITY_BARS = {"topk": {"fvu_max": 0.16, "dead_max": 0.10}, "jumprelu": {"fvu_max": 0.20, "l0_min": 24, "l0_max": 48}}


def quality_met(arch: str, fvu: float, l0: float, dead: float) -> bool | None:
    """Whether held-out quality meets the architecture's bar (None where the issue sets none)."""
    bar = QUALITY_BARS.get(arch)
    if bar is None:
        return None
    return fvu <= bar["fvu_max"] and dead < bar.get("dead_max", 1.0) and bar.get("l0_min", 0) <= l0 <= bar.get("l0_max", float("inf"))


def jumprelu_against_topk(results: dict) -> dict | None:
    """The issue's bar for `sae=jumprelu-l0`: held-out FVU no worse than TopK's at k = its target L0.

    None unless both ran; `met` is None when the target and k differ (nothing to judge).
    """
    ours, topk = results.get("jumprelu-l0"), results.get("topk")
    if ours is None or topk is None:
        return None
    same_l0 = ours["target_l0"] == topk["k"]
    return {
        "target_l0": ours["target_l0"],
        "topk_k": topk["k"],
        "fvu": ours["fvu"],
        "topk_fvu": topk["fvu"],
        "fvu_ratio": round(ours["fvu"] / topk["fvu"], 4),
        "met": ours["fvu"] <= topk["fvu"] if same_l0 else None,
    }


def without_outliers(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows of x [N, d] whose norm is at most `ratio` x the median row norm (all rows when ratio is 0)."""
    if ratio <= 0:
        return x
    keep = drop_norm_outliers(x[None], torch.ones(1, x.shape[0], dtype=torch.bool), ratio)[0]  # one "sequence"
    print(f"dropped {int((~keep).sum())} of {x.shape[0]:,} rows above {ratio} x the median norm")
    return x[keep]


def load(path: Path, eval_path: Path | None, site: str, layer: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N, d], held-out [M, d]) float32 activations from any supported layout."""
    if (path / site / f"layer_{layer}" / "manifest.json").is_file():
        from token_journey.data.shards import open_activations

        return open_activations(path, site, layer).tensor(), open_activations(path, site, layer, "eval").tensor()
    train_rows, eval_rows = _load_loose(path, eval_path)
    return without_outliers(train_rows, ratio), without_outliers(eval_rows, ratio)


def _load_loose(path: Path, eval_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    if path.is_dir():

        def cat(prefix: str) -> torch.Tensor:
            return torch.cat([torch.load(p, weights_only=True) for p in sorted(path.glob(f"{prefix}-*.pt"))])

        return cat("train").float(), cat("eval").float()
    data = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
    data = data.float()
    if eval_path is not None:
        return data, torch.load(eval_path, weights_only=True).float()
    return data[:-100_000], data[-100_000:]


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that say which activations to read (shared by the training benchmarks)."""
    ap.add_argument("acts", type=Path, nargs="?", default=Path("data/activations/smollm2-135m"))
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--max-norm-ratio", type=float, default=10.0, help="loose tensors only: drop rows above this x the median norm (0 keeps all)")


def in_memory(x: torch.Tensor, batch: int, seed: int):
    """`batches(start)` over a tensor, reshuffled every epoch, deterministic in (seed, start).

    The permutation is drawn once per epoch: drawn per step, a randperm of 1M rows (~8 ms) was a tenth
    of a batch-1024 step and counted against our tokens/s alone (the peers replay a precomputed order).
    """
    per_epoch = x.shape[0] // batch

    def batches(start: int):
        step, drawn_for, perm = start, -1, torch.empty(0, dtype=torch.long)
        while True:
            epoch, i = divmod(step, per_epoch)
            if epoch != drawn_for:
                perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
                drawn_for = epoch
            yield x[perm[i * batch : (i + 1) * batch]]
            step += 1

    return batches


def matmul_peak(n: int, d_in: int, d_sae: int, reps: int = 5) -> float:
    """Measured fp32 FLOP/s of the encoder-shaped matmul [n, d_in] x [d_in, d_sae] (best of reps)."""
    a, b = torch.randn(n, d_in), torch.randn(d_in, d_sae)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n * d_in * d_sae / best


def dense_step_seconds(cfg: SAEConfig, sae, x: torch.Tensor, steps: int = 3) -> float:
    """Seconds per step of a plain dense implementation (autograd, Adam) of the same architecture."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in sae.parameters()]
    names = [n for n, _ in sae.named_parameters()]
    p = dict(zip(names, params))
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        x_in = x - p["b_dec"] if sae.apply_b_dec_to_input else x
        pre = x_in @ p["W_enc"] + p["b_enc"]
        if cfg.architecture == "jumprelu":
            f = jumprelu(pre, p["threshold"].expand_as(pre), cfg.bandwidth)
            sparsity = heaviside(pre, p["threshold"].expand_as(pre), cfg.bandwidth).sum(-1).mean()
        elif cfg.architecture == "relu":
            f = pre.relu()
            sparsity = (f * p["W_dec"].norm(dim=1)).sum(-1).mean()
        else:
            if cfg.architecture == "topk":
                keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(cfg.k, dim=1).indices, True)
            else:
                keep = pre >= pre.flatten().topk(cfg.k * x.shape[0]).values.min()
            f = (pre * keep).relu()
            sparsity = pre.new_zeros(())
        ends = sae.cfg.prefixes or (cfg.width,)  # Matryoshka: every prefix of the latents reconstructs
        mse = sum((f[:, :m] @ p["W_dec"][:m] + p["b_dec"] - x).pow(2).sum(-1).mean() for m in ends) / len(ends)
        loss = mse + sparsity_at(cfg, 10**9) * sparsity
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, 0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def applies(override: str, arch: str) -> bool:
    """Whether a `--set` override is meant for `arch`: sae.k only where k sets the L0, the coefficient elsewhere.

    SAEConfig refuses a sparsity key its architecture ignores; one `--set sae.k=64` still serves a mixed `--archs`.
    """
    from token_journey.sae.registry import USES_K

    key = override.split("=", 1)[0]
    if key == "sae.k":
        return arch in USES_K
    if key in NOT_K_KEYS:
        return arch not in USES_K
    return True


def compare(peer: str, ours: dict, cfg: SAEConfig, x_train: torch.Tensor, x_eval: torch.Tensor, overrides: list[str], batch_sizes: list[int]) -> dict:
    """Train `peer` on our rows, in our shuffler's order, at each batch size; ours as ratios to its best run.

    Each library gets the batch size that suits it: sparsify's signum optimiser loses fidelity at small
    batches (FVU 0.214 at 1024 against 0.173 at 4096 on SmolLM2 layer 15), so the bar is judged against the
    peer's run with the lowest FVU, at that run's tokens/s; every run is printed and kept in the JSON.
    """
    skipped = importable(peer)
    if skipped:
        print(skipped)
        return {"skipped": skipped}
    runs = {}
    for batch in batch_sizes:
        steps = ours["train_tokens"] // batch
        run = run_sparsify(
            x_train,
            x_eval,
            k=cfg.k,
            width=cfg.width,
            batch_tokens=batch,
            steps=steps,
            batches=lambda rows, b=batch: in_memory(rows, b, 0)(0),
            overrides=overrides,
        )
        run.update(tokens_per_s_ratio=round(ours["tokens_per_s"] / run["tokens_per_s"], 3), fvu_ratio=round(ours["fvu"] / run["fvu"], 3))
        c = run["config"]
        print(
            f"{peer:9s} batch {batch:5d} {run['tokens_per_s']:8.0f} tok/s  FVU {run['fvu']} (its own definition "
            f"{run['fvu_own_definition']})  L0 {run['l0']}  dead {run['dead_fraction']}  | ours/theirs: tokens/s "
            f"x{run['tokens_per_s_ratio']:.3f}  FVU x{run['fvu_ratio']:.3f}  | {peer}: optimizer {c['optimizer']} "
            f"lr {c['lr_used']:.2e} auxk_alpha {c['auxk_alpha']} k_decay_steps {c['k_decay_steps']}",
            flush=True,
        )
        runs[batch] = run
    best = min(runs, key=lambda b: runs[b]["fvu"])
    theirs = runs[best]
    met = (
        theirs["tokens_per_s_ratio"] >= PEER_BAR["tokens_per_s_ratio_min"]
        and theirs["fvu_ratio"] <= PEER_BAR["fvu_ratio_max"]
        and ours["dead_fraction"] < PEER_BAR["dead_max"]
    )
    print(
        f"{peer:9s} best fidelity at batch {best}: ours (batch {cfg.batch_size}, adam lr {cfg.lr}, auxk_alpha "
        f"{cfg.auxk_alpha}) tokens/s x{theirs['tokens_per_s_ratio']:.3f}  FVU x{theirs['fvu_ratio']:.3f}  "
        f"dead {ours['dead_fraction']}  bar {'met' if met else 'NOT met'}",
        flush=True,
    )
    return {**theirs, "batch_size": best, "bar": PEER_BAR, "bar_met": met, "runs": runs}


def family_pass(root: Path, site: str, layer: int, targets: list[str], tokens: int, overrides: list[str]) -> dict:
    """The JumpReLU family at `targets` trained by the train_sae stage's code from one pass over the layer's shards,
    then each member on its own: bytes read (`storage.BYTES_READ`, from the read timings) and wall time of each way."""
    import tempfile

    from token_journey.config.tracking import TrackingConfig
    from token_journey.layout import train_read_file
    from token_journey.sae.train_layer import train_family

    tracking = build(TrackingConfig, compose(["tracking=disabled"])["tracking"], "tracking")
    members = []
    for target in targets:
        section = compose(["sae=jumprelu-l0", f"sae.target_l0={target}", f"sae.train_tokens={tokens}", *overrides])["sae"]
        cfg = build(SAEConfig, section, "sae")
        members.append((cfg.name, cfg))
    where = dict(activations=root, site=site, layer=layer, model="bench", seed=0, tracking=tracking, device="cpu")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, group in [("family", members)] + [(name, [(name, cfg)]) for name, cfg in members]:
            out = Path(tmp) / label
            t0 = time.perf_counter()
            train_family(group, saes=out / "saes", timings=out / "timings", **where)
            reads = json.loads(train_read_file(out / "timings", site, layer).read_text())
            runs[label] = {"seconds": round(time.perf_counter() - t0, 1), "bytes_read": reads["bytes_read"], "passes": reads["passes"]}
    alone = [runs[name] for name, _ in members]
    result = {
        "members": [name for name, _ in members],
        "shard_bytes": reads["shard_bytes"],
        "family": runs["family"],
        "one_by_one": {"seconds": round(sum(r["seconds"] for r in alone), 1), "bytes_read": sum(r["bytes_read"] for r in alone)},
        "bytes_ratio_to_one_member": round(runs["family"]["bytes_read"] / max(r["bytes_read"] for r in alone), 3),
    }
    print(
        f"family of {len(members)} ({', '.join(result['members'])}), {tokens:,} tokens each: one pass {runs['family']['seconds']} s, "
        f"{runs['family']['bytes_read'] / 1e6:.1f} MB read (x{result['bytes_ratio_to_one_member']} one member's); one by one "
        f"{result['one_by_one']['seconds']} s, {result['one_by_one']['bytes_read'] / 1e6:.1f} MB",
        flush=True,
    )
    return result


def table(results: dict) -> str:
    """The side-by-side table (markdown) of every trainer run: ours by architecture, then each peer batch."""
    rows = ["| trainer | batch | tokens/s | FVU | L0 | dead |", "|---|---|---|---|---|---|"]
    for arch, r in results.items():
        for peer, p in r.get("peers", {}).items():
            for batch, run in p.get("runs", {}).items():
                rows.append(f"| {peer} TopK | {batch} | {run['tokens_per_s']:,.0f} | {run['fvu']:.4f} | {run['l0']:.1f} | {run['dead_fraction']:.1%} |")
        rows.append(f"| ours, {arch} | {r['batch_size']} | {r['tokens_per_s']:,} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.1%} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per architecture")
    ap.add_argument("--archs", default="topk,jumprelu,batchtopk")
    ap.add_argument("--set", action="append", default=[], help="extra sae overrides, e.g. --set sae.lr=0.003")
    ap.add_argument("--peers", default="", help="comma-separated: sparsify, saelens (TopK only, same rows)")
    ap.add_argument(
        "--peer-batches",
        default="",
        help="comma-separated batch sizes (tokens) to train each peer at, e.g. 1024,4096 (default: ours); "
        "the bar is judged against the peer's run with the lowest FVU",
    )
    ap.add_argument(
        "--peer-set", action="append", default=[], help="a sparsify TrainConfig setting (JSON value, else a string), e.g. --peer-set optimizer=adam"
    )
    ap.add_argument(
        "--family",
        default="",
        help="comma-separated target L0s, e.g. 16,40,120: also train that JumpReLU family from one pass over the harvested "
        "shards (ACTS must be a harvest root) and then member by member, and print bytes read and wall time of each way",
    )
    ap.add_argument("--family-tokens", type=int, default=250_000, help="training tokens per family member")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown --peers {unknown}; known: {', '.join(PEERS)}")
    x_train, x_eval = load(args.acts, args.eval, args.site, args.layer, args.max_norm_ratio)
    stats = DataStats.from_rows(x_train)  # statistics without the outlier rows, as the harvest's manifest has them
    print(f"data: {x_train.shape[0]:,} train rows, {x_eval.shape[0]:,} held-out rows, d_in {x_train.shape[1]}")
    results = {}
    for arch in args.archs.split(","):
        overrides = [f"sae={arch}"] + [s for s in args.set if not s.startswith("sae=") and applies(s, arch)]
        cfg = build(SAEConfig, compose(overrides)["sae"], "sae")
        cfg = dataclasses.replace(cfg, train_tokens=args.tokens, checkpoint_every=0)
        batches = in_memory(x_train, cfg.batch_size, 0)
        sae = new_sae(cfg, x_train.shape[1], stats, 0, next(batches(0)))
        peak = matmul_peak(cfg.batch_size, x_train.shape[1], cfg.width)
        dense_s = dense_step_seconds(cfg, sae, x_train[: cfg.batch_size] * stats.scale)
        info = train(sae, batches, stats, cfg)
        peak_after = matmul_peak(cfg.batch_size, x_train.shape[1], cfg.width)
        dense_after = dense_step_seconds(cfg, sae, x_train[: cfg.batch_size] * stats.scale)
        metrics = sae_reconstruction(sae, x_eval)
        first = sae_reconstruction(sae, x_eval, latents=max(1, cfg.width // 16))
        ceiling = max(peak, peak_after) / (2 * x_train.shape[1] * cfg.width)
        dense_tps = cfg.batch_size / min(dense_s, dense_after)
        tps = info["tokens_per_s"]
        results[arch] = {
            "tokens_per_s": round(tps),
            "ceiling_tokens_per_s": round(ceiling),
            "ratio_to_ceiling": round(tps / ceiling, 3),
            "dense_tokens_per_s": round(dense_tps),
            "ratio_to_dense": round(tps / dense_tps, 2),
            "bar_ratio_to_dense": BARS[cfg.architecture],
            "fvu": round(metrics["fvu"], 4),
            "l0": round(metrics["l0"], 2),
            "dead_fraction": round(metrics["dead_fraction"], 4),
            "fvu_first_16th": round(first["fvu"], 4),
            "l0_first_16th": round(first["l0"], 2),
            "quality_bar": QUALITY_BARS.get(arch),
            "quality_met": quality_met(arch, metrics["fvu"], metrics["l0"], metrics["dead_fraction"]),
            "train_tokens": info["train_tokens"],
            "lr": cfg.lr,
            "sparsity_coefficient": cfg.sparsity_coefficient,
            "k": cfg.k,
            "target_l0": cfg.target_l0,
            "batch_size": cfg.batch_size,
        }
        r = results[arch]
        print(
            f"{arch:9s} {tps:8.0f} tok/s  ceiling {ceiling:8.0f} (x{r['ratio_to_ceiling']})  dense {dense_tps:6.0f} "
            f"(x{r['ratio_to_dense']}, bar x{BARS[cfg.architecture]})  FVU {r['fvu']}  L0 {r['l0']}  dead {r['dead_fraction']}"
            f"  first 1/16: FVU {r['fvu_first_16th']} L0 {r['l0_first_16th']}"
            f"  quality bar {'met' if r['quality_met'] else 'none' if r['quality_met'] is None else 'NOT met'}",
            flush=True,
        )
        if arch == "topk":
            for peer in peers:
                sizes = [int(b) for b in args.peer_batches.split(",") if b] or [cfg.batch_size]
                r.setdefault("peers", {})[peer] = compare(peer, r, cfg, x_train, x_eval, args.peer_set, sizes)
    if peers and "topk" not in args.archs.split(","):
        print("--peers compares TopK only; add topk to --archs")
    versus = jumprelu_against_topk(results)
    if versus is not None:
        verdict = {True: "met", False: "NOT met", None: "not judged: target_l0 != k"}[versus["met"]]
        print(
            f"jumprelu-l0 (target {versus['target_l0']:g}) FVU {versus['fvu']} against topk (k {versus['topk_k']}) "
            f"{versus['topk_fvu']}: x{versus['fvu_ratio']} (bar <= x1: {verdict})"
        )
    print(table(results))
    family = None
    if args.family:
        family = family_pass(args.acts, args.site, args.layer, args.family.split(","), args.family_tokens, [s for s in args.set if applies(s, "jumprelu")])
    print(
        json.dumps(
            {
                "benchmark": "train_sae",
                "train_rows": x_train.shape[0],
                "eval_rows": x_eval.shape[0],
                "threads": torch.get_num_threads(),
                "results": results,
                "jumprelu_l0_vs_topk": versus,
                "family": family,
            }
        )
    )


if __name__ == "__main__":
    main()
