"""Shared plumbing of the benchmark scripts: run ``fleetfl simulate`` in a fresh process.

A fresh process per run keeps Ray state and warm caches from leaking between compared runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleetfl.coordinator.config import PLAIN_OVERRIDES

RESULTS = Path(__file__).resolve().parent / "results"


# fleetfl's defaults run the full stack (int8, 80 % pruning, SecAgg+). The benchmarks measure
# one feature at a time from the plain path, as their recorded results did, and turn on what
# they measure (a later override of the same key wins).
PLAIN = list(PLAIN_OVERRIDES)


def simulate(overrides: list[str], out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``fleetfl simulate --set ... --out out``; return (summary, per-round rows)."""
    # Run from the output directory: in a repository checkout, the bare `fleetfl/` folder on the
    # working directory would shadow a non-editable install, in this process and in Ray's workers.
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fleetfl.coordinator.cli", "simulate", "--no-progress",
           "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_wall_time_s"] = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def machine() -> dict[str, Any]:
    """Where a figure was measured."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "platform": platform.platform(terse=True)}


def emit(name: str, result: dict[str, Any]) -> None:
    """Print ``result`` as JSON and keep a copy in ``benchmarks/results/NAME.json``."""
    result = {"benchmark": name, "machine": machine(), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
