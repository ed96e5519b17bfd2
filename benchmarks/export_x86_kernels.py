"""The int8 ONNX file on x86 CPUs with and without VNNI: full-range vs 7-bit weights.

Trains the digits CNN with QAT (as ``tests/test_export.py`` does), exports it to fp32 ONNX,
quantizes it twice with onnxruntime's ``quantize_static`` (per-channel int8 weights: full range
[-127, 127], and ``reduce_range`` [-64, 64], what ``fleetfl export --int8`` writes), and runs
each int8 file with onnxruntime on this CPU and under ``qemu-x86_64 -cpu Haswell`` (AVX2, no
VNNI: onnxruntime then takes its u8s8 kernels, whose VPMADDUBSW saturates at int16). Reports,
per file and CPU, the mean absolute logit error against torch, top-1 agreement and accuracy.

    python -m benchmarks.export_x86_kernels [--epochs 3] [--seeds 0 1 2]

Needs Debian's ``qemu-user`` (``qemu-x86_64``) on an x86-64 host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import emit
from fleetfl.compression.export_onnx import _torch_export, quantize_int8
from fleetfl.compression.structured import finetune
from fleetfl.coordinator.export_cmd import CALIBRATION_SAMPLES
from fleetfl.tasks.models import build_model
from fleetfl.tasks.registry import load_federated

_RUN = ("import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[3], s.run(None, {'input': np.load(sys.argv[2])})[0])\n")


def _logits(model_file: Path, x_file: Path, cpu: str | None) -> np.ndarray:
    """onnxruntime's logits, natively (``cpu=None``) or under qemu with CPU model ``cpu``."""
    out = model_file.with_suffix(f".{cpu or 'native'}.npy")
    python = os.path.realpath(sys.executable)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site)}
    prefix = [] if cpu is None else [shutil.which("qemu-x86_64") or "qemu-x86_64", "-cpu", cpu]
    subprocess.run([*prefix, python, "-c", _RUN, str(model_file), str(x_file), str(out)],
                   check=True, env=env, timeout=600)
    return np.load(out)


def measure(seed: int, epochs: int, work: Path) -> list[dict[str, Any]]:
    """One trained model: each weight range on each CPU."""
    data = load_federated("digits", num_clients=20, seed=0)
    train = data.train_union()
    model = build_model("cnn", (1, 8, 8), 10, seed=seed)
    finetune(model, torch.from_numpy(train.x), torch.from_numpy(train.y), epochs=epochs,
             qat=True)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(data.test.x)).numpy()
    fp32, x_file = work / f"s{seed}.fp32.onnx", work / "x.npy"
    np.save(x_file, data.test.x)
    _torch_export(model, fp32, (1, 8, 8))
    calib = train.x[np.random.default_rng(0).permutation(len(train.x))[:CALIBRATION_SAMPLES]]
    rows = []
    for weights, reduce_range in (("full-range [-127,127]", False), ("7-bit [-64,64]", True)):
        int8 = work / f"s{seed}.{reduce_range}.onnx"
        quantize_int8(fp32, int8, calib, reduce_range=reduce_range)
        for cpu in (None, "Haswell"):
            out = _logits(int8, x_file, cpu)
            rows.append({"seed": seed, "weights": weights, "cpu": cpu or "native",
                         "mean_abs_logit_error": float(np.abs(out - ref).mean()),
                         "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                         "accuracy_int8": float((out.argmax(1) == data.test.y).mean()),
                         "accuracy_torch": float((ref.argmax(1) == data.test.y).mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = Path("/proc/cpuinfo").read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for s in args.seeds for r in measure(s, args.epochs, Path(tmp))]
    emit("export_x86_kernels", {"native_cpu_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
                                "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
