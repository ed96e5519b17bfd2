"""TFLite export: litert-torch conversion, full int8 with ai-edge-quantizer (optional extra).

The converter stack (litert-torch, ai-edge-quantizer, litert-converter, JAX, transformers...)
is about 1.2 GB, so it lives in the ``tflite`` extra (``pip install 'fleetfl[tflite]'``) and is
imported only when :func:`export_tflite` runs. Reading a file's metadata needs only
ai-edge-litert (the on-device runtime).

Int8 is static full-integer quantization (``recipe.static_wi8_ai8``): per-channel symmetric
int8 weights, int8 activations calibrated with min/max on client-like data, and int8 model
input/output (the runtime quantizes/dequantizes them, see ``fleetfl.client.runtime``).
The model is converted with a fixed batch of 1, the usual on-device shape, and keeps torch's
NCHW layout at its input. Like the ONNX export, the file is compacted (internal tensor names
dropped) and ``metadata`` is stored as TFLite metadata entries.
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
from typing import Any

import numpy as np
import torch
from torch import nn

EXTRA_HINT = "pip install 'fleetfl[tflite]'"
CALIBRATION_SAMPLES = 256  # batch-1 model: one calibration step per sample


class MissingExtraError(ImportError):
    """The optional TFLite converter stack is not installed."""


def require_converters() -> tuple[Any, Any, Any]:
    """Import litert-torch and ai-edge-quantizer, or explain how to install them."""
    try:
        import litert_torch
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as err:
        raise MissingExtraError(
            f"TFLite export needs the optional converter stack ({err.name} is missing): "
            f"{EXTRA_HINT}  (about 1.2 GB; ONNX export needs nothing extra)") from None
    return litert_torch, quantizer, recipe


def export_tflite(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...],
    int8: bool = False,
    calibration: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
    input_dtype: str = "float32",
) -> Path:
    """Export ``model`` to a ``.tflite`` file, fp32 or full int8.

    Args:
        model: float model (QAT removed); it is put in eval mode.
        path: output ``.tflite`` file.
        input_shape: shape of one example, e.g. ``(1, 8, 8)``; the file takes a batch of 1.
        int8: full-integer quantization (requires ``calibration``).
        calibration: float32 inputs ``(n, *input_shape)``; the first
            ``CALIBRATION_SAMPLES`` are used.
        metadata: string key/values stored as TFLite metadata entries.
        input_dtype: must be ``float32``: the int8 recipe quantizes the input tensor, so token
            ids are not supported (export such a model to ONNX).

    Raises:
        MissingExtraError: the ``tflite`` extra is not installed.
        ValueError: an input that is not float32.
    """
    if input_dtype != "float32":
        raise ValueError(f"TFLite export takes float32 inputs; this model takes {input_dtype} "
                         f"(token ids): export it with --format onnx")
    if int8 and (calibration is None or len(calibration) == 0):
        raise ValueError("int8 export needs calibration data (a few hundred training inputs)")
    litert_torch, quantizer, recipe = require_converters()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.tflite"
        with _quiet():
            litert_torch.convert(model.eval(), (example,)).export(str(fp32))
        src = fp32
        if int8:
            assert calibration is not None
            src = Path(tmp) / "int8.tflite"
            with _quiet():
                qt = quantizer.Quantizer(str(fp32))
                qt.load_quantization_recipe(recipe.static_wi8_ai8())
                result = qt.quantize(qt.calibrate(_calibration_set(fp32, calibration)))
                result.export_model(str(src), overwrite=True)
        _finish(src, dest, metadata or {})
    return dest


def _calibration_set(model_path: Path, x: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration samples keyed by the model's signature and input name, batch 1 each."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(model_path)).get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    samples = np.ascontiguousarray(x[:CALIBRATION_SAMPLES], dtype=np.float32)
    return {key: [{name: s[None]} for s in samples]}


def _finish(src: Path, dest: Path, metadata: dict[str, str]) -> None:
    """Drop internal tensor names, add metadata entries, write ``dest``."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(src)
    for subgraph in model.subgraphs:
        io_tensors = {*subgraph.inputs, *subgraph.outputs}
        for index, tensor in enumerate(subgraph.tensors):
            if index not in io_tensors:
                tensor.name = None
    model.metadata = list(model.metadata or [])
    for key, value in metadata.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.encode(), dtype=np.uint8).copy()
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = key
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    flatbuffer_utils.write_model(model, dest)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata entries of a ``.tflite`` file that hold UTF-8 text (needs ai-edge-litert)."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    out: dict[str, str] = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        buffer = model.Buffers(entry.Buffer())
        raw = buffer.DataAsNumpy()
        if isinstance(raw, np.ndarray):
            with contextlib.suppress(UnicodeDecodeError):
                out[entry.Name().decode()] = raw.tobytes().decode()
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converters' progress output, warnings and absl logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
