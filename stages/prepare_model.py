"""Stage prepare_model: materialise the configured model as a safetensors HF folder.

Output: models/base/<model.name>/ (weights, tokenizer, manifest.json).
"""

from pathlib import Path

from token_journey.config import build
from token_journey.config.model import ModelConfig
from token_journey.lm import prepare_model
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    manifest = prepare_model(build(ModelConfig, cfg.model, "model"), Path(cfg.paths.base_model))
    print(f"prepared {manifest['name']}: {manifest['n_params']:,} parameters -> {cfg.paths.base_model}")


if __name__ == "__main__":
    main()
