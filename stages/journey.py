"""Stage journey: follow `journey.text` through the prepared model, every step recomputed and checked.

Output: <paths.journey>/<model>-<text slug>.html and .json; the terminal rendering goes to stdout.
Reads the SAEs under <paths.saes> when the pipeline has trained them (features with report links), and the
circuits branch's transcoders under <paths.circuits> when an edit names one (`tc:`).
"""

from token_journey.config.journey import journey_config, shown_saes
from token_journey.journey import UnsupportedArchitecture, run_journey
from token_journey.journey.render_html import write_journey
from token_journey.journey.render_terminal import render, render_captured
from token_journey.layout import Layout
from token_journey.lm import load_prepared
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    journey_cfg = journey_config(cfg.journey)
    layout = Layout.from_config(cfg.paths)
    # float32 so every step can be checked to 1e-4 whatever dtype the weights are stored in.
    loaded = load_prepared(layout.base_model, dtype="float32", device=cfg.device)
    try:
        journey = run_journey(
            loaded.model,
            loaded.tokenizer,
            journey_cfg,
            cfg.seed,
            loaded.name,
            layout.saes,
            report_root=layout.journey_to_report(),
            sae_names=shown_saes(journey_cfg.saes, cfg.sae, cfg.get("family")),
            transcoders=(layout.circuits, cfg.circuits.transcoder.name),
        )
    except UnsupportedArchitecture as exc:
        render_captured(exc.captured)
        raise
    render(journey)
    print(f"wrote {write_journey(journey, layout.journey)}")


if __name__ == "__main__":
    main()
