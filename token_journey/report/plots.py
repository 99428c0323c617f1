"""Small inline SVG charts drawn by hand: scatter (with Pareto frontier), lines and histograms.

No JavaScript library and no network: each chart is an `<svg>` string that the templates
embed as is. Every label passes through `markupsafe.escape`, and each mark carries a
`<title>` so hovering shows its exact value in any browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from token_journey.eval.metrics import pareto_front

WIDTH, HEIGHT = 560, 330
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 46
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


@dataclass
class Series:
    """One coloured group of points: a layer in a Pareto plot, an SAE in a line plot."""

    name: str
    xs: list[float]
    ys: list[float]
    labels: list[str] = field(default_factory=list)


def nice_ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    count = math.ceil((high - start) / step - 1e-9) + 1  # the last tick reaches `high`
    return [round(start + i * step, 12) for i in range(count)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


class _Frame:
    """Maps data coordinates to the SVG canvas and draws axes, grid and labels."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str, title: str) -> None:
        finite_x = [x for x in xs if math.isfinite(x)] or [0.0, 1.0]
        finite_y = [y for y in ys if math.isfinite(y)] or [0.0, 1.0]
        self.x_ticks = nice_ticks(min(finite_x), max(finite_x))
        self.y_ticks = nice_ticks(min(min(finite_y), 0.0) if min(finite_y) >= 0 else min(finite_y), max(finite_y))
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]
        self.labels = (x_label, y_label, title)

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (value - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return HEIGHT - BOTTOM - (value - self.y0) / span * (HEIGHT - TOP - BOTTOM)

    def axes(self) -> list[str]:
        x_label, y_label, title = (escape(s) for s in self.labels)
        parts = [f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle">{title}</text>']
        for tick in self.x_ticks:
            px = self.x(tick)
            parts.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>')
            parts.append(f'<text x="{px:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{_fmt(tick)}</text>')
        for tick in self.y_ticks:
            py = self.y(tick)
            parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>')
            parts.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
        parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">{x_label}</text>')
        parts.append(
            f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2})">{y_label}</text>'
        )
        return parts


def _svg(parts: list[str], legend: Sequence[str] = ()) -> Markup:
    items = []
    for i, name in enumerate(legend):
        y = TOP + 6 + 16 * i
        items.append(
            f'<rect x="{WIDTH - RIGHT - 130}" y="{y - 8}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{WIDTH - RIGHT - 115}" y="{y + 1}">{escape(name)}</text>'
        )
    body = "".join(parts + items)
    return Markup(f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img">{body}</svg>')


def front_path(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the Pareto-optimal points (`metrics.pareto_front`: lower is better), in drawing order (by x)."""
    on_front = pareto_front(list(xs), list(ys))
    return sorted((i for i, on in enumerate(on_front) if on), key=lambda i: (xs[i], ys[i]))


def scatter(series: Sequence[Series], x_label: str, y_label: str, title: str, frontier: bool = True) -> Markup:
    """Points per series (hover shows label and values), with each series' Pareto frontier as a line."""
    frame = _Frame([x for s in series for x in s.xs], [y for s in series for y in s.ys], x_label, y_label, title)
    parts = frame.axes()
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = [(x, y, lab) for x, y, lab in zip(s.xs, s.ys, s.labels or [""] * len(s.xs)) if math.isfinite(x) and math.isfinite(y)]
        if frontier and len(points) > 1:
            front = front_path([p[0] for p in points], [p[1] for p in points])
            path = " ".join(f"{frame.x(points[j][0]):.1f},{frame.y(points[j][1]):.1f}" for j in front)
            parts.append(f'<polyline class="front" points="{path}" stroke="{color}"/>')
        for x, y, label in points:
            tip = escape(f"{s.name} {label}: {x_label}={_fmt(x)}, {y_label}={_fmt(y)}")
            parts.append(f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="5" fill="{color}"><title>{tip}</title></circle>')
    return _svg(parts, [s.name for s in series])


def lines(series: Sequence[Series], x_label: str, y_label: str, title: str) -> Markup:
    """One polyline per series; each vertex has a hover title."""
    frame = _Frame([x for s in series for x in s.xs], [y for s in series for y in s.ys], x_label, y_label, title)
    parts = frame.axes()
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = [(x, y) for x, y in zip(s.xs, s.ys) if math.isfinite(x) and math.isfinite(y)]
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="line" points="{path}" stroke="{color}"/>')
        for x, y in pts:
            tip = escape(f"{s.name}: {x_label}={_fmt(x)}, {y_label}={_fmt(y)}")
            parts.append(f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.5" fill="{color}"><title>{tip}</title></circle>')
    return _svg(parts, [s.name for s in series] if len(series) > 1 else ())


def histogram(edges: Sequence[float], counts: Sequence[float], x_label: str, title: str, y_label: str = "count") -> Markup:
    """Bars for `len(edges) - 1` bins; hover shows the bin range and its count."""
    frame = _Frame(list(edges), [0.0, *counts], x_label, y_label, title)
    parts = frame.axes()
    base = frame.y(0.0)
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        left, right, top = frame.x(low), frame.x(high), frame.y(count)
        tip = escape(f"[{_fmt(low)}, {_fmt(high)}): {_fmt(count)}")
        parts.append(
            f'<rect class="bar" x="{left:.1f}" y="{top:.1f}" width="{max(right - left - 1, 1):.1f}" '
            f'height="{max(base - top, 0):.1f}"><title>{tip}</title></rect>'
        )
    return _svg(parts)
