"""Jinja2 rendering of the overview, the per-SAE pages and the Markdown summary.

Autoescaping is on for every template, so corpus text and names can never become markup;
the only unescaped fragments are the SVG charts from `plots`, which escape their own labels,
and the token search's JSON, whose `<` are escaped by `search.search_json`.
Files are written to a temporary name and renamed, so a half-written page never appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from token_journey.report.gather import HEADLINE, SaeEntry


def environment() -> Environment:
    """The template environment: autoescape always on, undefined names are errors."""
    env = Environment(
        loader=PackageLoader("token_journey.report", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["num"] = _num
    env.filters["pct"] = lambda v: f"{v:.3%}" if v is not None else ""
    return env


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def headline_columns() -> list[str]:
    return ["site", "layer", "SAE", *(title for _, title, _ in HEADLINE)]


def headline_rows(entries: Sequence[SaeEntry]) -> list[list[str]]:
    return [[e.site, str(e.layer), e.name, *e.cells()] for e in entries]


def render_index(env: Environment, entries: Sequence[SaeEntry], facts: list[tuple[str, str]], charts: dict[str, Any], pages: set[str]) -> str:
    """The overview page `index.html`."""
    rows = [(e, row, e.page in pages) for e, row in zip(entries, headline_rows(entries))]
    return env.get_template("index.html").render(title="token-journey report", root="", columns=headline_columns(), rows=rows, facts=facts, charts=charts)


def render_sae(
    env: Environment,
    entry: SaeEntry,
    dashboards: list[Any],
    index_rows: list[dict[str, Any]],
    charts: dict[str, Any],
    rows_streamed: int,
    dense_threshold: float,
    search: Markup = Markup("{}"),
    n_dense: int = 0,
    note: str = "",
    n_alive: int = 0,
) -> str:
    """One SAE's page with its feature browser; `root` is the relative way back to `index.html`.

    `search` is the token index as JSON (`search.search_json`, already safe inside a script
    element); `n_dense` counts the SAE's dense latents, `n_alive` its alive ones (the index table may
    list fewer).
    """
    return env.get_template("sae.html").render(
        title=f"{entry.site} layer {entry.layer} {entry.name}",
        root="../../",
        entry=entry,
        columns=headline_columns(),
        row=headline_rows([entry])[0],
        dashboards=dashboards,
        index_rows=index_rows,
        charts=charts,
        rows_streamed=rows_streamed,
        dense_threshold=dense_threshold,
        search=search,
        n_dense=n_dense,
        note=note,
        n_alive=n_alive,
    )


def _md_cell(text: str) -> str:
    """A Markdown table cell: pipes, angle brackets and newlines escaped so a name stays text."""
    for char in "\\|<>":
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def render_summary(entries: Sequence[SaeEntry], facts: list[tuple[str, str]]) -> str:
    """`summary.md`: the same headline table as the overview, for terminals and CI logs."""
    columns = headline_columns()
    lines = ["# token-journey summary", ""]
    lines += [f"- {_md_cell(label)}: {_md_cell(value)}" for label, value in facts]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in headline_rows(entries)]
    if not entries:
        lines.append("\n(no SAEs found: train one with the train_sae stage)")
    return "\n".join(lines) + "\n"
