"""The attribution graph of one prediction: nodes, direct-effect edges, influence pruning and scores.

Nodes, in circuit-tracer's order (so its adjacency and ours line up row for row): the active transcoder
latents (layer, position, index) sorted by layer, position and index; one error node per (layer,
position), layer-major; one embedding node per position; the top logits of the last position. Rows of
`adjacency` are targets, columns sources: `adjacency[t, s]` is the direct effect of s on t in the
local replacement model (`replacement.py`), i.e. s's write dotted with the gradient of t's value with
respect to that write, where t's value is a latent's pre-activation (x · W_enc[:, k] + b_enc[k]) or a
logit minus the mean logit (the demeaned unembedding direction, as circuit-tracer attributes it).
Every edge into a batch of targets read at one position comes from one pass of the frozen model's
transpose (`adjoint.py`), which each target joins at its own layer.

The first `constant_positions` positions (default 1: the BOS token circuit-tracer prepends, whose
huge norm makes its latents meaningless) have no latent or error nodes: their MLP writes are constant
terms, like the biases. `bias[t]` is the sum of all constant terms' effects on t (the replacement model
run with every node zeroed), so `bias + adjacency.sum(1)` equals each target's value exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from token_journey.circuits import replacement
from token_journey.circuits.adjoint import Adjoint
from token_journey.circuits.replacement import CleanPass
from token_journey.errors import TokenJourneyError
from token_journey.journey import ops
from token_journey.sae.base import SAE

NODE_THRESHOLD = 0.8
"""Keep the nodes that carry this fraction of the total influence on the logits (circuit-tracer's default)."""
EDGE_THRESHOLD = 0.98
"""Keep the edges that carry this fraction of the total edge influence (circuit-tracer's default)."""


@dataclass
class Graph:
    """An unpruned attribution graph (see the module docstring for the node order)."""

    token_ids: list[int]
    features: torch.Tensor
    """`[F, 3]` long: (layer, position, latent index) of each latent node."""
    activations: torch.Tensor
    """`[F]` each latent's activation."""
    n_layers: int
    logit_ids: list[int]
    logit_probs: torch.Tensor
    """`[K]` the model's probability of each target token (the logits' weights in influence)."""
    adjacency: torch.Tensor
    """`[N, N]` direct effects, rows = targets, columns = sources; rows of errors and tokens are zero."""
    bias: torch.Tensor
    """`[N]` the constant terms' effect on each latent and logit node (0 for errors and tokens)."""
    values: torch.Tensor
    """`[N]` each latent's pre-activation and each logit minus the mean logit, from the real model (0 for errors and tokens)."""
    replacement_logits: torch.Tensor
    """`[T, vocab]` the replacement model's logits with error nodes (soft-capped where the model is)."""
    constant_positions: int
    folded_latents: int = 0
    """Active latents beyond `max_feature_nodes`, whose writes are in the error nodes of their (layer, position)."""

    @property
    def n_pos(self) -> int:
        return len(self.token_ids)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        start = self.token_slice.stop
        return slice(start, start + len(self.logit_ids))

    @property
    def target_rows(self) -> torch.Tensor:
        """Indices of the rows that are targets: the latents and the logits."""
        return torch.cat([torch.arange(self.n_features), torch.arange(self.logit_slice.start, self.logit_slice.stop)])

    def completeness_error(self) -> float:
        """max over targets of |bias + Σ incoming edges − value|, relative to max(1, max |value|)."""
        rows = self.target_rows
        residual = self.bias[rows] + self.adjacency[rows].sum(1, dtype=torch.float64).float() - self.values[rows]
        return float(residual.abs().max()) / max(1.0, float(self.values[rows].abs().max()))


def select_logits(logits: torch.Tensor, max_n_logits: int = 10, desired_logit_prob: float = 0.95) -> tuple[list[int], torch.Tensor]:
    """The most probable tokens until their cumulative probability reaches `desired_logit_prob`, at most `max_n_logits`."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.shape[-1]))
    cutoff = min(int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1, len(top_idx))
    return top_idx[:cutoff].tolist(), top_p[:cutoff]


def _active(clean: CleanPass, constant_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer, position, index) `[F, 3]` and activations `[F]` of the nonzero latents after the constant positions."""
    coords, values = [], []
    for layer, f in enumerate(clean.latents):
        f = f.clone()
        f[:constant_positions] = 0
        pos, idx = f.nonzero(as_tuple=True)
        coords.append(torch.stack([torch.full_like(pos, layer), pos, idx], dim=1))
        values.append(f[pos, idx])
    return torch.cat(coords), torch.cat(values)


@dataclass
class _Sources:
    """Each layer's latent writes padded per position, so one batched matmul dots a gradient with all of them.

    `writes[L]` `[T, d, M]` holds the writes a·W_dec[k] of the latents active at (L, position), padded with
    zero columns to the most at any position (M); `columns[L]` `[T, M]` their node numbers, the padding
    pointing at a spare column past the last node, which is dropped.
    """

    writes: list[torch.Tensor]
    columns: list[torch.Tensor]

    @classmethod
    def of(cls, features: torch.Tensor, feature_writes: torch.Tensor, n_layers: int, T: int, spare: int) -> _Sources:
        writes, columns = [], []
        for layer in range(n_layers):
            at_layer = (features[:, 0] == layer).nonzero(as_tuple=True)[0]
            counts = torch.bincount(features[at_layer, 1], minlength=T)
            width = int(counts.max()) if len(at_layer) else 0
            w = feature_writes.new_zeros(T, feature_writes.shape[-1], width)
            cols = torch.full((T, width), spare, dtype=torch.long, device=features.device)
            slot = torch.arange(len(at_layer), device=features.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # rank at its position
            pos = features[at_layer, 1]
            w[pos, :, slot] = feature_writes[at_layer]
            cols[pos, slot] = at_layer
            writes.append(w)
            columns.append(cols)
        return cls(writes, columns)


ROUND_ROWS = 2048
"""With max_feature_nodes, the influence ranking is updated after this many latent rows (circuit-tracer: its update_interval 4
times its batch_size 512). Each update runs the power series over every row so far, so fewer, larger rounds cost less."""


def _fold(
    matrix: torch.Tensor,
    row_node: torch.Tensor,
    visited: torch.Tensor,
    features: torch.Tensor,
    activations: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    err_start: int,
    T: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The graph over the visited latents: each other latent's column added to its (layer, position) error node's.

    An edge is linear in its source's write, so folding a latent's write into the error node of its
    (layer, position) adds its column to the error's: every target's edges still sum to its value.
    Returns the kept features, activations, values, biases and the square adjacency in node order."""
    F = len(features)
    dropped = (~visited).nonzero(as_tuple=True)[0]
    error_of = err_start + features[:, 0].cpu() * T + features[:, 1].cpu()
    for part in dropped.split(4096):  # a slice of columns at a time: the copy stays small
        matrix.index_add_(1, error_of[part], matrix[:, part])
    kept = visited.nonzero(as_tuple=True)[0]
    columns = torch.cat([kept, torch.arange(F, matrix.shape[1])])
    new_index = torch.full((matrix.shape[1],), -1, dtype=torch.long)
    new_index[columns] = torch.arange(len(columns))
    adjacency = torch.zeros(len(columns), len(columns))
    adjacency[new_index[row_node]] = matrix[:, columns]
    return features[kept.to(features.device)], activations[kept.to(activations.device)], values[columns], bias[columns], adjacency


def build_graph(
    model: nn.Module,
    token_ids: Sequence[int],
    transcoders: Sequence[SAE],
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    constant_positions: int = 1,
    progress: bool = True,
    max_feature_nodes: int | None = None,
) -> Graph:
    """The unpruned attribution graph of the next token after `token_ids` (see the module docstring).

    `max_feature_nodes`: at most this many latents become nodes, the most influential on the logits
    (ranked as circuit-tracer ranks them); the writes of the others are folded into the error node of
    their (layer, position), so every check still holds exactly. None: every active latent."""
    T = len(token_ids)
    if not 0 <= constant_positions < T:
        raise TokenJourneyError(f"constant_positions={constant_positions} must leave at least one of the prompt's {T} positions as nodes")
    if batch_size < 1:
        raise TokenJourneyError(f"batch_size={batch_size} must be >= 1")
    if max_feature_nodes is not None and max_feature_nodes < 1:
        raise TokenJourneyError(f"max_feature_nodes={max_feature_nodes} must be >= 1 (or null for every active latent)")
    clean = replacement.clean_pass(model, token_ids, transcoders)
    spec, tape = clean.spec, clean.tape
    skips = replacement.skip_weights(transcoders)
    features, activations = _active(clean, constant_positions)
    head_w, head_b = replacement.unembed(model)
    logit_ids, logit_probs = select_logits(replacement.softcapped(spec, clean.logits[-1]), max_n_logits, desired_logit_prob)

    dec = [tc.W_dec.detach().float() for tc in transcoders]
    enc = [tc.W_enc.detach().float() for tc in transcoders]
    b_dec = [tc.b_dec.detach().float() for tc in transcoders]
    layer_of = features[:, 0]
    # Each latent's write a · W_dec[k], and the error nodes' writes (zero at the constant positions).
    rows_dec = [dec[L][k] for L, _, k in features.tolist()]
    dev = clean.embeds.device  # the model's: the graph's own tensors (adjacency, values) live on the CPU
    feature_writes = activations[:, None] * torch.stack(rows_dec) if rows_dec else torch.zeros(0, spec.d_model, device=dev)
    node_errors = [e.clone() for e in clean.errors]
    for e in node_errors:
        e[:constant_positions] = 0

    # Full writes (what the replacement model with error nodes computes) and the constant part of each.
    full_writes, constant_writes = [], []
    for layer in range(spec.n_layers):
        skip = 0 if skips[layer] is None else clean.mlp_in[layer] @ skips[layer].T
        full = clean.mlp_out[layer] - skip  # = decoded latents + b_dec + error
        constant = b_dec[layer].expand(T, -1).clone()
        constant[:constant_positions] = full[:constant_positions]
        full_writes.append(full)
        constant_writes.append(constant)

    with torch.no_grad():
        zero = replacement.run(model, spec, tape, torch.zeros_like(clean.embeds), constant_writes, skips)
        rep = replacement.run(model, spec, tape, clean.embeds, full_writes, skips)
    replacement_logits = replacement.softcapped(spec, ops.linear(rep.final, head_w, head_b))

    unembed_dirs = head_w[logit_ids] - head_w.mean(0)  # [K, d]
    head_bias = torch.zeros(len(logit_ids), device=dev) if head_b is None else head_b[logit_ids] - head_b.mean()
    n_feat, n_err, K = len(features), spec.n_layers * T, len(logit_ids)
    N = n_feat + n_err + T + K
    bias, values = torch.zeros(N), torch.zeros(N)

    # Each target's value in the real model and its bias (the replacement model with every node zeroed).
    with torch.no_grad():
        pre_clean = [tc.pre_acts(m.to(tc.W_enc.dtype)).float() for tc, m in zip(transcoders, clean.mlp_in, strict=True)]
        pre_zero = [tc.pre_acts(m.to(tc.W_enc.dtype)).float() for tc, m in zip(transcoders, zero.mlp_in, strict=True)]
    for layer in range(spec.n_layers):
        idx = (layer_of == layer).nonzero(as_tuple=True)[0]
        values[idx.cpu()] = pre_clean[layer][features[idx, 1], features[idx, 2]].cpu()
        bias[idx.cpu()] = pre_zero[layer][features[idx, 1], features[idx, 2]].cpu()
    logit_rows = torch.arange(N - K, N)
    values[logit_rows] = (clean.logits[-1][logit_ids] - clean.logits[-1].mean()).cpu()
    bias[logit_rows] = (zero.final[-1] @ unembed_dirs.T + head_bias).cpu()

    # Targets: every latent's encoder column and every logit's direction; rows are computed for the logits
    # and then for latents in order of influence (all of them unless max_feature_nodes caps it).
    targets = {node: (int(L), int(p), enc[L][:, k], node) for node, (L, p, k) in enumerate(features.tolist())}
    targets |= {int(node): (spec.n_layers, T - 1, u, int(node)) for u, node in zip(unembed_dirs, logit_rows, strict=True)}
    sources = _Sources.of(features, feature_writes, spec.n_layers, T, spare=N)
    adjoint = Adjoint(model, spec, tape, skips)
    err_start, tok_start = n_feat, n_feat + n_err
    n_rows = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    matrix = torch.zeros(K + n_rows, N)  # rows in the order computed, every node a column
    ranking = torch.zeros_like(matrix) if n_rows < n_feat else None  # the same rows as shares of their |total|, to rank by influence
    row_node = torch.empty(K + n_rows, dtype=torch.long)
    progress_bar = tqdm(total=K + n_rows, desc="attribution rows", disable=not progress)

    def compute(chosen: list[int], first: int) -> None:
        """Rows `first...` of `matrix` for the targets `chosen`, grouped by position (see `adjoint.py`)."""
        slot = {node: first + i for i, node in enumerate(chosen)}
        row_node[first : first + len(chosen)] = torch.tensor(chosen)
        group = sorted((targets[n] for n in chosen), key=lambda x: -x[0])  # deepest first
        for p in range(T):
            at = [x for x in group if x[1] == p]
            for chunk in (at[i : i + batch_size] for i in range(0, len(at), batch_size)):
                t = p + 1
                joins = {L: torch.stack([vec for L2, _, vec, _ in chunk if L2 == L]) for L in dict.fromkeys(x[0] for x in chunk)}
                block = torch.zeros(len(chunk), N + 1, device=dev)

                def on_write(layer: int, g: torch.Tensor, block: torch.Tensor = block, t: int = t) -> None:
                    R, cols = len(g), sources.columns[layer][:t].flatten()
                    if cols.numel():
                        block[:R, cols] = torch.bmm(g.transpose(0, 1), sources.writes[layer][:t]).transpose(0, 1).reshape(R, -1)
                    block[:R, err_start + layer * T : err_start + layer * T + t] = torch.einsum("rtd,td->rt", g, node_errors[layer][:t])

                g_tok = adjoint.descend(t, joins, on_write)
                block[:, tok_start : tok_start + t] = torch.einsum("rtd,td->rt", g_tok, clean.embeds[:t])
                slots = [slot[x[3]] for x in chunk]
                matrix[slots] = block[:, :N].cpu()
                if ranking is not None:
                    ranking[slots] = _normalized(matrix[slots])
                progress_bar.update(len(chunk))

    compute(logit_rows.tolist(), 0)
    visited = torch.zeros(n_feat, dtype=torch.bool)
    done = K
    while done < K + n_rows:
        if n_rows == n_feat:
            pending = torch.arange(n_feat)
        else:  # circuit-tracer's order: the unvisited latents most influential on the logits through the rows so far
            weights = torch.zeros(N)
            weights[logit_rows] = logit_probs.cpu()
            influence = _influence(ranking[:done], weights, row_node[:done])
            ranked = influence[:n_feat].argsort(descending=True)
            pending = ranked[~visited[ranked]][: min(ROUND_ROWS, K + n_rows - done)]
        compute(pending.tolist(), done)
        visited[pending] = True
        done += len(pending)
    progress_bar.close()
    ranking = None  # freed before the square adjacency is built
    features, activations, values, bias, adjacency = _fold(matrix, row_node, visited, features, activations, values, bias, err_start, T)

    return Graph(
        token_ids=list(token_ids),
        features=features.cpu(),
        activations=activations.cpu(),
        n_layers=spec.n_layers,
        logit_ids=logit_ids,
        logit_probs=logit_probs.cpu(),
        adjacency=adjacency,
        bias=bias,
        values=values,
        replacement_logits=replacement_logits.cpu(),
        constant_positions=constant_positions,
        folded_latents=n_feat - n_rows,
    )


# ---- influence, pruning, scores ---------------------------------------------------------------


def _normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows of zeros stay zero): each target's share from each source."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def _influence(normalized: torch.Tensor, weights: torch.Tensor, row_node: torch.Tensor | None = None) -> torch.Tensor:
    """weights · (A + A² + …): the total (all-path) influence of each node on the weighted targets.

    `row_node`: the node whose row each row of `normalized` is, when only some rows are computed yet
    (nodes without a row pass nothing on: circuit-tracer's partial influence); None: row i is node i.
    The graph is acyclic, so the series ends after at most as many terms as its longest path.
    """
    total = torch.zeros_like(weights)
    current = weights
    for _ in range(normalized.shape[1] + 1):
        current = (current if row_node is None else current[row_node]) @ normalized
        if not current.any():
            return total
        total += current
    raise TokenJourneyError("influence did not converge: the adjacency matrix has a cycle")


def _logit_weights(graph: Graph) -> torch.Tensor:
    weights = torch.zeros(graph.adjacency.shape[0])
    weights[graph.logit_slice] = graph.logit_probs
    return weights


def _cutoff(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the largest scores sum to `fraction` of the total (the smallest such set)."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


@dataclass
class Pruned:
    """Which nodes and edges survive pruning, and each node's influence on the logits."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    """`[N]` each node's total influence on the probability-weighted logits."""
    cumulative: torch.Tensor
    """`[N]` the share of the total influence held by the nodes at least as influential as this one."""


def prune(graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD) -> Pruned:
    """Keep the most influential nodes, then edges, as circuit-tracer's `prune_graph` does.

    Nodes: those carrying `node_threshold` of the total influence (tokens and logits always kept).
    Edges among the kept nodes: those carrying `edge_threshold` of the total edge influence (an
    edge's share of its target times the target's influence plus weight). Then latents and errors
    without a kept outgoing edge, and latents without a kept incoming one, are dropped until stable.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise TokenJourneyError(f"{name}={value} must be between 0 and 1")
    weights = _logit_weights(graph)
    influence = _influence(_normalized(graph.adjacency), weights)
    keep = influence >= _cutoff(influence, node_threshold)
    always = graph.token_slice.start
    keep[always:] = True
    pruned = graph.adjacency.clone()
    pruned[~keep] = 0
    pruned[:, ~keep] = 0
    normalized = _normalized(pruned)
    edge_scores = normalized * (_influence(normalized, weights) + weights)[:, None]
    edges = edge_scores >= _cutoff(edge_scores.flatten(), edge_threshold)
    while True:
        before = keep.clone()
        edges[~keep] = False
        edges[:, ~keep] = False
        keep[:always] &= edges[:, :always].any(0)
        keep[: graph.n_features] &= edges[: graph.n_features].any(1)
        if torch.equal(keep, before):
            break
    ordered, order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return Pruned(keep, edges, influence, cumulative)


def scores(graph: Graph) -> dict[str, float]:
    """circuit-tracer's graph scores of the unpruned graph.

    replacement: the share of the tokens' and errors' total influence on the logits that is the tokens'
    (1 = every path from the input to the logits runs through latents). completeness: the influence-
    weighted mean over nodes of the share of each node's input that does not come straight from errors.
    """
    weights = _logit_weights(graph)
    normalized = _normalized(graph.adjacency)
    influence = _influence(normalized, weights)
    tokens, errors = influence[graph.token_slice].sum(), influence[graph.error_slice].sum()
    non_error = 1 - normalized[:, graph.error_slice].sum(1)
    out = influence + weights
    return {"replacement": float(tokens / (tokens + errors)), "completeness": float((non_error * out).sum() / out.sum())}
