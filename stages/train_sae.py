"""Stage train_sae: train a layer's SAEs on its harvested activations, `sae` and the `family` members, from one pass over its shards.

Output: one SAE folder {sae.safetensors, cfg.json, train.json} per SAE under <paths.saes> (see
token_journey.layout); a folder already trained with the same config on the same activations is kept.
Sweeps: `python stages/train_sae.py -m layer=6 sae=topk,batchtopk sae.k=16,32,64`, `dvc exp run --queue
-S 'sae.lr=0.001,0.003'` or a wandb agent (conf/wandb-sweep.yaml); each member gets its own folder,
wandb groups the members of one sweep (token_journey.sweeps), and a sweep of `sae` trains it without the
family (token_journey.sae.family). Data parallel:
`torchrun --nproc_per_node 2 stages/train_sae.py` (gloo on CPU) or `accelerate launch --multi_gpu ...`.
"""

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.sae import SAEConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.layout import Layout
from token_journey.sae.family import layer_saes, sweeps_sae
from token_journey.sae.train_layer import train_family
from token_journey.stage import stage
from token_journey.sweeps import current_member, sweep_name


@stage
def main(cfg) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    member = current_member(config)
    sae_cfg = build(SAEConfig, cfg.sae, "sae")
    saes = layer_saes(sae_cfg, sweep_name(sae_cfg.name, member.overrides), config.get("family") or {}, sweeps_sae(member.overrides))
    layout = Layout.from_config(cfg.paths)
    tracking = build(TrackingConfig, cfg.tracking, "tracking")
    folders = train_family(
        saes,
        activations=layout.activations,
        saes=layout.saes,
        timings=layout.timings,
        site=cfg.site,
        layer=int(cfg.layer),
        model=cfg.model.name,
        seed=int(cfg.seed),
        tracking=tracking,
        device=cfg.device,
        group=member.group,
        config=config,
    )
    for (_, sae_cfg), out in zip(saes, folders):
        print(f"trained {sae_cfg.architecture} SAE -> {out}")


if __name__ == "__main__":
    main()
