"""`token-journey`: the command-line entry point (subcommand `journey`).

    token-journey journey --text "The capital of France is" --layer 3 --html
    token-journey journey --text "The capital of France is" --steer 15:1234=8 --ablate 5:77 --target " Paris"
    token-journey journey --ablate tc:15:1234@7          # a transcoder latent of the circuits branch, at position 7
    token-journey --version
    token-journey journey --saes jumprelu-w4608-target16 --saes jumprelu-w4608-target120     # the family's other members beside `sae`

loads a prepared model folder, follows the text through it (every step recomputed and checked),
prints the rich terminal rendering and, with --html, writes <paths.journey>/<slug>.html.
Defaults (text, sampling, folders) come from the composed `conf/`, as the DVC stage sees them.
Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from token_journey.errors import TokenJourneyError


def _parser(conf: dict[str, Any]) -> argparse.ArgumentParser:
    """The argument parser, with defaults from the composed config `conf`."""
    from token_journey.config.journey import journey_config
    from token_journey.layout import Layout

    journey, layout = journey_config(conf["journey"]), Layout.from_config(conf["paths"])
    from token_journey import __version__

    parser = argparse.ArgumentParser(prog="token-journey", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("journey", help="follow a text through a model, number by number")
    j.add_argument("--text", default=journey.text, help="the text (default: %(default)r)")
    j.add_argument("--model-dir", default=str(layout.base_model), help="prepared model folder (default: %(default)s)")
    j.add_argument("--layer", type=int, default=None, help="show only this layer in the terminal")
    j.add_argument("--html", action="store_true", help="also write the HTML page")
    j.add_argument("--out", default=str(layout.journey), help="folder for the HTML/JSON (default: %(default)s)")
    j.add_argument("--sae-root", default=str(layout.saes), help="folder of the trained SAEs (default: %(default)s)")
    j.add_argument(
        "--saes",
        action="append",
        metavar="NAME",
        help=f"also show this SAE beside {conf['sae']['name']} (a family member id or an SAE folder name; `all`: every SAE; repeatable; default: journey.saes)",
    )
    j.add_argument(
        "--transcoder-root", default=str(layout.circuits), help="folder of the circuits branch's transcoders, for `tc:` edits (default: %(default)s)"
    )
    j.add_argument("--report", default=str(layout.html), help="report folder the feature links point to (default: %(default)s)")
    j.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    j.add_argument("--dtype", default="float32", help="compute dtype (default: %(default)s; checks assume float32)")
    j.add_argument("--seed", type=int, default=0)
    g = journey.generation
    j.add_argument("--temperature", type=float, default=g.temperature)
    j.add_argument("--top-k", type=int, default=g.top_k)
    j.add_argument("--top-p", type=float, default=g.top_p)
    j.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    j.add_argument(
        "--steer",
        action="append",
        metavar="[tc:]LAYER:LATENT[@POS]=VALUE",
        help="set an SAE (tc: transcoder) latent on every position, or at POS, and re-run the pass (repeatable; default: journey.steer)",
    )
    j.add_argument(
        "--ablate",
        action="append",
        metavar="[tc:]LAYER:LATENT[@POS]",
        help="set an SAE (tc: transcoder) latent to zero on every position, or at POS (repeatable; default: journey.ablate)",
    )
    j.add_argument("--target", default=journey.target, help="token whose logit is attributed (default: the prediction)")
    j.add_argument("--versus", default=journey.versus, help="attribute the logit difference target - versus")
    j.add_argument("--quiet", action="store_true", help="no terminal rendering (with --html)")
    return parser


def journey_command(args: argparse.Namespace, conf: dict[str, Any]) -> int:
    """Run the `journey` subcommand (settings not on the command line from `conf`); returns the exit status."""
    from rich.console import Console

    from token_journey.config.journey import GenerationConfig, JourneyConfig, shown_saes
    from token_journey.journey import UnsupportedArchitecture, run_journey
    from token_journey.journey.render_html import write_journey
    from token_journey.journey.render_terminal import render, render_captured
    from token_journey.lm import load_prepared

    generation = GenerationConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    given = {"text": args.text, "generation": generation, "target": args.target, "versus": args.versus}
    if args.steer is not None:
        given["steer"] = tuple(args.steer)
    if args.ablate is not None:
        given["ablate"] = tuple(args.ablate)
    if args.saes is not None:
        given["saes"] = tuple(args.saes)
    defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in conf["journey"].items() if k not in given}
    cfg = JourneyConfig(**defaults, **given)
    loaded = load_prepared(args.model_dir, dtype=args.dtype, device=args.device)
    console = Console()
    report_root = Path(os.path.relpath(args.report, args.out)).as_posix()
    try:
        names = shown_saes(cfg.saes, conf["sae"], conf.get("family"))
        transcoders = (Path(args.transcoder_root), str(conf["circuits"]["transcoder"]["name"]))
        journey = run_journey(
            loaded.model, loaded.tokenizer, cfg, args.seed, loaded.name, Path(args.sae_root), report_root=report_root, sae_names=names, transcoders=transcoders
        )
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
    from token_journey.config import compose

    conf = compose()
    args = _parser(conf).parse_args(argv)
    try:
        return journey_command(args, conf)
    except TokenJourneyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
