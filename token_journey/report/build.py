"""Build the whole report: gather SAEs and metrics, stream feature statistics, render, write.

`build_report` is what the `report` stage calls. For each SAE folder it streams at most
`report.max_tokens` eval-split activation rows through the SAE (two passes, see `feature_stats`;
the second also fills the page's token search, see `search`), builds dashboards, and writes
its page (`layout.report_page`); then the overview
`<html>/index.html` and the Markdown summary. Numbers on the overview come from the metrics
JSONs of the evaluate stage; firing densities come from the report's own stream.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from markupsafe import Markup
from tqdm import tqdm

from token_journey.config.report import ReportConfig
from token_journey.errors import TokenJourneyError
from token_journey.layout import Layout, atomic_write_text
from token_journey.preemption import SIGNALS
from token_journey.report import plots
from token_journey.report.dashboards import ContextBuilder, Dashboard, build_dashboards, feature_index, read_eval_tokens
from token_journey.report.explain import Explainer, sae_identity
from token_journey.report.feature_stats import FeatureStats, feature_stats, select_features, selected_activations
from token_journey.report.gather import SaeEntry, facts, gather_saes
from token_journey.report.render import environment, render_index, render_sae, render_summary
from token_journey.report.search import TokenFeatureIndex, search_json
from token_journey.report.tokens import TokenStrings

log = logging.getLogger(__name__)

KEEP_LATENT_BYTES = 1 << 26
"""A page's stream whose latents fit in 64 MiB is encoded once, not twice (`FeatureStats.latents`)."""


@dataclass
class ReportResult:
    """What was written: file paths, their total size in bytes, the wall time, and the charts."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    entries: list[SaeEntry] = field(default_factory=list)
    charts: dict[str, Markup] = field(default_factory=dict)

    def write(self, path: Path, text: str) -> None:
        self.bytes += atomic_write_text(path, text)
        self.files.append(path)


def build_report(cfg: ReportConfig, paths: Layout, seed: int = 0, device: str = "cpu") -> ReportResult:
    """Render every page of the report (see the module docstring) and return what was written.

    Reads everything from the roots of `paths`; writes under `paths.html` and to `paths.summary`.
    """
    from token_journey.lm import load_prepared

    start = time.perf_counter()
    result = ReportResult(entries=gather_saes(paths.saes, paths.metrics))
    env = environment()
    with_folder = [e for e in result.entries if e.folder is not None]
    loaded = load_prepared(paths.base_model, device="cpu") if with_folder else None
    explainer = Explainer(cfg.explainer, paths.base_model, device) if (cfg.explainer.model and with_folder) else None
    densities: dict[str, np.ndarray] = {}
    job = _PageJob(cfg, paths, loaded, env, seed, device, explainer)
    for entry, (path, size, density) in zip(with_folder, _pages(job, with_folder, page_workers(cfg.workers, device, explainer is not None))):
        result.files.append(path)
        result.bytes += size
        if density is not None:
            densities[f"L{entry.layer} {entry.name}"] = density
    result.charts = overview_charts(result.entries, densities, cfg.hist_bins)
    info = facts(paths.base_model, paths.corpus, paths.activations, result.entries)
    pages = {e.page for e in with_folder}
    result.write(Path(paths.html) / "index.html", render_index(env, result.entries, info, result.charts, pages))
    result.write(paths.summary, render_summary(result.entries, info))
    result.seconds = time.perf_counter() - start
    return result


def page_workers(workers: int, device: str, explainer: bool) -> int:
    """Processes for the pages: `report.workers` (0 = the CPU cores this process may use), 1 on a GPU or with the explainer."""
    if explainer or not str(device).startswith("cpu"):
        return 1
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _PageJob:
    """What every page reads; forked workers inherit it (the model's mapped weights stay shared)."""

    cfg: ReportConfig
    paths: Layout
    loaded: Any
    env: Any
    seed: int
    device: str
    explainer: Explainer | None

    def __call__(self, entry: SaeEntry) -> tuple[Path, int, np.ndarray | None]:
        """Render and write one page: (its path, its bytes, its features' firing densities)."""
        log.info("feature pages for %s layer %d %s", entry.site, entry.layer, entry.name)
        html, density = sae_page(entry, self.cfg, self.paths, self.loaded, self.env, self.seed, self.device, self.explainer)
        path = Path(self.paths.html) / entry.page
        return path, atomic_write_text(path, html), density


_JOB: _PageJob | None = None
"""The job a forked page worker runs (set before the fork, so nothing is pickled but the entries)."""


def _worker_start(threads: int) -> None:
    """A forked page worker: its share of the cores, and the default, C-level effect of SIGTERM and SIGUSR1.

    The fork copies the stage's Python handlers (`preemption`), which turn the SIGTERM of the pool's
    terminate into Python code that a worker blocked in a lock does not run: the report stage was seen
    hanging in the suite with a worker in a futex wait and the stage waiting for it in the terminate.
    The parent handles a stop request; the workers die of it, as `Pool.terminate` expects."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    torch.set_num_threads(threads)


def _run_page(entry: SaeEntry) -> tuple[Path, int, np.ndarray | None]:
    assert _JOB is not None
    return _JOB(entry)


def _pages(job: _PageJob, entries: list[SaeEntry], workers: int) -> Iterator[tuple[Path, int, np.ndarray | None]]:
    """Each entry's page, in order: here, or across `workers` forked processes when there are several pages.

    Pages are independent and mostly Python (contexts, HTML), which one process runs on one core; each
    worker gets an equal share of the cores for torch. Forking shares the loaded model's pages instead
    of loading it again.
    """
    global _JOB
    workers = min(workers, len(entries))
    if workers <= 1:
        yield from (job(entry) for entry in entries)
        return
    _JOB = job
    threads = max(1, torch.get_num_threads() // workers)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start, initargs=(threads,)) as pool:
            yield from tqdm(pool.imap(_run_page, entries), total=len(entries), desc=f"report pages ({workers} processes)", unit="page")
    finally:
        _JOB = None


def sae_page(
    entry: SaeEntry, cfg: ReportConfig, paths: Layout, loaded: Any, env: Any, seed: int, device: str, explainer: Explainer | None = None
) -> tuple[str, np.ndarray | None]:
    """The HTML of one SAE's page and its features' firing densities `[d_sae]` (None without eval data).

    With an `explainer`, the first `report.explainer.n_features` dashboards get an explanation.
    """
    from token_journey.data.shards import open_activations
    from token_journey.sae.io import LazySAE
    from token_journey.sae.registry import TRANSCODER_INPUT_SITE, is_transcoder

    # The page needs the encoder and the decoder rows of its dashboards' features, not the whole SAE.
    lazy = LazySAE.open(entry.folder)
    sae = lazy.encoder(device)
    # A transcoder's latents read the MLP's input: its features fire on those rows.
    reads = TRANSCODER_INPUT_SITE if is_transcoder(lazy.spec.architecture) else entry.site
    try:
        acts = open_activations(paths.activations, reads, entry.layer, split="eval")
    except TokenJourneyError as exc:
        log.warning("no feature browser for %s: %s", entry.page, exc)
        charts = {"error": position_chart([entry])} if entry.metrics.get("error_by_position") else {}
        return render_sae(env, entry, [], [], charts, 0, cfg.dense_threshold, note=f"No feature browser: {exc}"), None
    stats = feature_stats(sae, acts.iter_tables, acts.dtype, cfg.batch_size, cfg.max_tokens, cfg.top_k, device, keep_bytes=KEEP_LATENT_BYTES)
    features = select_features(stats, cfg.n_index, cfg.n_random, cfg.n_strongest, cfg.n_dense, cfg.dense_threshold, seed)
    dense = torch.nonzero(stats.density > cfg.dense_threshold).flatten().tolist()
    search = TokenFeatureIndex(int(stats.counts.shape[0]), cfg.search_features, excluded=dense)
    chosen = selected_activations(sae, acts.iter_tables, acts.dtype, [f for f, _ in features], cfg.batch_size, cfg.max_tokens, device, search, stats.latents)
    stats.latents = None
    strings = TokenStrings(loaded.tokenizer)
    contexts = ContextBuilder(stats.index, read_eval_tokens(paths.corpus, stats.index.sequence_id), strings, cfg.window)
    dashboards = build_dashboards(stats, features, chosen, contexts, loaded.model, lazy.decoder_rows([f for f, _ in features]), cfg, seed)
    if explainer is not None:
        explain_dashboards(explainer, dashboards, [f for f, _ in features], chosen, stats, contexts, entry, loaded, seed)
    index_rows = feature_index(stats, contexts, {f for f, _ in features}, cfg.dense_threshold, cfg.max_index_rows)
    n_alive = int((stats.counts > 0).sum())
    density = stats.density.numpy()
    charts = {"density": density_chart({entry.name: density}, cfg.hist_bins)}
    if entry.metrics.get("error_by_position"):
        charts["error"] = position_chart([entry])
    return render_sae(
        env, entry, dashboards, index_rows, charts, stats.rows, cfg.dense_threshold, Markup(search_json(search, strings)), len(dense), n_alive=n_alive
    ), density


def explain_dashboards(
    explainer: Explainer,
    dashboards: list[Dashboard],
    features: list[int],
    chosen: torch.Tensor,
    stats: FeatureStats,
    contexts: ContextBuilder,
    entry: SaeEntry,
    loaded: Any,
    seed: int,
) -> None:
    """Attach an explanation to the first dashboards; `chosen` `[rows, len(features)]` holds their activations."""
    sae = sae_identity(entry.folder)
    column_of = {f: j for j, f in enumerate(features)}

    def decode(ids: Any) -> str:
        return loaded.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    for d in dashboards[: explainer.cfg.n_features]:
        top = [int(r) for v, r in zip(stats.top_values[:, d.feature], stats.top_rows[:, d.feature]) if v > 0]
        d.explanation = explainer.explain(sae, d.feature, chosen[:, column_of[d.feature]].numpy(), top, stats.index, contexts.sequences, decode, seed)
        log.info("feature %d explained in %.1f s: %s", d.feature, d.explanation.seconds, d.explanation.text)
    explainer.cache.save()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def pareto_chart(entries: list[SaeEntry], y_key: str, y_label: str, frontier: bool = True) -> Markup:
    """One series per (site, layer): `y_key` against L0 for every SAE that has both numbers, with the
    front of lower-is-better points joined unless `frontier` is off (for higher-is-better figures)."""
    groups: dict[str, plots.Series] = {}
    for e in entries:
        l0, y = e.value("l0"), e.value(y_key)
        if _finite(l0) and _finite(y):
            s = groups.setdefault(f"{e.site} L{e.layer}", plots.Series(f"{e.site} L{e.layer}", [], [], []))
            s.xs.append(float(l0))
            s.ys.append(float(y))
            s.labels.append(e.name)
    return plots.scatter(list(groups.values()), "L0", y_label, f"{y_label} vs L0", frontier)


def position_values(value: Any) -> tuple[list[float], list[float]]:
    """(positions, errors) from a metrics entry's `error_by_position` list; None/NaN positions are skipped."""
    if not isinstance(value, list):
        return [], []
    pairs = [(float(p), float(v)) for p, v in enumerate(value) if _finite(v)]
    return [p for p, _ in pairs], [v for _, v in pairs]


def position_chart(entries: list[SaeEntry]) -> Markup:
    """Reconstruction error against token position, one line per SAE."""
    series = []
    for e in entries:
        xs, ys = position_values(e.metrics.get("error_by_position"))
        if ys:
            series.append(plots.Series(f"L{e.layer} {e.name}", xs, ys))
    return plots.lines(series, "position in sequence", "reconstruction error", "Reconstruction error by position")


def density_chart(densities: dict[str, np.ndarray], bins: int) -> Markup:
    """Histogram(s) of log10 firing density over alive features; dead features are counted in the title."""
    alive = {k: d[d > 0] for k, d in densities.items()}
    low = math.floor(min((np.log10(a).min() for a in alive.values() if len(a)), default=-6.0))
    edges = np.linspace(low, 0.0, bins + 1)
    dead = sum(int((d == 0).sum()) for d in densities.values())
    title = f"Feature firing density ({dead:,} dead)"
    if len(densities) == 1:
        counts, _ = np.histogram(np.log10(next(iter(alive.values()))), bins=edges)
        return plots.histogram(edges.tolist(), counts.tolist(), "log10 firing density", title, "features")
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    series = [plots.Series(k, centres, np.histogram(np.log10(a), bins=edges)[0].astype(float).tolist()) for k, a in alive.items()]
    return plots.lines(series, "log10 firing density", "features", title)


def overview_charts(entries: list[SaeEntry], densities: dict[str, np.ndarray], bins: int) -> dict[str, Markup]:
    """The overview's charts: two Pareto plots, absorption and 1-sparse probing against L0 (when the
    SAEBench metrics ran), error by position, firing densities."""
    charts = {
        "delta_loss_vs_l0": pareto_chart(entries, "delta_loss", "delta LM loss"),
        "fvu_vs_l0": pareto_chart(entries, "fvu", "FVU"),
    }
    for key, chart, label, lower_better in (
        ("absorption_rate", "absorption_vs_l0", "absorption rate", True),
        ("probe_sae_top_1", "probe_vs_l0", "1-sparse probe accuracy", False),
    ):
        if any(_finite(e.value(key)) for e in entries):
            charts[chart] = pareto_chart(entries, key, label, lower_better)
    if any(e.metrics.get("error_by_position") for e in entries):
        charts["error_by_position"] = position_chart(entries)
    if densities:
        charts["firing_density"] = density_chart(densities, bins)
    return charts


def log_to_run(run: Any, result: ReportResult) -> None:
    """Log the headline table and every overview chart to a wandb run."""
    import wandb

    from token_journey.report.render import headline_columns, headline_rows

    table = wandb.Table(columns=headline_columns(), data=headline_rows(result.entries))
    run.log({"report/headline": table, **{f"report/{k}": wandb.Html(str(v)) for k, v in result.charts.items()}})
