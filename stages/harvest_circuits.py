"""Stage circuits_harvest: the circuits branch's slice of the corpus, harvested at mlp_in and mlp_out of every layer.

Output under <paths.circuits_data>: corpus/{train,eval}.parquet (the first sequences of the pipeline's
corpus within circuits.train_tokens / circuits.eval_tokens) and activations/ (shards as the harvest
stage writes them). Killed part-way, rerunning it resumes after the last complete shard.
"""

from token_journey.circuits.branch import harvest_config, slice_corpus
from token_journey.config import build
from token_journey.config.circuits import CircuitsConfig
from token_journey.config.harvest import HarvestConfig
from token_journey.data.harvest import harvest
from token_journey.distributed import select_device
from token_journey.layout import Layout
from token_journey.lm import load_prepared
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    circuits = build(CircuitsConfig, cfg.circuits, "circuits")
    harvest_cfg = harvest_config(build(HarvestConfig, cfg.harvest, "harvest"), circuits)
    layout = Layout.from_config(cfg.paths)
    corpus = layout.circuits_data / "corpus"
    tokens = slice_corpus(layout.corpus, corpus, {"train": circuits.train_tokens, "eval": circuits.eval_tokens})
    device = select_device(cfg.device)
    lm = load_prepared(layout.base_model, dtype=harvest_cfg.forward_dtype, device=str(device))
    result = harvest(lm, harvest_cfg, corpus, layout.circuits_data / "activations", device)
    for split, manifests in result.items():
        rows = sum(m["rows"] for m in manifests.values()) // max(1, len(manifests))
        print(f"circuits harvest {split}: {tokens[split]:,} token slots, about {rows:,} rows per (site, layer) at {len(manifests)} points")


if __name__ == "__main__":
    main()
