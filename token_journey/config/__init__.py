"""Structured views of the Hydra config, one small frozen dataclass per concept.

`conf/` is the hand-edited source of truth; `params.yaml` is its composed form (see
`compose`). Stages receive an OmegaConf `DictConfig` and turn the sections they read into
these dataclasses with `build`, which rejects unknown or missing keys with one clear line.
This package imports neither torch nor wandb, so reading config stays cheap.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from token_journey.errors import TokenJourneyError

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def build(cls: type[T], section: Mapping[str, Any] | Any, where: str) -> T:
    """Build the frozen dataclass `cls` from a config `section` (a mapping or DictConfig).

    `where` is the config path shown in errors (e.g. ``"model"``), so a typo such as
    ``model.dtpye`` is reported as an unknown key with the list of valid ones. A field whose type
    is itself a dataclass (a nested section such as ``report.explainer``) is built the same way
    from its mapping, so its typos are named by their full path too.
    """
    if not isinstance(section, Mapping):
        try:
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        except Exception as exc:  # not a DictConfig either
            raise TokenJourneyError(f"config section `{where}` is not a mapping: {section!r}") from exc
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise TokenJourneyError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        if name in section:
            value = section[name]
            if isinstance(value, Sequence) and not isinstance(value, str):  # a list, or a DictConfig's ListConfig
                value = tuple(value)
            elif dataclasses.is_dataclass(hints.get(name)) and not dataclasses.is_dataclass(value):
                value = build(hints[name], value, f"{where}.{name}")
            elif hints.get(name) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # `sae.adam_beta1=0` on a command line arrives as an int; torch wants floats
            kwargs[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise TokenJourneyError(f"missing config key `{where}.{name}`")
    return cls(**kwargs)


def compose(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose `conf/` exactly as `dvc exp run` does (Hydra compose, then resolve) into a dict.

    `params.yaml` is the YAML dump of `compose()`; `tests/test_params.py` proves they agree and
    `python -m token_journey.config > params.yaml` rewrites it.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(config_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def dump_yaml(config: dict[str, Any]) -> str:
    """YAML text of a composed config, in the same form DVC writes to params.yaml."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))
