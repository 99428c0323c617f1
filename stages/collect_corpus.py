"""Stage collect_corpus: read the configured documents, tokenize them with the prepared model's
tokenizer into fixed-length sequences, and split train/eval by document.

Output: <paths.corpus>/{train,eval}.parquet and stats.json.
"""

import json

from token_journey.config import build
from token_journey.config.corpus import CorpusConfig
from token_journey.data.corpus import collect_corpus
from token_journey.layout import Layout
from token_journey.lm import MANIFEST
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    from transformers import AutoTokenizer

    from token_journey.errors import TokenJourneyError

    layout = Layout.from_config(cfg.paths)
    base = layout.base_model
    if not (base / MANIFEST).is_file():
        raise TokenJourneyError(f"no prepared model at {base}; run `python stages/prepare_model.py` first")
    max_positions = json.loads((base / MANIFEST).read_text())["architecture"].get("max_position_embeddings")
    tokenizer = AutoTokenizer.from_pretrained(base)
    corpus = build(CorpusConfig, cfg.corpus, "corpus")
    stats = collect_corpus(corpus, tokenizer, max_positions, layout.corpus, seed=int(cfg.seed))
    print(f"corpus {corpus.name}: {stats['sequences']} sequences of {corpus.context_size} tokens -> {layout.corpus}")


if __name__ == "__main__":
    main()
