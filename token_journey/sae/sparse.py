"""Training kernels that touch only the active latents of each token.

A dense SAE step costs five `[tokens, d_in] x [d_in, d_sae]` matmuls (encoder forward, decoder
forward, and three in the backward pass). Only the encoder forward has to be dense: once we know
which latents are active (TopK winners, JumpReLU latents above `threshold - bandwidth/2`, ...),
the decoder and every gradient are sums over the `nnz` active (token, latent) pairs. These
autograd Functions do exactly that with `embedding_bag` (gather-and-sum) and `sampled_addmm`
(a dot product per active pair), so the step costs one dense matmul plus O(nnz * d_in).

When the active set is large (a JumpReLU early in training fires half its latents), the same
Functions switch to dense matmuls, which are faster there; results are identical either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

DENSE_ABOVE = {"cpu": 0.2, "cuda": 0.05, "mps": 0.05}
"""Per device kind: above this fraction of active (token, latent) pairs, dense matmuls beat gather/scatter.

cpu: measured on a 2-core CPU, JumpReLU step at batch 4096, width 4608: sparse/dense 374/751 ms at 7.6%
active, 739/1006 ms at 17%, 1117/958 ms at 26%.
cuda, mps: NOT measured yet (no GPU was available). 0.05 assumes tensor-core matmuls are far faster
relative to memory-bound gathers than on a CPU; `benchmarks/gpu_smoke.py` times both paths at several
fractions on the first GPU run, and that figure should replace this one. Both paths give the same result.
"""


def count(ids: torch.Tensor, size: int) -> torch.Tensor:
    """[size] occurrences of each id in `ids` [n]; `torch.bincount` is ~100x slower on CPU (min/max passes)."""
    return torch.zeros(size, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


@dataclass
class Active:
    """The active (token, latent) pairs of one batch, in row-major order.

    `rows`, `cols`: [nnz] token index and latent index of each pair, sorted by row.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    n_tokens: int
    d_sae: int
    offsets: torch.Tensor | None = None  # [tokens] start of each token's pairs, when known up front

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Active:
        """Pairs where `mask` [tokens, d_sae] is true (one flat nonzero, no per-dimension pass)."""
        flat = mask.reshape(-1).nonzero().squeeze(1)
        d_sae = mask.shape[1]
        return cls(torch.div(flat, d_sae, rounding_mode="floor"), flat.remainder(d_sae), mask.shape[0], d_sae)

    @classmethod
    def from_topk(cls, indices: torch.Tensor, d_sae: int) -> Active:
        """Pairs from per-token indices [tokens, k] (k pairs per token, so the offsets are a range)."""
        n, k = indices.shape
        rows = torch.arange(n, device=indices.device).unsqueeze(1).expand(n, k).reshape(-1)
        offsets = torch.arange(0, n * k, k, device=indices.device)
        return cls(rows, indices.reshape(-1), n, d_sae, offsets)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @property
    def dense(self) -> bool:
        """Whether dense matmuls are the faster way to handle this many pairs."""
        return self.nnz > DENSE_ABOVE.get(self.cols.device.type, DENSE_ABOVE["cuda"]) * self.n_tokens * self.d_sae

    @cached_property
    def row_offsets(self) -> torch.Tensor:
        """[tokens] start of each token's pairs (the `offsets` of `embedding_bag`)."""
        if self.offsets is not None:
            return self.offsets
        counts = count(self.rows, self.n_tokens)
        return torch.cumsum(counts, 0) - counts

    @cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm [nnz], rows in latent order [nnz], latent offsets [d_sae]) for the transposed products.

        One stable sort of the [nnz] latent ids, computed once per batch and shared by both weight
        gradients. On CPU numpy's radix sort of 16-bit keys is ~40x faster than `torch.sort` here.
        """
        if self.cols.is_cpu and self.d_sae <= 2**15:
            keys = self.cols.numpy().astype(np.int16)
            perm = torch.from_numpy(np.argsort(keys, kind="stable")).to(self.cols.dtype)
        else:
            perm = torch.sort(self.cols, stable=True).indices
        counts = count(self.cols, self.d_sae)
        return perm, self.rows[perm], torch.cumsum(counts, 0) - counts

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Dense [tokens, d_sae] matrix with `values` [nnz] at the pairs."""
        out = values.new_zeros(self.n_tokens, self.d_sae)
        out[self.rows, self.cols] = values
        return out

    def transposed_sum(self, values: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
        """`S^T @ dense_rows` -> [d_sae, d] where S [tokens, d_sae] holds `values` at the pairs."""
        if self.dense:
            return self.scatter(values).t() @ dense_rows
        perm, rows, offsets = self.by_latent
        return F.embedding_bag(rows, dense_rows, offsets, mode="sum", per_sample_weights=values[perm])

    def row_sum(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`S @ table` -> [tokens, d] where `table` is [d_sae, d]."""
        if self.dense:
            return self.scatter(values) @ table
        return F.embedding_bag(self.cols, table, self.row_offsets, mode="sum", per_sample_weights=values)

    def pair_dots(self, left: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[nnz] dot products `left[row] . table[col]` (`left` [tokens, d], `table` [d_sae, d])."""
        if self.dense:
            return (left @ table.t())[self.rows, self.cols]
        crow = torch.cat([self.row_offsets, self.row_offsets.new_tensor([self.nnz])])
        with warnings.catch_warnings():  # "CSR support is in beta": the op used here is tested
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, self.cols, left.new_zeros(self.nnz), (self.n_tokens, self.d_sae), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, left, table.t()).values()


class _EncodeAt(torch.autograd.Function):
    """Pre-activations at the active pairs, with gradients that touch only those pairs.

    forward(x [tokens, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in] or None, values [nnz],
    active) -> values, for the encoder input `x - b_dec` (or `x` without b_dec). The values were
    computed by the (dense, no-grad) encoder matmul; this attaches the graph. The gradient to b_dec
    only needs the sum over tokens of the input gradient, which is `-W_enc @ grad_b_enc` ([d_in]),
    so no [tokens, d_in] input gradient is formed unless x itself needs one.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, values, active):  # type: ignore[override]
        ctx.active = active
        x_in = x if b_dec is None else x - b_dec
        ctx.save_for_backward(x_in, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_in, W_enc = ctx.saved_tensors
        active: Active = ctx.active
        grad_x = grad_w = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = active.row_sum(grad, W_enc.t())
        if ctx.needs_input_grad[1]:
            grad_w = active.transposed_sum(grad, x_in).t()  # [d_in, d_sae], same strides as W_enc
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b = grad.new_zeros(active.d_sae).index_add_(0, active.cols, grad)
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(W_enc @ grad_b)
        return grad_x, grad_w, grad_b, grad_b_dec, None, None


class _DecodeAt(torch.autograd.Function):
    """`sum_pairs f[pair] * W_dec[col]` per token -> [tokens, d_in], sparse in both directions."""

    @staticmethod
    def forward(ctx, f, W_dec, active):  # type: ignore[override]
        ctx.active = active
        ctx.save_for_backward(f, W_dec)
        return active.row_sum(f, W_dec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        f, W_dec = ctx.saved_tensors
        active: Active = ctx.active
        grad = grad.contiguous()
        grad_f = active.pair_dots(grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_w = active.transposed_sum(f, grad) if ctx.needs_input_grad[1] else None
        return grad_f, grad_w, None


def encode_at(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, values: torch.Tensor, active: Active, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable pre-activations [nnz] at `active` of the encoder input `x - b_dec` (or `x`).

    `values` come from a no-grad dense matmul; `x` [tokens, d_in] is the raw batch.
    """
    return _EncodeAt.apply(x, W_enc, b_enc, b_dec, values, active)


def decode_at(f: torch.Tensor, W_dec: torch.Tensor, active: Active) -> torch.Tensor:
    """Differentiable reconstruction without bias [tokens, d_in] from latent values [nnz] at `active`."""
    return _DecodeAt.apply(f, W_dec, active)
