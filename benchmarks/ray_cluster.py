"""Rounds per minute on two Ray nodes against one, side by side on this machine.

``fleetfl simulate`` with the defaults (digits CNN, the default fleet of 20 devices, 10 per
round, int8, pruning, SecAgg+) for ``--rounds`` rounds, on:

* ``local``: the Ray instance ``fleetfl simulate`` starts itself (one node, this machine's CPUs);
* ``two-nodes``: a head and a second node on 127.0.0.1 (``ray start``, half the CPUs each, the
  second with its own temp dir), joined with ``federation.ray_address``, as the README says,
  the clients' state in Flower's context (no ``FLEETFL_CLIENT_STATE_DIR`` on the nodes);
* ``two-nodes-shared``: the same with one state directory both nodes share.

Alternated ``--repeats`` times; rounds per minute over rounds 2..R (round 1 includes Ray's and
the actors' start-up), medians. Both setups share the same 2 cores here, so this measures what
the second node costs (scheduling, object transfer between raylets), not what it adds.

    python -m benchmarks.ray_cluster [--rounds 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ray_nodes import cluster_env, two_nodes  # noqa: E402

from benchmarks.common import emit, simulate  # noqa: E402


def rounds_per_minute(rows: list[dict[str, Any]]) -> float:
    """Rounds 2..R per minute of wall time."""
    seconds = rows[-1]["wall_time_s"] - rows[0]["wall_time_s"]
    return 60.0 * (len(rows) - 1) / seconds


def run_two_nodes(rounds: int, out: Path, cpus: int, shared_state: Path | None) -> float:
    """One simulation on a head and a second node of ``cpus`` CPUs each; ``shared_state``:
    the clients' state directory of both nodes (None: in Flower's context)."""
    env = cluster_env([])
    if shared_state is not None:
        env["FLEETFL_CLIENT_STATE_DIR"] = str(shared_state)
    out.mkdir(parents=True, exist_ok=True)
    with two_nodes(env, out, cpus) as address:
        _, rows = simulate([f"federation.rounds={rounds}",
                            f"federation.ray_address='{address}'", "output.plot=false"], out)
    return rounds_per_minute(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cpus = max(1, (os.cpu_count() or 2) // 2)
    setups = ["local", "two-nodes", "two-nodes-shared"]
    runs: dict[str, list[float]] = {setup: [] for setup in setups}
    order = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for setup in setups if rep % 2 == 0 else setups[::-1]:
                order.append(setup)
                out = Path(tmp) / f"{setup}-{rep}"
                if setup == "local":
                    _, rows = simulate([f"federation.rounds={args.rounds}",
                                        "output.plot=false"], out)
                    runs[setup].append(rounds_per_minute(rows))
                else:
                    shared = Path(tmp) / f"state-{rep}" if setup.endswith("shared") else None
                    runs[setup].append(run_two_nodes(args.rounds, out, cpus, shared))
                print(setup, runs[setup][-1], file=sys.stderr)
    emit("ray_cluster", {"rounds": args.rounds, "cpus_per_node": cpus, "order": order,
                         "rounds_per_minute": runs,
                         "median": {k: statistics.median(v) for k, v in runs.items()}})


if __name__ == "__main__":
    main()
