"""``fleetfl schedule``: rewrite an exported model into its peak-memory-optimal operator order.

    fleetfl schedule --model model.tflite --out model.sched.tflite [--budget BYTES]

Reads a .onnx or .tflite file, finds the operator order with the lowest peak activation memory
(``fleetfl.devices.scheduler``), writes the model with only its operator order changed, prints
the peak before and after, and checks on a random input that the runtime (onnxruntime or
ai-edge-litert, when installed) gives bit-identical outputs. Exit status: 0 done, 1 the best
order still exceeds ``--budget`` (nothing written), 2 unreadable or unsupported model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MIB = 2**20


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``schedule`` command to ``fleetfl``'s subparsers."""
    parser = subparsers.add_parser(
        "schedule", help="reorder an exported model's operators for the lowest peak memory",
        description=("Rewrite an ONNX or TFLite model so that its operators run in the order "
                     "with the lowest peak activation memory (SERENITY-style dynamic "
                     "programming). Only the operator order changes; outputs are identical."),
    )
    parser.add_argument("--model", required=True, metavar="FILE", help=".onnx or .tflite model")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the result")
    parser.add_argument("--budget", type=int, metavar="BYTES",
                        help="activation memory the device has; fail if no order fits it")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                        help="exact search time before falling back to beam search (60)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running both models on a random input")
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl schedule``; returns the exit status."""
    from fleetfl.devices.scheduler import optimal_schedule, peak_memory

    src, dst = Path(args.model), Path(args.out)
    try:
        kind = _kind(src)
        model, graph = _load(src, kind)
    except (OSError, ValueError, ImportError) as err:
        print(f"fleetfl schedule: error: {src}: {err}", file=sys.stderr)
        return 2
    before = peak_memory(graph)
    result = optimal_schedule(graph, budget_bytes=args.budget, time_limit_s=args.time_limit)
    proof = ("optimal" if result.optimal else
             f"beam search, within {result.gap:.1%} of the lower bound "
             f"{_size(result.lower_bound_bytes)}")
    print(f"{src}: {kind}, {graph.num_nodes} operators, {result.segments} pieces "
          f"between cut points")
    print(f"  peak activation memory, exporter's order: {_size(before)}")
    print(f"  peak activation memory, scheduled order:  {_size(result.peak_bytes)} "
          f"({before / max(result.peak_bytes, 1):.2f}x lower; {proof}; "
          f"{result.seconds:.2f} s)")
    if args.budget is not None and result.peak_bytes > args.budget:
        print(f"fleetfl schedule: error: no order found fits --budget {_size(args.budget)}; "
              f"the lowest peak {'is' if result.optimal else 'found is'} "
              f"{_size(result.peak_bytes)}; nothing written", file=sys.stderr)
        return 1
    data = _rewrite(model, graph, result.order, kind)
    dst.write_bytes(data)
    print(f"  wrote {dst}")
    if not args.no_verify:
        print(f"  {_verify(src.read_bytes(), data, kind)}")
    if kind == "ONNX":
        print("  onnxruntime follows the file's order only with SessionOptions.execution_order "
              "= ExecutionOrder.PRIORITY_BASED")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes:,} bytes ({nbytes / MIB:.2f} MiB)"


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "ONNX"
    if suffix == ".tflite":
        return "TFLite"
    raise ValueError(f"unsupported model type {suffix!r}: expected .onnx or .tflite")


def _load(path: Path, kind: str) -> tuple[Any, Any]:
    """The model (ModelProto, or .tflite bytes) and its operator graph."""
    from fleetfl.devices.graph import from_onnx, from_tflite

    if kind == "ONNX":
        import onnx

        try:
            model = onnx.load(str(path))
        except Exception as err:  # onnx raises DecodeError and others for a broken file
            raise ValueError(f"not a readable ONNX model ({err})") from err
        return model, from_onnx(model)
    data = path.read_bytes()
    return data, from_tflite(data)


def _rewrite(model: Any, graph: Any, order: tuple[int, ...], kind: str) -> bytes:
    from fleetfl.devices.reorder import reorder_onnx, reorder_tflite

    if kind == "ONNX":
        return reorder_onnx(model, graph, order).SerializeToString()
    return reorder_tflite(model, graph, order)


def _verify(original: bytes, rewritten: bytes, kind: str) -> str:
    """Run both models on one random input; say whether every output is bit-identical."""
    import numpy as np

    try:
        run = _onnx_runner if kind == "ONNX" else _tflite_runner
        a, b = run(original), run(rewritten)
    except ImportError as err:
        return f"not verified: {err}"
    same = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    return ("verified: outputs bit-identical on a random input" if same
            else "WARNING: outputs differ on a random input")


def _onnx_runner(data: bytes) -> list[Any]:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}
    feeds = {i.name: (4 * rng.standard_normal(i.shape)).astype(dtypes.get(i.type, np.float32))
             for i in session.get_inputs()}
    return session.run(None, feeds)


def _tflite_runner(data: bytes) -> list[Any]:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        value = rng.standard_normal(detail["shape"]).astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
