"""Simulation engines side by side: seconds per round and client trainings per second against
cohort size, for fleetfl on its local engine, fleetfl on Flower's Ray engine, and plain Flower
(FedAvg with a textbook ClientApp, on Ray: ``benchmarks.flower_overhead``), with the driver's and
the whole process tree's peak RSS.

Every run is a fresh process on the digits CNN (``--partitions`` Dirichlet 0.5 shards, client
i on shard i mod P: ``federation.data_partitions``; 2 local epochs of batch 10), an always-on
fleet of one device kind, central evaluation after each round. fleetfl runs the plain path
(float32 both ways, no pruning, no SecAgg+) unless ``--full`` (the defaults: int8 both ways,
80 % pruning, SecAgg+, memory plans); plain Flower is always plain FedAvg. Stacks alternate in
order from one cohort to the next. A steady round is the median over rounds 2..R; "round 1"
is from the start of the ServerApp's first round (engine start-up, registration and the first
dispatch included); "process" is the whole command.

    python -m benchmarks.engines [--population 1000] [--partitions 100] [--cohorts 50 100 250]
        [--rounds 8] [--full]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLAIN, emit
from fleetfl.devices.memory_stats import rss_bytes

STACKS = ("local", "ray", "flower")
MiB = 2**20


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def run_sampled(cmd: list[str], cwd: Path) -> tuple[str, dict[str, float]]:
    """Run ``cmd``; its stdout and the peak RSS (MiB) of its first process and of its whole
    tree, sampled every 0.25 s."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = {"driver_mib": 0.0, "tree_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            sizes = []
            for p in descendants(proc.pid):
                try:
                    sizes.append(rss_bytes(p) / MiB)
                except (OSError, ValueError):
                    continue
            if sizes:
                peak["driver_mib"] = max(peak["driver_mib"], sizes[0])
                peak["tree_mib"] = max(peak["tree_mib"], sum(sizes))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return stdout, peak


def run_fleetfl(engine: str, population: int, partitions: int, cohort: int, rounds: int,
                full: bool, out: Path) -> dict[str, Any]:
    """``fleetfl simulate`` on ``engine``; round times (s) and peaks."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets = [*([] if full else PLAIN), f"federation.engine={engine}",
            f"federation.rounds={rounds}", f"federation.num_clients={population}",
            f"federation.data_partitions={partitions}",
            f"federation.clients_per_round={cohort}", "federation.local_epochs=2",
            "federation.batch_size=10", "fleet.mix={rpi5=1}", "output.plot=false"]
    cmd = [sys.executable, "-m", "fleetfl.coordinator.cli", "simulate", "--no-progress",
           "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    _, peak = run_sampled(cmd, out)
    process_s = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_time_s"] for r in rows]
    trained = [r["received"] + r["failed"] for r in rows]
    return _figures(walls, trained, process_s, peak,
                    accuracy=rows[-1]["accuracy"], aggregated=rows[-1]["aggregated"])


def run_flower(population: int, partitions: int, cohort: int, rounds: int) -> dict[str, Any]:
    """Plain Flower FedAvg on Ray; round times (s) and peaks."""
    cmd = [sys.executable, "-m", "benchmarks.flower_overhead", "--one", "flower", "--rounds",
           str(rounds), "--clients", str(population), "--per-round", str(cohort),
           "--partitions", str(partitions)]
    started = time.perf_counter()
    stdout, peak = run_sampled(cmd, Path.cwd())
    process_s = time.perf_counter() - started
    marks = json.loads(stdout.strip().splitlines()[-1])  # end of rounds 1..R after round 0
    return _figures(marks, [cohort] * len(marks), process_s, peak)


def _figures(walls: list[float], trained: list[int], process_s: float,
             peak: dict[str, float], **extra: Any) -> dict[str, Any]:
    steady = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    med = statistics.median(steady)
    return {"round1_s": walls[0], "steady_round_s": med, "steady_rounds_s": steady,
            "trainings_per_s": sum(trained[1:]) / (walls[-1] - walls[0]),
            "round1_over_steady": walls[0] / med, "process_s": process_s, **peak, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=100,
                        help="data partitions (digits can make ~250): client i trains on i mod P")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[50, 100, 250])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    parser.add_argument("--full", action="store_true", help="fleetfl's full-stack defaults")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/engines"))
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for i, cohort in enumerate(args.cohorts):
        stacks = args.stacks if i % 2 == 0 else list(reversed(args.stacks))
        for stack in stacks:
            key = f"{stack}/{cohort}"
            order.append(key)
            print(f"running {key} ...", file=sys.stderr, flush=True)
            results[key] = (run_flower(args.population, args.partitions, cohort, args.rounds)
                            if stack == "flower" else
                            run_fleetfl(stack, args.population, args.partitions, cohort,
                                        args.rounds, args.full, args.out / key.replace("/", "-")))
    name = "engines" + (f"_{args.label}" if args.label else "") + ("_full" if args.full else "")
    emit(name, {"population": args.population, "partitions": args.partitions,
                "cohorts": args.cohorts, "rounds": args.rounds,
                "full_stack": args.full, "order": order, "runs": results})


if __name__ == "__main__":
    main()
