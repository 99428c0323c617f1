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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
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
    train_read_file,
    train_timing_file,
    write_json,
)
from token_journey.locks import exclusive
from token_journey.preemption import stop_requests
from token_journey.sae.io import save_sae
from token_journey.sae.member import Member
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, check_site, is_transcoder
from token_journey.sae.train import DataStats, new_sae, train_members
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


def train_layer(cfg: SAEConfig, *, name: str, **where: Any) -> Path:
    """Train one SAE `cfg` as `name` on (site, layer) and write its folder (see `train_family`); returns the folder."""
    return train_family([(name, cfg)], **where)[0]


def train_family(
    members: list[tuple[str, SAEConfig]],
    *,
    activations: Location,
    saes: Path,
    timings: Path,
    site: str,
    layer: int,
    model: str,
    seed: int,
    tracking: TrackingConfig,
    device: str,
    group: str = "",
    config: dict[str, Any] | None = None,
) -> list[Path]:
    """Train every SAE of `members` ((folder name, config) pairs) on (site, layer) on `device` and write their folders.

    The layer's shards are opened and verified once, and the members that share a batch size and shuffle
    buffer (all, in the default family) train from one pass of one loader, each with its own optimiser,
    schedule, checkpoint and controller (`token_journey.sae.member`): each comes out the same bytes as when
    trained alone. Members already trained with their config on these activations by this code are kept.
    `activations` is the harvest root, local or an object-store URI. Under a launcher every process reads
    every batch and takes its slice (each process reads the shards once); process 0 evaluates, saves and
    logs. A transcoder (`site` mlp_out) trains on the layer's mlp_in rows paired token by token with its
    mlp_out rows. Speeds go to the timings (`layout.train_timing_file`; the layer's bytes read, passes and
    seconds to `layout.train_read_file`), not into the SAE folders. Returns the folders, in `members` order.
    """
    if site not in SITES:
        raise TokenJourneyError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    for _, cfg in members:
        check_site(cfg.architecture, site)
    started, read_before = time.perf_counter(), storage.BYTES_READ.total
    target = select_device(device)
    rank = join_processes(target).index
    data = LayerData(activations, site, layer, paired=any(is_transcoder(cfg.architecture) for _, cfg in members))
    place = Placement(saes, timings, site, layer, model)
    passes = _passes(members)
    trained: list[str] = []
    for group_members in passes:
        trained += _train_pass(group_members, data, place, target, rank, seed=seed, tracking=tracking, group=group, config=config)
    if rank == 0:
        reads = {
            "members": [name for name, _ in members],
            "trained": trained,
            "passes": len(passes),
            "bytes_read": storage.BYTES_READ.total - read_before,
            "shard_bytes": data.shard_bytes,
            "seconds": round(time.perf_counter() - started, 3),
            "processes": current_processes().count,
        }
        write_json(train_read_file(timings, site, layer), reads)
        log.info(
            "%s layer %d: %d SAE(s) trained in %d pass(es); %.1f MB read (the train shards: %.1f MB)",
            site,
            layer,
            len(trained),
            len(passes),
            reads["bytes_read"] / 1e6,
            data.shard_bytes / 1e6,
        )
    return [place.folder(name) for name, _ in members]


@dataclass(frozen=True)
class Placement:
    """Where one layer's SAEs and timings go, and what they record about it."""

    saes: Path
    timings: Path
    site: str
    layer: int
    model: str

    def folder(self, name: str) -> Path:
        return sae_folder(self.saes, self.site, self.layer, name)


class LayerData:
    """One (site, layer)'s harvested splits, opened and verified once for every SAE trained on it.

    With a transcoder among the SAEs, the layer's mlp_in splits too (its input; `site` is its target).
    The held-out rows are read once, as many as the most demanding SAE evaluates on.
    """

    def __init__(self, activations: Location, site: str, layer: int, paired: bool) -> None:
        from token_journey.data.shards import MANIFEST, open_activations

        if paired and not storage.is_file(activations_folder(activations, TRANSCODER_INPUT_SITE, layer) / MANIFEST):
            raise TokenJourneyError(
                f"a transcoder reads {TRANSCODER_INPUT_SITE} at layer {layer}, which was not "
                f"harvested; run harvest with 'harvest.sites=[{TRANSCODER_INPUT_SITE},{site}]'"
            )
        # Opened unverified: the sha256 of every shard is checked once, and only if some SAE is to be trained (`verify`).
        self.train = open_activations(activations, site, layer, "train", verify=False)
        self.held_out = open_activations(activations, site, layer, "eval", verify=False)
        if self.held_out.d_model != self.train.d_model:
            raise TokenJourneyError(f"eval split d_model {self.held_out.d_model} != train {self.train.d_model}; rerun harvest")
        self.stats = data_stats(self.train.manifest, self.train.d_model)
        self.train_in = self.held_in = self.in_stats = None
        if paired:
            self.train_in = open_activations(activations, TRANSCODER_INPUT_SITE, layer, "train", verify=False)
            self.held_in = open_activations(activations, TRANSCODER_INPUT_SITE, layer, "eval", verify=False)
            self.in_stats = data_stats(self.train_in.manifest, self.train_in.d_model)
        splits = [self.train] + ([self.train_in] if paired else [])
        self.shard_bytes = sum(storage.file_size(path) for split in splits for path in split.paths)
        self._held: dict[bool, tuple[int, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.verified = False

    def verify(self) -> None:
        """Check every shard's sha256 against its manifest, once, before the first SAE trains on them."""
        if not self.verified:
            for split in (self.train, self.held_out, self.train_in, self.held_in):
                if split is not None:
                    split.verify()
            self.verified = True

    def key(self, paired: bool) -> str:
        """What an SAE folder records about the rows it was trained on (changes with any row)."""
        if not paired:
            return activations_key(self.train.manifest)
        return short_hash([activations_key(self.train_in.manifest), activations_key(self.train.manifest)])

    def loader(self, cfg: SAEConfig, seed: int, paired: bool) -> Any:
        from token_journey.data.loader import PairedLoader, ShuffledLoader

        if paired:
            return PairedLoader(self.train_in, self.train, cfg.batch_size, seed, cfg.buffer_rows)
        return ShuffledLoader(self.train, cfg.batch_size, seed, cfg.buffer_rows)

    def held_out_rows(self, rows: int, paired: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input, target or None) of the first `rows` held-out tokens, read once for all SAEs asking for at most that many."""
        from token_journey.data.loader import paired_tensors

        asked, held = self._held.get(paired, (0, None))
        if held is None or asked < rows:
            held = paired_tensors(self.held_in, self.held_out, rows) if paired else (self.held_out.tensor(rows), None)
            self._held[paired] = (rows, held)
        x, y = held
        return x[:rows], None if y is None else y[:rows]


def _passes(saes: list[tuple[str, SAEConfig]]) -> list[list[tuple[str, SAEConfig]]]:
    """The SAEs grouped into passes over the shards: one per (batch size, shuffle buffer, transcoder or not),
    which decide the stream of batches; members keep their order."""
    groups: dict[tuple[int, int, bool], list[tuple[str, SAEConfig]]] = {}
    for name, cfg in saes:
        groups.setdefault((cfg.batch_size, cfg.buffer_rows, is_transcoder(cfg.architecture)), []).append((name, cfg))
    return list(groups.values())


def _train_pass(
    saes: list[tuple[str, SAEConfig]],
    data: LayerData,
    place: Placement,
    target: torch.device,
    rank: int,
    *,
    seed: int,
    tracking: TrackingConfig,
    group: str,
    config: dict[str, Any] | None,
) -> list[str]:
    """Train `saes` (one batch stream) from one pass of one loader and write their folders; the names trained."""
    from token_journey.data.loader import prefetched

    paired = is_transcoder(saes[0][1].architecture)
    key = data.key(paired)
    # One writer per SAE folder: process 0 holds the locks of all (sorted, so two runs cannot deadlock); a
    # second run of the same SAEs waits, then keeps what the first trained. The other processes wait at the
    # barrier, then all decide alike.
    with ExitStack() as locks:
        if rank == 0:
            for name, _ in sorted(saes):
                locks.enter_context(exclusive(lock_file(place.folder(name)), f"SAE {name} of {place.site} layer {place.layer}"))
        current_processes().barrier()
        todo = []
        for name, cfg in saes:
            if _already_trained(place.folder(name), cfg, key):
                log.info("%s is already trained with this config on these activations; kept as is", place.folder(name))
            else:
                todo.append((name, cfg))
        if not todo:
            return []
        data.verify()
        cfg0 = todo[0][1]
        loader = data.loader(cfg0, seed, paired)
        first = None
        if any(cfg.b_dec_init == "geometric_median" for _, cfg in todo):
            first = next(loader.batches())
            first = first[:, data.train.d_model :] if paired else first  # b_dec lives in the target's space
        members, runs = [], []
        processes = current_processes()
        for name, cfg in todo:
            sae = new_sae(cfg, data.train.d_model, data.stats, seed, first, device=target, name=name, model=place.model, site=place.site, layer=place.layer)
            run = start_run({**(config or {}), "sae": asdict(cfg)}, tracking, "train_sae", group, name) if rank == 0 else None
            member = Member(
                sae,
                data.stats,
                cfg,
                in_stats=data.in_stats,
                checkpoint_dir=checkpoint_folder(place.folder(name)),
                tracker=run,
                rank=processes.index,
                world=processes.count,
            )
            members.append(member)
            runs.append(run)
            log.info("training %s on %s layer %d: %d rows, %d steps on %s", name, place.site, place.layer, data.train.rows, cfg.steps, target)
        # Every process resumes from the checkpoints (process 0 alone writes them), so a killed multi-process
        # run restarts with all processes at the same step and weights.
        with stop_requests() as stop:
            infos = train_members(members, lambda start: prefetched(loader.batches(start)), stop)
        if rank == 0:
            for (name, cfg), member, info, run in zip(todo, members, infos, runs):
                _save(member.sae, cfg, name, info, run, data, place, key, paired)
    return [name for name, _ in todo]


def _save(sae: Any, cfg: SAEConfig, name: str, info: dict[str, Any], run: Any, data: LayerData, place: Placement, key: str, paired: bool) -> None:
    """Evaluate a trained SAE on the held-out rows, write its folder and timing, and end its wandb run."""
    x, y = data.held_out_rows(cfg.eval_tokens, paired)
    metrics = sae_reconstruction(sae, x, target=y)  # y is None but for a transcoder
    speed = {"tokens_per_s": info.pop("tokens_per_s"), "processes": info["processes"]}
    write_json(train_timing_file(place.timings, place.site, place.layer, name), speed)
    train_info = {
        **metrics,
        **info,
        "architecture": cfg.architecture,
        "width": cfg.width,
        "site": place.site,
        "layer": place.layer,
        "model": place.model,
        "model_fingerprint": data.train.manifest.get("model_fingerprint"),
        "activations_key": key,
        "code_key": code_key(),
        "config": asdict(cfg),
    }
    out_dir = place.folder(name)
    save_sae(sae, out_dir, train_info)
    shutil.rmtree(checkpoint_folder(out_dir), ignore_errors=True)
    if run is not None:
        run.log({**{f"eval/{k}": v for k, v in metrics.items()}, **{f"speed/{k}": v for k, v in speed.items()}})
        run.finish()
    log.info("%s: FVU %.4f, L0 %.1f, dead %.3f", name, metrics["fvu"], metrics["l0"], metrics["dead_fraction"])
