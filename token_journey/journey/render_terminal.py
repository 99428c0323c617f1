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
        table.add_row(Text(s.name), Text(s.formula), Text(str(list(s.shape))), Text(_values(s)), _diff(s.max_abs_diff),
                      _diff(s.drift), human(s.params), human(s.flops))
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


def layer_panel(journey: Journey, layer: int) -> Panel:
    """Everything about one layer on one screen."""
    steps = [s for s in journey.run.steps if s.layer == layer]
    sums = journey.per_layer[layer]
    parts = [steps_table(steps, f"layer {layer} ({journey.run.spec.layer_types[layer]})"),
             _attention_text(journey, layer), _lens_text(journey, layer)]
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
    console.print(Panel(Group(Text(f"model {journey.model_name} ({run.spec.family}), text: "), Text(repr(journey.text)),
                              _tokens_table(journey)), title="the token journey"))
    console.print(steps_table([s for s in run.steps if s.layer is None and s.reference not in ("final_norm", "lm_head", "logits", "probs")],
                              "tokens to vectors"))
    for current in range(n_layers) if layer is None else [layer]:
        console.print(layer_panel(journey, current))
    console.print(steps_table([s for s in run.steps if s.reference in ("final_norm", "lm_head", "logits", "probs")],
                              "vectors to the next token"))
    table = Table(title="most likely next tokens")
    table.add_column("token")
    table.add_column("probability", justify="right")
    for i, p in journey.next_tokens:
        table.add_row(Text(repr(journey.vocab[i])), f"{p:.4f}")
    console.print(table)
    cont = Text("sampled continuation: ")
    cont.append(journey.text, style="bold")
    cont.append(journey.continuation, style="bold green")
    console.print(cont)
    totals = journey.totals
    console.print(Text(f"whole pass: {human(totals['params'])} parameters (model: {human(journey.model_params)}), "
                       f"{human(totals['flops'])} FLOPs ({human(totals['matmul_flops'])} in matrix products) for "
                       f"{len(run.tokens)} tokens; worst step difference {run.max_abs_diff:.1e}, worst chained drift "
                       f"{run.max_drift:.1e}; {journey.features_note}"))


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
