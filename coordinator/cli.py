"""The ``fleetfl`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
from collections.abc import Sequence

from fleetfl import __version__
from fleetfl.coordinator.config import ConfigError, describe_keys, load_config


def _keys_epilog() -> str:
    lines = ["configuration keys (TOML [section] key, or --set section.key=value):"]
    for key, default, help_text in describe_keys():
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(help_text, 70, initial_indent="      ",
                                   subsequent_indent="      "))
    lines.append("\nexample: fleetfl simulate --set task.dataset=synthetic --set task.model=logreg"
                 " --set fleet.stragglers=0.9 --out runs/straggle")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetfl", description=(
        "Edge federated learning: heterogeneity-aware FedProx over device fleets, on Flower."))
    parser.add_argument("--version", action="version", version=f"fleetfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = sub.add_parser(
        "simulate", help="simulate a whole fleet on this machine (Flower simulation engine)",
        description=("Run federated rounds over a simulated heterogeneous fleet and write "
                     "metrics.jsonl, summary.json and report.png to the output directory. "
                     "With no options, runs the default fleet (digits CNN, 20 devices)."),
        epilog=_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--config", metavar="FILE.toml", help="TOML file with [task] [federation] "
                     "[strategy] [fleet] [compression] [secagg] [output] sections")
    sim.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE",
                     help="override one key (repeatable); VALUE is read as TOML, e.g. 0.5, true, "
                          "'\"text\"' or {rpi4=1,phone-mid=2}")
    sim.add_argument("--out", metavar="DIR", help="output directory (default: output.dir)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return parser


def _simulate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    output = config.output
    if args.out:
        output = dataclasses.replace(output, dir=args.out)
    if args.no_progress:
        output = dataclasses.replace(output, progress=False)
    config = dataclasses.replace(config, output=output)
    from rich.console import Console

    from fleetfl.coordinator.simulate import simulate, summary_table

    console = Console()
    summary = simulate(config, verbose=args.verbose)
    console.print(summary_table(summary, config.output.dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "simulate":
            return _simulate(args)
    except ConfigError as err:
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
