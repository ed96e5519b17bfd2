"""On-device inference of an exported model: onnxruntime for ``.onnx``, LiteRT for ``.tflite``.

``load_runtime(path)`` picks the runtime by file extension. TFLite files run on ai-edge-litert
(``ai_edge_litert.interpreter``, the successor of tflite-runtime, with numpy 2 support); a
device that only has the old ``tflite_runtime`` package falls back to it. ``predict`` takes
inputs of the file's dtype (float32, or an ONNX file's token ids: its ``input_dtype``) and
returns float32 logits: for full-int8 TFLite files it quantizes the
input and dequantizes the output with the tensors' (scale, zero point), and it feeds files with
a fixed batch size (TFLite exports use 1) chunk by chunk.
"""

from __future__ import annotations

import os
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = {".onnx": "onnx", ".tflite": "tflite"}


class ModelLoadError(RuntimeError):
    """The runtime for a model file is missing, or the file cannot be loaded."""


class Runtime(ABC):
    """A loaded model ready for inference."""

    #: which inference engine runs it: "onnxruntime", "ai-edge-litert" or "tflite-runtime"
    backend: str
    #: shape of one example, e.g. ``(1, 8, 8)``
    input_shape: tuple[int, ...]
    #: numpy dtype name of the inputs: ``float32``, or token ids (``uint8``, ``int64``)
    input_dtype: str = "float32"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def size_bytes(self) -> int:
        """Size of the model file in bytes."""
        return self.path.stat().st_size

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, float32 ``(n, num_classes)``, for inputs ``(n, *input_shape)`` (cast to
        ``input_dtype``)."""


class OnnxRuntime(Runtime):
    """An ONNX file in an onnxruntime CPU session."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__(path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {err}") from None
        (inp,) = self._session.get_inputs()
        self._input_name = inp.name
        self.input_shape = tuple(int(d) for d in inp.shape[1:])
        # "tensor(float)", "tensor(uint8)", "tensor(int64)": the dtype the file was exported for
        kind = inp.type.removeprefix("tensor(").removesuffix(")")
        self.input_dtype = "float32" if kind == "float" else kind
        self._batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x, self.input_shape, self.input_dtype)
        if self._batch is None:  # dynamic batch: one call
            return self._session.run(None, {self._input_name: x})[0].astype(np.float32)
        out = [self._session.run(None, {self._input_name: c})[0] for c in _chunks(x, self._batch)]
        return np.concatenate(out)[: len(x)].astype(np.float32)


class LiteRuntime(Runtime):
    """A ``.tflite`` file in the LiteRT interpreter (or tflite-runtime's)."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__(path)
        interpreter_cls, self.backend = _interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{path}: {self.backend} cannot load it: {err}") from None
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        shape = tuple(int(d) for d in self._in["shape"])
        self._batch = shape[0]
        self.input_shape = shape[1:]

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x, self.input_shape)
        outputs = []
        for chunk in _chunks(x, self._batch):
            self._interp.set_tensor(self._in["index"], _quantize(chunk, self._in))
            self._interp.invoke()
            outputs.append(_dequantize(self._interp.get_tensor(self._out["index"]), self._out))
        return np.concatenate(outputs)[: len(x)]


def _interpreter_class() -> tuple[type, str]:
    """LiteRT's Interpreter, else tflite-runtime's (devices that already have it)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise ModelLoadError("running .tflite models needs ai-edge-litert: "
                            "pip install ai-edge-litert") from None


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """``x`` in the tensor's dtype: round(x / scale) + zero_point for integer inputs."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float32 values of an output tensor: (q - zero_point) * scale for integer outputs."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return q.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _chunks(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """``x`` split into batches of exactly ``batch`` rows, the last one zero-padded.

    Callers trim the concatenated outputs to ``len(x)`` rows.
    """
    pad = -len(x) % batch
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def _check_input(x: np.ndarray, input_shape: tuple[int, ...],
                 dtype: str = "float32") -> np.ndarray:
    """``dtype``, C-contiguous ``(n, *input_shape)``, or a ValueError naming the shapes."""
    x = np.ascontiguousarray(x, dtype=dtype)
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"expected inputs of shape (n, {', '.join(map(str, input_shape))}), "
                         f"got {x.shape}")
    return x


def load_runtime(path: str | os.PathLike[str], *, threads: int = 1) -> Runtime:
    """Load an exported model for inference, choosing the runtime by extension.

    Args:
        path: a ``.onnx`` or ``.tflite`` file.
        threads: intra-op threads of the runtime (1 = a small device's single core).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an extension other than ``.onnx``/``.tflite``.
        ModelLoadError: the runtime is not installed or cannot load the file.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such model file")
    kind = FORMATS.get(src.suffix.lower())
    if kind is None:
        raise ValueError(f"{src}: unknown model format {src.suffix!r}; expected .onnx or .tflite")
    if kind == "onnx":
        return OnnxRuntime(src, threads)
    return LiteRuntime(src, threads)


def median_latency_ms(
    predict: Callable[[np.ndarray], Any], x: np.ndarray, *, repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time in milliseconds of ``predict(x)`` over ``repeats`` calls.

    ``warmup`` untimed calls first (lazy allocation, caches); the median resists the noise of
    a shared machine better than the mean.
    """
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
