"""Evaluate the SAEs of one layer on held-out tokens, in one sweep over the data.

Per batch of eval sequences [batch, seq]:

1. the *clean* pass: one full forward pass that returns the logits and, through a recording
   splice at (site, layer), the activations `x` [batch, seq, d_model]; reconstruction metrics
   need no other pass;
2. the *zero-ablation* pass: the site's activation set to 0 at the evaluated positions;
3. one *spliced* pass per SAE: the activation replaced by the SAE's reconstruction at the
   evaluated positions (the encode/decode is done once and reused for the metrics).

A transcoder (site mlp_out) is spliced the same way, with its prediction from the MLP's input in
place of the MLP's output: the clean pass also records `mlp_in` (upstream of the splice, so the
spliced pass would see the same input), FVU is that of the MLP output, loss recovered is against the
zero-ablated MLP output, and L0 counts its latents on the MLP input.

So k SAEs cost k + 2 forward passes over the eval tokens, the splice exactly one per SAE. Only the
clean pass runs the whole model: the others resume from what it handed to the decoder layers from
the site on (`token_journey.sites.resume`), so at layer L of n they run the last n - L layers (n - L - 1
for resid_post) and the head: the same operations on the same inputs as a full pass.

Which positions count (the same rules as the harvest, `token_journey.data.corpus.row_mask` and
`drop_norm_outliers`):
- *evaluated positions* R [batch, seq] = `row_mask(input_ids, special_ids, exclude_first)`:
  real tokens, not BOS/EOS/pad, not among the first `exclude_first` real tokens, and (with
  `max_norm_ratio` > 0) not a norm outlier of its sequence, judged on the clean pass's
  activations (with a transcoder among the SAEs, on both `mlp_in` and `mlp_out`, the rows its training
  pairs). These are the rows reconstruction metrics average over and the positions the
  splice and the zero ablation replace; elsewhere the model keeps its own activation (the SAE
  never saw those).
- *loss positions*: the logits at position t predict token t + 1, and that prediction counts
  iff t + 1 is an evaluated position (R[:, 1:]). CE, delta loss, loss recovered and KL all
  average over exactly these predictions, identical for the clean, zero and spliced passes.

Memory: the passes stop at the final hidden state [batch, seq, d_model]; the LM head and the
log-softmax run over the counted predictions in chunks of at most `LOGIT_CHUNK_BYTES` of float32
logits, so a 128k-256k vocabulary never materialises [batch, seq, vocab]. KL needs the clean
distribution of each chunk again: a batch keeps it when it fits in `CLEAN_KEEP_BYTES` (computed
once, shared by every SAE), else each SAE recomputes it from the kept clean hidden states (one
[chunk, d_model] x [d_model, vocab] product) so that memory stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from token_journey.config.eval import EvalConfig
from token_journey.data.corpus import drop_norm_outliers
from token_journey.errors import TokenJourneyError
from token_journey.eval import metrics, saebench
from token_journey.layout import Layout, eval_timing_file, layer_folder, metrics_file, pareto_file, train_timing_file, write_json
from token_journey.lm import final_norm_gain, load_prepared
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, is_transcoder
from token_journey.sites import check_point, record_layer_inputs, resume, splice

log = logging.getLogger(__name__)


@dataclass
class LossTally:
    """Sums of per-prediction CE (and KL against the clean pass) over the loss positions."""

    ce: float = 0.0
    kl: float = 0.0
    count: int = 0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None = None) -> None:
        """Add per-prediction losses `ce` [M] (and `kl` [M]) of one batch."""
        self.ce += float(ce.double().sum())
        self.kl += float(kl.double().sum()) if kl is not None else 0.0
        self.count += ce.numel()

    @property
    def mean_ce(self) -> float:
        return self.ce / self.count

    @property
    def mean_kl(self) -> float:
        return self.kl / self.count


@dataclass
class _SaeState:
    """Running sums for one SAE during the sweep."""

    recon: metrics.ReconstructionTally
    loss: LossTally = field(default_factory=LossTally)
    seconds: float = 0.0


@dataclass
class SweepResult:
    """Metrics per SAE name plus what the sweep as a whole cost."""

    saes: dict[str, dict]
    sweep: dict


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LOGIT_CHUNK_BYTES = 128 * 2**20
"""Most float32 logits held at once by the loss computation (128 MiB: 261 rows at vocab 128,256)."""


def _final_hidden(model: nn.Module, input_ids: torch.Tensor, site: str, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The decoder's final (normed) hidden state [batch, seq, d_model], the site's activation passed through `replace`."""
    with splice(model, site, layer, replace):
        return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def head_log_probs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [m, vocab] in float32 from final hidden states [m, d_model].

    The causal-LM head as transformers applies it: the output embedding, then (Gemma 2/3) the
    final logit soft-capping tanh(z / c) * c, in the model's dtype.
    """
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return metrics.log_probs(logits)


def rows_per_chunk(vocab_size: int, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> int:
    """How many predictions' float32 logits fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * vocab_size))


CLEAN_KEEP_BYTES = 512 * 2**20
"""Most float32 clean log-probs a batch keeps for its SAEs' KL (the default batch needs ~200 MB); above
this each SAE recomputes them chunk by chunk from the clean hidden states."""


def chunked_losses(
    model: nn.Module,
    hidden: torch.Tensor | None,
    targets: torch.Tensor,
    clean_hidden: torch.Tensor | None = None,
    chunk_bytes: int = LOGIT_CHUNK_BYTES,
    kept: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-prediction CE [M] at `targets` [M] from hidden states [M, d_model], and KL(clean || this) [M].

    KL is computed when `clean_hidden` [M, d_model] is given; `hidden=None` means the clean pass
    itself (CE only). At most `chunk_bytes` of logits (per distribution) exist at a time, whatever
    the vocabulary. `kept`, one dict per batch, keeps the clean log-probs of each chunk (by its first
    row) across calls, so the clean pass and every SAE of the batch compute them once.
    """
    step = rows_per_chunk(model.get_output_embeddings().weight.shape[0], chunk_bytes)

    def clean_at(start: int) -> torch.Tensor:
        if kept is not None and start in kept:
            return kept[start]
        log_p = head_log_probs(model, clean_hidden[start : start + step])
        if kept is not None:
            kept[start] = log_p
        return log_p

    ce, kl = [], []
    for start in range(0, len(targets), step):
        log_q = clean_at(start) if hidden is None else head_log_probs(model, hidden[start : start + step])
        ce.append(metrics.token_cross_entropy(log_q, targets[start : start + step]))
        if hidden is not None and clean_hidden is not None:
            kl.append(metrics.token_kl(clean_at(start), log_q))
        del log_q
    with_kl = hidden is not None and clean_hidden is not None
    if not ce:  # no counted prediction in this batch
        ce = kl = [targets.new_zeros(0, dtype=torch.float32)]
    return torch.cat(ce), (torch.cat(kl) if with_kl else None)


def _replace_rows(rows: torch.Tensor, values: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice function writing `values` [R, d_model] (None: zeros) at the positions `rows` [batch, seq]."""

    def replace(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[rows] = 0 if values is None else values.to(act.dtype)
        return out

    return replace


def _is_transcoder(sae: nn.Module) -> bool:
    """True for an SAE that reads the MLP's input and predicts its output."""
    return is_transcoder(getattr(sae, "architecture", ""))


def _sae_dtype(sae: nn.Module) -> torch.dtype:
    return next(sae.parameters()).dtype


@torch.inference_mode()
def _eval_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    site: str,
    layer: int,
    saes: Mapping[str, nn.Module],
    states: dict[str, _SaeState],
    clean: LossTally,
    zero: LossTally,
    max_norm_ratio: float = 0.0,
    chunk_bytes: int = LOGIT_CHUNK_BYTES,
) -> int:
    """Run the clean, zero-ablation and spliced passes for one batch and add to every tally.

    `input_ids` [batch, seq], `rows` [batch, seq] bool (positions the row rule admits; norm
    outliers are dropped here, once the clean pass shows the activations). Returns the rows evaluated.
    """
    recorded: dict[str, torch.Tensor] = {}

    def recorder(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def record(act: torch.Tensor) -> torch.Tensor:
            recorded[key] = act
            return act

        return record

    paired = any(_is_transcoder(sae) for sae in saes.values())
    # The zero-ablated and spliced passes differ from the clean one only from the site on, so they
    # resume from the clean pass's state there: after layer L for resid_post, else at layer L's input.
    resume_at = layer + 1 if site == "resid_post" else layer
    with record_layer_inputs(model, resume_at) as inputs, splice(model, TRANSCODER_INPUT_SITE, layer, recorder("in")) if paired else contextlib.nullcontext():
        clean_hidden = _final_hidden(model, input_ids, site, layer, recorder("act"))
    rows = drop_norm_outliers(recorded["act"], rows, max_norm_ratio)
    if paired:  # training pairs only tokens that are rows at both sites
        rows = drop_norm_outliers(recorded["in"], rows, max_norm_ratio)
    counted = rows[:, 1:]  # (B, T-1): prediction at t counts iff its target t + 1 is evaluated
    targets = input_ids[:, 1:][counted]  # (M,)

    def hidden_at(replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # (M, D) at the counted predictions
        if site == "resid_post":
            final = resume(model, inputs, replace(recorded["act"]), resume_at)
        else:
            with splice(model, site, layer, replace):
                final = resume(model, inputs, inputs.hidden, resume_at)
        return final[:, :-1][counted]

    clean_hidden = clean_hidden[:, :-1][counted]  # (M, D)
    vocab = model.get_output_embeddings().weight.shape[0]
    kept: dict[int, torch.Tensor] | None = {} if len(targets) * vocab * 4 <= CLEAN_KEEP_BYTES else None
    clean.add(chunked_losses(model, None, targets, clean_hidden, chunk_bytes, kept)[0])
    zero.add(chunked_losses(model, hidden_at(_replace_rows(rows, None)), targets, chunk_bytes=chunk_bytes)[0])
    x = recorded["act"][rows]  # (R, D)
    x_in = recorded["in"][rows] if paired else None  # (R, D) the MLP's input, for transcoders
    positions = rows.nonzero()[:, 1]  # (R,) index of each row within its sequence
    device = input_ids.device
    for name, sae in saes.items():
        _sync(device)
        start = time.perf_counter()
        if _is_transcoder(sae):
            source = x_in.to(_sae_dtype(sae))
            f = sae.encode(source)  # (R, F)
            x_hat = sae.output(f, source)  # (R, D) the predicted MLP output
        else:
            f = sae.encode(x.to(_sae_dtype(sae)))  # (R, F)
            x_hat = sae.decode(f)  # (R, D)
        states[name].loss.add(*chunked_losses(model, hidden_at(_replace_rows(rows, x_hat)), targets, clean_hidden, chunk_bytes, kept))
        states[name].recon.update(x.float(), x_hat.float(), f, positions)
        _sync(device)
        states[name].seconds += time.perf_counter() - start
    return int(rows.sum())


def evaluate_saes(
    model: nn.Module,
    sequences: torch.Tensor,
    rows: torch.Tensor,
    site: str,
    layer: int,
    saes: Mapping[str, nn.Module],
    batch_size: int,
    dense_threshold: float = metrics.DENSE_THRESHOLD,
    max_norm_ratio: float = 0.0,
    chunk_bytes: int = LOGIT_CHUNK_BYTES,
) -> SweepResult:
    """Evaluate every SAE in `saes` (name -> module with encode/decode) at (site, layer).

    `sequences` [n_seq, seq] token ids and `rows` [n_seq, seq] bool positions the row rule
    admits (see the module docstring), less norm outliers when `max_norm_ratio` > 0; both are
    moved to the model's device batch by batch. `chunk_bytes` bounds the logits held at once.
    """
    device = next(model.parameters()).device
    states = {name: _SaeState(metrics.ReconstructionTally(_width(sae), sequences.shape[1])) for name, sae in saes.items()}
    clean, zero = LossTally(), LossTally()
    _sync(device)
    start = time.perf_counter()
    eval_rows = 0
    for first in tqdm(range(0, len(sequences), batch_size), desc=f"evaluate {site} layer {layer}", unit="batch"):
        ids = sequences[first : first + batch_size].to(device)
        eval_rows += _eval_batch(model, ids, rows[first : first + batch_size].to(device), site, layer, saes, states, clean, zero, max_norm_ratio, chunk_bytes)
    _sync(device)
    seconds = time.perf_counter() - start
    n_tokens = sequences.numel()
    results = {name: _sae_metrics(state, clean, zero, n_tokens, dense_threshold) for name, state in states.items()}
    sweep = {
        "tokens": n_tokens,
        "sequences": len(sequences),
        "eval_rows": eval_rows,
        "norm_outliers_dropped": int(rows.sum()) - eval_rows,
        "loss_positions": clean.count,
        "forward_passes": len(saes) + 2,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
    }
    return SweepResult(saes=results, sweep=sweep)


def _width(sae: nn.Module) -> int:
    """d_sae of an SAE (rows of W_dec [d_sae, d_in])."""
    return int(sae.W_dec.shape[0])


def _sae_metrics(state: _SaeState, clean: LossTally, zero: LossTally, n_tokens: int, dense_threshold: float) -> dict:
    """The JSON entry of one SAE: reconstruction, sparsity and spliced-loss metrics."""
    ce_clean, ce_zero, ce_sae = clean.mean_ce, zero.mean_ce, state.loss.mean_ce
    return {
        **state.recon.result(dense_threshold),
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "delta_loss": ce_sae - ce_clean,
        "loss_recovered": metrics.loss_recovered(ce_clean, ce_sae, ce_zero),
        "kl": state.loss.mean_kl,
        "eval_tokens": state.recon.n,
        "loss_positions": state.loss.count,
        # This SAE's own cost (encode/decode, spliced pass, metrics) over all eval tokens.
        "eval_tokens_per_s": n_tokens / state.seconds,
    }


# --- the evaluate stage: inputs, checks and outputs around `evaluate_saes` -------------------


def load_subjects(layout: Layout, site: str, layer: int, extra: tuple[str, ...], d_model: int, device: torch.device) -> dict[str, tuple[Path, nn.Module]]:
    """The SAEs to evaluate: the pipeline's own for (site, layer) plus `extra` folders, checked.

    Raises a `TokenJourneyError` naming both sides when there is no SAE, when an SAE's d_in is not
    the site's d_model, when its recorded site/layer differ, or when two share a name.
    """
    from token_journey.sae.io import find_saes, load_sae

    own = find_saes(layout.saes, site, layer) if layout.saes.exists() else []
    folders = [*own, *(Path(p) for p in extra)]
    if not folders:
        raise TokenJourneyError(
            f"no SAE to evaluate for {site} layer {layer}: nothing under {layer_folder(layout.saes, site, layer)} "
            "and eval.extra_saes is empty; train one (`dvc repro train_sae`) or list SAE folders in eval.extra_saes"
        )
    subjects: dict[str, tuple[Path, nn.Module]] = {}
    for folder in folders:
        sae = load_sae(folder, device=str(device)).eval()
        spec = sae.cfg
        if spec.d_in != d_model:
            raise TokenJourneyError(
                f"SAE {folder} has d_in={spec.d_in} but {site} at layer {layer} of the model has d_model={d_model}; "
                "evaluate it against the model and layer it was trained on"
            )
        if spec.layer >= 0 and (spec.site, spec.layer) != (site, layer):  # layer -1: unknown (Gemma Scope)
            raise TokenJourneyError(f"SAE {folder} was trained on {spec.site} layer {spec.layer} but this evaluation is for {site} layer {layer}")
        if spec.name in subjects:
            raise TokenJourneyError(f"two SAEs are named {spec.name!r}: {subjects[spec.name][0]} and {folder}; rename one")
        subjects[spec.name] = (folder, sae)
    return subjects


def check_activations(layout: Layout, site: str, layer: int, d_model: int, fingerprint: str) -> tuple[int, float]:
    """Require the layer's harvested eval split from this model; return its (exclude_first, max_norm_ratio).

    Evaluation applies the exclusion rule the harvest recorded, so both see the same rows.
    """
    from token_journey.data.shards import open_activations

    acts = open_activations(layout.activations, site, layer, split="eval")
    have = acts.manifest.get("model_fingerprint")
    if acts.d_model != d_model or (have and have != fingerprint):
        raise TokenJourneyError(
            f"activations {acts.folder} are from model {have} "
            f"(d_model {acts.d_model}) but the evaluated model is {fingerprint} (d_model {d_model}); re-run the harvest"
        )
    rule = acts.manifest.get("exclusion", {})
    return int(rule.get("exclude_first", 0)), float(rule.get("max_norm_ratio", 0.0))


def _train_tokens_per_s(timings: Path, site: str, layer: int, name: str) -> float | None:
    """Training throughput our trainer recorded for this SAE, if any."""
    path = train_timing_file(timings, site, layer, name)
    return json.loads(path.read_text()).get("tokens_per_s") if path.is_file() else None


def split_timings(document: dict) -> tuple[dict, dict]:
    """(results, speeds) of a metrics document: wall-clock figures differ between runs, so they go apart.

    Speeds: the sweep's `seconds` and `tokens_per_s`, and each SAE's `eval_tokens_per_s` (and
    `saebench_seconds` when the SAEBench metrics ran).
    """
    sweep = dict(document["sweep"])
    speeds = {"sweep": {k: sweep.pop(k) for k in ("seconds", "tokens_per_s")}, "saes": {}}
    saes = {}
    for name, entry in document["saes"].items():
        entry = dict(entry)
        speeds["saes"][name] = {"eval_tokens_per_s": entry.pop("eval_tokens_per_s")}
        if "saebench_seconds" in entry:
            speeds["saes"][name]["saebench_seconds"] = entry.pop("saebench_seconds")
        saes[name] = entry
    return {**document, "sweep": sweep, "saes": saes}, speeds


PLOTTED_SAEBENCH = ("absorption_rate", "probe_sae_top_1")
"""SAEBench figures copied into the plot rows (None when eval.saebench is off)."""


def pareto_rows(saes: Mapping[str, dict], layer: int) -> list[dict]:
    """DVC plot rows of one layer: one per SAE with l0, fvu, delta_loss and whether it is on each
    frontier, plus the absorption rate and the 1-sparse probe accuracy."""
    names = list(saes)
    l0s = [saes[n]["l0"] for n in names]
    on_fvu = metrics.pareto_front(l0s, [saes[n]["fvu"] for n in names])
    on_loss = metrics.pareto_front(l0s, [saes[n]["delta_loss"] for n in names])
    return [
        {
            "sae": n,
            "layer": layer,
            "l0": saes[n]["l0"],
            "fvu": saes[n]["fvu"],
            "delta_loss": saes[n]["delta_loss"],
            "fvu_frontier": a,
            "delta_loss_frontier": b,
            **{key: saes[n].get(key) for key in PLOTTED_SAEBENCH},
        }
        for n, a, b in zip(names, on_fvu, on_loss)
    ]


def saebench_rows(activations: Path, site: str, layer: int, max_rows: int, split: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_rows` harvested rows of (site, layer, split): activations [N, d_model] float32 and
    their token ids [N] int64 (the harvest stores both), for the SAEBench metrics."""
    import numpy as np

    from token_journey.data.shards import activation_tensor, open_activations

    acts = open_activations(activations, site, layer, split=split)
    xs, ids, have = [], [], 0
    for table in acts.iter_tables(["activation", "token_id"]):
        xs.append(activation_tensor(table.column("activation"), acts.dtype))
        ids.append(torch.from_numpy(table.column("token_id").to_numpy().astype(np.int64)))
        have += len(ids[-1])
        if have >= max_rows:
            break
    return torch.cat(xs)[:max_rows], torch.cat(ids)[:max_rows]


def saebench_metrics(saes: Mapping[str, nn.Module], x: torch.Tensor, token_ids: torch.Tensor, tokenizer: object, w_u: torch.Tensor) -> dict[str, dict]:
    """`saebench.sae_metrics` of every SAE on rows `x` with tokens `token_ids`, each with its `saebench_seconds`.

    Token texts are decoded one id at a time (a token's own text, as the labelled tasks need). The
    probes on the raw activations do not depend on the SAE, so they are fitted once for all SAEs
    (their time is logged, not counted in any SAE's `saebench_seconds`).
    """
    decoded = {t: tokenizer.decode([t]) for t in sorted(set(token_ids.tolist()))}
    texts = [decoded[t] for t in token_ids.tolist()]
    start = time.perf_counter()
    raw = saebench.raw_probes(x, token_ids, texts)
    log.info("SAEBench probes on the raw activations: %.1f s", time.perf_counter() - start)
    out = {}
    for name, sae in saes.items():
        start = time.perf_counter()
        out[name] = saebench.sae_metrics(sae, x, token_ids, texts, w_u, raw=raw)
        out[name]["saebench_seconds"] = time.perf_counter() - start
        log.info("SAEBench metrics of %s: %.1f s", name, out[name]["saebench_seconds"])
    return out


def evaluate_layer(cfg: EvalConfig, layout: Layout, site: str, layer: int, device: str = "auto") -> tuple[dict, dict]:
    """Evaluate every SAE of (site, layer) on the eval split and write the metrics, plot and timing files.

    Returns (the metrics document written to `layout.metrics_file(...)`, the speeds written to
    `layout.eval_timing_file(...)`).
    """
    from token_journey.data.corpus import read_sequences, row_mask, special_ids

    loaded = load_prepared(layout.base_model, dtype=cfg.dtype or None, device=device)
    model, manifest = loaded.model, loaded.manifest
    check_point(model, site, layer)
    d_model = int(manifest["architecture"]["d_model"])
    exclude_first, max_norm_ratio = check_activations(layout, site, layer, d_model, manifest["fingerprint"])
    subjects = load_subjects(layout, site, layer, cfg.extra_saes, d_model, loaded.device)
    corpus_file = layout.corpus_file("eval")
    sequences = read_sequences(corpus_file).input_ids
    sequences = sequences[: max(1, cfg.max_tokens // sequences.shape[1])]
    rows = row_mask(sequences, special_ids(loaded.tokenizer), exclude_first)
    if not rows[:, 1:].any():
        raise TokenJourneyError(
            f"{corpus_file} gives no token to evaluate in its first {len(sequences)} sequence(s) "
            f"(all special or among the first {exclude_first}); raise eval.max_tokens or corpus.eval_tokens"
        )
    log.info("evaluating %d SAE(s) on %d eval sequences (%d tokens, %d rows)", len(subjects), len(sequences), sequences.numel(), int(rows.sum()))
    result = evaluate_saes(
        model, sequences, rows, site, layer, {name: sae for name, (_, sae) in subjects.items()}, cfg.batch_size, cfg.dense_threshold, max_norm_ratio
    )
    bench: dict[str, dict] = {}
    if cfg.saebench:
        x, token_ids = saebench_rows(layout.activations, site, layer, cfg.saebench_rows)
        # Token directions as the residual stream sees them: logit_v is proportional to <x, g * W_U_v>
        # for the final norm's gain g (see `token_journey.report.tokens.logit_effects`).
        w_u = model.get_output_embeddings().weight.detach().float().cpu() * final_norm_gain(model)
        # Not for transcoders: absorption compares decoder rows with a probe on the activation the latents
        # read, and a transcoder reads the MLP's input but writes its output.
        plain = {name: sae for name, (_, sae) in subjects.items() if not _is_transcoder(sae)}
        if len(plain) < len(subjects):
            log.info("SAEBench metrics skipped for the transcoders %s", sorted(set(subjects) - set(plain)))
        bench = saebench_metrics(plain, x, token_ids, loaded.tokenizer, w_u)
    saes = {}
    for name, entry in result.saes.items():
        folder, sae = subjects[name]
        saes[name] = {"architecture": sae.cfg.architecture, "width": int(sae.cfg.d_sae), "folder": str(folder), **entry, **bench.get(name, {})}
    document, speeds = split_timings({"model": manifest["name"], "site": site, "layer": layer, "saes": saes, "sweep": result.sweep})
    for name, speed in speeds["saes"].items():
        speed["train_tokens_per_s"] = _train_tokens_per_s(layout.timings, site, layer, name)
    write_json(pareto_file(layout.metrics, site, layer), pareto_rows(document["saes"], layer))
    write_json(metrics_file(layout.metrics, site, layer), document)
    write_json(eval_timing_file(layout.timings, site, layer), speeds)
    return document, speeds
