"""Rewrite an exported model so that its runtime executes operators in a chosen order.

TFLite runs subgraph 0's operators in file order and plans its activation arena from that
order; ONNX Runtime derives its execution order from the node list (``PRIORITY_BASED``
follows it exactly; see docs/scheduling.md for ``DEFAULT``). Only the order changes: every
operator, tensor, weight and attribute is kept as is, so the outputs are the same.

``order`` holds :class:`~fleetfl.devices.graph.OpGraph` node indices, as returned by the
scheduler; operators the graph left out (they only compute constants) go first, in their
original order, which is valid because they read no activation. onnx and the TFLite schema
are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleetfl.devices.graph import OpGraph


def file_order(graph: OpGraph, order: Sequence[int], num_ops: int) -> list[int]:
    """Positions of the file's ``num_ops`` operators in their new order.

    Raises:
        ValueError: ``order`` is not a topological order of ``graph``.
    """
    if not graph.is_topological(order):
        raise ValueError("order is not a topological order of the graph")
    scheduled = set(graph.node_index)
    constant_ops = [i for i in range(num_ops) if i not in scheduled]
    return constant_ops + [graph.node_index[u] for u in order]


def reorder_onnx(model: Any, graph: OpGraph, order: Sequence[int]) -> Any:
    """A copy of the ``onnx.ModelProto`` whose top-level nodes follow ``order``; checked with
    ``onnx.checker`` (which also verifies the node list is topologically sorted)."""
    import onnx

    nodes = list(model.graph.node)
    positions = file_order(graph, order, len(nodes))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes[i] for i in positions)
    onnx.checker.check_model(out)
    return out


def reorder_tflite(data: bytes, graph: OpGraph, order: Sequence[int]) -> bytes:
    """The .tflite bytes with subgraph 0's operators in ``order``; other subgraphs, buffers,
    signatures and metadata are carried over by the flatbuffer object API."""
    from fleetfl.devices.tflite_schema import load_model, save_model

    model = load_model(data)
    operators = model.subgraphs[0].operators
    positions = file_order(graph, order, len(operators))
    model.subgraphs[0].operators = [operators[i] for i in positions]
    return save_model(model)
