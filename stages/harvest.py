"""Stage harvest: run the prepared model over the corpus and write the activations of every
configured layer and site, from one forward pass per batch.

Output: shards and a manifest per (site, layer, split) under <paths.activations> (see token_journey.layout).
Killed part-way, rerunning it resumes after the last complete shard.
"""

from token_journey.config import build
from token_journey.config.harvest import HarvestConfig
from token_journey.data.harvest import harvest
from token_journey.distributed import select_device
from token_journey.layout import Layout
from token_journey.lm import load_prepared
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    harvest_cfg = build(HarvestConfig, cfg.harvest, "harvest")
    device = select_device(cfg.device)
    layout = Layout.from_config(cfg.paths)
    lm = load_prepared(layout.base_model, dtype=harvest_cfg.forward_dtype, device=str(device))
    result = harvest(lm, harvest_cfg, layout.corpus, layout.activations, device)
    for split, manifests in result.items():
        if not manifests:  # another process of a multi-process run writes the manifests
            continue
        rows = ", ".join(f"{site} layer {layer}: {m['rows']:,}" for (site, layer), m in manifests.items())
        print(f"harvest {split}: {rows} rows -> {layout.activations}")


if __name__ == "__main__":
    main()
