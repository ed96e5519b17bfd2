"""Export: int8 ONNX agrees with the torch model; structured pruning; the export/evaluate CLI."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetfl.client.runtime import load_runtime
from fleetfl.compression.export_onnx import read_metadata
from fleetfl.compression.qat import enable_qat
from fleetfl.compression.structured import count_parameters, finetune, structured_prune
from fleetfl.coordinator.checkpoint import load_checkpoint, save_checkpoint
from fleetfl.coordinator.export_cmd import CALIBRATION_SAMPLES, calibration_inputs, main
from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.models import build_model
from fleetfl.tasks.registry import load_federated

TASK = {"dataset": "digits", "model": "cnn", "alpha": 1.0, "beta": 1.0, "iid": False,
        "partition_alpha": 0.5, "seed": 0, "num_clients": 20, "input_shape": [1, 8, 8],
        "num_classes": 10}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two intra-op threads on a shared 2-core machine are ~10x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_fake_quant_simulates_the_int8_model(exported: dict[str, Path],
                                             digits: FederatedDataset) -> None:
    """QAT's forward is closer to the deployed int8 model than the float forward is."""
    model = load_checkpoint(exported["checkpoint"]).build_model()
    x = torch.from_numpy(digits.test.x)
    # The export's calibration set in one batch: the observers take its min/max, as onnxruntime's
    # MinMax calibration does, so both quantize on (nearly) the same grids.
    calib = torch.from_numpy(calibration_inputs(TASK, CALIBRATION_SAMPLES))
    int8 = load_runtime(exported["int8"]).predict(digits.test.x)
    with torch.no_grad():
        float_logits = model(x).numpy()
        with enable_qat(model):
            model.train()
            model(calib)
            model.eval()
            fq_logits = model(x).numpy()
    assert np.abs(fq_logits - int8).mean() < 0.7 * np.abs(float_logits - int8).mean()


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
