"""Tests for fleetfl.devices.graph: operator graphs from hand-built ops, ONNX, TFLite, torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fleetfl.devices.graph import Op, build_graph, from_onnx, from_tflite, from_torch, nbytes
from fleetfl.devices.scheduler import peak_memory

FIXTURES = Path(__file__).parent / "fixtures"


def test_build_graph_numbers_tensors_and_drops_constants() -> None:
    ops = [
        Op("a", "Conv", ("x", "w"), ("t",)),  # w: a weight, no size given
        Op("b", "Relu", ("t",), ("u",)),
        Op("c", "Add", ("t", "u"), ("y",)),
    ]
    g = build_graph(ops, {"x": 4, "t": 8, "u": 8, "y": 2}, ["x"], ["y"])
    assert g.tensor_names == ("x", "t", "u", "y")
    assert g.node_inputs == ((0,), (1,), (1, 2))
    assert g.producers() == [-1, 0, 1, 2]
    assert g.consumers() == [[0], [1, 2], [2], []]
    assert g.predecessors() == [[], [0], [0, 1]]
    assert g.successors() == [[1, 2], [2], []]
    assert g.node_index == (0, 1, 2)
    assert g.is_topological([0, 1, 2]) and not g.is_topological([1, 0, 2])


def test_ops_computing_constants_are_folded_out() -> None:
    ops = [
        Op("s", "Sigmoid", ("param",), ("w",)),  # reads only a weight: a constant
        Op("m", "Mul", ("x", "w"), ("y",)),
    ]
    g = build_graph(ops, {"x": 4, "w": 4, "y": 4}, ["x"], ["y"])
    assert g.node_names == ("m",)
    assert g.node_index == (1,)
    assert g.node_inputs == ((0,),)


@pytest.mark.parametrize(
    ("ops", "match"),
    [
        ([Op("a", "R", ("x",), ("t",)), Op("b", "R", ("x",), ("t",))], "written twice"),
        ([Op("a", "R", ("x", "ghost"), ("t",))], "no op or input writes"),
        ([Op("a", "R", ("x",), ("t",))], "not computed from the inputs"),
    ],
)
def test_build_graph_rejects_bad_graphs(ops: list[Op], match: str) -> None:
    sizes = {"x": 1, "t": 1, "ghost": 1, "y": 1}
    with pytest.raises(ValueError, match=match):
        build_graph(ops, sizes, ["x"], ["y"] if match.startswith("not") else ["t"])


def test_build_graph_rejects_a_cycle() -> None:
    ops = [Op("a", "R", ("x", "v"), ("u",)), Op("b", "R", ("u",), ("v",))]
    with pytest.raises(ValueError, match="cycle"):
        build_graph(ops, {"x": 1, "u": 1, "v": 1}, ["x"], ["v"])


def test_nbytes() -> None:
    assert nbytes((2, 3, 4), "float32") == 96
    assert nbytes((), "int8") == 1
    with pytest.raises(ValueError, match="static"):
        nbytes((-1, 3), "float32")


def _tiny_onnx() -> onnx.ModelProto:
    """x(1x2x4x4) -> Conv(w) -> c; Constant k; c * k -> m; Relu(c) -> r; Add(m, r) -> y."""
    w = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
            np.array(2.0, np.float32))),
        helper.make_node("Mul", ["c", "k"], ["m"], name="mul"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["m", "r"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_from_onnx_sizes_from_shape_inference() -> None:
    g = from_onnx(_tiny_onnx())
    assert g.node_names == ("conv", "mul", "relu", "add")
    assert g.node_index == (0, 2, 3, 4)  # the Constant node is not an operator here
    sizes = dict(zip(g.tensor_names, g.tensor_bytes, strict=True))
    assert sizes == {"x": 128, "c": 192, "m": 192, "r": 192, "y": 192}
    # conv: x + c = 320; mul: x freed, c + m = 384; relu: c + m + r = 576; add: m + r + y
    assert peak_memory(g) == 576


def test_from_onnx_fixture_counts_every_non_constant_node() -> None:
    model = onnx.load(FIXTURES / "randwire_128.onnx")
    g = from_onnx(model)
    assert g.num_nodes == sum(n.op_type != "Constant" for n in model.graph.node)
    assert g.tensor_bytes[g.inputs[0]] == 128 * 128 * 4  # float32 1x1x128x128
    assert peak_memory(g) > 0


def test_from_tflite_fixture() -> None:
    g = from_tflite(FIXTURES / "randwire_128.tflite")
    assert g.tensor_bytes[g.inputs[0]] == 128 * 128 * 4
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= set(g.node_kinds)
    assert g.node_index == tuple(range(g.num_nodes))  # litert-torch folds its constants
    with pytest.raises(ValueError, match="TFL3"):
        from_tflite(b"\0" * 64)


class _Branchy(nn.Module):
    """conv -> (relu, sigmoid(gate) * conv) -> add -> flatten (a view) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.gate = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        mixed = torch.relu(c) + c * torch.sigmoid(self.gate)
        return self.fc(mixed.flatten(1))


def test_from_torch_skips_views_and_weight_only_ops() -> None:
    g = from_torch(_Branchy().eval(), (torch.zeros(1, 1, 4, 4),))
    kinds = [k.split(".")[1] for k in g.node_kinds]  # "aten.relu.default" -> "relu"
    assert kinds == ["conv2d", "relu", "mul", "add", "linear"]  # no sigmoid, no view
    sizes = dict(zip(g.tensor_names, g.tensor_bytes, strict=True))
    assert sizes[g.tensor_names[g.inputs[0]]] == 64
    assert sizes[g.tensor_names[g.outputs[0]]] == 12
    linear_input = g.node_inputs[4][0]
    assert g.producers()[linear_input] == 3  # the linear reads the add's output through the view
