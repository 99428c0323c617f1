"""Which activations to harvest from the prepared model, and how to store them."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError

DTYPES = ("float32", "float16", "bfloat16")
SITES = ("resid_post", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    layers: tuple[int, ...]
    """Decoder layers (0-based) to harvest; also drives the per-layer DVC stages."""
    sites: tuple[str, ...]
    """Activation sites to harvest at every layer: resid_post | attn_out | mlp_in | mlp_out (a transcoder needs
    mlp_in and mlp_out of its layer)."""
    dtype: str
    """Storage dtype of the activation vectors on disk."""
    forward_dtype: str
    """Dtype the model computes in during the harvest."""
    batch_size: int
    """Sequences per forward pass."""
    shard_rows: int
    """Target tokens per shard; a shard holds a fixed run of shard_rows // context_size sequences."""
    row_group_rows: int
    """Rows per Parquet row group: the unit the shuffling loader reads, so smaller mixes more shards."""
    exclude_first: int
    """The first N real tokens of each sequence are not written (the attention-sink outliers)."""
    max_norm_ratio: float
    """Also drop rows whose norm exceeds this multiple of their sequence's median row norm; 0 turns it off."""

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(layer, int) or layer < 0 for layer in self.layers):
            raise TokenJourneyError(f"harvest.layers={list(self.layers)} must be a non-empty list of layer indices >= 0")
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise TokenJourneyError(f"harvest.sites={list(self.sites)} must be a non-empty subset of {', '.join(SITES)}")
        for key in ("dtype", "forward_dtype"):
            if getattr(self, key) not in DTYPES:
                raise TokenJourneyError(f"harvest.{key}={getattr(self, key)!r} is not one of {', '.join(DTYPES)}")
        for key in ("batch_size", "shard_rows", "row_group_rows"):
            if getattr(self, key) < 1:
                raise TokenJourneyError(f"harvest.{key}={getattr(self, key)} must be at least 1")
        if self.exclude_first < 0 or self.max_norm_ratio < 0:
            raise TokenJourneyError("harvest.exclude_first and harvest.max_norm_ratio must be >= 0")
