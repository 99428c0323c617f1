"""The pruned attribution graph as one self-contained HTML page: inline SVG, no script, no network.

Nodes sit on a grid: one column per prompt position, one row per layer, the token embeddings at the
bottom and the logits on top; the latents of one (layer, position) share their cell. Edges are lines
whose width follows |weight| (blue positive, red negative); hovering a node or an edge shows its values
(SVG `<title>`, so no script is needed). Every string from the prompt, the tokenizer or the config
goes through `html.escape` (text and attributes alike), so hostile text stays text. The SVG scales to
the window through its viewBox, and each token label is clipped to its column, so labels never overlap.
"""

from __future__ import annotations

import html
from typing import Any

COLUMN = 132
"""Width of one position's column in SVG units."""
ROW = 64
"""Height of one layer's row."""
LABEL_CHARS = 14
"""Token labels longer than this are shortened (the full text is in the hover)."""
MAX_DRAWN_EDGES = 4000
"""The page draws at most this many edges, the strongest: circuit-tracer's default edge threshold keeps
190k edges for SmolLM2's 6-token default sentence (a 26 MB page); the JSON keeps them all."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _linked(text: Any, url: str | None) -> str:
    """`text` escaped, inside a link to `url` when there is one."""
    return f'<a href="{_e(url)}">{_e(text)}</a>' if url else _e(text)


def _num(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or a dash where it was not measured."""
    return "-" if value is None else format(value, spec)


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _layout(nodes: list[dict[str, Any]], n_pos: int, n_layers: int) -> dict[str, tuple[float, float]]:
    """SVG centre of each node: (column of its position, row of its layer), latents of a cell side by side."""
    rows = n_layers + 2  # embeddings, layers, logits
    height = rows * ROW
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for node in nodes:
        cells.setdefault((node["layer"], node["ctx_idx"]), []).append(node)
    where = {}
    for (layer, pos), members in cells.items():
        row = 0 if layer == "E" else int(layer) + 1  # the logit layer is n_layers + 1: the top row
        members.sort(key=lambda n: (n["feature_type"] != "mlp reconstruction error", n.get("influence") or 0.0))
        per_line = max(1, (COLUMN - 16) // 12)
        for i, node in enumerate(members):
            line, slot = divmod(i, per_line)
            count = min(per_line, len(members) - line * per_line)
            x = pos * COLUMN + COLUMN / 2 + (slot - (count - 1) / 2) * 12
            y = height - row * ROW - ROW / 2 - line * 12 + 6 * ((len(members) - 1) // per_line)
            where[node["node_id"]] = (x, y)
    return where


def _node_title(node: dict[str, Any], tokens: list[str]) -> str:
    kind, pos = node["feature_type"], node["ctx_idx"]
    where = f"position {pos} ({tokens[pos]!r})"
    influence = f"cumulative influence {node['influence']:.3f}" if node.get("influence") is not None else ""
    if kind == "embedding":
        return f"embedding of {tokens[pos]!r} at position {pos}; {influence}"
    if kind == "logit":
        return node["clerp"]
    if kind == "mlp reconstruction error":
        return f"error node, layer {node['layer']}, {where}; {influence}"
    index = node["node_id"].split("_")[1]
    return f"latent {index} of layer {node['layer']}'s transcoder, {where}; activation {node['activation']:.4g}; {influence}"


def _step(journey_href: str | None, layer: Any) -> str | None:
    """The link to `layer`'s step (its section) in the journey page of the same prompt, if there is one."""
    return f"{journey_href}#layer-{layer}" if journey_href else None


def _svg(payload: dict[str, Any], n_layers: int, logit_text: dict[int, str], journey_href: str | None = None) -> str:
    tokens = payload["metadata"]["prompt_tokens"]
    nodes, links = payload["nodes"], payload["links"]
    n_pos = len(tokens)
    width, height = n_pos * COLUMN, (n_layers + 2) * ROW + 28
    where = _layout(nodes, n_pos, n_layers)
    biggest = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    parts = [f'<svg class="graph" viewBox="0 0 {width} {height}" role="img" aria-label="attribution graph">']
    for r in range(n_layers + 2):
        y = (n_layers + 1 - r) * ROW
        label = "emb" if r == 0 else ("logits" if r == n_layers + 1 else f"L{r - 1}")
        parts.append(f'<rect class="band{r % 2}" x="0" y="{y}" width="{width}" height="{ROW}"/><text class="row" x="3" y="{y + 12}">{label}</text>')
    drawn = sorted(links, key=lambda link: abs(link["weight"]))[-MAX_DRAWN_EDGES:]
    for link in drawn:
        (x1, y1), (x2, y2) = where[link["source"]], where[link["target"]]
        w = link["weight"]
        stroke = 0.4 + 3.6 * abs(w) / biggest
        title = f"{link['source']} → {link['target']}: {w:+.4g}"
        parts.append(
            f'<line class="{"pos" if w >= 0 else "neg"}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke-width="{stroke:.2f}"><title>{_e(title)}</title></line>'
        )
    for node in nodes:
        x, y = where[node["node_id"]]
        title = f"<title>{_e(_node_title(node, tokens))}</title>"
        kind = node["feature_type"]
        if kind == "mlp reconstruction error":
            shape = f'<rect class="error" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8">{title}</rect>'
        elif kind in ("embedding", "logit"):
            text = _short(tokens[node["ctx_idx"]] if kind == "embedding" else logit_text[node["feature"]])
            shape = f'<circle class="{kind}" cx="{x:.1f}" cy="{y:.1f}" r="5">{title}</circle>'
            if kind == "logit":
                shape += f'<text class="tok" x="{x:.1f}" y="{y - 8:.1f}">{_e(text)}<title>{_e(node["clerp"])}</title></text>'
        else:
            shape = f'<circle class="feature" cx="{x:.1f}" cy="{y:.1f}" r="4.5">{title}</circle>'
            url = node.get("url") or _step(journey_href, node["layer"])  # its feature page, else its layer's step in the journey
            if url:
                shape = f'<a href="{_e(url)}">{shape}</a>'
        parts.append(shape)
    for pos, token in enumerate(tokens):
        x = pos * COLUMN + COLUMN / 2
        parts.append(f'<text class="tok" x="{x:.1f}" y="{height - 8}">{_e(_short(token))}<title>{_e(f"position {pos}: {token!r}")}</title></text>')
    parts.append("</svg>")
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:12px 16px;max-width:1800px;color:#222}
h1{font-size:1.3em;overflow-wrap:anywhere}
.graph{width:100%;height:auto;display:block;border:1px solid #ddd}
.band0{fill:#fafafa}.band1{fill:#f1f1f1}
text.row{font-size:10px;fill:#888}
text.tok{font-size:11px;text-anchor:middle;fill:#222}
line{stroke-linecap:round;opacity:.55}line.pos{stroke:#2166ac}line.neg{stroke:#b2182b}
line:hover{opacity:1}
circle.feature{fill:#f4a300;stroke:#7a5200}circle.embedding{fill:#6a6a6a}circle.logit{fill:#1b7837}
rect.error{fill:#9e9e9e;stroke:#444}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;overflow-wrap:anywhere}
.figures{display:flex;flex-wrap:wrap;gap:16px}
"""


def render_page(traced: Any, payload: dict[str, Any], journey_href: str | None = None) -> str:
    """The page of one traced prompt (`trace.Traced`; typed loosely, as trace imports this module) from its viewer JSON `payload`.

    `journey_href`: the journey page of the same prompt, relative to this page; each latent then links to
    its layer's step there (a node with its own feature page, `"url"`, links to that instead)."""
    s = traced.summary()
    figures = [
        ("target", f"{s['target']!r} (p = {s['target_probability']:.3f})"),
        ("active latents", s["active_features"]),
        ("latent nodes (the others folded into the error nodes: circuits.max_feature_nodes)", s["latent_nodes"]),
        ("kept nodes / edges", f"{s['kept_nodes']} / {s['kept_edges']}"),
        ("pruning thresholds (node, edge)", f"{s['node_threshold']}, {s['edge_threshold']}"),
        ("replacement score", f"{s['replacement_score']:.3f}"),
        ("completeness score", f"{s['completeness_score']:.3f}"),
        ("logits: replacement vs model", f"{s['logits_max_abs_diff']:.2e}"),
        ("edges + constants vs values", f"{s['completeness_error']:.2e}"),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in figures)
    logits = "".join(
        f"<tr><td>{_e(repr(tok))}</td><td>{float(p):.4f}</td></tr>" for tok, p in zip(traced.logit_tokens, traced.graph.logit_probs.tolist(), strict=True)
    )
    top = sorted((n for n in payload["nodes"] if n["feature_type"] == "cross layer transcoder"), key=lambda n: n["influence"])[:30]
    tokens = payload["metadata"]["prompt_tokens"]
    latents = "".join(
        f"<tr><td>{_linked(n['layer'], _step(journey_href, n['layer']))}</td><td>{n['ctx_idx']} ({_e(repr(tokens[n['ctx_idx']]))})</td>"
        f"<td>{_e(n['node_id'].split('_')[1])}</td>"
        f"<td>{n['activation']:.4g}</td><td>{n['influence']:.3f}</td></tr>"
        for n in top
    )
    tests = "".join(
        f"<tr><td>{x['layer']}</td><td>{x['position']} ({_e(repr(tokens[x['position']]))})</td><td>{x['latent']}</td><td>{x['activation']:.4g}</td>"
        f"<td>{x['direct']:+.4g}</td><td>{x['total']:+.4g}</td><td>{x['measured']:+.4g}</td><td>{-x['total']:+.4g}</td><td>{x['doubled']:+.4g}</td>"
        f"<td><code>{_e(x['spec'])}</code></td></tr>"
        for x in s["interventions"]
    )
    agree = s.get("intervention_agreement")
    agree_text = (
        f"Correlation with the measured changes: direct edge {agree['direct_correlation']:.3f}, all paths {agree['total_correlation']:.3f} "
        f"(relative error {agree['direct_relative_error']:.3f} and {agree['total_relative_error']:.3f}); doubled, all paths "
        f"{agree['doubled_correlation']:.3f} (relative error {agree['doubled_relative_error']:.3f})."
        if agree
        else ""
    )
    interventions = (
        f"""<h2>Interventions</h2>
<p>Each latent set to 0 (ablated), then to twice its activation, in the real model by the journey's transcoder edit (its change
times its decoder row added to the MLP output at its position; attention, norms and later MLPs free): the change of the top logit
(minus the mean logit) beside the graph's predictions, from its direct edge and through all its paths. The last column is the
journey's <code>--ablate</code> that shows the whole edited pass. {_e(agree_text)}</p>
<table><tr><th>layer</th><th>position</th><th>latent</th><th>activation</th><th>ablated: predicted (direct)</th><th>predicted (all paths)</th>
<th>measured</th><th>doubled: predicted (all paths)</th><th>measured</th><th>journey edit</th></tr>{tests}</table>"""
        if tests
        else ""
    )
    quality = "".join(
        f"<tr><td>{r['layer']}</td><td>{_num(r.get('fvu'), '.3f')}</td><td>{_num(r.get('delta_loss'), '+.4f')}</td><td>{_num(r.get('l0'), '.1f')}</td>"
        f"<td>{_num(r.get('dead_fraction'), '.1%')}</td><td>{_num(r.get('eval_tokens'), ',')}</td></tr>"
        for r in s.get("transcoders", [])
    )
    transcoders = (
        f"""<h2>Transcoders</h2>
<p>How well each layer's transcoder stands in for its MLP: FVU of mlp_out, L0 and the latents that never fire on the branch's
held-out rows (from its training), and the spliced delta loss: next-token cross-entropy with that MLP's output replaced by the
transcoder's, minus the clean model's, on the first tokens of the branch's eval slice.</p>
<table><tr><th>layer</th><th>FVU (mlp_out)</th><th>delta loss (spliced)</th><th>L0</th><th>dead</th><th>held-out rows</th></tr>{quality}</table>"""
        if quality
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Attribution graph: {_e(traced.text)}</title><style>{_STYLE}</style></head>
<body>
<h1>Attribution graph of {_e(traced.model_name)}'s next token after “{_e(traced.text)}”</h1>
<p>Each MLP is replaced by its transcoder plus an error node; attention patterns and norm scales are frozen at the
clean pass, so every edge is a direct effect and a node's incoming edges plus constants equal its value (checked below).
Pruned to the nodes and edges that carry the stated share of the influence on the logits; the strongest {min(len(payload["links"]), MAX_DRAWN_EDGES)}
of its {len(payload["links"])} edges are drawn. Hover a node or an edge for its values.</p>
<div class="figures"><table>{rows}</table><table><tr><th>logit target</th><th>probability</th></tr>{logits}</table></div>
{_svg(payload, traced.graph.n_layers, dict(zip(traced.graph.logit_ids, traced.logit_tokens, strict=True)), journey_href)}
<h2>Most influential latents</h2>
<table><tr><th>layer</th><th>position</th><th>latent</th><th>activation</th><th>cumulative influence</th></tr>{latents}</table>
{interventions}
{transcoders}
<p>The graph JSON beside this page opens in circuit-tracer's graph viewer and Neuronpedia.</p>
</body></html>
"""
