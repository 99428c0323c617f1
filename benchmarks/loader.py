"""Loader throughput against the rate SAE training consumes activations.

Loader: `ShuffledLoader` over synthetic float32 shards of d_model 576 written by `ShardWriter`
(the harvest's own writer), more rows than the buffer so windows are reloaded during the run.
Training: a plain dense ReLU SAE step (encode, ReLU, decode, MSE + L1, backward, Adam) and,
when `token_journey.sae` is present, its JumpReLU `training_step`; both at d_in 576, width
4608, batch 4096. The bar is taken against the faster of the two.
Bar: loader tokens/s >= 20 x training tokens/s.

    python benchmarks/loader.py
Prints figures, then ONE JSON object on the last line.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from token_journey.data.loader import ShuffledLoader
from token_journey.data.shards import ShardWriter, open_activations, write_manifest
from token_journey.layout import activations_folder

D_IN, WIDTH, BATCH = 576, 4608, 4096
SHARDS, ROWS_PER_SHARD, BUFFER = 8, 16384, 65536


def write_shards(root: Path) -> None:
    folder = activations_folder(root, "resid_post", 0)
    writer = ShardWriter(folder, D_IN, "float32", run_key="bench", row_group_rows=4096)
    gen = torch.Generator().manual_seed(0)
    for shard in range(SHARDS):
        ids = torch.arange(ROWS_PER_SHARD)
        writer.add(torch.randn(ROWS_PER_SHARD, D_IN, generator=gen), ids, ids // 128, ids % 128, {})
        writer.finish(shard)
    write_manifest(folder, SHARDS, {"site": "resid_post", "layer": 0, "d_model": D_IN, "dtype": "float32"})


def loader_rate(root: Path, n_batches: int = 64) -> float:
    """Tokens/s delivered by the loader, counting the window loads it does along the way."""
    batches = ShuffledLoader(open_activations(root, "resid_post", 0), BATCH, seed=0, buffer_rows=BUFFER).batches()
    next(batches)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * BATCH / (time.perf_counter() - start)


def _dense_step() -> tuple[Callable[[], None], str]:
    gen = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(D_IN, WIDTH, generator=gen) / D_IN**0.5).requires_grad_()
    W_dec = (torch.randn(WIDTH, D_IN, generator=gen) / WIDTH**0.5).requires_grad_()
    b_enc, b_dec = torch.zeros(WIDTH, requires_grad=True), torch.zeros(D_IN, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    x = torch.randn(BATCH, D_IN, generator=gen)

    def step() -> None:
        f = torch.relu((x - b_dec) @ W_enc + b_enc)  # [batch, width]
        x_hat = f @ W_dec + b_dec  # [batch, d_in]
        loss = (x_hat - x).pow(2).sum(-1).mean() + 1e-3 * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, "plain dense ReLU SAE step (encode, relu, decode, backward, adam)"


def _project_step() -> tuple[Callable[[], None], str] | None:
    """The project's own JumpReLU training step, when token_journey.sae is present."""
    try:
        from token_journey.sae.base import SAESpec, StepContext
        from token_journey.sae.registry import build_sae
    except ImportError:
        return None
    sae = build_sae(SAESpec(architecture="jumprelu", d_in=D_IN, d_sae=WIDTH))
    sae.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        out = sae.training_step(x, StepContext(sparsity_coefficient=1e-3))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step, "token_journey.sae JumpReLU training_step + adam"


def training_rates(n_steps: int = 6) -> dict[str, float]:
    """Tokens/s of each available SAE training step at d_in 576, width 4608, batch 4096."""
    rates = {}
    for made in (_dense_step(), _project_step()):
        if made is None:
            continue
        step, how = made
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(n_steps):
            step()
        rates[how] = n_steps * BATCH / (time.perf_counter() - start)
    return rates


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp))
        load_tps = loader_rate(Path(tmp))
    rates = training_rates()
    how, train_tps = max(rates.items(), key=lambda kv: kv[1])  # the fastest consumer is the stricter bar
    ratio = load_tps / train_tps
    print(
        f"loader: {load_tps:,.0f} tokens/s = {load_tps / BATCH:,.1f} batches/s of {BATCH} x {D_IN} ({SHARDS} shards x {ROWS_PER_SHARD} rows, buffer {BUFFER})"
    )
    for name, rate in rates.items():
        print(f"training ({name}, width {WIDTH}): {rate:,.0f} tokens/s = {rate / BATCH:,.2f} batches/s")
    print(f"ratio loader / fastest training = {ratio:.1f} (bar >= 20: {'PASS' if ratio >= 20 else 'FAIL'})")
    print(
        json.dumps(
            {
                "benchmark": "loader",
                "loader_tokens_per_s": load_tps,
                "training_tokens_per_s": rates,
                "batch": BATCH,
                "d_in": D_IN,
                "width": WIDTH,
                "ratio": ratio,
                "bar": 20,
                "pass": ratio >= 20,
            }
        )
    )


if __name__ == "__main__":
    main()
