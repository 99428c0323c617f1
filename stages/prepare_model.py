"""Stage prepare_model: materialise the configured model as a safetensors HF folder.

Output: <paths.base_model>/ (weights, tokenizer, manifest.json).
"""

from token_journey.config import build
from token_journey.config.model import ModelConfig
from token_journey.layout import Layout
from token_journey.lm import prepare_model
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    layout = Layout.from_config(cfg.paths)
    manifest = prepare_model(build(ModelConfig, cfg.model, "model"), layout.base_model)
    print(f"prepared {manifest['name']}: {manifest['n_params']:,} parameters -> {layout.base_model}")


if __name__ == "__main__":
    main()
