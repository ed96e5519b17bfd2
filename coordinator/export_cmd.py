"""``fleetfl export`` and ``fleetfl evaluate``: checkpoint → device file, and how well it runs.

``fleetfl export --checkpoint FILE --format onnx|tflite [--int8] [--structured-prune RATIO]
--out FILE`` rebuilds the global model from a checkpoint (masks applied), optionally removes
channels (torch-pruning) and fine-tunes briefly, and writes an ONNX or TFLite file, fp32 or
full int8 calibrated on the clients' training data. The task config travels inside the file.

``fleetfl export --checkpoint FILE --format executorch-train [--max-batch N] --out FILE.pte``
writes the task's *training program* for phones instead: forward, loss, the FedProx proximal
term and backward, for ExecuTorch's training runtime, with its manifest at ``FILE.pte.json``
(:mod:`fleetfl.client.training_program`; docs/mobile.md).

``fleetfl evaluate --model FILE [--checkpoint FILE]`` runs an exported file in onnxruntime or
ai-edge-litert on the task's test set and reports accuracy, file size and median latency, next
to the torch model's when a checkpoint is given.

The CLI wires both with ``add_parser(subparsers)`` and ``run(args)``; until then (and for
the benchmarks) ``python -m fleetfl.coordinator.export_cmd export|evaluate ...`` runs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch, the checkpoint and the runtimes load only when a command runs:
    import torch  # `fleetfl` builds every command's parser, the coordinator's too.

    from fleetfl.coordinator.checkpoint import Checkpoint

COMMANDS = ("export", "evaluate")
EXECUTORCH_TRAIN = "executorch-train"
TASK_KEY, EXPORT_KEY = "fleetfl.task", "fleetfl.export"
CALIBRATION_SAMPLES = 256
DEFAULT_PRUNE_FINETUNE_EPOCHS = 3


class CommandError(Exception):
    """A user error reported as ``fleetfl: error: ...`` with exit status 2."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``evaluate`` sub-commands to the ``fleetfl`` parser."""
    exp = subparsers.add_parser(
        "export", help="export a checkpoint's model to ONNX or TFLite (fp32 or full int8), or "
                       "its training program for phones (ExecuTorch)",
        description="Export the global model of a checkpoint for on-device inference, or with "
                    "--format executorch-train the training program a phone runs (needs "
                    "pip install 'fleetfl[executorch]'). TFLite export needs the optional "
                    "converter stack: pip install 'fleetfl[tflite]'.")
    exp.add_argument("--checkpoint", required=True, metavar="FILE",
                     help="checkpoint written by the coordinator (e.g. DIR/model.pt)")
    exp.add_argument("--format", required=True, choices=("onnx", "tflite", EXECUTORCH_TRAIN))
    exp.add_argument("--max-batch", type=int, default=None, metavar="N",
                     help="executorch-train: the largest batch one step takes; the runtime "
                          "plans its memory for it (default 256)")
    exp.add_argument("--int8", action="store_true",
                     help="full int8: per-channel int8 weights, int8 activations calibrated on "
                          "the clients' training data")
    exp.add_argument("--structured-prune", type=float, default=0.0, metavar="RATIO",
                     help="remove this fraction of the channels of every hidden layer "
                          "(torch-pruning), e.g. 0.5; the file gets really smaller and faster")
    exp.add_argument("--finetune-epochs", type=int, default=None, metavar="N",
                     help=f"SGD epochs on the training data after structured pruning "
                          f"(default {DEFAULT_PRUNE_FINETUNE_EPOCHS} when pruning, else 0)")
    exp.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES, metavar="N",
                     help="training examples used to calibrate int8 activation ranges")
    exp.add_argument("--out", required=True, metavar="FILE", help="output .onnx/.tflite file")
    exp.set_defaults(command="export")

    ev = subparsers.add_parser(
        "evaluate", help="accuracy, size and latency of an exported model on the test set",
        description="Run an exported .onnx (onnxruntime) or .tflite (ai-edge-litert) model on "
                    "the task's test set; with --checkpoint, next to the torch model.")
    ev.add_argument("--model", required=True, metavar="FILE", help="exported .onnx or .tflite")
    ev.add_argument("--checkpoint", metavar="FILE",
                    help="compare with this checkpoint's torch model (and take its task config)")
    ev.add_argument("--repeats", type=int, default=50, help="timed runs per latency (median)")
    ev.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(command="evaluate")


def run(args: argparse.Namespace) -> int:
    """Run ``export`` or ``evaluate``; 0 on success, 2 on a user error (message on stderr)."""
    from fleetfl.client.runtime import ModelLoadError
    from fleetfl.coordinator.checkpoint import CheckpointError

    try:
        if args.command == "export":
            print(json.dumps(export(args), indent=2))
        else:
            report = evaluate(args)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
    except (CommandError, CheckpointError, ModelLoadError, FileNotFoundError, ImportError,
            ValueError) as err:
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 2
    return 0


def calibration_inputs(task: dict[str, Any], n: int, seed: int = 0) -> np.ndarray:
    """``n`` training inputs drawn at random from all clients' data (client-like data)."""
    from fleetfl.coordinator.checkpoint import load_task_dataset

    union = load_task_dataset(task).train_union()
    idx = np.random.default_rng(seed).permutation(len(union))[: max(1, n)]
    return union.x[idx]


def export(args: argparse.Namespace) -> dict[str, Any]:
    """``fleetfl export``: write the file; return what was written."""
    from fleetfl.coordinator.checkpoint import load_checkpoint

    out = Path(args.out)
    suffix = {"onnx": ".onnx", "tflite": ".tflite", EXECUTORCH_TRAIN: ".pte"}[args.format]
    if out.suffix.lower() != suffix:
        raise CommandError(f"--out {out} should end in {suffix} for --format {args.format}")
    if not 0.0 <= args.structured_prune < 1.0:
        raise CommandError(f"--structured-prune must be in [0, 1), got {args.structured_prune}")
    if args.max_batch is not None and args.format != EXECUTORCH_TRAIN:
        raise CommandError(f"--max-batch applies to --format {EXECUTORCH_TRAIN} only")
    ckpt = load_checkpoint(args.checkpoint)
    if args.format == EXECUTORCH_TRAIN:
        return _export_training_program(args, ckpt, out)
    if args.format == "tflite":
        from fleetfl.compression.export_tflite import require_converters

        require_converters()  # fail before any work when the extra is missing
    model = ckpt.build_model()
    epochs = args.finetune_epochs
    if epochs is None:
        epochs = DEFAULT_PRUNE_FINETUNE_EPOCHS if args.structured_prune > 0 else 0
    if args.structured_prune > 0:
        model = _prune(ckpt, model, args.structured_prune, epochs, qat=args.int8)
    calibration = calibration_inputs(ckpt.task, args.calibration_samples)
    info = {"format": args.format, "int8": args.int8, "structured_prune": args.structured_prune,
            "finetune_epochs": epochs if args.structured_prune > 0 else 0,
            "server_round": ckpt.server_round, "checkpoint": Path(args.checkpoint).name,
            "parameters": sum(p.numel() for p in model.parameters())}
    metadata = {TASK_KEY: json.dumps(ckpt.task), EXPORT_KEY: json.dumps(info)}
    if args.format == "onnx":
        from fleetfl.compression.export_onnx import export_onnx as write
    else:
        from fleetfl.compression.export_tflite import export_tflite as write
    write(model, out, input_shape=ckpt.input_shape, int8=args.int8, calibration=calibration,
          metadata=metadata, input_dtype=ckpt.input_dtype)
    return {"out": str(out), "size_bytes": out.stat().st_size, **info}


def _export_training_program(args: argparse.Namespace, ckpt: Checkpoint,
                             out: Path) -> dict[str, Any]:
    """``--format executorch-train``: the checkpoint's model as an ExecuTorch training
    program (its weights are the starting point only; every round loads the global model)."""
    from fleetfl.client.training_program import (
        DEFAULT_MAX_BATCH,
        build_training_program,
        save_program,
    )
    from fleetfl.tasks.registry import task_from_record

    if args.int8 or args.structured_prune:
        raise CommandError(f"--int8 and --structured-prune do not apply to --format "
                           f"{EXECUTORCH_TRAIN} (it trains the task's float model)")
    max_batch = DEFAULT_MAX_BATCH if args.max_batch is None else args.max_batch
    program = build_training_program(
        task_from_record(ckpt.task), ckpt.build_model(), _example_batch(ckpt),
        max_batch=max_batch, task_ref={"name": ckpt.task.get("name"),
                                       "params": ckpt.task.get("params", {})})
    manifest = save_program(program, out)
    return {"out": str(out), "manifest": str(manifest), "format": EXECUTORCH_TRAIN,
            "size_bytes": out.stat().st_size, "max_batch": max_batch,
            "planned_memory_bytes": program.manifest.planned_bytes,
            "parameters": sum(int(np.prod(s)) for _, s in program.manifest.parameters),
            "masked": program.manifest.masked, "server_round": ckpt.server_round,
            "checkpoint": Path(args.checkpoint).name}


def _example_batch(ckpt: Checkpoint, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A few training examples to trace and check the program with; zeros of the task's input
    shape and dtype (label 0) when the task cannot make its data here (a deployed
    coordinator's task may hold none)."""
    try:
        union = ckpt.load_dataset().train_union()
        return union.x[:n], union.y[:n]
    except Exception:  # noqa: BLE001 - a user task's federated_data may raise anything
        return (np.zeros((n, *ckpt.input_shape), dtype=ckpt.input_dtype),
                np.zeros(n, dtype=np.int64))


def _prune(ckpt: Checkpoint, model: torch.nn.Module, ratio: float, epochs: int,
           qat: bool) -> torch.nn.Module:
    """Structured pruning, then ``epochs`` of fine-tuning on the clients' training union."""
    import torch

    from fleetfl.compression.structured import finetune, structured_prune

    example = torch.zeros((1, *ckpt.input_shape), dtype=getattr(torch, ckpt.input_dtype))
    pruned = structured_prune(model, example, ratio)
    if epochs > 0:
        train = ckpt.load_dataset().train_union()
        finetune(pruned, torch.from_numpy(train.x), torch.from_numpy(train.y), epochs=epochs,
                 qat=qat, seed=int(ckpt.task.get("seed", 0)))
    return pruned


def model_metadata(path: Path) -> dict[str, str]:
    """The string metadata an exported file carries (task config, export settings)."""
    if path.suffix.lower() == ".onnx":
        from fleetfl.compression.export_onnx import read_metadata
    else:
        from fleetfl.compression.export_tflite import read_metadata
    try:
        return read_metadata(path)
    except ImportError:
        return {}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``fleetfl evaluate``: accuracy, size and latency of the file (and of the torch model)."""
    import torch

    from fleetfl.client.runtime import load_runtime
    from fleetfl.coordinator.checkpoint import load_checkpoint, load_task_dataset

    path = Path(args.model)
    runtime = load_runtime(path, threads=args.threads)
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    meta = model_metadata(path)
    if ckpt is not None:
        task = ckpt.task
    elif TASK_KEY in meta:
        task = json.loads(meta[TASK_KEY])
    else:
        raise CommandError(f"{path} carries no task config (not exported by fleetfl export?); "
                           "pass --checkpoint FILE")
    test = load_task_dataset(task).test
    if tuple(runtime.input_shape) != tuple(test.x.shape[1:]):
        raise CommandError(f"{path} takes inputs of shape {runtime.input_shape}, the task's "
                           f"test set has {tuple(test.x.shape[1:])}")
    logits = runtime.predict(test.x)
    report: dict[str, Any] = {
        "model": str(path), "backend": runtime.backend, "test_examples": len(test),
        "export": json.loads(meta.get(EXPORT_KEY, "{}")),
        "exported": _figures(runtime.predict, logits, test.x, test.y, args.repeats,
                             runtime.size_bytes),
    }
    if ckpt is not None:
        torch.set_num_threads(args.threads)
        model = ckpt.build_model()

        @torch.no_grad()
        def torch_predict(x: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(x)).numpy()

        torch_logits = torch_predict(test.x)
        fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
        report["torch"] = _figures(torch_predict, torch_logits, test.x, test.y, args.repeats,
                                   fp32_bytes)
        report["top1_agreement"] = float((logits.argmax(1) == torch_logits.argmax(1)).mean())
    return report


def _figures(predict: Any, logits: np.ndarray, x: np.ndarray, y: np.ndarray, repeats: int,
             size: int) -> dict[str, float]:
    """Accuracy, size and latencies (batch of 1, and per example over the whole test set)."""
    from fleetfl.client.runtime import median_latency_ms

    one = x[:1]
    batch_ms = median_latency_ms(predict, x, repeats=max(1, repeats // 10), warmup=1)
    return {"accuracy": float((logits.argmax(1) == y).mean()), "size_bytes": int(size),
            "latency_ms_batch1": median_latency_ms(predict, one, repeats=repeats),
            "latency_ms_per_example_batched": batch_ms / len(x)}


def format_report(report: dict[str, Any]) -> str:
    """The evaluate report as a small aligned table."""
    rows = [("", "accuracy", "size", "latency b=1", "per example (batched)")]
    columns = [("exported", f"{report['backend']}")]
    if "torch" in report:
        columns.append(("torch", "torch (checkpoint)"))
    for key, label in columns:
        f = report[key]
        rows.append((label, f"{100 * f['accuracy']:.2f} %", f"{f['size_bytes'] / 1024:.1f} KiB",
                     f"{f['latency_ms_batch1']:.3f} ms",
                     f"{f['latency_ms_per_example_batched']:.4f} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['model']} on {report['test_examples']} test examples"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if "top1_agreement" in report:
        agreement = 100 * report["top1_agreement"]
        lines.append(f"top-1 agreement with the torch model: {agreement:.2f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m fleetfl.coordinator.export_cmd COMMAND ...``."""
    parser = argparse.ArgumentParser(prog="fleetfl")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
