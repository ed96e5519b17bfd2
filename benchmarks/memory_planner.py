"""Training-memory planner: predicted vs measured peak of local training, and a fleet run that
stays inside its budgets.

1. Accuracy: for the digits CNN and RandWire at several batch sizes (and RandWire with
   micro-batches and with activation checkpointing), the predicted peak of a FedProx solver
   step against a measurement: a fresh process (mmap threshold pinned, as a client does),
   one warm-up step on a copy, free memory handed back, then /proc/self/clear_refs reset and
   the VmHWM rise over two steps, plus the weights (resident before the reset).
2. Fleet: one round of the real ServerApp loop (``run_rounds``) over one real device per
   catalog profile, RandWire with the coordinator's batch size. Each device is a ClientApp in
   device mode (its own data file and profile, always online) that gets its train message in a
   fresh process, as a deployed SuperNode runs it (``tests/device_process.py``). The
   coordinator's runtime figure (``fleet.runtime_memory_mib``) is calibrated first: the
   resident memory of a fresh device process once it has loaded its data and model, plus
   4 MiB. The coordinator plans every device's memory, leaves out those where nothing fits;
   each client checks its plan against its own resident memory and budget, refuses or trains,
   and the process's peak RSS (VmHWM) is compared with the device's budget.

    python -m benchmarks.memory_planner [--repeats 3] [--fleet-batch 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PLAIN, emit
from fleetfl import protocol as P
from fleetfl.coordinator.config import Config, load_config
from fleetfl.coordinator.planning import MemorySettings, PlanSettings, memory_plan
from fleetfl.coordinator.registry import ClientInfo
from fleetfl.coordinator.server_app import RunOutcome, message_config, run_rounds
from fleetfl.devices.memory_planner import MIB, TrainingMemoryStats, predict_peak
from fleetfl.devices.memory_stats import training_memory_stats
from fleetfl.devices.profiles import CATALOG
from fleetfl.tasks.data_format import save_npz
from fleetfl.tasks.models import build_model
from tests.device_process import ProcessGrid, runtime_bytes

DIGITS = (1, 8, 8)
# (model, batch, micro-batch, checkpointing)
CASES = [
    ("cnn", 32, 32, False), ("cnn", 128, 128, False), ("cnn", 512, 512, False),
    ("cnn", 512, 128, False),
    ("randwire", 16, 16, False), ("randwire", 64, 64, False), ("randwire", 256, 256, False),
    ("randwire", 256, 64, False), ("randwire", 256, 256, True), ("randwire", 256, 64, True),
]

MEASURE = """
import copy, json, sys, torch
from fleetfl.devices.memory_stats import peak_rss_delta, pin_mmap_threshold, release_free_memory
from fleetfl.client.solver import fedprox_train
from fleetfl.tasks.models import build_model
pin_mmap_threshold()
torch.set_num_threads(1)
name, batch, micro, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
model = build_model(name, (1, 8, 8), 10)
x, y = torch.randn(batch, 1, 8, 8), torch.arange(batch) % 10
kw = dict(mu=0.01, lr=0.05, batch_size=batch, seed=0, micro_batch=micro, checkpointing=ckpt)
fedprox_train(copy.deepcopy(model), x, y, steps=1, **kw)  # code pages, kernel caches
release_free_memory()
delta = peak_rss_delta(lambda: fedprox_train(model, x, y, steps=2, **kw))
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(delta + weights))
"""

def _run(code: str, *args: object) -> Any:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accuracy(stats: dict[str, TrainingMemoryStats], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, batch, micro, ckpt in CASES:
        predicted = predict_peak(stats[name], micro, -(-batch // micro), ckpt)
        measured = statistics.median(_run(MEASURE, name, batch, micro, int(ckpt))
                                     for _ in range(repeats))
        rows.append({"model": name, "batch": batch, "micro_batch": micro,
                     "checkpointing": ckpt, "predicted": predicted.total,
                     "predicted_parts": {"weights": predicted.weights,
                                         "gradients": predicted.gradients,
                                         "optimizer_state": predicted.optimizer_state,
                                         "activations": predicted.activations,
                                         "workspace": predicted.workspace},
                     "measured_median": measured, "repeats": repeats,
                     "error": predicted.total / measured - 1})
    return rows


def fleet_devices(root: Path, batch: int) -> list[tuple[str, dict[str, Any]]]:
    """One device per catalog profile (always online), each with 4 batches of random
    digits-shaped data: ``(profile name, node_config)``."""
    devices = []
    rng = np.random.default_rng(0)
    for i, (name, profile) in enumerate(sorted(CATALOG.items(),
                                               key=lambda kv: kv[1].memory_budget_bytes)):
        data = save_npz(root / f"{name}.npz", rng.random((4 * batch, *DIGITS), np.float32),
                        rng.integers(0, 10, 4 * batch))
        online = dataclasses.replace(profile, availability=1.0)
        devices.append((name, {"data-path": str(data), "device": json.dumps(online.to_dict()),
                               "client-index": i}))
    return devices


def fleet_config(batch: int, clients: int, runtime: int) -> Config:
    return load_config(None, [
        *PLAIN,
        "task.dataset=digits", "task.model=randwire", f"federation.num_clients={clients}",
        f"federation.clients_per_round={clients}", "federation.rounds=1",
        "federation.local_epochs=1", f"federation.batch_size={batch}", "federation.lr=0.05",
        f"fleet.runtime_memory_mib={runtime / MIB!r}",
    ])


def fleet(stats: TrainingMemoryStats, batch: int, repeats: int) -> dict[str, Any]:
    """``repeats`` one-round fleet runs through the coordinator's planning and the ClientApp."""
    with tempfile.TemporaryDirectory(prefix="fleetfl-bench-") as tmp:
        devices = fleet_devices(Path(tmp), batch)
        probe = fleet_config(batch, len(devices), 0)
        measured_runtime = runtime_bytes(message_config(probe), devices[0][1])
        runtime = measured_runtime + 4 * MIB
        config = fleet_config(batch, len(devices), runtime)
        runs = []
        for _ in range(repeats):
            grid = ProcessGrid([nc for _, nc in devices])
            outcome = RunOutcome()
            run_rounds(grid, config, outcome)
            runs.append((grid, outcome.rows[0]))
    settings = PlanSettings(len(devices), 1, batch, 0.0, None, 0,
                            MemorySettings(stats, runtime_bytes=runtime))
    clients = []
    for i, (name, _) in enumerate(devices):
        node, profile = 1000 + i, CATALOG[name]
        sent = [m.content[P.CONFIG] for m in runs[0][0].sent
                if m.metadata.message_type == "train" and m.metadata.dst_node_id == node]
        peaks = [grid.peaks[node] for grid, _ in runs if node in grid.peaks]
        errors = [grid.errors[node] for grid, _ in runs if node in grid.errors]
        row: dict[str, Any] = {"device": name, "budget": profile.memory_budget_bytes}
        if not sent:
            plan = memory_plan(ClientInfo(node, i, profile, 4 * batch), settings)
            row.update(status="not given work", reason=plan.reason if plan else "")
        else:
            cfg = sent[0]
            row.update(micro_batch=cfg[P.PLAN_MICRO_BATCH],
                       checkpointing=cfg[P.PLAN_CHECKPOINTING],
                       predicted=cfg[P.PLAN_PREDICTED_PEAK_BYTES],
                       status="refused" if errors else "trained",
                       reason=errors[0] if errors else "")
            if peaks and not errors:
                row.update(peak_rss=peaks, peak_rss_max=max(peaks),
                           under_budget=max(peaks) <= profile.memory_budget_bytes)
        clients.append(row)
    trained = [c for c in clients if c["status"] == "trained"]
    return {"model": "randwire", "batch": batch, "repeats": repeats,
            "measured_runtime_bytes": measured_runtime, "runtime_memory_bytes": runtime,
            "rounds": [{k: row[k] for k in ("selected", "aggregated", "unfit", "memory_refused",
                                            "failed")} for _, row in runs],
            "clients": clients, "trained": len(trained),
            "all_trained_under_budget": all(c["under_budget"] for c in trained)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fleet-batch", type=int, default=512)
    args = parser.parse_args()
    stats = {name: training_memory_stats(build_model(name, DIGITS, 10), DIGITS)
             for name in ("cnn", "randwire")}
    rows = accuracy(stats, args.repeats)
    emit("memory_planner", {
        "stats": {name: s.to_dict() for name, s in stats.items()},
        "accuracy": rows,
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "fleet": fleet(stats["randwire"], args.fleet_batch, args.repeats),
    })


if __name__ == "__main__":
    main()
