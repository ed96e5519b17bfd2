"""Operator graphs for memory-aware scheduling: operators, activation tensors and their sizes.

An :class:`OpGraph` holds what the scheduler needs from a model: the operators in the order the
exporter wrote them, the activation tensors each one reads and writes, and every activation's
size in bytes. Constants (weights, ONNX initializers, TFLite tensors backed by a buffer) are not
activations: runtimes keep them outside the activation arena whatever the operator order, so they
are left out. ``from_onnx``, ``from_tflite`` and ``from_torch`` read the three formats; torch,
onnx and the TFLite schema are imported inside them, so importing this module stays light.

Libraries checked: onnx (``shape_inference.infer_shapes`` gives every tensor's shape), the
flatbuffer schema bundled with ai-edge-litert (``schema_py_generated``, the same generated code
TensorFlow ships; it reads and writes .tflite, so no separate ``tflite`` package is needed), and
``torch.export`` (each node's ``meta["val"]`` carries its output's shape and dtype).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Bytes per element, keyed by the dtype names numpy, onnx and TFLite share (lower case).
DTYPE_BYTES: Mapping[str, int] = {
    "float64": 8, "double": 8, "int64": 8, "uint64": 8, "complex64": 8,
    "float32": 4, "float": 4, "int32": 4, "uint32": 4,
    "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Op:
    """One operator as a format reader sees it: names of the tensors it reads and writes."""

    name: str
    kind: str  # operator type, e.g. "Conv"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class OpGraph:
    """A DAG of operators over activation tensors; node ``i`` is the exporter's ``i``-th op.

    Tensors are numbered; ``tensor_bytes[t]`` is tensor ``t``'s size in bytes. Operators the
    reader left out (they compute constants) still count in ``node_index``. ``inputs`` are the
    tensors live before the first operator (the model's inputs); ``outputs`` stay live until the
    end. A node's ``node_inputs`` lists each activation it reads once.
    """

    node_names: tuple[str, ...]
    node_kinds: tuple[str, ...]
    node_inputs: tuple[tuple[int, ...], ...]
    node_outputs: tuple[tuple[int, ...], ...]
    tensor_names: tuple[str, ...]
    tensor_bytes: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    node_index: tuple[int, ...]  # each node's position among the file's operators

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    def producers(self) -> list[int]:
        """``producers()[t]``: the node writing tensor ``t``, or -1 for a model input."""
        prod = [-1] * len(self.tensor_names)
        for u, outs in enumerate(self.node_outputs):
            for t in outs:
                prod[t] = u
        return prod

    def consumers(self) -> list[list[int]]:
        """``consumers()[t]``: the nodes reading tensor ``t``, ascending."""
        cons: list[list[int]] = [[] for _ in self.tensor_names]
        for u, ins in enumerate(self.node_inputs):
            for t in ins:
                cons[t].append(u)
        return cons

    def predecessors(self) -> list[list[int]]:
        """``predecessors()[u]``: distinct nodes whose outputs node ``u`` reads, ascending."""
        prod = self.producers()
        return [sorted({prod[t] for t in ins if prod[t] >= 0}) for ins in self.node_inputs]

    def successors(self) -> list[list[int]]:
        """``successors()[u]``: distinct nodes reading an output of node ``u``, ascending."""
        succ: list[set[int]] = [set() for _ in self.node_names]
        for v, preds in enumerate(self.predecessors()):
            for u in preds:
                succ[u].add(v)
        return [sorted(s) for s in succ]

    def is_topological(self, order: Sequence[int]) -> bool:
        """Whether ``order`` is a permutation of the nodes with every producer first."""
        if sorted(order) != list(range(self.num_nodes)):
            return False
        position = {u: i for i, u in enumerate(order)}
        preds = self.predecessors()
        return all(position[p] < position[u] for u in order for p in preds[u])

    @property
    def activation_bytes(self) -> int:
        """Bytes of every activation tensor together: the arena if nothing were ever freed."""
        return sum(self.tensor_bytes)


def build_graph(
    ops: Iterable[Op],
    tensor_bytes: Mapping[str, int],
    inputs: Sequence[str],
    outputs: Sequence[str],
) -> OpGraph:
    """An :class:`OpGraph` from format-neutral ops in file order.

    A tensor named in no ``tensor_bytes`` entry is a constant. An op that reads no activation
    (directly or through other such ops) computes a constant, as exporters and runtimes fold
    it: it is left out, and its outputs are constants. ``OpGraph.node_index`` maps each kept
    op back to its position in ``ops``.

    Raises:
        ValueError: a tensor written twice, an op reading an activation that nothing writes, an
            output that is no activation, or a cycle.
    """
    ops = list(ops)
    written: dict[str, str] = {name: "<input>" for name in inputs}
    for op in ops:
        for name in op.outputs:
            if name in written:
                raise ValueError(f"tensor {name!r} is written twice (op {op.name!r})")
            written[name] = op.name
    for op in ops:
        for name in op.inputs:
            if name in tensor_bytes and name not in written:
                raise ValueError(f"op {op.name!r} reads {name!r}, which no op or input writes")
    kept = _activation_ops(ops, set(inputs))
    activations = set(inputs) | {n for i in kept for n in ops[i].outputs}
    for i in kept:
        for name in ops[i].outputs:
            if name not in tensor_bytes:
                raise ValueError(f"op {ops[i].name!r} writes {name!r}, whose size is unknown "
                                 "(export the model with static shapes)")
    missing = [name for name in outputs if name not in activations]
    if missing:
        raise ValueError(f"model outputs {missing} are not computed from the inputs")
    ids: dict[str, int] = {}
    for name in [*inputs, *(n for i in kept for n in ops[i].outputs)]:
        ids.setdefault(name, len(ids))
    graph = OpGraph(
        node_names=tuple(ops[i].name for i in kept),
        node_kinds=tuple(ops[i].kind for i in kept),
        node_inputs=tuple(
            tuple(dict.fromkeys(ids[n] for n in ops[i].inputs if n in activations)) for i in kept
        ),
        node_outputs=tuple(tuple(ids[n] for n in ops[i].outputs) for i in kept),
        tensor_names=tuple(ids),
        tensor_bytes=tuple(int(tensor_bytes[n]) for n in ids),
        inputs=tuple(ids[n] for n in inputs),
        outputs=tuple(dict.fromkeys(ids[n] for n in outputs)),
        node_index=tuple(kept),
    )
    if topological_order(graph) is None:
        raise ValueError("the operator graph has a cycle")
    return graph


def _activation_ops(ops: Sequence[Op], inputs: set[str]) -> list[int]:
    """Indices of the ops that read an activation, directly or through other ops."""
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            readers.setdefault(name, []).append(i)
    reached: set[int] = set()
    frontier = list(inputs)
    while frontier:  # graph search, so a file whose ops are not in topological order works too
        name = frontier.pop()
        for i in readers.get(name, ()):
            if i not in reached:
                reached.add(i)
                frontier.extend(ops[i].outputs)
    return sorted(reached)


def topological_order(graph: OpGraph) -> list[int] | None:
    """A topological order preferring the lowest node index (None if there is a cycle)."""
    import heapq

    preds = graph.predecessors()
    succ = graph.successors()
    indegree = [len(p) for p in preds]
    ready = [u for u in range(graph.num_nodes) if indegree[u] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        u = heapq.heappop(ready)
        order.append(u)
        for v in succ[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, v)
    return order if len(order) == graph.num_nodes else None


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype`` (a name in ``DTYPE_BYTES``)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if any(d is None or d < 0 for d in shape):
        raise ValueError(f"shape {tuple(shape)} is not static; export with fixed sizes")
    return math.prod(shape) * DTYPE_BYTES[dtype]


# --- readers --------------------------------------------------------------------------------


def from_onnx(path_or_model: str | Path | object) -> OpGraph:
    """The top-level graph of an ONNX model (a path or an ``onnx.ModelProto``).

    Shapes come from ONNX shape inference, so every activation must have a static shape.
    ``Constant`` nodes, like any node reading no activation, compute constants.
    """
    import onnx

    model = path_or_model
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(path_or_model), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    sizes: dict[str, int] = {}
    for info in [*g.input, *g.value_info, *g.output]:
        ttype = info.type.tensor_type
        if not ttype.HasField("shape") or not ttype.elem_type:
            continue  # unknown to shape inference: an error later if it is an activation
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if min(dims, default=0) >= 0:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
            sizes[info.name] = nbytes(dims, dtype)
    constants = {init.name for init in g.initializer}
    constants |= {o for node in g.node if node.op_type == "Constant" for o in node.output}
    for name in constants:
        sizes.pop(name, None)
    ops = [
        Op(node.name or f"{node.op_type}_{i}", node.op_type, tuple(x for x in node.input if x),
           tuple(x for x in node.output if x))
        for i, node in enumerate(g.node)
    ]
    inputs = [i.name for i in g.input if i.name not in constants]
    return build_graph(ops, sizes, inputs, [o.name for o in g.output])


def from_tflite(path_or_bytes: str | Path | bytes) -> OpGraph:
    """Subgraph 0 of a .tflite flatbuffer (a path or its bytes), read with ai-edge-litert's
    bundled schema. Tensors with buffer data are weights; operators are named ``OPCODE_i``.
    """
    from fleetfl.devices.tflite_schema import load_model, opcode_names, tensor_type_name

    model = load_model(path_or_bytes)
    sub = model.subgraphs[0]
    sizes: dict[str, int] = {}
    for t, tensor in enumerate(sub.tensors):
        buffer = model.buffers[tensor.buffer] if tensor.buffer else None
        constant = buffer is not None and (buffer.data is not None or buffer.size)
        if not constant and not tensor.isVariable:
            shape = list(tensor.shape) if tensor.shape is not None else []
            sizes[str(t)] = nbytes(shape, tensor_type_name(tensor.type))
    kinds = opcode_names(model)
    ops = [
        Op(f"{kinds[op.opcodeIndex]}_{i}", kinds[op.opcodeIndex],
           tuple(str(t) for t in op.inputs if t >= 0), tuple(str(t) for t in op.outputs))
        for i, op in enumerate(sub.operators)
    ]
    inputs = [str(t) for t in sub.inputs if str(t) in sizes]
    return build_graph(ops, sizes, inputs, [str(t) for t in sub.outputs])


def from_torch(model: object, example_inputs: tuple[object, ...]) -> OpGraph:
    """The ATen graph ``torch.export`` records for ``model(*example_inputs)``, in the mode the
    model is in (call ``eval()`` first for the inference graph).

    Views alias their input in eager PyTorch, so an op whose output aliases an input (its
    schema says so) allocates nothing: its readers read the viewed tensor instead. ``getitem``
    on a multi-output op names one of that op's outputs.
    """
    import operator

    import torch

    exported = torch.export.export(model, example_inputs)  # type: ignore[arg-type]
    graph = exported.graph
    user_inputs = set(exported.graph_signature.user_inputs)
    sizes: dict[str, int] = {}
    alias: dict[str, str] = {}
    ops: list[Op] = []
    inputs: list[str] = []

    def size_of(val: object) -> int:
        vals = val if isinstance(val, list | tuple) else [val]
        return sum(
            v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor)
        )

    def real(name: str) -> str:
        return alias.get(name, name)

    outputs: list[str] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                sizes[node.name] = size_of(node.meta["val"])
                inputs.append(node.name)
        elif node.op == "output":
            outputs = [real(a.name) for a in node.args[0] if isinstance(a, torch.fx.Node)]
        elif node.op == "call_function":
            args = [real(a.name) for a in node.all_input_nodes]
            if node.target is operator.getitem or _aliases_input(node.target):
                alias[node.name] = args[0] if args else node.name
                continue
            sizes[node.name] = size_of(node.meta.get("val"))
            ops.append(Op(node.name, str(node.target), tuple(args), (node.name,)))
    return build_graph(ops, sizes, inputs, outputs)


def _aliases_input(target: object) -> bool:
    """Whether an ATen op's first output is a view of an input (from its schema)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write
