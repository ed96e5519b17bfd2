"""Export: int8 ONNX agrees with the torch model; structured pruning; the export/evaluate CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fleetfl.client.runtime import load_runtime
from fleetfl.compression.export_onnx import read_metadata
from fleetfl.compression.qat import ACT_QMAX, ACT_QMIN, enable_qat
from fleetfl.compression.structured import count_parameters, finetune, structured_prune
from fleetfl.coordinator.checkpoint import load_checkpoint, save_checkpoint
from fleetfl.coordinator.export_cmd import main
from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.models import build_model
from fleetfl.tasks.registry import load_federated

TASK = {"dataset": "digits", "model": "cnn", "alpha": 1.0, "beta": 1.0, "iid": False,
        "partition_alpha": 0.5, "seed": 0, "num_clients": 20, "input_shape": [1, 8, 8],
        "num_classes": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return load_federated("digits", num_clients=20, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory,
             digits: FederatedDataset) -> dict[str, Path]:
    """A digits CNN trained with QAT for 3 epochs, its checkpoint, fp32 and int8 ONNX files."""
    train = digits.train_union()
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    finetune(model, torch.from_numpy(train.x), torch.from_numpy(train.y), epochs=3, qat=True)
    out = tmp_path_factory.mktemp("export")
    ckpt = save_checkpoint(out / "model.pt", state_dict=model.state_dict(), task=TASK,
                           server_round=3, quantization={"qat": True})
    files = {"checkpoint": ckpt}
    for name, flags in (("fp32", []), ("int8", ["--int8"])):
        files[name] = out / f"{name}.onnx"
        argv = ["export", "--checkpoint", str(ckpt), "--format", "onnx", *flags,
                "--out", str(files[name])]
        assert main(argv) == 0
    return files


QEMU_X86 = shutil.which("qemu-x86_64")


def _torch_logits(ckpt: Path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_checkpoint(ckpt).build_model()(torch.from_numpy(x)).numpy()


def test_int8_onnx_agrees_with_torch(exported: dict[str, Path], digits: FederatedDataset) -> None:
    test = digits.test
    ref = _torch_logits(exported["checkpoint"], test.x)
    int8 = load_runtime(exported["int8"]).predict(test.x)
    torch_acc = float((ref.argmax(1) == test.y).mean())
    int8_acc = float((int8.argmax(1) == test.y).mean())
    assert torch_acc > 0.9  # the model really learned the task
    assert float((int8.argmax(1) == ref.argmax(1)).mean()) >= 0.98
    assert abs(int8_acc - torch_acc) <= 0.01


def test_fp32_onnx_matches_torch(exported: dict[str, Path], digits: FederatedDataset) -> None:
    ref = _torch_logits(exported["checkpoint"], digits.test.x)
    out = load_runtime(exported["fp32"]).predict(digits.test.x)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_int8_file_is_at_least_3_5x_smaller(exported: dict[str, Path]) -> None:
    ratio = exported["fp32"].stat().st_size / exported["int8"].stat().st_size
    assert ratio >= 3.5, ratio


def test_file_carries_task_and_export_settings(exported: dict[str, Path]) -> None:
    meta = read_metadata(exported["int8"])
    assert json.loads(meta["fleetfl.task"]) == TASK
    assert json.loads(meta["fleetfl.export"])["int8"] is True


def _activation_grids(path: Path) -> list[tuple[float, float]]:
    """(low, high) of each activation QuantizeLinear of an int8 QDQ file, in graph order."""
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    grids = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero = float(inits[node.input[1]]), int(inits[node.input[2]])
            grids.append(((ACT_QMIN - zero) * scale, (ACT_QMAX - zero) * scale))
    return grids


def test_fake_quant_simulates_the_int8_model(exported: dict[str, Path],
                                             digits: FederatedDataset) -> None:
    """QAT's forward on the exported file's grids computes what the int8 model computes.

    Weights: the file's int8 weights are exactly QAT's (same per-channel grid). Activations:
    the fake-quant uses the file's own activation scales and zero points. Ranges re-observed
    in torch differ from onnxruntime's (calibrated on the float model) by ~0.3 %, enough to
    move many values to a neighbouring level: the mean logit error would then be dominated by
    the output grid's rounding (a step of ~0.1), not by the arithmetic this test is about.
    """
    model = load_checkpoint(exported["checkpoint"]).build_model()
    x = torch.from_numpy(digits.test.x)
    int8 = load_runtime(exported["int8"]).predict(digits.test.x)
    # The CNN's quantized tensors in graph order: input, conv1 out (conv2's input), conv2 out,
    # max-pool out, flatten out (linear1's input), linear1 out (linear2's input), logits.
    grids = _activation_grids(exported["int8"])
    assert len(grids) == 7
    with torch.no_grad():
        float_logits = model(x).numpy()
        with enable_qat(model) as qat:
            qat.set_activation_ranges({
                "features.0:input": grids[0], "features.2:input": grids[1],
                "classifier.1:input": grids[4], "classifier.3:input": grids[5],
                "output": grids[6]})
            model.eval()
            fq_logits = model(x).numpy()
    fq_error, float_error = np.abs(fq_logits - int8).mean(), np.abs(float_logits - int8).mean()
    assert fq_error < 0.1 * float_error, (fq_error, float_error)  # measured 0.02-0.05x
    assert (np.abs(fq_logits - int8) < 1e-5).mean() > 0.95  # measured 98.4-99.1 % exact


def test_int8_weights_cannot_saturate_x86_kernels(exported: dict[str, Path]) -> None:
    """Every int8 weight is in [-64, 64]: onnxruntime's non-VNNI x86 kernels add two u8 x s8
    products into a saturating int16 (VPMADDUBSW), exact only while |w_i| + |w_j| <= 128."""
    proto = onnx.load(str(exported["int8"]))
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(weights) == 4  # two convolutions, two linear layers
    for w in weights:
        assert np.abs(w.astype(np.int32)).max() <= 64
        assert 255 * 2 * np.abs(w.astype(np.int32)).max() <= 32767


@pytest.mark.skipif(QEMU_X86 is None or platform.machine() != "x86_64",
                    reason="needs qemu-x86_64 (Debian's qemu-user) on an x86-64 host")
def test_int8_model_gives_the_same_logits_on_a_cpu_without_vnni(
        exported: dict[str, Path], digits: FederatedDataset, tmp_path: Path) -> None:
    """Under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI) onnxruntime takes its u8s8 kernels;
    with full-range weights they gave logits off by 0.6 on average (top-1 agreement 97.8 %)."""
    np.save(tmp_path / "x.npy", digits.test.x)
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "np.save(sys.argv[3], s.run(None, {'input': np.load(sys.argv[2])})[0])\n")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, *sys.path[1:]])}
    subprocess.run([QEMU_X86, "-cpu", "Haswell", os.path.realpath(sys.executable), "-c", script,
                    str(exported["int8"]), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, timeout=300, env=env, capture_output=True)
    emulated = np.load(tmp_path / "y.npy")
    native = load_runtime(exported["int8"]).predict(digits.test.x)
    np.testing.assert_allclose(emulated, native, atol=1e-4)


def test_evaluate_reads_the_task_from_the_file(exported: dict[str, Path],
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--model", str(exported["int8"]), "--repeats", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "onnxruntime"
    assert report["exported"]["accuracy"] > 0.9
    assert report["exported"]["size_bytes"] == exported["int8"].stat().st_size
    assert report["exported"]["latency_ms_batch1"] > 0
    assert "torch" not in report


def test_evaluate_next_to_the_torch_model(exported: dict[str, Path],
                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["evaluate", "--model", str(exported["int8"]), "--checkpoint",
            str(exported["checkpoint"]), "--repeats", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "torch (checkpoint)" in text
    assert "top-1 agreement with the torch model" in text


def test_structured_pruning_really_shrinks_the_model() -> None:
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    pruned = structured_prune(model, torch.zeros(1, 1, 8, 8), 0.5)
    assert [pruned.features[0].out_channels, pruned.features[2].out_channels,
            pruned.classifier[1].out_features, pruned.classifier[3].out_features] == [8, 16, 32, 10]
    assert count_parameters(pruned) < 0.3 * count_parameters(model)
    assert pruned(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert count_parameters(model) == 38282  # the original is left alone
    with pytest.raises(ValueError, match="ratio"):
        structured_prune(model, torch.zeros(1, 1, 8, 8), 1.0)


def test_pruned_int8_export(exported: dict[str, Path], digits: FederatedDataset,
                            tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    argv = ["export", "--checkpoint", str(exported["checkpoint"]), "--format", "onnx", "--int8",
            "--structured-prune", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert out.stat().st_size < 0.5 * exported["int8"].stat().st_size
    ref = _torch_logits(exported["checkpoint"], digits.test.x)
    pruned = load_runtime(out).predict(digits.test.x)
    torch_acc = float((ref.argmax(1) == digits.test.y).mean())
    assert float((pruned.argmax(1) == digits.test.y).mean()) >= torch_acc - 0.03


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--checkpoint", "absent.pt", "--format", "onnx", "--out", "m.onnx"],
         "no such checkpoint"),
        (["export", "--checkpoint", "CKPT", "--format", "onnx", "--out", "m.tflite"],
         "should end in .onnx"),
        (["export", "--checkpoint", "CKPT", "--format", "onnx", "--structured-prune", "1.5",
          "--out", "m.onnx"], "structured-prune"),
        (["evaluate", "--model", "absent.onnx"], "no such model file"),
        (["evaluate", "--model", "CKPT"], "unknown model format"),
    ],
)
def test_cli_errors(argv: list[str], message: str, exported: dict[str, Path],
                    capsys: pytest.CaptureFixture) -> None:
    argv = [str(exported["checkpoint"]) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetfl: error:") and message in err


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is not None,
                    reason="the tflite extra is installed")
def test_tflite_export_without_the_extra_says_how_to_install(
        exported: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["export", "--checkpoint", str(exported["checkpoint"]), "--format", "tflite",
            "--out", str(tmp_path / "m.tflite")]
    assert main(argv) == 2
    assert "pip install 'fleetfl[tflite]'" in capsys.readouterr().err
