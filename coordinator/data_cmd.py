"""``fleetfl data split``: per-client ``.npz`` shards of a built-in dataset, for trying devices.

Each shard is exactly the data the simulation gives client ``i`` (same partition, same seed),
in the device data format of :mod:`fleetfl.tasks.data_format`: ``x``/``y`` (its training
split) and ``x_test``/``y_test`` (its local test split). The coordinator's central test set is
held out before partitioning (it depends on ``task.seed`` only), so with the same seed no
shard overlaps it. ``--config`` takes dataset, seed and client count from the coordinator's
configuration, which keeps both sides consistent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleetfl.coordinator.config import ConfigError, load_config
from fleetfl.tasks.data_format import save_npz
from fleetfl.tasks.task import Task


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fleetfl data split``."""
    data = subparsers.add_parser("data", help="prepare local data for real devices")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    split = sub.add_parser(
        "split", help="write one .npz shard per client of a task's federated data",
        description="Partition a built-in dataset as the simulation does and write "
                    "DIR/client-I.npz for I in 0..N-1 (arrays x, y, x_test, y_test).")
    split.add_argument("--config", metavar="FILE.toml",
                       help="take [task] and federation.num_clients from this configuration")
    split.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    split.add_argument("--dataset", metavar="TASK",
                       help="task.name: digits, synthetic or package.module:attribute "
                            "(default: the config's)")
    split.add_argument("--num-clients", type=int, metavar="N",
                       help="number of shards (default: federation.num_clients)")
    split.add_argument("--out", required=True, metavar="DIR", help="output directory")
    return data


def split(task: Task, num_clients: int, out: Path, *, seed: int = 0) -> list[Path]:
    """Write ``out/client-I.npz`` for every client of ``task``'s federated data."""
    data = task.federated_data(num_clients, seed)
    paths = []
    for i, (train, test) in enumerate(data.clients):
        paths.append(save_npz(out / f"client-{i}.npz", train.x, train.y, test.x, test.y))
    return paths


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl data split``."""
    overrides = list(args.overrides)
    if args.dataset:
        overrides.append(f'task.name="{args.dataset}"')
    config = load_config(args.config, overrides)  # ConfigError is reported by the CLI
    num_clients = config.federation.num_clients if args.num_clients is None else args.num_clients
    if num_clients < 1:
        raise ConfigError("--num-clients", f"must be >= 1, got {num_clients}")
    task, out = config.task, Path(args.out).expanduser()
    paths = split(task.build(), num_clients, out, seed=task.seed)
    manifest = {"task": task.name, "params": task.params, "seed": task.seed,
                "num_clients": num_clients,
                "shards": [p.name for p in paths]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(paths)} shards of {task.name} to {out} "
          f"(use task.seed={task.seed} on the coordinator)")
    return 0
