"""Compression micro-benchmark: bytes and throughput of the update/model wire path.

A 100,000-parameter model (conv 16x16x3x3, fc 250x384 + bias, fc 10x168: the shape mix of a
small edge CNN), weights N(0, 0.05²), a client update Δ ~ N(0, 0.01²), clip range 0.04. For
global-magnitude sparsity 0 / 75 / 90 %, measures on this machine:

* bytes of the int8 update blob vs dense float32 (400,000 bytes of values) and vs what Flower
  carries: the same blob inside a ConfigRecord vs the float32 tensors as an ArrayRecord
  (``fleetfl.protocol.record_bytes``: measured from serialization);
* throughput (MB/s of float32 parameters, 0.4 MB per call; median of ``--repeats`` calls) of
  quantize (error feedback + stochastic rounding), encode, decode (full validation) and
  dequantize + scatter back to dense;
* downlink model bytes as int8 / float16 / float32, with and without the mask bitmaps.

    python -m benchmarks.compression_micro [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import emit
from fleetfl.compression import codec
from fleetfl.compression.masks import (
    apply_masks_,
    global_magnitude_masks,
    mask_id,
    pack_masks,
    prunable,
)
from fleetfl.compression.quantize import ErrorFeedback, dequantize_int8, int8_scale, quantize_model

SHAPES = {"conv.weight": (16, 16, 3, 3), "fc1.weight": (250, 384), "fc1.bias": (16,),
          "fc2.weight": (10, 168)}
PARAMS = sum(int(np.prod(s)) for s in SHAPES.values())  # 100,000
CLIP = 0.04
SPARSITIES = (0.0, 0.75, 0.9)


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rate(seconds: float) -> dict[str, float]:
    return {"ms": round(seconds * 1e3, 3), "MB_per_s": round(PARAMS * 4 / seconds / 1e6, 1)}


def _flower_bytes(blob: bytes, dense: dict[str, np.ndarray]) -> dict[str, int]:
    from flwr.app import ConfigRecord, RecordDict

    from fleetfl import protocol as P

    return {
        "blob_in_config_record": P.record_bytes(RecordDict({"c": ConfigRecord({"u": blob})})),
        "float32_array_record": P.record_bytes(
            RecordDict({P.ARRAYS: P.arrays_to_record(list(dense), list(dense.values()))})),
    }


def bench_update(sparsity: float, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    weights = {n: rng.normal(scale=0.05, size=s).astype(np.float32) for n, s in SHAPES.items()}
    delta = {n: rng.normal(scale=0.01, size=s).astype(np.float32) for n, s in SHAPES.items()}
    names = prunable(list(SHAPES), list(SHAPES.values()))
    masks = global_magnitude_masks(weights, sparsity, names) if sparsity else {}
    apply_masks_(delta, masks)
    mid, scale = mask_id(masks), int8_scale(CLIP)
    ef = ErrorFeedback()
    q, tail = ef.compress_all(delta, clip=CLIP, rng=rng, masks=masks)
    scales = dict.fromkeys(q, scale)
    blob = codec.encode_update(q, round=1, mask_id=mid, scales=scales, masks=masks)
    expected = codec.expect_update(SHAPES, masks, scale=CLIP / 127)
    decoded = codec.decode_update(blob, max_bytes=len(blob), expected=expected)

    def dequantize() -> dict[str, np.ndarray]:
        return {n: dequantize_int8(decoded.dense(n, masks.get(n)), CLIP) for n in SHAPES}

    fp32_blob = codec.encode_update(delta, round=1, mask_id=mid, scales={}, masks=masks)
    return {
        "sparsity": sparsity,
        "values_sent": sum(v.size for v in decoded.values.values()),
        "clipped_fraction": round(tail.clipped_fraction, 6),
        "bytes": {
            "int8_blob": len(blob),
            "float32_blob_same_mask": len(fp32_blob),
            "dense_float32_values": PARAMS * 4,
            "ratio_vs_dense_float32": round(PARAMS * 4 / len(blob), 2),
            "flower": _flower_bytes(blob, delta),
        },
        "quantize_ef": _rate(_median_s(
            lambda: ErrorFeedback().compress_all(delta, clip=CLIP, rng=rng, masks=masks),
            repeats)),
        "encode": _rate(_median_s(
            lambda: codec.encode_update(q, round=1, mask_id=mid, scales=scales, masks=masks),
            repeats)),
        "decode": _rate(_median_s(
            lambda: codec.decode_update(blob, max_bytes=len(blob), expected=expected,
                                        expected_round=1, expected_mask_id=mid), repeats)),
        "dequantize_scatter": _rate(_median_s(dequantize, repeats)),
    }


def bench_model(sparsity: float, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    weights = {n: rng.normal(scale=0.05, size=s).astype(np.float32) for n, s in SHAPES.items()}
    names = prunable(list(SHAPES), list(SHAPES.values()))
    masks = global_magnitude_masks(weights, sparsity, names) if sparsity else {}
    apply_masks_(weights, masks)
    out: dict[str, Any] = {"sparsity": sparsity,
                           "mask_bitmap_bytes": sum(b.size for b in pack_masks(masks).values())}
    for bits in (8, 16, 32):
        arrays, scales = quantize_model(weights, bits)
        plain = codec.encode_model(arrays, round=1, scales=scales, masks=masks)
        with_masks = codec.encode_model(arrays, round=1, scales=scales, masks=masks,
                                        include_masks=True)
        out[f"bits{bits}"] = {"bytes": len(plain), "bytes_with_masks": len(with_masks)}
    out["global_magnitude_masks"] = _rate(_median_s(
        lambda: global_magnitude_masks(weights, max(sparsity, 0.5), names, previous=masks),
        max(3, repeats // 5)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    emit("compression_micro", {
        "parameters": PARAMS,
        "clip": CLIP,
        "repeats": args.repeats,
        "update": [bench_update(s, args.repeats) for s in SPARSITIES],
        "model": [bench_model(s, args.repeats) for s in SPARSITIES],
    })


if __name__ == "__main__":
    main()
