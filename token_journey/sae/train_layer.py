"""Train one SAE on one harvested layer and write its folder: the body of the `train_sae` stage.

Reads one harvested (site, layer) through the shard API (manifest statistics for the
normalisation, a deterministic shuffled loader for resume, the held-out `eval/` split for the
final figures), trains, and writes the SAE folder (`token_journey.layout.sae_folder`). Checkpoints
live next to it in a hidden folder (`layout.checkpoint_folder`), so a killed run resumes, and are
removed once the SAE is saved. Two runs of the same SAE at once (two terminals, a parallel launcher)
take turns on its lock (`token_journey.locks`): the first trains it, the second then keeps it. Under
torchrun / `accelerate launch` each process takes a slice of every batch; process 0 evaluates, saves
and logs.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from token_journey import storage
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.distributed import current_processes, join_processes, select_device
from token_journey.errors import TokenJourneyError
from token_journey.eval.metrics import sae_reconstruction
from token_journey.layout import (
    Location,
    activations_folder,
    checkpoint_folder,
    dataclass_json,
    lock_file,
    sae_folder,
    sha256_file,
    short_hash,
    train_timing_file,
    write_json,
)
from token_journey.locks import exclusive
from token_journey.sae.io import save_sae
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, check_site, is_transcoder
from token_journey.sae.train import DataStats, new_sae, train
from token_journey.sites import SITES
from token_journey.tracking import start_run

log = logging.getLogger(__name__)


def data_stats(manifest: dict[str, Any], d_model: int) -> DataStats:
    """Normalisation statistics from a shard manifest, with a clear error when they are absent."""
    if "mean" not in manifest or "mean_sq_norm" not in manifest:
        raise TokenJourneyError("activation manifest lacks mean / mean_sq_norm; rerun harvest with the current code")
    mean = torch.tensor(manifest["mean"], dtype=torch.float32, device="cpu")
    if mean.numel() != d_model:
        raise TokenJourneyError(f"manifest mean has {mean.numel()} values but d_model is {d_model}; rerun harvest")
    return DataStats(mean, float(manifest["mean_sq_norm"]))


def activations_key(manifest: dict[str, Any]) -> str:
    """A short hash of a harvested split's shard list (names, rows, sha256): changes with any row."""
    return short_hash(manifest.get("shards", []))


def code_key() -> str:
    """A short hash of the code that decides an SAE folder's bytes: the `sae` package, the shard reader
    and loader, and the metrics written to train.json."""
    package = Path(__file__).resolve().parents[1]
    files = [*sorted((package / "sae").glob("*.py")), package / "data/shards.py", package / "data/loader.py", package / "eval/metrics.py"]
    return short_hash({str(f.relative_to(package)): sha256_file(f) for f in files})


def _already_trained(out_dir: Path, cfg: SAEConfig, key: str) -> bool:
    """True when `out_dir` holds an SAE trained with exactly `cfg`, on exactly these activations, by this code.

    The SAE layer folder persists across `dvc repro` (it also collects sweep members), so a rerun
    triggered by another member must not retrain the ones already there; new activations (a new
    corpus or harvest rule) or new training code retrain every SAE, so a folder is always what the
    current code makes of the current data.
    """
    info_path = out_dir / "train.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    return info.get("config") == dataclass_json(cfg) and info.get("activations_key") == key and info.get("code_key") == code_key()


def train_layer(
    cfg: SAEConfig,
    *,
    activations: Location,
    saes: Path,
    timings: Path,
    site: str,
    layer: int,
    model: str,
    seed: int,
    tracking: TrackingConfig,
    name: str,
    device: str,
    group: str = "",
    config: dict[str, Any] | None = None,
) -> Path:
    """Train `cfg` on (site, layer) on `device` (auto | cpu | cuda | cuda:N | mps) and write the SAE folder.

    Returns the folder's path. `activations` is the harvest root: a local folder or an object-store
    URI (`s3://bucket/prefix`). Under a launcher each process trains on its own GPU (LOCAL_RANK).
    The training speed goes to `layout.train_timing_file` under `timings`, not into the SAE folder,
    so an SAE trained twice from the same inputs is the same bytes. A transcoder (`site` must be
    mlp_out) trains on the layer's mlp_in rows paired token by token with its mlp_out rows.
    """
    from token_journey.data.loader import PairedLoader, ShuffledLoader, paired_tensors, prefetched
    from token_journey.data.shards import MANIFEST, open_activations

    if site not in SITES:
        raise TokenJourneyError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    check_site(cfg.architecture, site)
    paired = is_transcoder(cfg.architecture)
    if paired and not storage.is_file(activations_folder(activations, TRANSCODER_INPUT_SITE, layer) / MANIFEST):
        raise TokenJourneyError(
            f"{cfg.architecture} reads {TRANSCODER_INPUT_SITE} at layer {layer}, which was not "
            f"harvested; run harvest with 'harvest.sites=[{TRANSCODER_INPUT_SITE},{site}]'"
        )
    target = select_device(device)
    rank = join_processes(target).index
    acts = open_activations(activations, site, layer, "train")
    held_out = open_activations(activations, site, layer, "eval")
    if held_out.d_model != acts.d_model:
        raise TokenJourneyError(f"eval split d_model {held_out.d_model} != train {acts.d_model}; rerun harvest")
    stats = data_stats(acts.manifest, acts.d_model)
    in_stats = None
    if paired:  # a transcoder reads the MLP input of the same tokens and predicts `site`
        acts_in = open_activations(activations, TRANSCODER_INPUT_SITE, layer, "train")
        held_in = open_activations(activations, TRANSCODER_INPUT_SITE, layer, "eval")
        in_stats = data_stats(acts_in.manifest, acts_in.d_model)
        loader: ShuffledLoader = PairedLoader(acts_in, acts, cfg.batch_size, seed, cfg.buffer_rows)
    else:
        loader = ShuffledLoader(acts, cfg.batch_size, seed, cfg.buffer_rows)
    first = next(loader.batches()) if cfg.b_dec_init == "geometric_median" else None
    if first is not None and paired:
        first = first[:, acts.d_model :]  # b_dec lives in the target's space
    sae = new_sae(cfg, acts.d_model, stats, seed, first, device=target, name=name, model=model, site=site, layer=layer)
    out_dir = sae_folder(saes, site, layer, name)
    key = activations_key(acts.manifest) if not paired else short_hash([activations_key(acts_in.manifest), activations_key(acts.manifest)])
    # One writer per SAE folder: process 0 holds its lock (a second run of the same SAE waits for it, then
    # keeps what it trained); the other processes of this run wait at the barrier, then all decide alike.
    with exclusive(lock_file(out_dir), f"SAE {name} of {site} layer {layer}") if rank == 0 else nullcontext():
        current_processes().barrier()
        if _already_trained(out_dir, cfg, key):
            log.info("%s is already trained with this config on these activations; kept as is", out_dir)
            return out_dir
        ckpt = checkpoint_folder(out_dir)
        run = start_run(config or {"sae": asdict(cfg)}, tracking, "train_sae", group, name) if rank == 0 else None
        log.info("training %s on %s layer %d: %d rows, %d steps on %s", name, site, layer, acts.rows, cfg.steps, target)
        # Every process resumes from the checkpoint (process 0 alone writes it), so a killed
        # multi-process run restarts with all processes at the same step and weights.
        info = train(sae, lambda start: prefetched(loader.batches(start)), stats, cfg, in_stats=in_stats, checkpoint_dir=ckpt, tracker=run)
        if rank == 0:
            if paired:
                x_in, y = paired_tensors(held_in, held_out, cfg.eval_tokens)
                metrics = sae_reconstruction(sae, x_in, target=y)
            else:
                metrics = sae_reconstruction(sae, held_out.tensor(cfg.eval_tokens))
            speed = {"tokens_per_s": info.pop("tokens_per_s"), "processes": info["processes"]}
            write_json(train_timing_file(timings, site, layer, name), speed)
            train_info = {
                **metrics,
                **info,
                "architecture": cfg.architecture,
                "width": cfg.width,
                "site": site,
                "layer": layer,
                "model": model,
                "model_fingerprint": acts.manifest.get("model_fingerprint"),
                "activations_key": key,
                "code_key": code_key(),
                "config": asdict(cfg),
            }
            save_sae(sae, out_dir, train_info)
            shutil.rmtree(ckpt, ignore_errors=True)
            if run is not None:
                run.log({**{f"eval/{k}": v for k, v in metrics.items()}, **{f"speed/{k}": v for k, v in speed.items()}})
                run.finish()
            log.info("%s: FVU %.4f, L0 %.1f, dead %.3f", name, metrics["fvu"], metrics["l0"], metrics["dead_fraction"])
    return out_dir
