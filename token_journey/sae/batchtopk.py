"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the k * batch largest ReLU pre-activations across the whole batch, so busy tokens
get more latents and easy ones fewer. A running estimate of the smallest kept activation becomes
a global threshold, so at inference the SAE encodes each token on its own like a JumpReLU (and is
saved with that threshold). The cut drifts while the weights learn, so the loop weights batches
as `threshold_weight_at` says: a fast running mean early on, and a plain mean over the final
quarter of training, when the weights have nearly settled.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from token_journey.distributed import current_processes
from token_journey.sae.base import SAE, StepContext, StepOutput
from token_journey.sae.sparse import Active
from token_journey.sae.topk import TopKSAE


def kth_largest(values: torch.Tensor, k: int, sample_size: int = 1 << 18) -> torch.Tensor:
    """The k-th largest element of `values` (any shape), exactly, as a 0-d tensor.

    A full top-k over a [4096, 4608] batch costs twice the encoder matmul on CPU. Instead: read an
    evenly strided sample, take a value from it that (with a generous margin) fewer than k
    elements exceed, keep the elements at or above it (a few more than k), and top-k those. The
    answer is exact whenever at least k elements pass; otherwise it falls back to the full top-k.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and {n}")
    stride = max(1, n // sample_size)
    while math.gcd(stride, values.shape[-1]) != 1:  # a stride sharing a factor with the rows skips columns
        stride += 1
    sample = flat[::stride]
    expected = k * sample.numel() / n
    rank = int(1.25 * expected + 4 * math.sqrt(expected) + 16)
    if rank < sample.numel():
        bound = sample.topk(rank, sorted=False).values.min()
        candidates = flat[flat >= bound]
        if candidates.numel() >= k:
            return candidates.topk(k, sorted=False).values.min()
    return flat.topk(k, sorted=False).values.min()


def batch_cut(pre: torch.Tensor, k: float) -> torch.Tensor:
    """The (k x global batch)-th largest pre-activation of the whole global batch, on every process.

    k may be fractional (a JumpReLU's target L0, in its warm start): the rank is rounded to a whole element.

    Alone, that is `kth_largest` of this batch. Under data parallelism each process holds an equal
    slice, and the global top set lies inside the union of every process's own top
    `k x global batch` elements, so each process sends those candidates (a few times k floats per
    token, far less than its [rows, d_sae] pre-activations) and all take the same exact cut.
    """
    processes = current_processes()
    total = max(1, round(k * pre.shape[0] * processes.count))
    if processes.count == 1:
        return kth_largest(pre, total)
    flat = pre.reshape(-1)
    candidates = flat[flat >= kth_largest(flat, min(total, flat.numel()))]
    sizes = [torch.zeros(1, dtype=torch.long, device=pre.device) for _ in range(processes.count)]
    dist.all_gather(sizes, torch.tensor([candidates.numel()], device=pre.device))
    longest = int(max(int(n) for n in sizes))
    padded = torch.full((longest,), -math.inf, dtype=pre.dtype, device=pre.device)
    padded[: candidates.numel()] = candidates
    gathered = [torch.empty_like(padded) for _ in range(processes.count)]
    dist.all_gather(gathered, padded)
    return kth_largest(torch.cat(gathered), total)


def global_min(value: torch.Tensor) -> torch.Tensor:
    """The smallest of every process's 0-d `value` (the value itself for one process)."""
    if current_processes().count == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


class BatchTopKSAE(SAE):
    """k latents per token on average over a batch; a fixed threshold at inference."""

    architecture = "batchtopk"
    apply_b_dec_to_input = True
    has_threshold = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x).relu()
        return pre * (pre > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        x_in, pre = self._sparse_pre(x)
        active, values = self._batch_active(pre, ctx)
        f = self._attach(x_in, values, active).relu()
        errors = self._errors(x, f, active)
        total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
        mses = errors.pow(2).sum(-1).mean(-1)
        aux = TopKSAE._auxk(self, x_in, pre, errors[-1].detach(), ctx)  # type: ignore[arg-type]
        loss = mses.mean() / total_var + ctx.extra.get("auxk_alpha", 1 / 32) * aux
        n = x.shape[0]
        return StepOutput(loss, mses[-1].detach(), aux.detach(), float((f > 0).sum()) / n, self._fired(f.detach(), active))

    @torch.no_grad()
    def _batch_active(self, pre: torch.Tensor, ctx: StepContext) -> tuple[Active, torch.Tensor]:
        """The latents active in this batch and their pre-activations [nnz]; moves the inference threshold.

        The exact batch-level cut: the (k x rows)-th largest pre-activation of the whole (global) batch.
        """
        cut = batch_cut(pre, self.cfg.k)
        active = Active.from_mask(pre >= cut.clamp_min(torch.finfo(pre.dtype).tiny))
        values = pre[active.rows, active.cols]
        self._update_threshold(values, ctx.threshold_weight)
        return active, values

    def _errors(self, x: torch.Tensor, f: torch.Tensor, active: Active) -> torch.Tensor:
        """Errors x_hat - x [reconstructions, N, d_in] of the reconstructions the loss averages (FVU each).

        BatchTopK has one, the whole SAE's; Matryoshka has one per nested prefix, the last using every latent.
        """
        return (self._reconstruct(f, active) - x).unsqueeze(0)

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor, weight: float) -> None:
        """Move the shared threshold towards the global batch's smallest kept activation by `weight`.

        Every process takes the minimum over all processes, so their thresholds stay identical.
        """
        positive = kept[kept > 0]
        smallest = global_min(positive.min() if positive.numel() else kept.new_tensor(math.inf))
        if not math.isfinite(float(smallest)):
            return
        current = self.threshold[0]
        new = smallest if float(current) <= 0 else (1 - weight) * current + weight * smallest
        self.threshold.fill_(float(new))
