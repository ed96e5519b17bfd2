"""The phone runtime (ExecuTorch's training runtime) against eager torch, side by side.

    python -m benchmarks.executorch_runtime steps [--models cnn lstm] [--steps 40]
    python -m benchmarks.executorch_runtime fleet [--rounds 30] [--seeds 0] [--set K=V ...]
                                                  [--name executorch_fleet]

``steps``: for the digits CNN and the Shakespeare-class LSTM (``small``: 1 × LSTM 128, 82 k
parameters, 80-symbol windows), the training program is exported once (timed), then each
runtime trains in a **fresh process**: a FedProx local round of ``--steps`` SGD steps at the
default batch (10), timed after 3 warm-up steps (median seconds per step over 4 chunks), and
the process's peak RSS (``VmHWM``) at the end, next to its RSS before training. Also the
``.pte`` size against the fp32 ONNX inference model and the fp32 weights, and ExecuTorch's
planned arena for the program's largest batch (``--max-batch``, the runtime allocates it).

``fleet``: ``fleetfl simulate`` (digits CNN, the default fleet) for ``--rounds`` rounds with
every client in torch, every client in ExecuTorch, and the phones in ExecuTorch (mixed), on
the same seeds; final and best accuracy, wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLAIN, emit, simulate

MODELS = {"cnn": ("digits", {}), "lstm": ("shakespeare", {"model": "small"})}
BATCH = 10


def _task_and_data(model: str) -> tuple[Any, Any]:
    from fleetfl.tasks.registry import resolve_task

    name, params = MODELS[model]
    task = resolve_task(name, params)
    if model == "lstm":  # random 80-symbol windows: no download needed to time a step
        import numpy as np

        from fleetfl.tasks.data import Split

        rng = np.random.default_rng(0)
        return task, Split(x=rng.integers(0, 80, (400, 80)).astype(np.uint8),
                           y=rng.integers(0, 80, 400))
    return task, task.federated_data(10, 0).clients[0][0]


def export(model: str, out: Path, max_batch: int) -> dict[str, Any]:
    """Export the training program and the fp32 ONNX inference model; their sizes."""
    import torch

    from fleetfl.client.training_program import build_training_program, save_program
    from fleetfl.compression.export_onnx import export_onnx

    task, data = _task_and_data(model)
    net = task.build_model(0)
    started = time.perf_counter()
    program = build_training_program(task, net, (data.x[:8], data.y[:8]), max_batch=max_batch)
    export_s = time.perf_counter() - started
    save_program(program, out)
    onnx_path = out.with_suffix(".onnx")
    export_onnx(net, onnx_path, input_shape=tuple(data.x.shape[1:]), int8=False,
                calibration=data.x[:8], metadata={}, input_dtype=str(data.x.dtype))
    return {"export_s": round(export_s, 1), "pte_bytes": out.stat().st_size,
            "onnx_fp32_bytes": onnx_path.stat().st_size,
            "weights_fp32_bytes": sum(p.numel() * 4 for p in net.parameters()),
            "parameters": sum(p.numel() for p in net.parameters()),
            "max_batch": max_batch, "planned_arena_bytes": program.manifest.planned_bytes,
            "torch": torch.__version__}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_runtime(model: str, runtime: str, program: Path, steps: int) -> dict[str, Any]:
    """In this (fresh) process: load everything, then train; seconds per step and memory."""
    import torch

    torch.set_num_threads(1)
    task, data = _task_and_data(model)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    net = task.build_model(0)
    weights = {k: v.detach().numpy().copy() for k, v in net.named_parameters()}
    solve = dict(mu=0.01, lr=0.05, batch_size=BATCH, seed=0)
    if runtime == "executorch":
        from fleetfl.client.solver_executorch import ProgramRunner, fedprox_train_executorch
        from fleetfl.client.training_program import load_program

        runner = ProgramRunner(load_program(program))

        def train(n: int) -> None:
            fedprox_train_executorch(runner, weights, {}, x, y, steps=n, **solve)
    else:
        from fleetfl.client.solver import fedprox_train

        def train(n: int) -> None:
            net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            fedprox_train(net, x, y, steps=n, loss_fn=task.loss, **solve)

    train(3)  # warm-up (and the runtime's first-run initialization)
    ready = _status("VmRSS")
    chunk = max(1, steps // 4)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        train(chunk)
        times.append((time.perf_counter() - started) / chunk)
    return {"step_s_median": statistics.median(times), "rss_ready_bytes": ready,
            "peak_rss_bytes": _status("VmHWM")}


def steps_benchmark(models: list[str], steps: int, max_batch: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            program = Path(tmp) / f"{model}.pte"
            entry = {"program": export(model, program, max_batch)}
            for runtime in ("torch", "executorch"):  # one fresh process each
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.executorch_runtime", "_one", model,
                     runtime, str(program), str(steps)],
                    capture_output=True, text=True, check=True)
                entry[runtime] = json.loads(out.stdout.strip().splitlines()[-1])
            entry["slowdown"] = round(entry["executorch"]["step_s_median"]
                                      / entry["torch"]["step_s_median"], 1)
            results[model] = entry
            print(json.dumps({model: entry}), file=sys.stderr, flush=True)
    return {"batch": BATCH, "steps": steps, "models": results}


def _runtimes(profiles: list[str]) -> str:
    return "{" + ", ".join(f'{p} = "executorch"' for p in profiles) + "}"


def _fleets() -> dict[str, str]:
    from fleetfl.devices.profiles import CATALOG

    return {"torch": "{}", "executorch": _runtimes(list(CATALOG)),
            "mixed": _runtimes([p for p in CATALOG if p.startswith("phone")])}


def fleet_benchmark(rounds: int, seeds: list[int], sets: list[str]) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for fleet, mapping in _fleets().items():
                overrides = [*PLAIN, f"federation.rounds={rounds}", f"task.seed={seed}",
                             f"fleet.seed={seed}", f"fleet.runtimes={mapping}", *sets]
                summary, rows = simulate(overrides, Path(tmp) / f"{fleet}-{seed}")
                run = {"fleet": fleet, "seed": seed,
                       "final_accuracy": summary["final_accuracy"],
                       "best_accuracy": max(r["accuracy"] for r in rows),
                       "executorch_updates": sum(r["executorch"] for r in rows),
                       "updates": sum(r["aggregated"] for r in rows),
                       "wall_time_s": round(summary["process_wall_time_s"], 1)}
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    return {"rounds": rounds, "set": sets, "runs": runs}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        model, runtime, program, steps = sys.argv[2:6]
        print(json.dumps(one_runtime(model, runtime, Path(program), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    st = sub.add_parser("steps")
    st.add_argument("--models", nargs="+", default=["cnn", "lstm"], choices=sorted(MODELS))
    st.add_argument("--steps", type=int, default=40)
    st.add_argument("--max-batch", type=int, default=32)
    fl = sub.add_parser("fleet")
    fl.add_argument("--rounds", type=int, default=30)
    fl.add_argument("--seeds", type=int, nargs="+", default=[0])
    fl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every run (e.g. the full stack)")
    fl.add_argument("--name", default="executorch_fleet", help="results file name")
    args = parser.parse_args()
    if args.what == "steps":
        emit("executorch_steps", steps_benchmark(args.models, args.steps, args.max_batch))
    else:
        emit(args.name, fleet_benchmark(args.rounds, args.seeds, args.set))


if __name__ == "__main__":
    main()
