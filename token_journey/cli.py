"""`token-journey`: the command-line entry point (subcommand `journey`).

    token-journey journey --text "The capital of France is" --layer 3 --html

loads a prepared model folder, follows the text through it (every step recomputed and checked),
prints the rich terminal rendering and, with --html, writes reports/journey/<slug>.html.
Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from token_journey.errors import TokenJourneyError

DEFAULTS = {"model_dir": "models/base/smollm2-135m", "out": "reports/journey", "saes": "models/saes"}


def _parser() -> argparse.ArgumentParser:
    from token_journey.config.journey import GenerationConfig, JourneyConfig

    parser = argparse.ArgumentParser(prog="token-journey", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("journey", help="follow a text through a model, number by number")
    j.add_argument("--text", default=JourneyConfig.text, help="the text (default: %(default)r)")
    j.add_argument("--model-dir", default=DEFAULTS["model_dir"], help="prepared model folder (default: %(default)s)")
    j.add_argument("--layer", type=int, default=None, help="show only this layer in the terminal")
    j.add_argument("--html", action="store_true", help="also write the HTML page")
    j.add_argument("--out", default=DEFAULTS["out"], help="folder for the HTML/JSON (default: %(default)s)")
    j.add_argument("--saes", default=None, help="SAE root (default: models/saes/<model name>)")
    j.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    j.add_argument("--dtype", default="float32", help="compute dtype (default: %(default)s; checks assume float32)")
    j.add_argument("--seed", type=int, default=0)
    g = GenerationConfig()
    j.add_argument("--temperature", type=float, default=g.temperature)
    j.add_argument("--top-k", type=int, default=g.top_k)
    j.add_argument("--top-p", type=float, default=g.top_p)
    j.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    j.add_argument("--quiet", action="store_true", help="no terminal rendering (with --html)")
    return parser


def journey_command(args: argparse.Namespace) -> int:
    """Run the `journey` subcommand; returns the exit status."""
    from rich.console import Console

    from token_journey.config.journey import GenerationConfig, JourneyConfig
    from token_journey.journey import UnsupportedArchitecture, run_journey
    from token_journey.journey.render_html import write_journey
    from token_journey.journey.render_terminal import render, render_captured
    from token_journey.lm import load_prepared

    generation = GenerationConfig(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    cfg = JourneyConfig(text=args.text, generation=generation)
    loaded = load_prepared(args.model_dir, dtype=args.dtype, device=args.device)
    saes = Path(args.saes) if args.saes else Path(DEFAULTS["saes"]) / loaded.name
    console = Console()
    try:
        journey = run_journey(loaded.model, loaded.tokenizer, cfg, args.seed, loaded.name, saes)
    except UnsupportedArchitecture as exc:
        render_captured(exc.captured, console)
        raise
    if not args.quiet:
        render(journey, console, args.layer)
    if args.html:
        console.print(f"wrote {write_journey(journey, Path(args.out))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return journey_command(args)
    except TokenJourneyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
