"""Stage attribute: the attribution graph of `circuits.text`'s next token through every layer's transcoder.

Output under <paths.graphs>: <model>-<text slug>.json (circuit-tracer's and Neuronpedia's graph viewer
schema), .html (a self-contained page of the pruned graph) and .metrics.json (scores and checks), with each
layer's transcoder figures (FVU, L0, dead fraction, spliced delta loss: token_journey.circuits.quality).
Stops with one line when the replacement model does not reproduce the model (token_journey.circuits.verify).
"""

from token_journey.circuits.quality import layer_table, spliced_losses
from token_journey.circuits.trace import load_transcoders, trace, write_outputs
from token_journey.config import build
from token_journey.config.circuits import CircuitsConfig
from token_journey.layout import Layout, corpus_file, sae_folder, write_json
from token_journey.lm import load_prepared
from token_journey.sites import decoder_layers
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    circuits = build(CircuitsConfig, cfg.circuits, "circuits")
    layout = Layout.from_config(cfg.paths)
    # float32, so the checks hold to 1e-4 whatever dtype the weights are stored in.
    loaded = load_prepared(layout.base_model, dtype="float32", device=cfg.device)
    n_layers = len(decoder_layers(loaded.model))
    transcoders = load_transcoders(layout.circuits, circuits.transcoder.name, n_layers, device=str(next(loaded.model.parameters()).device))
    traced = trace(loaded.model, loaded.tokenizer, transcoders, circuits, loaded.name)
    losses = None
    if circuits.loss_tokens:
        eval_slice = corpus_file(layout.circuits_data / "corpus", "eval")
        losses = spliced_losses(
            loaded.model, loaded.tokenizer, eval_slice, transcoders, circuits.loss_tokens, int(cfg.harvest.exclude_first), float(cfg.harvest.max_norm_ratio)
        )
    folders = [sae_folder(layout.circuits, "mlp_out", layer, circuits.transcoder.name) for layer in range(n_layers)]
    traced.transcoders = layer_table(folders, losses)
    paths = write_outputs(traced, layout.graphs, scan=f"{loaded.name}/{circuits.transcoder.name}", journey=layout.journey)
    write_json(layout.timings / "circuits" / f"{paths['graph'].stem}.json", {"seconds": traced.seconds})
    s = traced.summary()
    print(
        f"graph of {s['target']!r} after {s['text']!r}: {s['active_features']} active latents ({s['latent_nodes']} as nodes), "
        f"{s['kept_nodes']} nodes and {s['kept_edges']} edges kept; "
        f"replacement {s['replacement_score']:.3f}, completeness {s['completeness_score']:.3f}; {traced.seconds:.1f} s -> {paths['page']}"
    )


if __name__ == "__main__":
    main()
