"""How good each layer's transcoder is, beside the graph that rests on it: FVU of mlp_out and spliced delta loss.

A graph is only as faithful as its transcoders: a layer whose transcoder explains little of its MLP puts
most of that MLP in the error nodes, and one that raises the loss when spliced in changes what the model
predicts. Per layer, the page and the metrics show:

- from the transcoder's `train.json` (written when it was trained): FVU of mlp_out, L0 and the fraction
  of latents that never fire, on the branch's held-out rows (`eval_tokens` of them);
- the spliced delta loss, measured here: the next-token cross-entropy on the first `tokens` of the
  branch's eval slice with that layer's MLP output replaced by the transcoder's prediction from the
  MLP's input, minus the clean pass's (the evaluate stage's `evaluate_saes`, same row rules as the harvest).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from token_journey.data.corpus import read_sequences, row_mask, special_ids
from token_journey.errors import TokenJourneyError
from token_journey.eval.evaluate import evaluate_saes
from token_journey.sae.base import SAE

TRAINED = ("fvu", "l0", "dead_fraction", "eval_tokens")


def trained_figures(folder: Path) -> dict[str, Any]:
    """FVU, L0, dead fraction and held-out rows of one transcoder, as its `train.json` records them."""
    path = Path(folder) / "train.json"
    if not path.is_file():
        raise TokenJourneyError(f"no train.json in {folder}; retrain that transcoder (dvc repro circuits/dvc.yaml)")
    info = json.loads(path.read_text())
    return {key: info.get(key) for key in TRAINED}


def spliced_losses(
    model: nn.Module,
    tokenizer: Any,
    corpus_eval: Path,
    transcoders: Sequence[SAE],
    tokens: int,
    exclude_first: int,
    max_norm_ratio: float,
    batch_size: int = 8,
) -> list[dict[str, float]]:
    """Per layer: clean and spliced cross-entropy and their difference on the first `tokens` of `corpus_eval`."""
    sequences = read_sequences(corpus_eval).input_ids
    sequences = sequences[: max(1, tokens // sequences.shape[1])]
    rows = row_mask(sequences, special_ids(tokenizer), exclude_first)
    out = []
    for layer, transcoder in enumerate(transcoders):
        result = evaluate_saes(model, sequences, rows, "mlp_out", layer, {"t": transcoder}, batch_size, max_norm_ratio=max_norm_ratio)
        m = result.saes["t"]
        out.append({"ce_clean": m["ce_clean"], "ce_spliced": m["ce_sae"], "delta_loss": m["delta_loss"], "loss_positions": m["loss_positions"]})
    return out


def layer_table(folders: Sequence[Path], losses: Sequence[dict[str, float]] | None) -> list[dict[str, Any]]:
    """One row per layer: the trained figures, with the spliced losses where they were measured."""
    rows = []
    for layer, folder in enumerate(folders):
        row = {"layer": layer, **trained_figures(folder)}
        if losses is not None:
            row.update(losses[layer])
        rows.append(row)
    return rows
