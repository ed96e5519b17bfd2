"""Training-memory planner: predicted vs measured peak of local training, and a fleet that
stays inside its budgets.

1. Accuracy: for the digits CNN and RandWire at several batch sizes (and RandWire with
   micro-batches and with activation checkpointing), the predicted peak of a FedProx solver
   step against a measurement: a fresh process (mmap threshold pinned, as a client does),
   one warm-up step on a copy, free memory handed back, then /proc/self/clear_refs reset and
   the VmHWM rise over two steps, plus the weights (resident before the reset).
2. Fleet: one client per catalog device trains RandWire with the coordinator's batch size.
   Each client measures its own resident memory before training (the runtime: Python, torch,
   model, data), plans with ``fit_training_plan(stats, batch, budget, reserved_bytes=rss)``,
   refuses the work with the planner's reason when nothing fits, else trains and reports the
   whole process's peak RSS (VmHWM), which must stay under the device's budget.

    python -m benchmarks.memory_planner [--repeats 3] [--fleet-batch 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from benchmarks.common import emit
from fleetfl.devices.memory_planner import TrainingMemoryStats, predict_peak
from fleetfl.devices.memory_stats import training_memory_stats
from fleetfl.devices.profiles import CATALOG
from fleetfl.tasks.models import build_model

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

CLIENT = """
import json, sys, torch
from fleetfl.devices.memory_stats import pin_mmap_threshold, rss_bytes
pin_mmap_threshold()
torch.set_num_threads(1)
from fleetfl.client.solver import fedprox_train
from fleetfl.devices.memory_planner import TrainingMemoryStats, fit_training_plan
from fleetfl.tasks.models import build_model
stats = TrainingMemoryStats.from_dict(json.loads(sys.argv[1]))
budget, batch = int(sys.argv[2]), int(sys.argv[3])
model = build_model("randwire", (1, 8, 8), 10)
x, y = torch.randn(4 * batch, 1, 8, 8), torch.arange(4 * batch) % 10
reserved = rss_bytes()
plan = fit_training_plan(stats, batch, budget, reserved_bytes=reserved)
out = {"reserved": reserved, "predicted": plan.predicted_peak_bytes, "reason": plan.reason,
       "micro_batch": plan.micro_batch, "checkpointing": plan.checkpointing,
       "accepted": plan.fits}
if plan.fits:
    fedprox_train(model, x, y, mu=0.01, lr=0.05, batch_size=batch, steps=4, seed=0,
                  micro_batch=plan.micro_batch, checkpointing=plan.checkpointing)
out["peak_rss"] = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                       if l.startswith("VmHWM"))
print(json.dumps(out))
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


def fleet(stats: TrainingMemoryStats, batch: int) -> list[dict[str, Any]]:
    rows = []
    for name, profile in sorted(CATALOG.items(), key=lambda kv: kv[1].memory_budget_bytes):
        result = _run(CLIENT, json.dumps(stats.to_dict()), profile.memory_budget_bytes, batch)
        result.update(device=name, budget=profile.memory_budget_bytes,
                      under_budget=result["peak_rss"] <= profile.memory_budget_bytes)
        rows.append(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fleet-batch", type=int, default=512)
    args = parser.parse_args()
    stats = {name: training_memory_stats(build_model(name, DIGITS, 10), DIGITS)
             for name in ("cnn", "randwire")}
    rows = accuracy(stats, args.repeats)
    clients = fleet(stats["randwire"], args.fleet_batch)
    accepted = [c for c in clients if c["accepted"]]
    emit("memory_planner", {
        "stats": {name: s.to_dict() for name, s in stats.items()},
        "accuracy": rows,
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "fleet": {"model": "randwire", "batch": args.fleet_batch, "clients": clients,
                  "accepted": len(accepted), "refused": len(clients) - len(accepted),
                  "all_accepted_under_budget": all(c["under_budget"] for c in accepted)},
    })


if __name__ == "__main__":
    main()
