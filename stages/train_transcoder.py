"""Stage circuits_train: the circuits branch's skip transcoder of one layer (`layer`), trained on its activations.

Output: <paths.circuits>/mlp_out/layer_XX/<circuits.transcoder.name>/ (an SAE folder, as train_sae
writes); a folder already trained with the same config on the same activations is kept.
"""

from dataclasses import asdict

from omegaconf import OmegaConf

from token_journey.config import build
from token_journey.config.circuits import CircuitsConfig
from token_journey.config.tracking import TrackingConfig
from token_journey.layout import Layout, location
from token_journey.sae.train_layer import train_layer
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    circuits = build(CircuitsConfig, cfg.circuits, "circuits")
    layout = Layout.from_config(cfg.paths)
    config = OmegaConf.to_container(cfg, resolve=True)
    out = train_layer(
        circuits.transcoder,
        activations=location(str(layout.circuits_data / "activations")),
        saes=layout.circuits,
        timings=layout.timings / "circuits",
        site="mlp_out",
        layer=int(cfg.layer),
        model=cfg.model.name,
        seed=int(cfg.seed),
        tracking=build(TrackingConfig, cfg.tracking, "tracking"),
        name=circuits.transcoder.name,
        device=cfg.device,
        config={**config, "sae": asdict(circuits.transcoder)},
    )
    print(f"trained the layer {cfg.layer} transcoder -> {out}")


if __name__ == "__main__":
    main()
