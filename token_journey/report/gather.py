"""Collect what the overview shows: every SAE folder, every metrics entry, model and corpus facts.

An SAE appears once per (site, layer, name), whether it has a folder under `<paths.saes>`, an
entry in `<paths.metrics>/<site>/layer_<L>.json`, or both; missing numbers show as blanks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from token_journey import storage
from token_journey.errors import TokenJourneyError
from token_journey.layout import Location, activations_folder, layers_under, report_page

log = logging.getLogger(__name__)

# (key, column title, format) of the headline table, shared by index.html and summary.md.
HEADLINE = (
    ("architecture", "arch", "{}"),
    ("width", "width", "{:,}"),
    ("l0", "L0", "{:.1f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("delta_loss", "delta LM loss", "{:.4f}"),
    ("loss_recovered", "loss recovered", "{:.1%}"),
    ("dead_fraction", "dead", "{:.1%}"),
    ("dense_fraction", "dense", "{:.1%}"),
    # SAEBench-style (token_journey.eval.saebench): first-letter absorption, split letters, k-sparse
    # probe accuracy (k = 1, 5), duplicated decoder rows, decoder rows aligned with a token's unembedding.
    ("absorption_rate", "absorption", "{:.1%}"),
    ("split_fraction", "split letters", "{:.0%}"),
    ("probe_sae_top_1", "probe k=1", "{:.1%}"),
    ("probe_sae_top_5", "probe k=5", "{:.1%}"),
    ("duplicate_fraction", "duplicates", "{:.1%}"),
    ("token_feature_fraction", "token features", "{:.1%}"),
)


@dataclass
class SaeEntry:
    """One SAE of one layer: its folder (if any), cfg.json, train.json and metrics entry."""

    site: str
    layer: int
    name: str
    folder: Path | None = None
    cfg: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def page(self) -> str:
        """Path of its page relative to the report root."""
        return report_page(self.site, self.layer, self.name)

    def value(self, key: str) -> Any:
        """A headline number: from the metrics, else from cfg.json (architecture, width)."""
        if self.metrics.get(key) is not None:
            return self.metrics[key]
        ours = self.cfg.get("token_journey", {})  # our cfg.json nests our own names beside SAELens'
        fallback = {"width": self.cfg.get("d_sae"), "architecture": ours.get("architecture", self.cfg.get("architecture"))}
        return fallback.get(key)

    def cells(self) -> list[str]:
        """The headline row as display strings ("" where a number is missing)."""
        out = []
        for key, _, fmt in HEADLINE:
            value = self.value(key)
            out.append("" if value is None else (fmt.format(value) if not isinstance(value, str) else value))
        return out


def read_json(path: Location) -> dict[str, Any]:
    """A JSON object from disk (or object storage), or a one-line error naming the broken file."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenJourneyError(f"cannot read {path}: {exc}; rerun the stage that writes it") from exc
    if not isinstance(data, dict):
        raise TokenJourneyError(f"{path} does not hold a JSON object; rerun the stage that writes it")
    return data


def gather_saes(saes_root: Path, metrics_root: Path) -> list[SaeEntry]:
    """Every SAE folder and metrics entry, merged and sorted by (site, layer, name)."""
    from token_journey.sae.io import find_saes

    entries: dict[tuple[str, int, str], SaeEntry] = {}
    for site, layer, _ in (found for found in layers_under(saes_root) if found[2].is_dir()):
        for folder in find_saes(Path(saes_root), site, layer):
            cfg = read_json(folder / "cfg.json") if (folder / "cfg.json").is_file() else {}
            train = read_json(folder / "train.json") if (folder / "train.json").is_file() else {}
            entries[(site, layer, folder.name)] = SaeEntry(site, layer, folder.name, folder, cfg, train)
    for site, layer, path in (found for found in layers_under(metrics_root) if found[2].is_file()):
        for name, metrics in read_json(path).get("saes", {}).items():
            entry = entries.setdefault((site, layer, name), SaeEntry(site, layer, name))
            entry.metrics = metrics
    log.info("found %d SAEs under %s and %s", len(entries), saes_root, metrics_root)
    return [entries[key] for key in sorted(entries)]


def facts(base_model: Path, corpus: Path, activations: Location, entries: list[SaeEntry]) -> list[tuple[str, str]]:
    """(label, value) lines about the model, the corpus and the token budgets, for the overview."""
    out: list[tuple[str, str]] = []
    manifest = Path(base_model) / "manifest.json"
    if manifest.is_file():
        model = read_json(manifest)
        out.append(
            (
                "model",
                f"{model.get('name', '?')} ({model.get('source', '?')}, {model.get('n_params', 0):,} "
                f"parameters, {model.get('dtype', '?')}, fingerprint {model.get('fingerprint', '?')})",
            )
        )
    stats = Path(corpus) / "stats.json"
    if stats.is_file():
        scalars = {k: v for k, v in read_json(stats).items() if isinstance(v, (int, float, str))}
        out.append(("corpus", f"{Path(corpus).name}: " + ", ".join(f"{k}={_num(v)}" for k, v in scalars.items())))
    for site, layer in sorted({(e.site, e.layer) for e in entries}):
        rows = []
        for split in ("train", "eval"):
            path = activations_folder(activations, site, layer, split) / "manifest.json"
            if storage.is_file(path):
                layer_manifest = read_json(path)
                dropped = layer_manifest.get("excluded_counts", {})
                rows.append(
                    f"{split} {layer_manifest.get('rows', 0):,} tokens"
                    + (
                        f" (not rows: {dropped.get('special', 0):,} special, {dropped.get('first_positions', 0):,} first "
                        f"positions, {dropped.get('max_norm', 0):,} norm outliers)"
                        if dropped
                        else ""
                    )
                )
        if rows:
            out.append((f"activations {site} layer {layer}", ", ".join(rows)))
    for e in entries:
        budget = {k: v for k, v in e.train.items() if "tokens" in k and isinstance(v, (int, float))}
        if "eval_tokens" in e.metrics:
            budget["eval_tokens"] = e.metrics["eval_tokens"]
        if budget:
            out.append((f"{e.site} layer {e.layer} {e.name}", ", ".join(f"{k}={_num(v)}" for k, v in budget.items())))
    return out


def _num(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"
