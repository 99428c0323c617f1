"""Stage evaluate: reconstruction, sparsity and spliced-LM-loss metrics of every SAE of one layer,
and (eval.saebench) feature absorption, sparse probing and decoder geometry.

Output: the layer's metrics file (DVC metrics, one entry per SAE) and its Pareto plot rows
(l0, fvu, delta_loss per SAE); `token_journey.layout` says where both live.
"""

from token_journey.config import build
from token_journey.config.eval import EvalConfig
from token_journey.eval.evaluate import evaluate_layer
from token_journey.layout import Layout, metrics_file
from token_journey.stage import stage


def _pct(value: float | None) -> str:
    """A share as a percentage, or "n/a" where the task had too few rows."""
    return "n/a" if value is None else f"{value:.1%}"


@stage
def main(cfg) -> None:
    layout = Layout.from_config(cfg.paths)
    document, speeds = evaluate_layer(build(EvalConfig, cfg.eval, "eval"), layout, cfg.site, int(cfg.layer), device=cfg.device)
    sweep = document["sweep"]
    print(
        f"evaluated {len(document['saes'])} SAE(s) at {cfg.site} layer {cfg.layer} on {sweep['tokens']:,} tokens: "
        f"{speeds['sweep']['tokens_per_s']:.0f} eval tokens/s over {sweep['forward_passes']} passes per batch"
    )
    for name, m in document["saes"].items():
        print(
            f"  {name}: L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  delta loss {m['delta_loss']:.4f} nats  "
            f"loss recovered {m['loss_recovered']:.3f}  KL {m['kl']:.4f}  dead {m['dead_fraction']:.1%}  "
            f"({speeds['saes'][name]['eval_tokens_per_s']:.0f} tokens/s for this SAE)"
        )
        if "saebench" in m:
            print(
                f"    absorption {_pct(m['absorption_rate'])}  split letters {_pct(m['split_fraction'])}  "
                f"probe llm {_pct(m['probe_llm'])} / SAE k=1 {_pct(m['probe_sae_top_1'])} k=5 {_pct(m['probe_sae_top_5'])}  "
                f"max-cos {m['decoder_max_cos']:.3f}  duplicates {_pct(m['duplicate_fraction'])}  "
                f"token features {_pct(m['token_feature_fraction'])}  ({speeds['saes'][name]['saebench_seconds']:.1f} s)"
            )
    print(f"-> {metrics_file(layout.metrics, cfg.site, int(cfg.layer))}")


if __name__ == "__main__":
    main()
