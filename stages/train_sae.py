"""Stage train_sae: train one SAE on one layer's harvested activations.

Output: one SAE folder {sae.safetensors, cfg.json, train.json} under <paths.saes> (see token_journey.layout).
Sweeps: `python stages/train_sae.py -m layer=6 sae=jumprelu,topk sae.k=16,32,64` (each member gets
its own folder; wandb groups them by the sweep folder). Data parallel:
`torchrun --nproc_per_node 2 stages/train_sae.py` (gloo on CPU) or `accelerate launch --multi_gpu ...`.
"""

import sys

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.layout import Layout
from token_journey.sae.train_layer import sweep_name, train_layer
from token_journey.stage import stage


def _sweep() -> tuple[list[str], str]:
    """(this member's values of the swept keys, sweep folder) of a Hydra multirun; ([], "") otherwise."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return [], ""
    swept = {a.split("=", 1)[0] for a in sys.argv[1:] if "=" in a and ("," in a or "(" in a.split("=", 1)[1])}
    return [o for o in hc.overrides.task if o.split("=", 1)[0] in swept], str(hc.sweep.dir)


@stage
def main(cfg) -> None:
    sae_cfg = build(SAEConfig, cfg.sae, "sae")
    overrides, group = _sweep()
    layout = Layout.from_config(cfg.paths)
    out = train_layer(
        sae_cfg, activations=layout.activations, saes=layout.saes, timings=layout.timings, site=cfg.site,
        layer=int(cfg.layer), model=cfg.model.name, seed=int(cfg.seed), tracking=build(TrackingConfig, cfg.tracking, "tracking"),
        name=sweep_name(sae_cfg.name, overrides), device=cfg.device, group=group, config=OmegaConf.to_container(cfg, resolve=True),
    )
    print(f"trained {sae_cfg.architecture} SAE -> {out}")


if __name__ == "__main__":
    main()
