"""``fleetfl traces generate``: synthetic FedScale-format device traces for a simulation.

Writes ``capacity.json`` and ``availability.json`` (or ``.pkl``, FedScale's own pickles) for
``fleet.capacity_trace`` and ``fleet.availability_trace``. Where the numbers come from, and
what is assumed: :mod:`fleetfl.devices.trace_gen`.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

from fleetfl.coordinator.config import ConfigError
from fleetfl.devices import trace_gen


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fleetfl traces generate``."""
    traces = subparsers.add_parser("traces", help="device traces for simulations")
    sub = traces.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    gen = sub.add_parser(
        "generate", help="write synthetic capacity and availability traces (FedScale format)",
        description="Capacity drawn from FedScale's measured values (compute ms per sample, "
                    "bandwidth kbit/s); availability from an assumed on/off model whose "
                    "defaults follow the one public FedScale entry. See fleetfl.devices."
                    "trace_gen for the sources.")
    gen.add_argument("--clients", type=int, required=True, metavar="N",
                     help="entries per trace (client i of a fleet takes entry i mod N)")
    gen.add_argument("--out", required=True, metavar="DIR", help="output directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--online-fraction", type=float, default=trace_gen.ONLINE_FRACTION,
                     metavar="F", help="long-run fraction of time a device is online "
                                       f"(default {trace_gen.ONLINE_FRACTION})")
    gen.add_argument("--mean-window-h", type=float, default=trace_gen.MEAN_WINDOW_S / 3600,
                     metavar="H", help="mean online window, hours "
                                       f"(default {trace_gen.MEAN_WINDOW_S / 3600:g})")
    gen.add_argument("--period-days", type=float, default=trace_gen.PERIOD_S / 86400,
                     metavar="D", help="the trace repeats every D days "
                                       f"(default {trace_gen.PERIOD_S / 86400:g})")
    gen.add_argument("--pickle", action="store_true",
                     help="write FedScale's pickles (.pkl) instead of JSON")
    return traces


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl traces generate``."""
    if args.clients < 1:
        raise ConfigError("--clients", f"must be >= 1, got {args.clients}")
    try:
        behave = trace_gen.availability(
            args.clients, args.seed, period_s=int(args.period_days * 86400),
            online_fraction=args.online_fraction, mean_window_s=args.mean_window_h * 3600)
    except ValueError as err:
        raise ConfigError("--online-fraction/--mean-window-h/--period-days", str(err)) from None
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".pkl" if args.pickle else ".json"
    paths = {name: out / f"{name}{suffix}" for name in ("capacity", "availability")}
    _write(paths["capacity"], trace_gen.capacity(args.clients, args.seed), args.pickle)
    _write(paths["availability"], behave, args.pickle)
    print(f"wrote {args.clients} entries to {paths['capacity']} and {paths['availability']}\n"
          f"use: --set fleet.capacity_trace='\"{paths['capacity']}\"' "
          f"--set fleet.availability_trace='\"{paths['availability']}\"'")
    return 0


def _write(path: Path, mapping: dict[int, Any], as_pickle: bool) -> None:
    if as_pickle:
        path.write_bytes(pickle.dumps(mapping, protocol=4))
    else:
        path.write_text(json.dumps(mapping, separators=(",", ":")) + "\n")
