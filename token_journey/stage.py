"""What every `stages/*.py` entry point shares: Hydra wiring, logging and one-line errors.

A stage is a thin `main(cfg)` decorated with `@stage`. Run by hand it composes `conf/`
(`python stages/x.py key=value`, `-m` sweeps); run by DVC it reads the composed `params.yaml`
(`--config-path <repo> --config-name params`), which is what `dvc exp run -S key=value` rewrites.
A `TokenJourneyError` is printed as one line on stderr and the process exits with status 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from token_journey.errors import TokenJourneyError

REPO = Path(__file__).resolve().parents[1]


def stage(func: Callable[[Any], Any]) -> Callable[[], Any]:
    """Wrap `func(cfg)` as a Hydra app on `conf/config.yaml` with friendly errors."""
    import hydra

    @functools.wraps(func)
    def guarded(cfg: Any) -> Any:
        logging.getLogger("token_journey").setLevel(logging.INFO)
        try:
            return func(cfg)
        except TokenJourneyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")(guarded)
