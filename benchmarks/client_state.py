"""Where a simulated client's state lives: the coordinator's memory with Flower's context vs
the workers' disk (``client/state_store.py``), side by side.

Runs ``fleetfl simulate`` (digits CNN, int8 updates with error feedback: a 153 KB residual per
client that has trained; no pruning and no SecAgg+, so the residual is the only big state)
over ``--clients`` devices (IID shards: scikit-learn's 1,437 training digits allow at most
~280 clients of 5 examples), ``--per-round`` per round, twice per repeat in alternating order:
``FLEETFL_CLIENT_STATE_DIR=off`` (the state stays in Flower's context, kept by the driver) and
the default store. Samples the driver process's VmRSS every 0.25 s and reports, per run, the
RSS when round 1 ends, at the end, the peak, and the growth from round 1 to the end, plus the
wall time of rounds 2..R. The clients sampled at least once grow over the rounds, and with
them the state Flower keeps.

    python -m benchmarks.client_state [--clients 250] [--per-round 50] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLAIN, emit
from fleetfl.client.state_store import ENV as STATE_ENV
from fleetfl.client.state_store import OFF
from fleetfl.devices.memory_stats import rss_bytes


def driver_rss(pid: int) -> int:
    """VmRSS of the driver ``pid`` in bytes (0 once it has exited)."""
    try:
        return rss_bytes(pid)
    except OSError:
        return 0


def run(where: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One simulation with the state ``where`` ("context" or "store"); its RSS figures."""
    env = dict(os.environ)
    env.pop(STATE_ENV, None)
    if where == "context":
        env[STATE_ENV] = OFF
    sets = [*PLAIN, "compression.update_bits=8", f"federation.rounds={args.rounds}",
            f"federation.num_clients={args.clients}",
            f"federation.clients_per_round={args.per_round}", "fleet.mix={rpi5=1}",
            "task.params.iid=true",
            "output.plot=false"]
    cmd = [sys.executable, "-m", "fleetfl.coordinator.cli", "simulate", "--no-progress",
           "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int]] = []  # (rounds finished, RSS)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        samples.append((done, driver_rss(proc.pid)))
        time.sleep(0.25)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    after_round1 = next(r for d, r in samples if d >= 1)
    end = [r for d, r in samples if d >= args.rounds and r] or [samples[-1][1]]
    return {"state": where, "rss_after_round1_mb": after_round1 / 1e6,
            "rss_end_mb": end[0] / 1e6, "rss_peak_mb": max(r for _, r in samples) / 1e6,
            "growth_mb": (end[0] - after_round1) / 1e6,
            "rounds_2_to_R_s": rows[-1]["wall_time_s"] - rows[0]["wall_time_s"],
            "final_accuracy": rows[-1]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=250)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = ("context", "store") if rep % 2 == 0 else ("store", "context")
            for where in order:
                result = run(where, args, Path(tmp) / f"{where}-{rep}")
                print(json.dumps(result), file=sys.stderr)
                runs.append(result)
    summary = {where: {key: statistics.median(r[key] for r in runs if r["state"] == where)
                       for key in runs[0] if key != "state"}
               for where in ("context", "store")}
    emit("client_state", {"settings": vars(args), "runs": runs, "median": summary})


if __name__ == "__main__":
    main()
