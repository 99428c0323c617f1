"""Metrics beyond reconstruction, after SAEBench (Karvonen et al. 2025), that need no LLM judge.

FVU and delta loss say how much an SAE keeps, not whether its latents are usable features. These
three families, each defined once below with its formula, run offline on harvested eval rows:

- *feature absorption* (Chanin et al. 2024, "A is for Absorption", as SAEBench runs it): a
  first-letter task over the vocabulary's word tokens (one row per token id met in the eval
  rows, labelled by the token's first letter); a linear probe on the raw activations
  finds the "starts with L" direction, k-sparse probing on the latents finds the letter's main
  latents, and a token is *absorbed* when the main latents stay silent while another latent,
  aligned with the probe direction, carries the letter instead;
- *sparse probing* (Gurnee et al. 2023, SAEBench): k-sparse probes (latents chosen by the
  difference of class means, then logistic regression) against a probe on the raw activations, on
  token-level tasks (digit, capitalised, Python keyword, leading space), held-out accuracy;
- *decoder geometry*: each decoder row's largest cosine with another row (duplicated features)
  and with a row of the unembedding (token features).

Where this differs from SAEBench, to stay offline and within seconds: the first-letter rows are the
tokens where they occur in our corpus, not in SAEBench's in-context-learning prompts; one 26-way
probe replaces per-letter probes; main latents are ranked by the difference of class means (the
selection SAEBench's sparse probing uses); and only full absorption by one latent is counted.

Notation: `x` [N, d_in] raw activations of N rows, `f` [N, d_sae] their latents (>= 0, exactly 0
when off), `W_dec` [d_sae, d_in] decoder rows, `W_U` [vocab, d_in] the unembedding as the residual
stream sees it (the evaluate stage scales its rows by the final norm's gain), `texts[n]` the
decoded text of row n's token. Probes are multinomial logistic regressions fitted by L-BFGS
in float64 from zero (deterministic), at most `PROBE_ITERS` iterations, on standardised inputs.
"""

from __future__ import annotations

import keyword
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PROBE_ITERS = 100
"""L-BFGS iteration cap of every probe fit (keeps the metrics within seconds on a CPU)."""
GRAD_TOL = 1e-5
"""A probe fit stops once its largest gradient entry is below this..."""
LOSS_TOL = 1e-8
"""...or once a step lowers the objective by less than this fraction of it."""
PROBE_L2 = 1e-3
"""L2 penalty on probe weights (standardised inputs), so separable tasks still have a bounded fit."""
PROBE_KS = (1, 2, 5)
"""Latent counts of the k-sparse probes (SAEBench reports k = 1, 2, 5)."""
ROWS_PER_CLASS = 1000
"""At most this many rows of each class in a probing task (balanced), so a fit sees <= 2,000 rows."""
MIN_PER_CLASS = 10
"""A task with fewer rows of either class is skipped (its accuracies would be noise)."""
TEST_FRACTION = 0.2
"""Held-out share of each probing task's rows."""
SPLIT_F1_GAIN = 0.03
"""Absorption: adding the (k+1)-th latent must raise the sparse probe's F1 by more than this for the
letter to count as split over more latents (SAEBench's tau_fs)."""
ABSORPTION_COS = 0.025
"""Absorption: a latent whose decoder row has at least this cosine with the letter's probe
direction can absorb the letter (SAEBench's threshold)."""
ABSORPTION_SHARE = 0.4
"""Absorption: the absorbing latent must carry at least this share of the SAE's positive
projection onto the probe direction on that token (SAEBench's probe-projection proportion)."""
MIN_LETTER_TOKENS = 5
"""A letter enters the absorption averages only with at least this many held-out tokens the raw probe gets right."""
MAX_SPLIT_K = 5
"""Largest number of main latents a letter is searched for."""
DUPLICATE_COS = 0.9
"""Two decoder rows closer than this cosine count as a duplicated feature."""
TOKEN_COS = 0.5
"""A decoder row with cosine above this to some unembedding row counts as a token feature."""


@dataclass(frozen=True)
class Probe:
    """A fitted multinomial logistic regression: logits = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    weight: torch.Tensor  # [d, classes]
    bias: torch.Tensor  # [classes]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, classes] (float64)."""
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class of each row, [N] int64."""
        return self.logits(x).argmax(-1)

    def direction(self, c: int) -> torch.Tensor:
        """Class c's weight vector in the raw input space, weight[:, c] / std ([d]).

        With the L2 penalty the fitted weights sum to zero over classes, so this is the direction
        that raises class c against the others.
        """
        return self.weight[:, c] / self.std


def _loss_and_grad(params: torch.Tensor, z1: torch.Tensor, onehot: torch.Tensor, l2: float) -> tuple[float, torch.Tensor]:
    """The probe objective and its gradient, in closed form: for logits z1 @ params with the bias as the
    last row, d/dparams mean CE = z1^T (softmax - onehot) / N, plus 2 l2 W for the weights."""
    log_p = torch.log_softmax(z1 @ params, dim=-1)
    loss = -(onehot * log_p).sum() / len(z1) + l2 * params[:-1].pow(2).sum()
    grad = z1.T @ (log_p.exp() - onehot) / len(z1)
    grad[:-1] += 2 * l2 * params[:-1]
    return float(loss), grad


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = PROBE_L2, max_iter: int = PROBE_ITERS, history: int = 10) -> Probe:
    """Minimise mean_n CE(softmax(z_n W + b), y_n) + l2 ||W||^2 over W, b, with z = (x - mean(x)) / std(x).

    `x` [N, d], `y` [N] int64 in [0, n_classes). L-BFGS (two-loop recursion over the last `history`
    steps, backtracking Armijo line search) from zero in float64, at most `max_iter` iterations,
    stopping at `GRAD_TOL` or `LOSS_TOL`: the same inputs always give the same probe.
    Written out rather than taken from torch.optim, whose first use imports torch._dynamo
    (about 15 s on a small CPU).
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z1 = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    onehot = F.one_hot(y, n_classes).double()
    params = torch.zeros(z1.shape[1], n_classes, dtype=torch.float64)
    loss, grad = _loss_and_grad(params, z1, onehot, l2)
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, g change, 1 / <s, g change>)
    for _ in range(max_iter):
        if grad.abs().max() < GRAD_TOL:
            break
        q = grad.clone()
        alphas = []
        for s, dg, rho in reversed(steps):
            alphas.append(rho * float((s * q).sum()))
            q -= alphas[-1] * dg
        if steps:
            s, dg, _ = steps[-1]
            q *= float((s * dg).sum() / (dg * dg).sum())
        else:
            q /= float(grad.norm())
        for (s, dg, rho), alpha in zip(steps, reversed(alphas)):
            q += (alpha - rho * float((dg * q).sum())) * s
        direction, slope, t = -q, -float((grad * q).sum()), 1.0
        while True:
            new_params = params + t * direction
            new_loss, new_grad = _loss_and_grad(new_params, z1, onehot, l2)
            if new_loss <= loss + 1e-4 * t * slope or t < 1e-10:
                break
            t /= 2
        s, dg = new_params - params, new_grad - grad
        curvature = float((s * dg).sum())
        if curvature > 1e-12:
            steps = [*steps[-(history - 1) :], (s, dg, 1 / curvature)]
        converged = loss - new_loss <= LOSS_TOL * max(abs(loss), 1.0)
        params, loss, grad = new_params, new_loss, new_grad
        if converged:
            break
    return Probe(mean, std, params[:-1], params[-1])


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose prediction equals the label, (1/N) sum_n [pred_n = y_n]."""
    return (pred == y).double().mean().item()


def f1_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Binary F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    tp = int(((pred == 1) & (y == 1)).sum())
    wrong = int((pred != y).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def top_latents(f: torch.Tensor, y: torch.Tensor, k: int, signed: bool = False) -> torch.Tensor:
    """The k latents with the largest difference of class means, d_j = mean_{y=1} f_j - mean_{y=0} f_j.

    SAEBench's selection for k-sparse probes ranks |d_j|; `signed` ranks d_j itself (latents that fire
    *for* the class, as the absorption metric's main latents must). Ties keep the lower index. -> [k] int64
    """
    diff = f[y == 1].double().mean(0) - f[y == 0].double().mean(0)
    score = diff if signed else diff.abs()
    return torch.argsort(score, descending=True, stable=True)[:k]


def balanced_split(
    y: torch.Tensor, generator: torch.Generator, per_class: int = ROWS_PER_CLASS, test_fraction: float = TEST_FRACTION
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train, test) row indices of a binary task: n = min(#pos, #neg, per_class) rows of each class
    drawn at random, shuffled, the last `test_fraction` held out. None when n < MIN_PER_CLASS."""
    pos, neg = y.nonzero()[:, 0], (y == 0).nonzero()[:, 0]
    n = min(len(pos), len(neg), per_class)
    if n < MIN_PER_CLASS:
        return None
    picked = torch.cat([pos[torch.randperm(len(pos), generator=generator)[:n]], neg[torch.randperm(len(neg), generator=generator)[:n]]])
    picked = picked[torch.randperm(len(picked), generator=generator)]
    n_test = max(2, round(len(picked) * test_fraction))
    return picked[:-n_test], picked[-n_test:]


# --- labelled tasks from token texts -------------------------------------------------------------


def _bare(text: str) -> str:
    """A token's text without the one leading space byte-level BPE folds into word tokens."""
    return text[1:] if text.startswith(" ") else text


TOKEN_TASKS = {
    "digit": lambda t: t.strip() != "" and all(c in string.digits for c in t.strip()),
    "capitalised": lambda t: _bare(t)[:1] in string.ascii_uppercase and _bare(t)[:1] != "",
    "python_keyword": lambda t: t.strip() in keyword.kwlist,
    "leading_space": lambda t: t.startswith(" "),
}
"""Binary token-level properties probed by sparse probing: name -> predicate on the token's text."""


def token_labels(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each `TOKEN_TASKS` property of each row's token text: name -> [N] int64 (1 = has it)."""
    return {name: torch.tensor([int(rule(t)) for t in texts], dtype=torch.int64) for name, rule in TOKEN_TASKS.items()}


def first_letters(texts: Sequence[str]) -> torch.Tensor:
    """The first-letter task's label of each token: 0..25 for a word token (its text, less one leading
    space, is ASCII letters only) by its lower-cased first letter, -1 for every other token. [N] int64."""
    out = []
    for t in texts:
        word = _bare(t)
        out.append(string.ascii_lowercase.index(word[0].lower()) if word.isascii() and word.isalpha() else -1)
    return torch.tensor(out, dtype=torch.int64)


def first_occurrences(token_ids: torch.Tensor) -> torch.Tensor:
    """Indices of the first row of each distinct token id, in row order: one row per vocabulary
    entry, as the vocabulary-built first-letter task has. [U] int64."""
    seen: set[int] = set()
    keep = []
    for n, t in enumerate(token_ids.tolist()):
        if t not in seen:
            seen.add(t)
            keep.append(n)
    return torch.tensor(keep, dtype=torch.int64)


# --- sparse probing ------------------------------------------------------------------------------


def task_splits(labels: dict[str, torch.Tensor], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """`balanced_split` of every task in `labels` (name -> [N] 0/1), in order, from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return {name: balanced_split(y, generator) for name, y in labels.items()}


def raw_probe_accuracy(x: torch.Tensor, y: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Held-out accuracy of a probe on all of `x` for the binary task `y` split as `split` (train, test)."""
    train, test = split
    return accuracy(fit_probe(x[train], y[train], 2).predict(x[test]), y[test])


def sparse_probe_accuracies(
    x: torch.Tensor,
    f: torch.Tensor,
    y: torch.Tensor,
    split: tuple[torch.Tensor, torch.Tensor] | None,
    ks: Sequence[int] = PROBE_KS,
    llm: float | None = None,
) -> dict[str, float] | None:
    """Held-out accuracy of a probe on all of `x` ("llm") and of k-sparse probes on `f` ("sae_top_<k>").

    The task's rows are balanced and split by `balanced_split` (`split`; None when too few); the k latents are
    `top_latents` of the training rows, then a logistic regression on just those k. A k-sparse probe
    near the raw probe means k latents already hold what the model linearly represents. `llm`: the raw
    probe's accuracy when already known (it does not depend on the SAE), else it is fitted here.
    """
    if split is None:
        return None
    train, test = split
    out = {"llm": raw_probe_accuracy(x, y, split) if llm is None else llm}
    for k in ks:
        chosen = top_latents(f[train], y[train], k)
        probe = fit_probe(f[train][:, chosen], y[train], 2)
        out[f"sae_top_{k}"] = accuracy(probe.predict(f[test][:, chosen]), y[test])
    out["rows"] = len(train) + len(test)
    return out


def sparse_probing(
    x: torch.Tensor, f: torch.Tensor, labels: dict[str, torch.Tensor], seed: int = 0, ks: Sequence[int] = PROBE_KS, raw: RawProbes | None = None
) -> dict[str, Any]:
    """`sparse_probe_accuracies` of every task in `labels` (name -> [N] 0/1) and their means over the tasks run.

    `raw`: the splits and raw-probe accuracies of these rows and labels, when already fitted (`raw_probes`).
    Returns {"tasks": {name: accuracies or None}, "llm": mean, "sae_top_<k>": mean, ...} (means None when no task ran).
    """
    splits = task_splits(labels, seed) if raw is None else raw.splits
    tasks = {name: sparse_probe_accuracies(x, f, y, splits[name], ks, None if raw is None else raw.llm[name]) for name, y in labels.items()}
    done = [t for t in tasks.values() if t is not None]
    keys = ["llm", *(f"sae_top_{k}" for k in ks)]
    return {"tasks": tasks, **{key: sum(t[key] for t in done) / len(done) if done else None for key in keys}}


# --- feature absorption --------------------------------------------------------------------------


def main_latents(f: torch.Tensor, y: torch.Tensor, max_k: int = MAX_SPLIT_K, gain: float = SPLIT_F1_GAIN) -> tuple[torch.Tensor, list[float]]:
    """The latents that carry a binary feature, by SAEBench's feature-split search.

    For k = 1, 2, ...: the k `top_latents` (signed) and the F1 F_k of a logistic regression on
    them (fitted and scored on these rows). Stop at the first k with F_{k+1} - F_k <= `gain`; those
    k latents are the main latents (k > 1: the feature is split). Returns (latents [k], [F_1, ...]).
    """
    ranked = top_latents(f, y, max_k, signed=True)  # the k best are its first k
    f1s: list[float] = []
    for k in range(1, max_k + 1):
        chosen = f[:, ranked[:k]]
        f1s.append(f1_score(fit_probe(chosen, y, 2).predict(chosen), y))
        if k > 1 and f1s[-1] - f1s[-2] <= gain:
            return ranked[: k - 1], f1s
    return ranked, f1s


def absorbed(
    f: torch.Tensor, w_dec: torch.Tensor, direction: torch.Tensor, main: torch.Tensor, cos_threshold: float = ABSORPTION_COS, share: float = ABSORPTION_SHARE
) -> torch.Tensor:
    """Which rows have their feature absorbed: [N] bool.

    With p = direction / ||direction||, c_j = <W_dec_j, p> / ||W_dec_j|| and a_nj = f_nj <W_dec_j, p>
    (latent j's contribution along p), and j* = argmax_{j not main} a_nj the non-main latent that
    contributes most along p, row n is absorbed iff
      (1) every main latent is off, f_nm = 0 for m in `main`,
      (2) j* is aligned with the probe, c_j* >= cos_threshold, and
      (3) j* carries a_nj* > 0 and a_nj* >= share * sum_j max(a_nj, 0) of the positive contributions.
    """
    p = direction.double() / direction.double().norm()
    w_dec = w_dec.double()
    along = w_dec @ p  # [d_sae]
    cos = along / w_dec.norm(dim=1).clamp_min(1e-12)
    contrib = f.double() * along  # [N, d_sae]
    total = contrib.clamp_min(0).sum(1)
    contrib[:, main] = -torch.inf
    top, j = contrib.max(1)
    main_off = (f[:, main] == 0).all(1)
    return main_off & (cos[j] >= cos_threshold) & (top > 0) & (top >= share * total)


def letter_probe(x: torch.Tensor, letters: torch.Tensor, seed: int = 0) -> Probe:
    """The 26-way first-letter probe on the raw activations of the training word rows (`word_split`)."""
    train, _ = word_split(letters, seed)
    return fit_probe(x[train], letters[train], 26)


def word_split(letters: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of the word rows (`letters` >= 0): a seeded shuffle, the first
    `TEST_FRACTION` held out."""
    words = (letters >= 0).nonzero()[:, 0]
    words = words[torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))]
    n_test = round(len(words) * TEST_FRACTION)
    return words[n_test:], words[:n_test]


def absorption(
    x: torch.Tensor,
    f: torch.Tensor,
    letters: torch.Tensor,
    w_dec: torch.Tensor,
    seed: int = 0,
    min_tokens: int = MIN_LETTER_TOKENS,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """Feature absorption on the first-letter task (rows with `letters` >= 0, one per vocabulary token).

    1. Split the word rows (`word_split`) and fit one 26-way probe on the raw activations `x`.
    2. Per letter L: main latents M_L = `main_latents` on the training rows (L against the rest);
       split iff |M_L| > 1.
    3. T_L = held-out rows of letter L the raw probe classifies as L (the model has the feature);
       absorption rate r_L = #{n in T_L : `absorbed`(n)} / |T_L|.
    Letters with |T_L| < `min_tokens` are left out. Returns {"absorption_rate": mean_L r_L,
    "split_fraction": mean_L [|M_L| > 1], "letters": {L: {...}}, "probe_accuracy": held-out accuracy}.
    `probe`: step 1's probe when already fitted on these rows (`letter_probe`; it does not depend on the SAE).
    """
    train, test = word_split(letters, seed)
    result: dict[str, Any] = {"absorption_rate": None, "split_fraction": None, "letters": {}, "probe_accuracy": None, "word_tokens": len(train) + len(test)}
    if len(test) < min_tokens:
        return result
    probe = letter_probe(x, letters, seed) if probe is None else probe
    predicted = probe.predict(x[test])
    result["probe_accuracy"] = accuracy(predicted, letters[test])
    for c, letter in enumerate(string.ascii_lowercase):
        hits = test[(letters[test] == c) & (predicted == c)]
        y_train = (letters[train] == c).long()
        if len(hits) < min_tokens or int(y_train.sum()) == 0:
            continue
        main, f1s = main_latents(f[train], y_train)
        rate = absorbed(f[hits], w_dec, probe.direction(c), main).double().mean().item()
        result["letters"][letter] = {"absorption_rate": rate, "main_latents": main.tolist(), "f1": f1s, "tokens": len(hits)}
    done = result["letters"].values()
    if done:
        result["absorption_rate"] = sum(v["absorption_rate"] for v in done) / len(done)
        result["split_fraction"] = sum(len(v["main_latents"]) > 1 for v in done) / len(done)
    return result


# --- decoder geometry ----------------------------------------------------------------------------


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def max_cosine_to_others(w_dec: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """m_j = max_{i != j} cos(W_dec_i, W_dec_j) for every decoder row j: [d_sae] (a zero row has cosine 0)."""
    unit = _unit_rows(w_dec)
    out = torch.empty(len(unit))
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T  # [chunk, d_sae]
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -torch.inf
        out[start : start + chunk] = sims.max(1).values
    return out


def max_cosine_to(w_dec: torch.Tensor, w_u: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """t_j = max_v cos(W_dec_j, W_U_v): each decoder row's closest unembedding row. [d_sae]"""
    unit, tokens = _unit_rows(w_dec), _unit_rows(w_u)
    return torch.cat([(unit[start : start + chunk] @ tokens.T).max(1).values for start in range(0, len(unit), chunk)])


def decoder_geometry(
    w_dec: torch.Tensor, w_u: torch.Tensor | None = None, duplicate_cos: float = DUPLICATE_COS, token_cos: float = TOKEN_COS
) -> dict[str, float]:
    """Mean of m_j and #{j : m_j > duplicate_cos} / d_sae (duplicated features); with an unembedding,
    mean of t_j and #{j : t_j > token_cos} / d_sae (token features). See `max_cosine_to_others`, `max_cosine_to`."""
    m = max_cosine_to_others(w_dec)
    out = {"decoder_max_cos": m.double().mean().item(), "duplicate_fraction": (m > duplicate_cos).double().mean().item()}
    if w_u is not None:
        t = max_cosine_to(w_dec, w_u)
        out["token_max_cos"] = t.double().mean().item()
        out["token_feature_fraction"] = (t > token_cos).double().mean().item()
    return out


# --- all of the above for one SAE ----------------------------------------------------------------


@dataclass(frozen=True)
class RawProbes:
    """What the metrics need from the raw activations alone, shared by every SAE evaluated on the same rows.

    `labels`: the probing tasks (`token_labels`); `splits`: their `task_splits`; `llm`: each task's raw-probe
    accuracy (None where the task has too few rows); `unique`: the first-letter rows (`first_occurrences`),
    `letters` their labels; `letter_probe`: the first-letter probe (None with too few word rows).
    """

    labels: dict[str, torch.Tensor]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    llm: dict[str, float | None]
    unique: torch.Tensor
    letters: torch.Tensor
    letter_probe: Probe | None


@torch.no_grad()
def raw_probes(x: torch.Tensor, token_ids: torch.Tensor, texts: Sequence[str], seed: int = 0) -> RawProbes:
    """The `RawProbes` of rows `x` [N, d_in] with tokens `token_ids` [N] and texts `texts`: fit once per layer,
    passed to `sae_metrics` for each SAE (each fit is the one that SAE's metrics would otherwise repeat)."""
    x = x.float().cpu()
    labels = token_labels(texts)
    unique = first_occurrences(token_ids)
    letters = first_letters([texts[i] for i in unique.tolist()])
    with one_thread():
        splits = task_splits(labels, seed)
        llm = {name: None if split is None else raw_probe_accuracy(x, labels[name], split) for name, split in splits.items()}
        _, test = word_split(letters, seed)
        probe = letter_probe(x[unique], letters, seed) if len(test) >= MIN_LETTER_TOKENS else None
    return RawProbes(labels, splits, llm, unique, letters, probe)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the count. The probe fits are thousands of
    tiny ops, for which thread hand-offs cost more than they give: on a busy 2-core machine one
    thread made them 5x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sae_metrics(
    sae: Any,
    x: torch.Tensor,
    token_ids: torch.Tensor,
    texts: Sequence[str],
    w_u: torch.Tensor | None,
    seed: int = 0,
    chunk: int = 4096,
    raw: RawProbes | None = None,
) -> dict[str, Any]:
    """Absorption, sparse probing and decoder geometry of `sae` (with `encode` and `W_dec`) on rows
    `x` [N, d_in] whose tokens are `token_ids` [N] with texts `texts` [N]; `w_u` the model's unembedding.

    The first-letter task keeps one row per token id (`first_occurrences`); the probing tasks use
    every row. Returns flat headline numbers plus a "saebench" entry with the per-task and
    per-letter details. `raw`: `raw_probes(x, token_ids, texts, seed)` when already computed (several SAEs).
    """
    w_dec = sae.W_dec.detach()
    f = torch.cat([sae.encode(part.to(w_dec.device, w_dec.dtype)).float().cpu() for part in x.split(chunk)])
    x, w_dec = x.float().cpu(), w_dec.float().cpu()
    raw = raw_probes(x, token_ids, texts, seed) if raw is None else raw
    unique = raw.unique
    with one_thread():
        probing = sparse_probing(x, f, raw.labels, seed, raw=raw)
        letters = absorption(x[unique], f[unique], raw.letters, w_dec, seed, probe=raw.letter_probe)
    return {
        "absorption_rate": letters["absorption_rate"],
        "split_fraction": letters["split_fraction"],
        **{f"probe_{key}": probing[key] for key in ("llm", *(f"sae_top_{k}" for k in PROBE_KS))},
        **decoder_geometry(w_dec, None if w_u is None else w_u.float().cpu()),
        "saebench": {"rows": len(x), "probing": probing["tasks"], "first_letter": letters},
    }
