"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

The latents are ordered, and each nested prefix of them (the first m_1 < m_2 < ... < d_sae)
must reconstruct the input on its own, with the decoder bias: the loss is the mean of the
prefixes' FVUs, plus BatchTopK's AuxK term. Early latents then carry the broad, frequent
directions a small dictionary would learn, and later ones refine them, instead of the general
latents being split ("absorbed") into many specific ones as width grows; any prefix is a usable
smaller SAE. Which latents are active is BatchTopK's global batch cut (shared, not reimplemented),
and inference uses the same learned global threshold, so the SAE is saved exactly like BatchTopK
(a SAELens JumpReLU folder) and only our cfg.json block records the prefixes.
"""

from __future__ import annotations

import torch

from token_journey.sae.batchtopk import BatchTopKSAE
from token_journey.sae.sparse import Active, decode_at


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose nested latent prefixes (`cfg.prefixes`, in latents) each reconstruct x."""

    architecture = "matryoshka"

    def _errors(self, x: torch.Tensor, f: torch.Tensor, active: Active) -> torch.Tensor:
        """x_hat_m - x [prefixes, N, d_in] for each prefix m, where x_hat_m = b_dec + the decoded active latents < m.

        One sparse decode serves every prefix: the pair (token t, latent c) in band b (prefixes[b-1] <= c <
        prefixes[b]) is placed in row b * N + t of a virtual batch of prefixes x N rows, so decoding it
        gives each band's contribution per token, and their running sums over the bands are the prefix
        reconstructions. The cost is BatchTopK's decode plus a few [prefixes, N, d_in] passes.
        """
        n, bands = x.shape[0], len(self.cfg.prefixes)
        ends = torch.tensor(self.cfg.prefixes[:-1], device=active.cols.device, dtype=active.cols.dtype)
        band = torch.bucketize(active.cols, ends, right=True)
        band, order = torch.sort(band, stable=True)  # by band, then by token as `Active` requires
        virtual = Active(band * n + active.rows[order], active.cols[order], bands * n, active.d_sae)
        parts = decode_at(f.index_select(0, order), self.W_dec, virtual).view(bands, n, -1)
        return (self.b_dec - x) + parts.cumsum(0)
