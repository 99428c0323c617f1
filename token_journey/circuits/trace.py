"""One prompt traced end to end: tokens, the graph, its checks, pruning, scores, and the files written.

The prompt is tokenized as circuit-tracer tokenizes it (no special tokens added by the tokenizer,
then BOS prepended unless the text already starts with a special token), so the same prompt gives
the same graph in both tools; the BOS position is then a constant term, not nodes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from token_journey.circuits import verify as checks
from token_journey.circuits.graph import Graph, Pruned, build_graph, prune, scores
from token_journey.circuits.interop import graph_json, write_graph_json
from token_journey.circuits.intervene import Intervention, agreement, intervene
from token_journey.circuits.page import render_page
from token_journey.config.circuits import CircuitsConfig
from token_journey.errors import TokenJourneyError
from token_journey.journey.follow import slug
from token_journey.journey.forward import token_strings
from token_journey.layout import atomic_write_text, sae_folder, write_json
from token_journey.sae.base import SAE
from token_journey.sae.io import load_sae


def prompt_ids(tokenizer: Any, text: str, prepend_bos: bool, max_tokens: int) -> list[int]:
    """Token ids of `text`, BOS first when `prepend_bos` (and the text does not begin with a special token)."""
    if not text or not text.strip():
        raise TokenJourneyError("circuits.text is empty; set circuits.text='The capital of France is'")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if prepend_bos and (not ids or ids[0] not in tokenizer.all_special_ids):
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise TokenJourneyError("the tokenizer has neither a BOS nor an EOS token to start the prompt with; set circuits.prepend_bos=false")
        ids = [bos, *ids]
    if len(ids) > max_tokens:
        raise TokenJourneyError(
            f"the prompt has {len(ids)} tokens but circuits.max_prompt_tokens={max_tokens}; shorten circuits.text or raise the limit (cost grows with it)"
        )
    return ids


@dataclass
class Traced:
    """Everything one traced prompt produced."""

    text: str
    model_name: str
    tokens: list[str]
    logit_tokens: list[str]
    graph: Graph
    pruned: Pruned
    verification: checks.Verification
    scores: dict[str, float]
    seconds: float
    node_threshold: float
    edge_threshold: float
    interventions: list[Intervention]
    transcoders: list[dict[str, Any]] = field(default_factory=list)
    """Per layer, how good its transcoder is (`token_journey.circuits.quality.layer_table`); empty if not measured."""

    def summary(self) -> dict[str, Any]:
        """The figures of the graph, as the stage's metrics file and the page show them."""
        g = self.graph
        return {
            "model": self.model_name,
            "text": self.text,
            "tokens": len(self.tokens),
            "active_features": g.n_features + g.folded_latents,
            "latent_nodes": g.n_features,
            "folded_latents": g.folded_latents,
            "target": self.logit_tokens[0],
            "target_probability": float(g.logit_probs[0]),
            "logit_targets": len(g.logit_ids),
            "kept_nodes": int(self.pruned.node_mask.sum()),
            "kept_edges": int(self.pruned.edge_mask.sum()),
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "replacement_score": self.scores["replacement"],
            "completeness_score": self.scores["completeness"],
            "logits_max_abs_diff": self.verification.logits_max_abs_diff,
            "completeness_error": self.verification.completeness_error,
            "interventions": [asdict(x) for x in self.interventions],
            **({"intervention_agreement": agreement(self.interventions)} if len(self.interventions) > 1 else {}),
            **({"transcoders": self.transcoders} if self.transcoders else {}),
        }


def trace(model: nn.Module, tokenizer: Any, transcoders: Sequence[SAE], cfg: CircuitsConfig, model_name: str, progress: bool = True) -> Traced:
    """Build, check (stopping if a check fails), prune and score the graph of `cfg.text`'s next token."""
    ids = prompt_ids(tokenizer, cfg.text, cfg.prepend_bos, cfg.max_prompt_tokens)
    start = time.perf_counter()
    graph = build_graph(
        model,
        ids,
        transcoders,
        max_n_logits=cfg.max_n_logits,
        desired_logit_prob=cfg.desired_logit_prob,
        batch_size=cfg.batch_size,
        max_feature_nodes=cfg.max_feature_nodes,
        constant_positions=1 if cfg.prepend_bos else 0,
        progress=progress,
    )
    verification = checks.verify(graph, model)
    checks.require(verification)
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    seconds = time.perf_counter() - start
    interventions = intervene(model, graph, pruned, transcoders, cfg.interventions) if cfg.interventions else []
    return Traced(
        text=cfg.text,
        model_name=model_name,
        tokens=token_strings(tokenizer, ids),
        logit_tokens=token_strings(tokenizer, graph.logit_ids),
        graph=graph,
        pruned=pruned,
        verification=verification,
        scores=scores(graph),
        seconds=seconds,
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        interventions=interventions,
    )


def write_outputs(traced: Traced, folder: Path, scan: str, journey: Path | None = None) -> dict[str, Path]:
    """`<slug>.json` (circuit-tracer's viewer schema), `<slug>.html` (our page) and `<slug>.metrics.json` under `folder`.

    `journey`: the folder of the journey pages; when it holds the page of the same prompt (the same
    `<slug>.html`), the graph's latents link to their layers' steps there."""
    folder = Path(folder)
    stem = slug(traced.model_name, traced.text)
    paths = {"graph": folder / f"{stem}.json", "page": folder / f"{stem}.html", "metrics": folder / f"{stem}.metrics.json"}
    payload = graph_json(traced.graph, traced.pruned, traced.tokens, traced.logit_tokens, stem, scan, traced.text, traced.node_threshold)
    write_graph_json(paths["graph"], payload)
    journey_page = Path(journey) / f"{stem}.html" if journey is not None else None
    href = os.path.relpath(journey_page, folder) if journey_page is not None and journey_page.is_file() else None
    atomic_write_text(paths["page"], render_page(traced, payload, href))
    write_json(paths["metrics"], traced.summary())
    return paths


def load_transcoders(root: Path, name: str, n_layers: int, device: str = "cpu") -> list[SAE]:
    """The transcoder named `name` of every layer 0..n_layers-1 under `root` (`<root>/mlp_out/layer_XX/<name>`), float32."""
    transcoders = []
    for layer in range(n_layers):
        folder = sae_folder(root, "mlp_out", layer, name)
        if not (folder / "cfg.json").is_file():
            raise TokenJourneyError(
                f"no transcoder {name!r} for layer {layer} at {folder}: a graph needs one at every layer; run `dvc repro circuits_attribute` "
                "(or set circuits.layers to every layer of the model)"
            )
        transcoders.append(load_sae(folder, device).float())
    return transcoders
