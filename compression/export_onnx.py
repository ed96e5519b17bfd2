"""ONNX export: fp32 via ``torch.onnx.export`` and full int8 via onnxruntime's ``quantize_static``.

Exporter: the torch.export-based exporter (``dynamo=True``, needs ``onnxscript``). With torch
2.13 both exporters work on our models; the TorchScript one is faster (0.5 s against 2-8 s) but
deprecated since torch 2.9 and emits a DeprecationWarning on every call, so we use the supported
one. Opset 18 is its native opset (asking for 17 triggers a version conversion).

Int8: static (calibrated) QDQ quantization, per-channel symmetric int8 weights and per-tensor
int8 activations (S8S8, onnxruntime's recommended default for QDQ); ranges are calibrated with
min/max on client-like data (a few hundred samples of the clients' training union). Dynamic-range
quantization is deliberately not offered: activations would stay float on the device.

Weights use onnxruntime's ``reduce_range`` (int8 values in [-64, 64], 7 bits). Without it the
file's outputs depend on the CPU that runs it: onnxruntime's x86 kernels for CPUs without VNNI
(AVX2, AVX-512 without VNNI: many laptops and older servers) multiply with ``VPMADDUBSW``, which
adds two u8 x s8 products into a *saturating* int16, wrong as soon as ``255 * (|w_i| + |w_j|) >
32767``. Measured on the digits CNN (``benchmarks/export_x86_kernels.py``, under ``qemu-x86_64
-cpu Haswell``): full-range weights gave a mean logit error of 0.60 there against 0.03 on a
VNNI/AMX CPU, 97.8 % top-1 agreement with torch instead of 100 %; with ``reduce_range`` the same
0.04 and 99.7 % on both. (ARM's ``sdot`` accumulates in int32 and does not saturate; not run
here.) onnxruntime documents ``reduce_range`` for
exactly this case. QAT (:mod:`fleetfl.compression.qat`) trains on the same 7-bit weight grid.

Both files are "compacted" for the device: debug strings (node names, per-node metadata,
value_info) are dropped and internal tensor names shortened, which matters for small models
(about 4 KB of the 47 KB of the int8 digits CNN). The graph input is ``input`` (batch dimension
dynamic) and the output ``logits``; ``metadata`` is stored in the model's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CALIBRATION_BATCH = 32


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...],
    int8: bool = False,
    calibration: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
    input_dtype: str = "float32",
) -> Path:
    """Export ``model`` to an ONNX file, fp32 or full int8 (QDQ, per-channel).

    Args:
        model: float model (QAT removed); it is put in eval mode.
        path: output ``.onnx`` file.
        input_shape: shape of one example, e.g. ``(1, 8, 8)``; the batch dimension is dynamic.
        int8: quantize weights and activations to int8 (requires ``calibration``).
        calibration: inputs ``(n, *input_shape)`` for the activation ranges.
        metadata: string key/values stored in the model (e.g. the task config as JSON).
        input_dtype: numpy dtype name of the file's input (``float32``, or token ids such as
            ``uint8``; quantization then covers the layers after them).

    Returns:
        The path written.
    """
    if int8 and (calibration is None or len(calibration) == 0):
        raise ValueError("int8 export needs calibration data (a few hundred training inputs)")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _torch_export(model.eval(), fp32, input_shape, input_dtype)
        src = fp32
        if int8:
            assert calibration is not None
            src = Path(tmp) / "int8.onnx"
            quantize_int8(fp32, src, calibration.astype(input_dtype, copy=False))
        proto = onnx.load(src)
    compact(proto)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, dest)
    return dest


def _torch_export(model: nn.Module, path: Path, input_shape: tuple[int, ...],
                  input_dtype: str = "float32") -> None:
    """fp32 export with a dynamic batch dimension, as one self-contained file."""
    # Batch 2, not 1: torch.export specializes dimensions of size 1.
    example = torch.zeros((2, *input_shape), dtype=getattr(torch, input_dtype))
    batch = torch.export.Dim("batch")
    with _quiet():
        torch.onnx.export(
            model, (example,), path, dynamo=True, opset_version=OPSET, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), verbose=False, optimize=True,
        )


def quantize_int8(src: Path, dest: Path, calibration: np.ndarray, *,
                  reduce_range: bool = True) -> None:
    """Static QDQ int8 quantization of ``src`` into ``dest`` calibrated on ``calibration``.

    ``reduce_range=False`` (full-range int8 weights) exists only to measure what it costs on
    CPUs without VNNI (``benchmarks/export_x86_kernels.py``); see the module docstring.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            batches = (x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH))
            self._batches = iter([{INPUT_NAME: np.ascontiguousarray(b)} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with _quiet():
        quantize_static(
            str(src), str(dest), _Reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
        )


def compact(proto: onnx.ModelProto) -> None:
    """Drop debug strings and shorten internal tensor names of ``proto``, in place."""
    graph = proto.graph
    del graph.value_info[:]
    proto.doc_string = ""
    graph.doc_string = ""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        return  # subgraphs refer to outer names: keep them (none of our models has any)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        del node.metadata_props[:]
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading the weights)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and quantizer's progress prints and advice warnings."""
    root, torch_onnx = logging.getLogger(), logging.getLogger("torch.onnx")
    levels = root.level, torch_onnx.level
    root.setLevel(logging.ERROR)
    torch_onnx.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(levels[0])
        torch_onnx.setLevel(levels[1])
