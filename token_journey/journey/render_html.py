"""The journey as one self-contained HTML page (no network assets): steps, heatmaps, lens, features.

Every token string reaches the page through jinja2 autoescaping (text and attributes), and the
attention heatmaps are inline SVG drawn from numbers by the template, so nothing from the text
is ever spliced in as markup. The page is written atomically (temp name, then rename); a full disk
stops with one line and leaves no partial page.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from token_journey.journey.flops import human
from token_journey.journey.follow import Journey, slug
from token_journey.layout import atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
MAX_HEATMAP_TOKENS = 96
"""Longer texts skip the heatmaps (a T×T grid per head would swamp the page)."""


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _layer_view(journey: Journey, layer: int) -> dict[str, Any]:
    run = journey.run
    T = len(run.tokens)
    cell = max(6, min(22, 360 // max(T, 1)))
    heads = []
    if T <= MAX_HEATMAP_TOKENS:
        for head, probs in enumerate(run.attention[layer]):
            heads.append({"head": head, "cells": [[round(float(p), 4) for p in row] for row in probs]})
    sums = journey.per_layer[layer]
    return {
        "layer": layer,
        "type": run.spec.layer_types[layer],
        "steps": [s for s in run.steps if s.layer == layer],
        "params": human(sums["params"]),
        "flops": human(sums["flops"]),
        "heads": heads,
        "cell": cell,
        "lens": [[(journey.vocab.get(i, str(i)), p) for i, p in top] for top in journey.lens[layer].top],
        "features": [h for h in journey.features if h.layer == layer],
    }


def _token(journey: Journey, i: int | None) -> str | None:
    return None if i is None else journey.vocab.get(i, str(i))


def _timelines(journey: Journey) -> list[dict[str, Any]]:
    """Per token: its path through the layers (SAE latents with links, logit-lens tokens)."""
    out = []
    for pos, token in enumerate(journey.run.tokens):
        rows = [{"layer": r.layer, "features": r.features, "lens": [(_token(journey, i), p) for i, p in r.lens]} for r in journey.timeline(pos)]
        out.append({"pos": pos, "token": token, "rows": rows})
    return out


def _steering(journey: Journey) -> dict[str, Any] | None:
    s = journey.steering
    if s is None:
        return None
    pairs = [((_token(journey, a), pa), (_token(journey, b), pb)) for (a, pa), (b, pb) in zip(s.before, s.after, strict=True)]
    after = [(_token(journey, i), p) for i, p in zip(s.generated.token_ids, s.generated.probs, strict=True)]
    return {"s": s, "pairs": pairs, "after": after}


def context(journey: Journey) -> dict[str, Any]:
    """Everything the template shows, as plain values."""
    run = journey.run
    head_refs = ("final_norm", "lm_head", "logits", "probs")
    return {
        "j": journey,
        "spec": run.spec,
        "tokens": list(zip(run.token_ids, run.tokens, strict=True)),
        "intro_steps": [s for s in run.steps if s.layer is None and s.reference not in head_refs],
        "head_steps": [s for s in run.steps if s.reference in head_refs],
        "layers": [_layer_view(journey, layer) for layer in range(run.spec.n_layers)],
        "next_tokens": [(journey.vocab[i], p) for i, p in journey.next_tokens],
        "generated": [(journey.vocab[i], p) for i, p in zip(journey.generated.token_ids, journey.generated.probs, strict=True)],
        "totals": {k: human(v) for k, v in journey.totals.items()},
        "model_params": human(journey.model_params),
        "max_diff": run.max_abs_diff,
        "max_drift": run.max_drift,
        "heatmap_limit": MAX_HEATMAP_TOKENS,
        "rope_types": run.rope_types,
        "attribution": journey.attribution,
        "target": _token(journey, journey.attribution.target) if journey.attribution else None,
        "versus": _token(journey, journey.attribution.versus) if journey.attribution else None,
        "steering": _steering(journey),
        "timelines": _timelines(journey),
    }


def render_page(journey: Journey) -> str:
    """The HTML text of the journey page."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    env.filters["human"] = human
    return env.get_template("journey.html.j2").render(**context(journey))


def summary(journey: Journey) -> dict[str, Any]:
    """A JSON-able record of the journey's steps and sums (for diffs between runs and for tests)."""
    return {
        "model": journey.model_name,
        "text": journey.text,
        "tokens": journey.run.tokens,
        "token_ids": journey.run.token_ids,
        "max_abs_diff": journey.run.max_abs_diff,
        "max_drift": journey.run.max_drift,
        "totals": journey.totals,
        "model_params": journey.model_params,
        "next_tokens": [[journey.vocab[i], p] for i, p in journey.next_tokens],
        "continuation": journey.continuation,
        "attribution": asdict(journey.attribution) if journey.attribution else None,
        "steering": {**asdict(journey.steering), "continuation": journey.steered_continuation} if journey.steering else None,
        "steps": [asdict(s) for s in journey.run.steps],
    }


def write_journey(journey: Journey, out_dir: Path) -> Path:
    """Write `<out_dir>/<slug>.html` and `<slug>.json`; returns the HTML path."""
    out_dir = Path(out_dir)  # atomic_write_text makes it (a full disk: one line, see token_journey.diskspace)
    stem = slug(journey.model_name, journey.text)
    html = out_dir / f"{stem}.html"
    atomic_write_text(html, render_page(journey))
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(summary(journey), indent=1) + "\n")
    return html
