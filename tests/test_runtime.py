"""On-device runtime: onnxruntime and LiteRT behind one ``predict``, int8 I/O, errors."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fleetfl.client.runtime import ModelLoadError, load_runtime, median_latency_ms
from fleetfl.coordinator.checkpoint import load_checkpoint
from fleetfl.coordinator.export_cmd import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TFLITE = FIXTURES / "digits_logreg_int8.tflite"  # made by fixtures/make_tflite_fixture.py
CHECKPOINT = FIXTURES / "digits_logreg.pt"
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
needs_litert = pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert is not installed")


def _gemm_model(path: Path, batch: int | str, weight: np.ndarray) -> Path:
    """An ONNX file computing ``flatten(x) @ weight.T`` for inputs (batch, 2, 3)."""
    w = numpy_helper.from_array(weight.astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 6], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 2, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        initializer=[w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("batch", ["n", 4])
def test_onnx_predict_any_number_of_examples(tmp_path: Path, batch: int | str) -> None:
    weight = np.random.default_rng(0).normal(size=(4, 6))
    runtime = load_runtime(_gemm_model(tmp_path / "m.onnx", batch, weight))
    assert runtime.backend == "onnxruntime"
    assert runtime.input_shape == (2, 3)
    x = np.random.default_rng(1).random((7, 2, 3))  # float64 on purpose: cast to float32
    out = runtime.predict(x)
    assert out.dtype == np.float32 and out.shape == (7, 4)
    np.testing.assert_allclose(out, x.reshape(7, 6) @ weight.T, rtol=1e-5, atol=1e-5)
    assert runtime.size_bytes == (tmp_path / "m.onnx").stat().st_size


def test_wrong_input_shape(tmp_path: Path) -> None:
    runtime = load_runtime(_gemm_model(tmp_path / "m.onnx", "n", np.ones((4, 6))))
    with pytest.raises(ValueError, match=r"\(n, 2, 3\)"):
        runtime.predict(np.zeros((5, 3, 2), np.float32))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_runtime(tmp_path / "absent.onnx")
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\0")
    with pytest.raises(ValueError, match="expected .onnx or .tflite"):
        load_runtime(weird)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        load_runtime(broken)


def test_median_latency() -> None:
    calls = []
    ms = median_latency_ms(calls.append, np.zeros(1), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= ms < 100


@needs_litert
def test_int8_tflite_agrees_with_torch() -> None:
    ckpt = load_checkpoint(CHECKPOINT)
    test = ckpt.load_dataset().test
    runtime = load_runtime(TFLITE)
    assert runtime.backend == "ai-edge-litert"
    assert runtime._in["dtype"] == np.int8  # full int8: the runtime quantizes the input
    logits = runtime.predict(test.x)
    with torch.no_grad():
        ref = ckpt.build_model()(torch.from_numpy(test.x)).numpy()
    assert logits.shape == ref.shape and logits.dtype == np.float32
    assert float((logits.argmax(1) == ref.argmax(1)).mean()) >= 0.98
    torch_acc = float((ref.argmax(1) == test.y).mean())
    assert torch_acc > 0.9
    assert abs(float((logits.argmax(1) == test.y).mean()) - torch_acc) <= 0.01
    np.testing.assert_allclose(runtime.predict(test.x[:3]), logits[:3])  # batch-1 file, 3 rows


@needs_litert
def test_evaluate_a_tflite_file(capsys: pytest.CaptureFixture) -> None:
    argv = ["evaluate", "--model", str(TFLITE), "--checkpoint", str(CHECKPOINT),
            "--repeats", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "ai-edge-litert"
    assert report["top1_agreement"] >= 0.98
    assert report["export"]["int8"] is True


@needs_litert
def test_falls_back_to_tflite_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_litert.interpreter import Interpreter

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    assert load_runtime(TFLITE).backend == "tflite-runtime"


def test_no_tflite_runtime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(ModelLoadError, match="pip install ai-edge-litert"):
        load_runtime(TFLITE)
