"""Export benchmark: fp32 vs full int8, dense vs structurally pruned, ONNX and TFLite.

Trains the digits model centrally with QAT (as the clients train; plain SGD + momentum on the
clients' training union, ``--epochs``), saves a fleetfl checkpoint, exports it with
``fleetfl export`` in every variant (ONNX: fp32 / int8; TFLite: fp32 / int8; each dense and
with ``--structured-prune``), then runs ``fleetfl evaluate`` on every file in fresh processes,
``--repeats`` times round-robin, and reports per file: size, test accuracy, top-1 agreement
with the torch model, and the median over processes of the median latency (batch of 1, and per
example over the whole test set), next to the torch model's. One inference thread throughout.

TFLite export needs the ``tflite`` extra; point ``--tflite-python`` at an interpreter that has
it (default: this one if it has litert-torch, else TFLite is skipped). The runtimes themselves
(onnxruntime, ai-edge-litert) run in this interpreter.

    python -m benchmarks.export [--epochs 10] [--repeats 5] [--prune 0.5] \
        [--tflite-python /tmp/tflite-venv/bin/python]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import emit
from fleetfl.compression.structured import finetune
from fleetfl.coordinator.checkpoint import save_checkpoint
from fleetfl.tasks.models import build_model
from fleetfl.tasks.registry import load_federated

OUT = Path("runs/bench/export")
CMD = ["-m", "fleetfl.coordinator.export_cmd"]


def train_checkpoint(model_name: str, epochs: int, path: Path) -> Path:
    """A digits model trained with QAT on all clients' training data, saved as a checkpoint."""
    data = load_federated("digits", num_clients=20, seed=0)
    train = data.train_union()
    model = build_model(model_name, data.input_shape, data.num_classes, seed=0)
    finetune(model, torch.from_numpy(train.x), torch.from_numpy(train.y), epochs=epochs,
             lr=0.05, qat=True)
    task = {"dataset": "digits", "model": model_name, "alpha": 1.0, "beta": 1.0, "iid": False,
            "partition_alpha": 0.5, "seed": 0, "num_clients": 20,
            "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    return save_checkpoint(path, state_dict=model.state_dict(), task=task, server_round=epochs,
                           quantization={"qat": True})


def _run(python: str, args: list[str]) -> str:
    # One thread everywhere: inference is timed single-threaded, and on a busy 2-core machine
    # two torch threads make the exports (fine-tuning, tracing) many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, *CMD, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def export_all(ckpt: Path, prune: float, tflite_python: str | None) -> dict[str, Path]:
    """Every variant's file, by name like ``onnx-int8-pruned``."""
    files: dict[str, Path] = {}
    formats = [("onnx", sys.executable)] + ([("tflite", tflite_python)] if tflite_python else [])
    for fmt, python in formats:
        for int8 in (False, True):
            for pruned in (False, True):
                name = f"{fmt}-{'int8' if int8 else 'fp32'}-{'pruned' if pruned else 'dense'}"
                out = OUT / f"{name}.{fmt}"
                args = ["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]
                args += ["--int8"] if int8 else []
                args += ["--structured-prune", str(prune)] if pruned else []
                started = time.perf_counter()
                _run(python, args)
                print(f"exported {name} in {time.perf_counter() - started:.1f} s",
                      file=sys.stderr)
                files[name] = out
    return files


def evaluate_all(files: dict[str, Path], ckpt: Path, repeats: int) -> dict[str, Any]:
    """Fresh-process evaluations, round-robin; medians over processes."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in files}
    for _ in range(repeats):
        for name, path in files.items():
            out = _run(sys.executable, ["evaluate", "--model", str(path), "--checkpoint",
                                        str(ckpt), "--repeats", "50", "--json"])
            runs[name].append(json.loads(out))
    results: dict[str, Any] = {}
    for name, reports in runs.items():
        first = reports[0]
        results[name] = {
            "backend": first["backend"],
            "size_bytes": first["exported"]["size_bytes"],
            "parameters": first["export"]["parameters"],
            "accuracy": first["exported"]["accuracy"],
            "top1_agreement_with_torch": first["top1_agreement"],
            **_median_latencies([r["exported"] for r in reports]),
        }
    torch_runs = [r["torch"] for reports in runs.values() for r in reports]
    results["torch-fp32-dense"] = {"backend": "torch", "size_bytes": torch_runs[0]["size_bytes"],
                                   "accuracy": torch_runs[0]["accuracy"],
                                   **_median_latencies(torch_runs)}
    return results


def _median_latencies(figures: list[dict[str, Any]]) -> dict[str, float]:
    return {key: round(statistics.median(f[key] for f in figures), 4)
            for key in ("latency_ms_batch1", "latency_ms_per_example_batched")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", help="digits model: cnn or randwire")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per file")
    parser.add_argument("--prune", type=float, default=0.5, help="structured pruning ratio")
    parser.add_argument("--tflite-python", default=None,
                        help="python with the tflite extra (litert-torch, ai-edge-quantizer)")
    args = parser.parse_args()
    tflite_python = args.tflite_python
    if tflite_python is None and importlib.util.find_spec("litert_torch") is not None:
        tflite_python = sys.executable
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = train_checkpoint(args.model, args.epochs, OUT / f"{args.model}.pt")
    files = export_all(ckpt, args.prune, tflite_python)
    results = evaluate_all(files, ckpt, args.repeats)
    ratios = {fmt: round(results[f"{fmt}-fp32-dense"]["size_bytes"]
                         / results[f"{fmt}-int8-dense"]["size_bytes"], 3)
              for fmt in ("onnx", "tflite") if f"{fmt}-int8-dense" in results}
    emit(f"export_{args.model}", {
        "model": args.model, "epochs": args.epochs, "prune_ratio": args.prune,
        "repeats": args.repeats, "threads": 1, "int8_size_ratio_dense": ratios,
        "command": " ".join(["python -m benchmarks.export", *sys.argv[1:]]),
        "results": results,
    })


if __name__ == "__main__":
    main()
