"""Memory-aware scheduling: peak memory of the exporter's operator order vs the scheduler's.

1. RandWire stages, WS(n=32, k=4, p=0.75), 20 seeds, at node level (each node reads its
   predecessors' tensors, writes one; all tensors equal): the "exporter's" order is the node
   index order, which is how torch.export, the ONNX exporter and litert-torch trace RandWire's
   forward. Also stacks of such stages (divide and conquer at the joins), 100+ nodes.
2. The RandWire model exported to ONNX and TFLite (tests/fixtures, 300+ operators) and the
   ATen graph torch.export records for the registered digits model.
3. Real runtimes: peak RSS of ai-edge-litert (XNNPACK delegate and built-in kernels) and
   onnxruntime (execution order PRIORITY_BASED or DEFAULT, graph optimizations BASIC or ALL)
   running the fixture model before and after reordering, fresh processes, interleaved
   repeats, medians.

    python -m benchmarks.scheduler [--seeds 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from fleetfl.devices.graph import Op, OpGraph, build_graph, from_onnx, from_tflite, from_torch
from fleetfl.devices.reorder import reorder_onnx, reorder_tflite
from fleetfl.devices.scheduler import optimal_schedule, peak_memory
from fleetfl.tasks.randwire import random_dag, sinks

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TENSOR = 16 * 8 * 8 * 4  # bytes of one stage-1 activation of the digits model (16 x 8 x 8)


def ws_stages(n: int, seeds: list[int]) -> OpGraph:
    """RandWire stages WS(n, 4, 0.75) in sequence, each reading the previous one's output."""
    ops: list[Op] = []
    sizes = {"x0": TENSOR}
    for s, seed in enumerate(seeds):
        preds = random_dag(n, 4, 0.75, seed)
        name = lambda i, s=s: f"s{s}n{i}"  # noqa: E731
        ops += [Op(name(i), "node", tuple(name(j) for j in p) or (f"x{s}",), (name(i),))
                for i, p in enumerate(preds)]
        ops.append(Op(f"s{s}out", "mean", tuple(name(j) for j in sinks(preds)), (f"x{s + 1}",)))
        sizes |= {name(i): TENSOR for i in range(n)} | {f"x{s + 1}": TENSOR}
    return build_graph(ops, sizes, ["x0"], [f"x{len(seeds)}"])


def compare(graph: OpGraph) -> dict[str, Any]:
    """Exporter's order vs the scheduler's, for one graph."""
    before = peak_memory(graph)
    result = optimal_schedule(graph)
    return {"nodes": graph.num_nodes, "pieces": result.segments, "exporter_peak": before,
            "scheduled_peak": result.peak_bytes, "ratio": before / result.peak_bytes,
            "optimal": result.optimal, "lower_bound": result.lower_bound_bytes,
            "seconds": result.seconds}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["ratio"] for r in rows]
    times = [r["seconds"] for r in rows]
    return {"graphs": len(rows), "all_optimal": all(r["optimal"] for r in rows),
            "ratio_mean": statistics.fmean(ratios), "ratio_max": max(ratios),
            "ratio_min": min(ratios), "seconds_median": statistics.median(times),
            "seconds_max": max(times)}


def exported_models() -> dict[str, Any]:
    import torch

    from fleetfl.tasks.models import build_model

    model = build_model("randwire", (1, 8, 8), 10).eval()
    return {
        "onnx_randwire_128": compare(from_onnx(FIXTURES / "randwire_128.onnx")),
        "tflite_randwire_128": compare(from_tflite(FIXTURES / "randwire_128.tflite")),
        "torch_export_randwire_digits": compare(from_torch(model, (torch.zeros(1, 1, 8, 8),))),
    }


CHILD = """
import json, sys, numpy as np
from pathlib import Path
from fleetfl.devices.memory_stats import rss_bytes, peak_rss_delta
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
path, runtime = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((1, 1, 128, 128)).astype(np.float32)
if runtime.startswith("litert"):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kw = {} if runtime == "litert-xnnpack" else {
        "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = Interpreter(model_path=path, **kw)
    def work():
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
else:
    import onnxruntime as ort
    _, order, level = runtime.split("-")
    so = ort.SessionOptions()
    so.execution_order = getattr(ort.ExecutionOrder, order)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    def work():
        sess.run(None, {"x": x})
rise = peak_rss_delta(work)
print(json.dumps({"rise": rise, "peak_rss": status("VmHWM")}))
"""

# ORT: BASIC optimizations keep the node list; ALL (the default) adds layout transforms that
# rebuild it; DEFAULT execution order ignores the file's order.
RUNTIMES = {"tflite": ["litert-xnnpack", "litert-builtin"],
            "onnx": ["ort-PRIORITY_BASED-BASIC", "ort-PRIORITY_BASED-ALL", "ort-DEFAULT-BASIC"]}


def reordered_files(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """(exporter's order, scheduled order) files of the fixture model, by format."""
    import onnx

    data = (FIXTURES / "randwire_128.tflite").read_bytes()
    graph = from_tflite(data)
    (tmp / "s.tflite").write_bytes(reorder_tflite(data, graph, optimal_schedule(graph).order))
    model = onnx.load(FIXTURES / "randwire_128.onnx")
    graph = from_onnx(model)
    onnx.save(reorder_onnx(model, graph, optimal_schedule(graph).order), tmp / "s.onnx")
    return {"tflite": (FIXTURES / "randwire_128.tflite", tmp / "s.tflite"),
            "onnx": (FIXTURES / "randwire_128.onnx", tmp / "s.onnx")}


def runtime_rss(repeats: int) -> dict[str, Any]:
    """Medians over fresh processes, before and after interleaved so drift hits both."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = reordered_files(Path(tmp))
        for kind, runtimes in RUNTIMES.items():
            for runtime in runtimes:
                runs: dict[str, list[dict[str, int]]] = {"exporter": [], "scheduled": []}
                for _ in range(repeats):
                    for label, path in zip(runs, files[kind], strict=True):
                        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), runtime],
                                              capture_output=True, text=True, check=True)
                        runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                med = {label: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                       for label, rows in runs.items()}
                out[runtime] = {**med, "rise_saved_bytes": med["exporter"]["rise"]
                                - med["scheduled"]["rise"], "repeats": repeats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ws_rows = [{"seed": s, **compare(ws_stages(32, [s]))} for s in range(args.seeds)]
    stacked = [{"seeds": list(range(4 * i, 4 * i + 4)),
                **compare(ws_stages(32, list(range(4 * i, 4 * i + 4))))} for i in range(5)]
    emit("scheduler", {
        "ws32": {"summary": summary(ws_rows), "graphs": ws_rows},
        "ws32_x4_stacked": {"summary": summary(stacked), "graphs": stacked},
        "exported": exported_models(),
        "runtime_peak_rss": runtime_rss(args.repeats),
    })


if __name__ == "__main__":
    main()
