"""The ``fleetfl`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from fleetfl import __version__
from fleetfl.coordinator.config import ConfigError, describe_keys, load_config


def _keys_epilog() -> str:
    lines = ["configuration keys (TOML [section] key, or --set section.key=value):"]
    for key, default, help_text in describe_keys():
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(help_text, 70, initial_indent="      ",
                                   subsequent_indent="      "))
    lines.append("\nexample: fleetfl simulate --set task.name=synthetic --set task.params.alpha=0.5"
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
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def _command_modules() -> list[Any]:
    """The modules of the other sub-commands (each has ``add_parser(sub)`` and ``run(args)``)."""
    from fleetfl.client import client_cmd
    from fleetfl.coordinator import (
        data_cmd,
        export_cmd,
        keys_cmd,
        schedule_cmd,
        service_cmd,
        traces_cmd,
    )

    return [service_cmd, client_cmd, data_cmd, keys_cmd, export_cmd, schedule_cmd, traces_cmd]


# Top-level modules of the [coordinator] extra (a device install has none of them).
_COORDINATOR_EXTRA = ("ray", "sklearn", "scipy", "matplotlib", "rich", "onnx", "onnxruntime",
                      "onnxscript", "torch_pruning")

# Sub-command name -> module (export_cmd registers two commands).
_RUNNERS = {"coordinator": "service_cmd", "client": "client_cmd", "data": "data_cmd",
            "keys": "keys_cmd", "export": "export_cmd", "evaluate": "export_cmd",
            "schedule": "schedule_cmd", "traces": "traces_cmd"}


def _simulate(args: argparse.Namespace) -> int:
    import importlib.util

    for module in ("ray", "sklearn"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"no module named {module!r}", name=module)
    config = load_config(args.config, args.overrides)
    output = config.output
    if args.out:
        output = dataclasses.replace(output, dir=args.out)
    if args.no_progress:
        output = dataclasses.replace(output, progress=False)
    output.check()  # --out on an existing file: one error naming the key
    config = dataclasses.replace(config, output=output)
    from rich.console import Console

    from fleetfl.coordinator.simulate import simulate, summary_table

    console = Console()
    summary = simulate(config, verbose=args.verbose)
    console.print(summary_table(summary, config.output.dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        # What a device runs: skip the coordinator's imports (config, torch models, exporters).
        from fleetfl.client.client_cmd import main as client_main

        return client_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "simulate":
            return _simulate(args)
        module = next(m for m in _command_modules()
                      if m.__name__.rsplit(".", 1)[1] == _RUNNERS[args.command])
        return int(module.run(args))
    except ConfigError as err:
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] not in _COORDINATOR_EXTRA:
            raise
        print(f"fleetfl: error: `fleetfl {args.command}` needs {err.name}, which a device "
              "install leaves out: pip install 'fleetfl[coordinator]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
