"""Other libraries' TopK trainers on the same activation rows, for `benchmarks/train_sae.py --peers`.

sparsify (EleutherAI, `pip install eai-sparsify`, the `peers` extra) trains by hooking a module of a
Hugging Face model while it iterates a token dataset. To run its own `Trainer.fit` unmodified (its
optimizer, learning-rate rule, k schedule, AuxK, decoder normalisation and bias init) on rows we
already hold, `ReplayModel` stands in for the language model: the "token ids" of each batch are row
indices, and its hooked submodule outputs the stored activations of those rows. The indices come
from the same shuffler as our training (`in_memory` over `arange(rows)`), so both trainers see the
same rows in the same order and batch sizes in tokens agree. Both SAEs are then scored with our
`sae_reconstruction` on the same held-out rows; sparsify's own FVU definition (per-batch variance) is
reported beside it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

from token_journey.eval.metrics import sae_reconstruction

PEERS = ("sparsify", "saelens")
SEQ_ROWS = 128
"""Rows per replayed "sequence": sparsify counts its batch size in sequences."""


def importable(peer: str) -> str | None:
    """None when `peer` can run here, else the one-line reason it is skipped."""
    module = {"sparsify": "sparsify", "saelens": "sae_lens"}[peer]
    try:
        __import__(module)
    except ImportError as err:
        hint = {
            "sparsify": "pip install --no-deps --target .peers eai-sparsify==1.3.3 einops natsort schedulefree "
            "simple-parsing docstring_parser, then PYTHONPATH=.peers:.",
            "saelens": "pip install sae-lens",
        }[peer]
        return f"{peer}: skipped, not importable ({err}); {hint}"
    if peer == "saelens":
        return "saelens: skipped, importable but its trainer is not wired into this benchmark yet"
    return None


class _Rows(nn.Module):
    """The hooked "layer": maps row indices [b, s] to the stored activations [b, s, d]."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows  # a plain attribute, not a buffer: the "model" has no parameters to count or freeze

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids]


class ReplayModel(nn.Module):
    """What sparsify's Trainer needs of a model (`base_model`, `device`, `dummy_inputs`, a forward on
    `input_ids`), with one submodule `layer` whose output is the stored rows named by the ids."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.layer = _Rows(rows)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    @property
    def base_model(self) -> ReplayModel:
        return self

    @property
    def device(self) -> torch.device:
        return self.layer.rows.device

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.layer(input_ids)


class _Sequences(torch.utils.data.Dataset):
    """Row-index "sequences" in training order: item j is {"input_ids": order[j]} ([SEQ_ROWS] indices)."""

    def __init__(self, order: torch.Tensor) -> None:
        self.order = order

    def __len__(self) -> int:
        return self.order.shape[0]

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.order[j]}


class _DenseView:
    """A sparsify SparseCoder seen through our `encode`/`decode`/`W_dec` interface (dense codes)."""

    def __init__(self, coder: nn.Module) -> None:
        self.coder = coder
        self.W_dec = coder.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.coder.encode(x)
        return x.new_zeros(x.shape[0], self.coder.num_latents).scatter_(1, out.top_indices, out.top_acts.float())

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.coder.W_dec + self.coder.b_dec


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def replay_order(rows: int, steps: int, batches: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """The row indices of `steps` batches of `batches` (our shuffler) as [steps x batch / SEQ_ROWS, SEQ_ROWS] sequences."""
    stream = batches(torch.arange(rows))
    return torch.cat([next(stream) for _ in range(steps)]).view(-1, SEQ_ROWS)


def run_sparsify(
    x_train: torch.Tensor,
    x_eval: torch.Tensor,
    *,
    k: int,
    width: int,
    batch_tokens: int,
    steps: int,
    batches: Callable[[torch.Tensor], Any],
    overrides: list[str],
) -> dict[str, Any]:
    """Train sparsify's TopK coder with its own Trainer on the rows `batches(arange(N))` yields (our order).

    `overrides` are `key=value` settings of sparsify's TrainConfig (JSON values), e.g. `optimizer="adam"`,
    `auxk_alpha=0.03125`, `k_decay_steps=100`; everything else keeps sparsify's defaults.
    """
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, TrainConfig, Trainer

    if batch_tokens % SEQ_ROWS:
        raise ValueError(f"batch size {batch_tokens} is not a multiple of {SEQ_ROWS} rows per replayed sequence")
    order = replay_order(x_train.shape[0], steps, batches)
    settings = {key: _value(v) for key, v in (o.split("=", 1) for o in overrides)}
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SaeConfig(k=k, num_latents=width),
            batch_size=batch_tokens // SEQ_ROWS,
            hookpoints=["layer"],
            log_to_wandb=False,
            save_dir=save_dir,
            save_every=10**9,
            **settings,
        )
        trainer = Trainer(cfg, _Sequences(order), ReplayModel(x_train))
        coder = trainer.saes["layer"]
        train_fvu: list[float] = []
        coder.register_forward_hook(lambda _m, _i, out: train_fvu.append(float(out.fvu.detach())))
        marks: dict[str, float] = {}

        def started(*_: Any) -> None:  # a pre-hook's return value would replace the layer's input
            marks.setdefault("start", time.perf_counter())

        trainer.model.layer.register_forward_pre_hook(started)
        save = trainer.save

        def timed_save() -> None:  # fit() ends with one checkpoint: the training time stops there
            marks["end"] = time.perf_counter()
            save()

        trainer.save = timed_save
        precision = torch.get_float32_matmul_precision()
        try:
            trainer.fit()
        finally:
            torch.set_float32_matmul_precision(precision)  # fit() sets "high" process-wide
    # Schedule-free optimizers train at one point and evaluate at another; sparsify saves the latter.
    for opt in trainer.optimizers:
        if isinstance(opt, ScheduleFreeWrapper):
            opt.eval()
    coder.eval()
    with torch.no_grad():
        ours = sae_reconstruction(_DenseView(coder), x_eval)
        own = [float(coder(chunk).fvu) for chunk in x_eval.split(batch_tokens) if chunk.shape[0] == batch_tokens]
    full = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name in ("optimizer", "lr", "lr_warmup_steps", "k_decay_steps", "auxk_alpha", "dead_feature_threshold", "batch_size")
    }
    lr = [g["lr"] for g in trainer.optimizers[0].param_groups][0]
    return {
        "tokens_per_s": round(steps * batch_tokens / (marks["end"] - marks["start"])),
        "fvu": round(ours["fvu"], 4),
        "l0": round(ours["l0"], 2),
        "dead_fraction": round(ours["dead_fraction"], 4),
        "fvu_own_definition": round(sum(own) / max(len(own), 1), 4),
        "train_fvu_last_10_steps": round(sum(train_fvu[-10:]) / max(len(train_fvu[-10:]), 1), 4),
        "train_tokens": steps * batch_tokens,
        "config": {**full, "lr_used": lr, "k": k, "num_latents": width, "rows_per_sequence": SEQ_ROWS},
    }
