"""Stage train_sae: train one SAE on one layer's harvested activations.

Output: one SAE folder {sae.safetensors, cfg.json, train.json} under <paths.saes> (see token_journey.layout).
Sweeps: `python stages/train_sae.py -m layer=6 sae=topk,batchtopk sae.k=16,32,64`, `dvc exp run --queue
-S 'sae.lr=0.001,0.003'` or a wandb agent (conf/wandb-sweep.yaml); each member gets its own folder and
wandb groups the members of one sweep (token_journey.sweeps). Data parallel:
`torchrun --nproc_per_node 2 stages/train_sae.py` (gloo on CPU) or `accelerate launch --multi_gpu ...`.
"""

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.layout import Layout
from token_journey.sae.train_layer import train_layer
from token_journey.stage import stage
from token_journey.sweeps import current_member, sweep_name


@stage
def main(cfg) -> None:
    sae_cfg = build(SAEConfig, cfg.sae, "sae")
    config = OmegaConf.to_container(cfg, resolve=True)
    member = current_member(config)
    layout = Layout.from_config(cfg.paths)
    out = train_layer(
        sae_cfg, activations=layout.activations, saes=layout.saes, timings=layout.timings, site=cfg.site,
        layer=int(cfg.layer), model=cfg.model.name, seed=int(cfg.seed), tracking=build(TrackingConfig, cfg.tracking, "tracking"),
        name=sweep_name(sae_cfg.name, member.overrides), device=cfg.device, group=member.group, config=config,
    )
    print(f"trained {sae_cfg.architecture} SAE -> {out}")


if __name__ == "__main__":
    main()
