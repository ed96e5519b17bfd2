"""Tests for the memory-aware scheduler, the model rewriters and ``fleetfl schedule``."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

from fleetfl.coordinator import schedule_cmd
from fleetfl.devices.graph import Op, OpGraph, build_graph, from_onnx, from_tflite
from fleetfl.devices.reorder import reorder_onnx, reorder_tflite
from fleetfl.devices.scheduler import (
    beam_schedule,
    lower_bound,
    memory_profile,
    optimal_schedule,
    peak_memory,
)
from fleetfl.devices.segments import cut_nodes, segment_problems
from fleetfl.tasks.randwire import random_dag, sinks

FIXTURES = Path(__file__).parent / "fixtures"


def random_graph(rng: random.Random, n: int) -> OpGraph:
    """A random DAG of ``n`` ops: 1-3 activation inputs, sometimes a weight or two outputs,
    random sizes (some zero), one or two model outputs."""
    inputs = ["in0"] + (["in1"] if rng.random() < 0.3 else [])
    sizes = {name: rng.randint(1, 9) for name in inputs}
    available = list(inputs)
    ops = []
    for i in range(n):
        reads = tuple(rng.sample(available, rng.randint(1, min(3, len(available)))))
        writes = (f"t{i}",) + ((f"t{i}b",) if rng.random() < 0.2 else ())
        sizes.update({name: rng.choice([0, 1, 2, 3, 5, 8, 13]) for name in writes})
        ops.append(Op(f"n{i}", "op", reads + (("w",) if rng.random() < 0.2 else ()), writes))
        available.extend(writes)
    written = [name for op in ops for name in op.outputs]
    return build_graph(ops, sizes, inputs, rng.sample(written, rng.randint(1, 2)))


def brute_force_peak(g: OpGraph) -> int:
    """The lowest peak over every topological order, by enumeration."""
    preds = g.predecessors()
    best = [float("inf")]

    def extend(order: list[int], done: set[int]) -> None:
        if len(order) == g.num_nodes:
            best[0] = min(best[0], peak_memory(g, order))
            return
        for u in range(g.num_nodes):
            if u not in done and all(p in done for p in preds[u]):
                extend([*order, u], done | {u})

    extend([], set())
    return int(best[0])


def ws_graph(n: int, seed: int) -> OpGraph:
    """One WS(n, 4, 0.75) RandWire stage at node level: each node reads its predecessors'
    tensors (or the stage input) and writes one; all tensors 1 KiB."""
    preds = random_dag(n, 4, 0.75, seed)
    ops = [Op(f"n{i}", "node", tuple(f"t{j}" for j in p) or ("x",), (f"t{i}",))
           for i, p in enumerate(preds)]
    ops.append(Op("out", "mean", tuple(f"t{j}" for j in sinks(preds)), ("y",)))
    sizes = {f"t{i}": 1024 for i in range(n)} | {"x": 1024, "y": 1024}
    return build_graph(ops, sizes, ["x"], ["y"])


def test_memory_profile_by_hand() -> None:
    # x(4) -> a -> t(8) -> b -> u(2); (t, u) -> c -> y(1)
    g = build_graph([Op("a", "", ("x",), ("t",)), Op("b", "", ("t",), ("u",)),
                     Op("c", "", ("t", "u"), ("y",))], {"x": 4, "t": 8, "u": 2, "y": 1},
                    ["x"], ["y"])
    assert memory_profile(g, [0, 1, 2]) == [12, 10, 11]
    assert peak_memory(g) == 12
    with pytest.raises(ValueError, match="topological"):
        memory_profile(g, [1, 0, 2])


def test_order_matters_and_the_scheduler_finds_the_better_one() -> None:
    # Two branches from x; the big one (a1 -> a2) should run, and shrink, first.
    ops = [Op("b1", "", ("x",), ("b",)), Op("a1", "", ("x",), ("a",)),
           Op("a2", "", ("a",), ("a_small",)), Op("join", "", ("b", "a_small"), ("y",))]
    g = build_graph(ops, {"x": 1, "a": 10, "a_small": 1, "b": 5, "y": 1}, ["x"], ["y"])
    assert peak_memory(g) == 16  # b(5) + x(1) + a(10)
    result = optimal_schedule(g)
    assert result.optimal and result.peak_bytes == 12  # a1, a2, then b1
    assert result.order == (1, 2, 0, 3)


def test_dp_matches_brute_force_on_random_dags() -> None:
    rng = random.Random(5)
    for _ in range(100):
        g = random_graph(rng, rng.randint(2, 9))
        best = brute_force_peak(g)
        result = optimal_schedule(g)
        assert g.is_topological(result.order)
        assert result.optimal and result.peak_bytes == best == peak_memory(g, result.order)
        assert lower_bound(g) <= best <= beam_schedule(g, width=1).peak_bytes


def test_cut_points_split_a_chain_of_diamonds() -> None:
    ops = []
    for i in range(3):  # diamond i: s{i} -> (l, r) -> s{i+1}
        src = f"s{i}"
        ops += [Op(f"l{i}", "", (src,), (f"l{i}",)), Op(f"r{i}", "", (src,), (f"r{i}",)),
                Op(f"j{i}", "", (f"l{i}", f"r{i}"), (f"s{i + 1}",))]
    sizes = {f"{k}{i}": 1 + i for k in "lrs" for i in range(4)}
    g = build_graph(ops, sizes, ["s0"], ["s3"])
    assert cut_nodes(g, list(range(g.num_nodes))) == [2, 5, 8]  # the joins
    assert [p.n for p in segment_problems(g)] == [3, 3, 3]
    assert optimal_schedule(g).peak_bytes == brute_force_peak(g)


def test_pass_through_tensors_count_in_every_piece() -> None:
    # x is read by the first and the last op, so it stays live across the cut at "mid".
    ops = [Op("a", "", ("x",), ("t",)), Op("mid", "", ("t",), ("u",)),
           Op("z", "", ("u", "x"), ("y",))]
    g = build_graph(ops, {"x": 100, "t": 1, "u": 1, "y": 1}, ["x"], ["y"])
    result = optimal_schedule(g)
    assert result.peak_bytes == peak_memory(g) == 102


def test_randwire_stage_is_solved_exactly_and_beats_index_order() -> None:
    g = ws_graph(32, seed=8)
    result = optimal_schedule(g)
    assert result.optimal and result.method == "dp"
    assert result.peak_bytes < peak_memory(g)
    assert result.seconds < 10  # about 0.1 s unloaded; generous for a shared machine


def test_beam_fallback_reports_its_gap_to_a_lower_bound() -> None:
    g = ws_graph(32, seed=8)
    exact = optimal_schedule(g)
    fallback = optimal_schedule(g, max_states=50, beam_width=4)
    assert g.is_topological(fallback.order)
    assert fallback.lower_bound_bytes <= exact.peak_bytes <= fallback.peak_bytes
    assert fallback.gap == pytest.approx(fallback.peak_bytes / fallback.lower_bound_bytes - 1)
    if not fallback.optimal:
        assert fallback.method == "beam" and fallback.gap > 0


def test_budget_is_a_first_guess_not_a_constraint() -> None:
    g = ws_graph(32, seed=3)
    best = optimal_schedule(g).peak_bytes
    for budget in (best - 1024, best, best + 4096):
        assert optimal_schedule(g, budget_bytes=budget).peak_bytes == best


# --- rewriting exported models --------------------------------------------------------------


def test_onnx_reorder_keeps_outputs_and_lowers_the_peak() -> None:
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(FIXTURES / "randwire_128.onnx")
    g = from_onnx(model)
    result = optimal_schedule(g)
    reordered = reorder_onnx(model, g, result.order)
    assert peak_memory(from_onnx(reordered)) == result.peak_bytes < peak_memory(g)
    x = np.random.default_rng(0).standard_normal((1, 1, 128, 128)).astype(np.float32)
    outputs = []
    for proto in (model, reordered):
        options = ort.SessionOptions()
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_tflite_reorder_keeps_outputs_and_lowers_the_peak() -> None:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    data = (FIXTURES / "randwire_128.tflite").read_bytes()
    g = from_tflite(data)
    result = optimal_schedule(g)
    reordered = reorder_tflite(data, g, result.order)
    g2 = from_tflite(reordered)
    assert list(g2.node_kinds) == [g.node_kinds[u] for u in result.order]  # names are positions
    assert peak_memory(g2) == result.peak_bytes < peak_memory(g)
    x = np.random.default_rng(0).standard_normal((1, 1, 128, 128)).astype(np.float32)
    outputs = []
    for content in (data, reordered):
        interpreter = interpreter_module.Interpreter(model_content=content)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_reorder_rejects_an_invalid_order() -> None:
    model = onnx.load(FIXTURES / "randwire_128.onnx")
    g = from_onnx(model)
    with pytest.raises(ValueError, match="topological"):
        reorder_onnx(model, g, list(reversed(range(g.num_nodes))))


def _schedule(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fleetfl")
    schedule_cmd.add_parser(parser.add_subparsers(dest="command"))
    return schedule_cmd.run(parser.parse_args(["schedule", *argv]))


def test_schedule_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sched.tflite"
    assert _schedule("--model", str(FIXTURES / "randwire_128.tflite"), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "exporter's order: 18,874,368 bytes" in text
    assert "scheduled order:  14,680,064 bytes" in text and "optimal" in text
    assert "bit-identical" in text or "not verified" in text
    assert peak_memory(from_tflite(out)) == 14_680_064


def test_schedule_command_budget_and_errors(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sched.onnx"
    model = str(FIXTURES / "randwire_128.onnx")
    assert _schedule("--model", model, "--out", str(out), "--budget", "1000000") == 1
    assert "no order found fits --budget" in capsys.readouterr().err
    assert not out.exists()
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("not a model")
    assert _schedule("--model", str(bogus), "--out", str(out)) == 2
    assert _schedule("--model", str(tmp_path / "m.pt"), "--out", str(out)) == 2
    assert "expected .onnx or .tflite" in capsys.readouterr().err
