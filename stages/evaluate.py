"""Stage evaluate: reconstruction, sparsity and spliced-LM-loss metrics of every SAE of one layer.

Output: reports/metrics/<model>/<site>/layer_<L>.json (DVC metrics, one entry per SAE) and
reports/metrics/<model>/<site>/pareto/layer_<L>.json (DVC plot rows: l0, fvu, delta_loss per SAE).
"""

from pathlib import Path

from token_journey.config import build
from token_journey.config.eval import EvalConfig
from token_journey.evaluate import LayerInputs, evaluate_layer, metrics_path
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    paths = cfg.paths
    inputs = LayerInputs(
        model_dir=Path(paths.base_model), corpus_dir=Path(paths.corpus), activations_dir=Path(paths.activations),
        saes_dir=Path(paths.saes), metrics_dir=Path(paths.metrics), site=cfg.site, layer=int(cfg.layer),
    )
    document = evaluate_layer(build(EvalConfig, cfg.eval, "eval"), inputs, device=cfg.device)
    sweep = document["sweep"]
    print(f"evaluated {len(document['saes'])} SAE(s) at {cfg.site} layer {cfg.layer} on {sweep['tokens']:,} tokens: "
          f"{sweep['tokens_per_s']:.0f} eval tokens/s over {sweep['forward_passes']} passes per batch")
    for name, m in document["saes"].items():
        print(f"  {name}: L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  delta loss {m['delta_loss']:.4f} nats  "
              f"loss recovered {m['loss_recovered']:.3f}  KL {m['kl']:.4f}  dead {m['dead_fraction']:.1%}  "
              f"({m['eval_tokens_per_s']:.0f} tokens/s for this SAE)")
    print(f"-> {metrics_path(inputs.metrics_dir, cfg.site, cfg.layer)}")


if __name__ == "__main__":
    main()
