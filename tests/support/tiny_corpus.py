"""A prepared tiny Llama with a small tokenized corpus (context 16): the input of harvest tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from support.configs import make
from support.tiny import save_tiny

WORDS = "in the beginning was the word and the word travelled through every layer of the network".split()


def tiny_llama_with_corpus(root: Path, n_docs: int, max_tokens: int, eval_tokens: int = 256) -> Any:
    """Prepare a tiny Llama under `root/base`, write `n_docs` seeded documents and collect them into
    `root/corpus` (train budget `max_tokens`); returns the loaded model."""
    from token_journey.config.corpus import CorpusConfig
    from token_journey.config.model import ModelConfig
    from token_journey.data.corpus import collect_corpus
    from token_journey.lm import load_prepared, prepare_model

    save_tiny("llama", root / "src")
    prepare_model(make(ModelConfig, name="tiny", source="local", id=str(root / "src")), root / "base")
    lm = load_prepared(root / "base", device="cpu")
    docs = root / "docs"
    docs.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(n_docs):
        picks = torch.randint(0, len(WORDS), (int(torch.randint(10, 80, (1,), generator=gen)),), generator=gen)
        (docs / f"{i:03d}.txt").write_text(" ".join(WORDS[int(j)] for j in picks))
    cfg = make(
        CorpusConfig, name="t", source="local", path=str(docs / "*.txt"), context_size=16, max_tokens=max_tokens, eval_tokens=eval_tokens, eval_fraction=0.2
    )
    collect_corpus(cfg, lm.tokenizer, 256, root / "corpus", seed=0)
    return lm
