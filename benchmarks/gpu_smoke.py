"""GPU smoke run: every pipeline stage on a tiny configuration on one device, then SAE step speeds.

    python benchmarks/gpu_smoke.py [--device cuda] [--model smollm2|tiny] [--small] [--keep DIR]

Part 1 runs prepare_model, collect_corpus (offline corpus, a small token budget), harvest (2 layers),
train_sae (a few dozen steps, JumpReLU and TopK per layer), evaluate, report and journey in this
process, through the same library calls as the stages, with configs composed from conf/ plus
overrides, in a scratch folder. Per stage it prints seconds, tokens/s and the peak memory: on CUDA the
peak allocated above what was allocated when the stage began (torch.cuda.reset_peak_memory_stats
between stages), elsewhere the process's peak RSS so far. It also records the device of every model
and SAE the stages load, and of each SAE's parameters when its training loop returns, and fails with a
non-zero exit when one of them is not on the requested device, when a device stage allocated no
CUDA memory, or when an output is missing. prepare_model and collect_corpus run on the CPU by design (no tensors on a device).

Part 2 times one training step of a 16k-wide SAE (width 16384, d_in 2048, batch 4096, random data on
the device; JumpReLU and TopK; warmup steps, then timed steps between torch.cuda.synchronize calls),
and the sparse and the dense path of token_journey.sae.sparse at a few active fractions (a JumpReLU
whose threshold is set to the quantile giving that fraction, lr 0 so it stays there; the path forced
by patching `Active.dense`), to measure where the dense path starts to win on this device.

`--device cuda` (the default) stops at once when CUDA is not available. `--device cpu --model tiny --small`
runs the same plumbing on a laptop-sized configuration (tiny random Llama, small SAEs) in about a minute.
Prints figures, then ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]

ARCHS = ("jumprelu", "topk")
FRACTIONS = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5)


# ---- measuring -------------------------------------------------------------------------------------


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


class Meter:
    """Seconds, tokens/s, peak memory and the devices seen, per stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stages: dict[str, dict[str, Any]] = {}
        self.current = ""
        self.seen: dict[str, set[str]] = {}

    def record(self, what: str, device: torch.device | str) -> None:
        """Note that `what` (model, sae, ...) of the current stage lived on `device`."""
        self.seen.setdefault(f"{self.current}|{what}", set()).add(str(device))

    @contextlib.contextmanager
    def stage(self, name: str, device_stage: bool = True) -> Iterator[dict[str, Any]]:
        self.current = name
        info: dict[str, Any] = {"tokens": None}
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield info
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        info["seconds"] = round(seconds, 2)
        if info["tokens"]:
            info["tokens_per_s"] = info.get("tokens_per_s") or round(info["tokens"] / seconds)
        if self.cuda:
            info["peak_gpu_mb"] = _mb(torch.cuda.max_memory_allocated(self.device) - base)
            info["device_stage"] = device_stage
        else:
            info["peak_rss_mb"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # process peak so far
        info["devices"] = {k.split("|", 1)[1]: sorted(v) for k, v in self.seen.items() if k.startswith(f"{name}|")}
        self.stages[name] = info
        tps = f"{info['tokens_per_s']:>10,} tokens/s" if info.get("tokens_per_s") else f"{'':>19}"
        mem = f"peak GPU {info['peak_gpu_mb']:8.1f} MB" if self.cuda else f"peak RSS {info['peak_rss_mb']:8.1f} MB"
        print(f"{name:22s} {seconds:7.1f} s {tps}  {mem}  {info['devices'] or ''}", flush=True)

    def problems(self) -> list[str]:
        """Every stage tensor found off the requested device, and device stages that used no CUDA memory."""
        out = []
        for key, devices in sorted(self.seen.items()):
            stage, what = key.split("|", 1)
            if what.startswith("saved"):
                continue
            wrong = [d for d in devices if torch.device(d).type != self.device.type]
            if wrong:
                out.append(f"{stage}: {what} on {', '.join(wrong)}, not {self.device}")
        if self.cuda:
            for name, info in self.stages.items():
                if info["device_stage"] and info["peak_gpu_mb"] <= 0:
                    out.append(f"{name}: allocated no CUDA memory")
        return out


@contextlib.contextmanager
def watching(meter: Meter) -> Iterator[None]:
    """Record the device of every LM loaded, SAE loaded, SAE trained and SAE saved while the stages run.

    build_report loads its LM on the CPU by design (token strings and unembedding rows only); its
    SAEs are loaded through `load_sae`, so they are recorded.
    """
    import token_journey.eval.evaluate as evaluate_mod
    import token_journey.sae.io as io_mod
    import token_journey.sae.train_layer as train_layer_mod

    load_prepared, load_sae = evaluate_mod.load_prepared, io_mod.load_sae
    train, save_sae = train_layer_mod.train, train_layer_mod.save_sae

    def loaded_model(*args: Any, **kwargs: Any) -> Any:
        lm = load_prepared(*args, **kwargs)
        meter.record("model", lm.device)
        return lm

    def loaded_sae(*args: Any, **kwargs: Any) -> Any:
        sae = load_sae(*args, **kwargs)
        for p in sae.parameters():
            meter.record("sae", p.device)
        return sae

    def trained(sae: Any, *args: Any, **kwargs: Any) -> Any:
        info = train(sae, *args, **kwargs)
        for p in sae.parameters():  # the trained SAE, before train_layer evaluates and saves it
            meter.record("sae", p.device)
        return info

    def saved_sae(sae: Any, *args: Any, **kwargs: Any) -> Any:
        for p in sae.parameters():
            meter.record("saved_sae", p.device)  # for information: saving may move it to the CPU first
        return save_sae(sae, *args, **kwargs)

    with (
        mock.patch.object(evaluate_mod, "load_prepared", loaded_model),
        mock.patch.object(io_mod, "load_sae", loaded_sae),
        mock.patch.object(train_layer_mod, "train", trained),
        mock.patch.object(train_layer_mod, "save_sae", saved_sae),
    ):
        yield


# ---- part 1: the pipeline ----------------------------------------------------------------------------


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama (tests/support/tiny.py, which the package does not ship)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny import save_tiny

    return save_tiny("llama", folder)


def pipeline_overrides(args: argparse.Namespace, scratch: Path) -> list[str]:
    if args.model == "tiny":
        model = ["model=local", "model.name=tiny", f"model.id={tiny_model_folder(scratch / 'tiny-source')}"]
        layers = "[0,2]"
    else:
        model, layers = [], "[5,15]"
    small = args.small
    batch = 256 if small else 1024
    steps = args.steps
    return [
        *model,
        "corpus=offline",
        "tracking=disabled",
        f"device={args.device}",
        f"harvest.layers={layers}",
        f"corpus.context_size={64 if small else 128}",
        f"corpus.max_tokens={8192 if small else 65536}",
        f"corpus.eval_tokens={2048 if small else 8192}",
        f"harvest.batch_size={8 if small else 32}",
        f"harvest.shard_rows={4096 if small else 16384}",
        f"harvest.row_group_rows={512 if small else 2048}",
        f"sae.width={128 if small else 4096}",
        f"sae.batch_size={batch}",
        f"sae.train_tokens={batch * steps}",
        f"sae.buffer_rows={batch * 8}",
        f"sae.eval_tokens={batch * 2}",
        f"sae.checkpoint_every={steps // 2}",
        "sae.lr_warmup_steps=2",
        "sae.sparsity_warmup_steps=4",
        "sae.log_every=4",
        f"eval.max_tokens={1024 if small else 4096}",
        "eval.batch_size=8",
        f"report.max_tokens={1024 if small else 4096}",
        "report.n_strongest=2",
        "report.n_random=2",
        "report.top_k=5",
        "journey.generation.max_new_tokens=4",
    ]


def run_pipeline(args: argparse.Namespace, device: torch.device, scratch: Path, meter: Meter) -> dict[str, Any]:
    from token_journey.config import build, compose
    from token_journey.config.corpus import CorpusConfig
    from token_journey.config.eval import EvalConfig
    from token_journey.config.harvest import HarvestConfig
    from token_journey.config.journey import journey_config
    from token_journey.config.model import ModelConfig
    from token_journey.config.report import ReportConfig
    from token_journey.config.sae import SAEConfig
    from token_journey.config.tracking import TrackingConfig
    from token_journey.layout import Layout, corpus_file, train_timing_file

    overrides = pipeline_overrides(args, scratch)
    cfg = compose(overrides)
    cfg["paths"] = {k: str(scratch / v) for k, v in cfg["paths"].items()}
    layout = Layout.from_config(cfg["paths"])
    saes = {arch: build(SAEConfig, compose([*overrides, f"sae={arch}"])["sae"], "sae") for arch in ARCHS}
    site, seed, layers = cfg["site"], int(cfg["seed"]), list(cfg["harvest"]["layers"])
    dev = str(device)

    with meter.stage("prepare_model", device_stage=False):
        from token_journey.lm import prepare_model

        manifest = prepare_model(build(ModelConfig, cfg["model"], "model"), layout.base_model)
    with meter.stage("collect_corpus", device_stage=False) as info:
        from transformers import AutoTokenizer

        from token_journey.data.corpus import collect_corpus

        tokenizer = AutoTokenizer.from_pretrained(layout.base_model)
        stats = collect_corpus(
            build(CorpusConfig, cfg["corpus"], "corpus"), tokenizer, manifest["architecture"].get("max_position_embeddings"), layout.corpus, seed
        )
        info["tokens"] = sum(stats["tokens"].values())
    with meter.stage("harvest") as info:
        from token_journey.data.harvest import harvest
        from token_journey.lm import load_prepared

        hcfg = build(HarvestConfig, cfg["harvest"], "harvest")
        lm = load_prepared(layout.base_model, dtype=hcfg.forward_dtype, device=dev)
        meter.record("model", lm.device)
        harvest(lm, hcfg, layout.corpus, layout.activations, device)
        info["tokens"] = info_tokens = sum(stats["tokens"].values())
        del lm
    for layer in layers:
        for arch, sae_cfg in saes.items():
            from token_journey.sae.train_layer import train_layer

            with meter.stage(f"train_sae@{layer}:{arch}") as info:
                train_layer(
                    sae_cfg,
                    activations=layout.activations,
                    saes=layout.saes,
                    timings=layout.timings,
                    site=site,
                    layer=layer,
                    model=manifest["name"],
                    seed=seed,
                    tracking=build(TrackingConfig, cfg["tracking"], "tracking"),
                    name=sae_cfg.name,
                    device=dev,
                )
                timing = json.loads(train_timing_file(layout.timings, site, layer, sae_cfg.name).read_text())
                info["tokens"] = sae_cfg.steps * sae_cfg.batch_size
                info["tokens_per_s"] = round(timing["tokens_per_s"])  # the loop's own figure, without loading
    for layer in layers:
        with meter.stage(f"evaluate@{layer}") as info:
            from token_journey.eval.evaluate import evaluate_layer

            document, speeds = evaluate_layer(build(EvalConfig, cfg["eval"], "eval"), layout, site, layer, device=dev)
            info["tokens"] = document["sweep"]["tokens"]
            info["tokens_per_s"] = round(speeds["sweep"]["tokens_per_s"])
    with meter.stage("report") as info:
        from token_journey.report.build import build_report

        rcfg = build(ReportConfig, cfg["report"], "report")
        result = build_report(rcfg, layout, seed=seed, device=dev)
        info["tokens"] = rcfg.max_tokens * len([e for e in result.entries if e.folder is not None])
    with meter.stage("journey") as info:
        from token_journey.journey import run_journey
        from token_journey.journey.render_html import write_journey
        from token_journey.lm import load_prepared

        loaded = load_prepared(layout.base_model, dtype="float32", device=dev)
        meter.record("model", loaded.device)
        journey = run_journey(
            loaded.model,
            loaded.tokenizer,
            journey_config(cfg["journey"]),
            seed,
            loaded.name,
            layout.saes,
            progress=False,
            report_root=layout.journey_to_report(),
        )
        page = write_journey(journey, layout.journey)
        info["tokens"] = len(journey.run.token_ids) + len(journey.generated.token_ids)
        del loaded
    outputs = {
        "corpus": corpus_file(layout.corpus, "train").is_file(),
        "html": (Path(layout.html) / "index.html").is_file(),
        "summary": Path(layout.summary).is_file(),
        "journey": Path(page).is_file(),
        "saes": len(list(Path(layout.saes).glob("*/layer_*/*/sae.safetensors"))) == len(layers) * len(ARCHS),
    }
    return {"model": manifest["name"], "layers": layers, "corpus_tokens": info_tokens, "outputs": outputs}


# ---- part 2: SAE step speed ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(sae: Any, cfg: Any, device: torch.device, lr: float) -> Callable[[torch.Tensor], Any]:
    """One training step exactly as token_journey.sae.train.train takes it (after warmups), on `x`."""
    from token_journey.sae.base import StepContext
    from token_journey.sae.member import _after_step, _constrain_grad, match_grad_layout

    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused, foreach=not fused)
    dead = torch.zeros(cfg.width, dtype=torch.bool, device=device)
    ctx = StepContext(cfg.sparsity_coefficient, dead, cfg.bandwidth, 0.01, {"auxk_alpha": cfg.auxk_alpha, "k_aux": float(cfg.k_aux)})

    def step(x: torch.Tensor) -> Any:
        out = sae.training_step(x, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _constrain_grad(sae)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip, foreach=True)
        match_grad_layout(sae)
        opt.step()
        _after_step(sae)
        return out

    return step


def time_steps(step: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device, warmup: int, timed: int) -> tuple[float, float]:
    """(median seconds per step over `timed` steps after `warmup`, each between synchronizations; mean L0)."""
    for _ in range(warmup):
        step(x)
    times, l0s = [], []
    for _ in range(timed):
        _sync(device)
        start = time.perf_counter()
        out = step(x)
        _sync(device)
        times.append(time.perf_counter() - start)
        l0s.append(float(out.l0))
    return statistics.median(times), sum(l0s) / timed


def new_device_sae(arch: str, width: int, d_in: int, batch: int, device: torch.device) -> tuple[Any, Any]:
    from token_journey.config import build, compose
    from token_journey.config.sae import SAEConfig
    from token_journey.sae.train import DataStats, new_sae

    cfg = build(SAEConfig, compose([f"sae={arch}", f"sae.width={width}", f"sae.batch_size={batch}", "sae.b_dec_init=zeros"])["sae"], "sae")
    sae = new_sae(cfg, d_in, DataStats(torch.zeros(d_in), 1.0), 0).to(device)
    return sae, cfg


def sae_step_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    width, d_in, batch = args.sae_width, args.sae_d_in, args.sae_batch
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d_in, device=device, generator=gen) / math.sqrt(d_in)  # E||x||^2 = 1, as train() feeds it
    results: dict[str, Any] = {"width": width, "d_in": d_in, "batch": batch, "timed_steps": args.timed_steps}
    for arch in ARCHS:
        sae, cfg = new_device_sae(arch, width, d_in, batch, device)
        seconds, l0 = time_steps(step_fn(sae, cfg, device, cfg.lr), x, device, args.warmup_steps, args.timed_steps)
        on = sorted({str(p.device) for p in sae.parameters()})
        results[arch] = {
            "step_ms": round(seconds * 1e3, 2),
            "tokens_per_s": round(batch / seconds),
            "active_fraction": round(l0 / width, 4),
            "parameters_on": on,
        }
        print(
            f"SAE step {arch:8s} width {width} d_in {d_in} batch {batch}: {seconds * 1e3:8.2f} ms = "
            f"{batch / seconds:12,.0f} tokens/s (active fraction {l0 / width:.3f}, parameters on {on})",
            flush=True,
        )
        del sae
    results["dense_vs_sparse"] = dense_vs_sparse(args, device, x)
    return results


def dense_vs_sparse(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> dict[str, Any]:
    """Step time of the forced sparse and forced dense path of a JumpReLU at several active fractions."""
    from token_journey.sae import sparse

    sae, cfg = new_device_sae("jumprelu", args.sae_width, args.sae_d_in, args.sae_batch, device)
    step = step_fn(sae, cfg, device, lr=0.0)  # lr 0: the threshold, hence the active fraction, stays put
    rows = []
    with torch.no_grad():
        sample = sae.pre_acts(x[: max(1, (1 << 23) // args.sae_width)]).flatten().float()
    for fraction in FRACTIONS:
        with torch.no_grad():
            sae.threshold.fill_(float(torch.quantile(sample, 1 - fraction)) + cfg.bandwidth / 2)
        row: dict[str, Any] = {"target_fraction": fraction}
        for path in ("sparse", "dense"):
            with mock.patch.object(sparse.Active, "dense", property(lambda self, p=path: p == "dense")):
                seconds, l0 = time_steps(step, x, device, 1, args.timed_steps)
            row[f"{path}_ms"] = round(seconds * 1e3, 2)
            row["active_fraction"] = round(l0 / args.sae_width, 4)
        row["faster"] = "dense" if row["dense_ms"] < row["sparse_ms"] else "sparse"
        rows.append(row)
        print(
            f"JumpReLU at {row['active_fraction']:.3f} active: sparse {row['sparse_ms']:8.2f} ms  dense {row['dense_ms']:8.2f} ms  -> {row['faster']}",
            flush=True,
        )
    # The dense path should win at every fraction above the crossover: it lies past the last sparse win.
    last_sparse = max((i for i, r in enumerate(rows) if r["faster"] == "sparse"), default=-1)
    crossover = [
        rows[last_sparse]["active_fraction"] if last_sparse >= 0 else 0.0,
        rows[last_sparse + 1]["active_fraction"] if last_sparse + 1 < len(rows) else 1.0,
    ]
    current = sparse.DENSE_ABOVE.get(device.type)
    print(f"dense path wins above an active fraction between {crossover[0]} and {crossover[1]} (sparse.DENSE_ABOVE[{device.type!r}] is {current})")
    return {"rows": rows, "crossover_between": crossover, "current_dense_above": current}


# ---- main --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument(
        "--model", choices=("smollm2", "tiny"), default="smollm2", help="the packaged SmolLM2-135M (default) or a tiny random Llama from tests/support/tiny.py"
    )
    ap.add_argument("--small", action="store_true", help="the smallest sizes (with --model tiny: a CPU check in ~1 min)")
    ap.add_argument("--steps", type=int, default=32, help="SAE training steps per architecture and layer")
    ap.add_argument("--sae-width", type=int, default=None, help="width of the timed SAE step (16384; --small: 1024)")
    ap.add_argument("--sae-d-in", type=int, default=None, help="d_in of the timed SAE step (2048; --small: 256)")
    ap.add_argument("--sae-batch", type=int, default=None, help="batch of the timed SAE step (4096; --small: 512)")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--timed-steps", type=int, default=None, help="timed steps per figure (10; --small: 3)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the SAE step timings")
    ap.add_argument("--keep", type=Path, default=None, help="scratch folder to keep (default: a temp folder, removed)")
    args = ap.parse_args()
    args.sae_width = args.sae_width or (1024 if args.small else 16384)
    args.sae_d_in = args.sae_d_in or (256 if args.small else 2048)
    args.sae_batch = args.sae_batch or (512 if args.small else 4096)
    args.timed_steps = args.timed_steps or (3 if args.small else 10)
    if args.small:
        args.warmup_steps = min(args.warmup_steps, 1)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use --device cpu for the plumbing check"
            )
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    start = time.perf_counter()
    meter = Meter(device)
    pipeline: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if not args.skip_pipeline:
            scratch = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-smoke-")))
            scratch.mkdir(parents=True, exist_ok=True)
            with watching(meter):
                pipeline = run_pipeline(args, device, scratch, meter)
    step = sae_step_speed(args, device)
    problems = meter.problems() + [f"output missing: {k}" for k, ok in pipeline.get("outputs", {}).items() if not ok]
    for arch in ARCHS:
        if any(torch.device(d).type != device.type for d in step[arch]["parameters_on"]):
            problems.append(f"SAE step {arch}: parameters on {step[arch]['parameters_on']}")
    result = {
        "benchmark": "gpu_smoke",
        "device": str(device),
        "ok": not problems,
        "problems": problems,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        **pipeline,
        "stages": meter.stages,
        "sae_step": step,
        "total_seconds": round(time.perf_counter() - start, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(json.dumps(result, default=str))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
