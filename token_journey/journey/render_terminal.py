"""The journey in a terminal: one rich panel per layer (or just the layer asked for).

Token strings are put in `rich.text.Text` objects, never in markup, so a token such as
``[bold]`` prints as itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from token_journey.errors import TokenJourneyError
from token_journey.journey.flops import human
from token_journey.journey.follow import Journey
from token_journey.journey.steps import Step


def _values(step: Step) -> str:
    first = " ".join(f"{v:.4g}" for v in step.first)
    last = " ".join(f"{v:.4g}" for v in step.last)
    return f"{first} … {last}"


def _diff(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(f"{value:.1e}", style="green" if value <= 1e-4 else "red")


def steps_table(steps: Iterable[Step], title: str) -> Table:
    """Name, formula, shape, first…last values, check, drift, parameters and FLOPs of each step."""
    table = Table(title=title, expand=True, show_lines=False)
    for column in ("step", "formula", "shape", "values (first … last)", "Δ step", "Δ chain", "params", "FLOPs"):
        table.add_column(column, overflow="fold")
    for s in steps:
        table.add_row(
            Text(s.name), Text(s.formula), Text(str(list(s.shape))), Text(_values(s)), _diff(s.max_abs_diff), _diff(s.drift), human(s.params), human(s.flops)
        )
    return table


def _tokens_table(journey: Journey) -> Table:
    table = Table(title="tokens", show_header=True)
    table.add_column("pos")
    table.add_column("id")
    table.add_column("token")
    for pos, (i, tok) in enumerate(zip(journey.run.token_ids, journey.run.tokens, strict=True)):
        table.add_row(str(pos), str(i), Text(repr(tok)))
    return table


def _attention_text(journey: Journey, layer: int) -> Text:
    """For the last position: which token each head attends to most."""
    probs = journey.run.attention[layer][:, -1, :]  # (H, T)
    text = Text("attention of the last token, per head: ")
    for head, row in enumerate(probs):
        j = int(row.argmax())
        text.append(f"h{head}→")
        text.append(repr(journey.run.tokens[j]), style="cyan")
        text.append(f" {float(row[j]):.2f}  ")
    return text


def _lens_text(journey: Journey, layer: int) -> Text:
    text = Text("logit lens (top token per position): ")
    for pos, top in enumerate(journey.lens[layer].top):
        i, p = top[0]
        text.append(f"{pos}:")
        text.append(repr(journey.vocab.get(i, str(i))), style="magenta")
        text.append(f" {p:.2f}  ")
    return text


def _features_text(journey: Journey, layer: int) -> Text | None:
    hits = [h for h in journey.features if h.layer == layer]
    if not hits:
        return None
    text = Text()
    for h in hits:
        text.append(f"SAE {h.sae_name} ({h.site}): ")
        for pos, top in enumerate(h.top):
            ids = ",".join(str(f) for f, _ in top[:3]) or "-"
            text.append(f"{journey.run.tokens[pos]!r}→{ids}  ")
        text.append("\n")
    return text


def _tok(journey: Journey, i: int | None) -> Text:
    return Text(repr(journey.vocab.get(i, str(i))))


def attribution_table(journey: Journey) -> Table | None:
    """The target's pre-cap logit split into SAE latents, b_dec, error and later layers, per SAE layer."""
    a = journey.attribution
    if a is None:
        return None
    what = repr(journey.vocab[a.target]) + (f" - {journey.vocab[a.versus]!r}" if a.versus is not None else "")
    capped = f", after soft-cap {a.capped:.4f}" if a.capped is not None else ""
    table = Table(title=f"attribution of the logit of {what} (pre-cap {a.logit:.4f}{capped}; direct contributions, final norm scale frozen at this token)")
    for column in ("layer", "SAE", "top latents (activation → contribution)", "other parts", "Σ parts", "check"):
        table.add_column(column, overflow="fold")
    for layer in a.layers:
        latents = "  ".join(f"#{p.latent} ({p.activation:.2f}→{p.value:+.3f})" for p in layer.top)
        others = "  ".join(f"{p.name} {p.value:+.3f}" for p in layer.parts if p.latent is None)
        table.add_row(str(layer.layer), Text(layer.sae_name), latents, others, f"{layer.total:.4f}", _diff(abs(layer.total - a.logit) / max(1.0, abs(a.logit))))
    return table


def steering_panel(journey: Journey) -> Panel | None:
    """Next tokens before/after the edits, KL, residual norms of later layers, continuations."""
    s = journey.steering
    if s is None:
        return None
    side = Table(title=f"next token before / after (KL {s.kl:.4g} nats)")
    for column in ("before", "p", "after", "p"):
        side.add_column(column)
    for (b, pb), (a, pa) in zip(s.before, s.after, strict=True):
        side.add_row(_tok(journey, b), f"{pb:.4f}", _tok(journey, a), f"{pa:.4f}")
    norms = Table(title="residual norm at the last position")
    for column in ("layer", "before", "after", "‖after − before‖"):
        norms.add_column(column, justify="right")
    for layer, nb, na, nd in s.norms:
        norms.add_row(str(layer), f"{nb:.4g}", f"{na:.4g}", f"{nd:.4g}")
    before = Text("continuation before: ")
    before.append(journey.text + journey.continuation, style="bold")
    after = Text("continuation after:  ")
    after.append(journey.text + journey.steered_continuation, style="bold yellow")
    edits = ", ".join(f"{spec} ({site} SAE {name})" for spec, name, _, site in s.edits)
    return Panel(Group(side, norms, before, after), title=f"steering: {edits}")


def timeline_table(journey: Journey, position: int = -1) -> Table:
    """One token's path: strongest SAE latents and the logit lens, layer by layer."""
    position %= len(journey.run.tokens)
    table = Table(title=f"the path of token {position} ({journey.run.tokens[position]!r}) through the layers")
    for column in ("layer", "SAE latents", "logit lens"):
        table.add_column(column, overflow="fold")
    for row in journey.timeline(position):
        hits = "  ".join(f"{name}: " + " ".join(f"#{f} {a:.2f}" for f, a, _ in top) for name, top in row.features)
        lens = Text()
        for i, p in row.lens:
            lens.append(repr(journey.vocab.get(i, str(i))), style="magenta")
            lens.append(f" {p:.2f}  ")
        table.add_row(str(row.layer), hits or "-", lens)
    return table


def layer_panel(journey: Journey, layer: int) -> Panel:
    """Everything about one layer on one screen."""
    steps = [s for s in journey.run.steps if s.layer == layer]
    sums = journey.per_layer[layer]
    parts = [steps_table(steps, f"layer {layer} ({journey.run.spec.layer_types[layer]})"), _attention_text(journey, layer), _lens_text(journey, layer)]
    features = _features_text(journey, layer)
    if features is not None:
        parts.append(features)
    subtitle = f"{human(sums['params'])} parameters, {human(sums['flops'])} FLOPs"
    return Panel(Group(*parts), title=f"layer {layer}", subtitle=subtitle)


def render(journey: Journey, console: Console | None = None, layer: int | None = None) -> None:
    """Print the journey: header, embedding, each layer (or only `layer`), head, prediction, continuation."""
    console = console or Console()
    n_layers = journey.run.spec.n_layers
    if layer is not None and not 0 <= layer < n_layers:
        raise TokenJourneyError(f"--layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
    run = journey.run
    console.print(
        Panel(
            Group(Text(f"model {journey.model_name} ({run.spec.family}), text: "), Text(repr(journey.text)), _tokens_table(journey)), title="the token journey"
        )
    )
    console.print(
        steps_table([s for s in run.steps if s.layer is None and s.reference not in ("final_norm", "lm_head", "logits", "probs")], "tokens to vectors")
    )
    for current in range(n_layers) if layer is None else [layer]:
        console.print(layer_panel(journey, current))
    console.print(steps_table([s for s in run.steps if s.reference in ("final_norm", "lm_head", "logits", "probs")], "vectors to the next token"))
    table = Table(title="most likely next tokens")
    table.add_column("token")
    table.add_column("probability", justify="right")
    for i, p in journey.next_tokens:
        table.add_row(Text(repr(journey.vocab[i])), f"{p:.4f}")
    console.print(table)
    for part in (attribution_table(journey), steering_panel(journey), timeline_table(journey)):
        if part is not None:
            console.print(part)
    cont = Text("sampled continuation: ")
    cont.append(journey.text, style="bold")
    cont.append(journey.continuation, style="bold green")
    console.print(cont)
    totals = journey.totals
    console.print(
        Text(
            f"whole pass: {human(totals['params'])} parameters (model: {human(journey.model_params)}), "
            f"{human(totals['flops'])} FLOPs ({human(totals['matmul_flops'])} in matrix products) for "
            f"{len(run.tokens)} tokens; worst step difference {run.max_abs_diff:.1e}, worst chained drift "
            f"{run.max_drift:.1e}; {journey.features_note}"
        )
    )


def render_captured(captured: list[tuple[str, torch.Tensor]], console: Console | None = None) -> None:
    """What the hooks saw in a model the recomputation does not support: module, shape, values."""
    console = console or Console()
    table = Table(title="module outputs captured by hooks (no recomputation for this architecture)")
    for column in ("module", "shape", "values (first … last)"):
        table.add_column(column)
    for name, tensor in captured:
        flat = tensor.flatten().float()
        values = " ".join(f"{v:.4g}" for v in flat[:4].tolist()) + " … " + " ".join(f"{v:.4g}" for v in flat[-4:].tolist())
        table.add_row(Text(name), str(list(tensor.shape)), values)
    console.print(table)
