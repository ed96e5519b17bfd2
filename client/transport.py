"""The client's side of model/update transport: decode the global model, encode the update.

Receiving: the model blob is validated by the codec, dequantized (int8/fp16/fp32 → float32) and
scattered under the pruning mask, which the client caches in ``context.state`` because the
coordinator sends bitmaps only when the mask changes. Sending: Δ = w_local − w_received on the
unpruned coordinates, as float32 or as int8 with the cohort's shared clip range (stochastic
rounding; with error feedback the residual is kept in ``context.state`` for the next round).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fleetfl.compression.codec import decode_model, encode_update, model_size_bound
from fleetfl.compression.masks import sparse_values
from fleetfl.compression.quantize import (
    ErrorFeedback,
    TailCounts,
    dequantize_model,
    empty_tail,
    int8_scale,
    quantize_int8,
    tail_counts,
)

MASKS_KEY = "fleetfl.masks"  # context.state ArrayRecord: the pruning masks last received
RESIDUAL_KEY = "fleetfl.error-feedback"  # context.state ArrayRecord: EF residuals (float32)


@dataclass(frozen=True)
class ReceivedModel:
    """The global model as this client received it (its FedProx anchor)."""

    weights: dict[str, np.ndarray]  # float32, full shapes, zeros at pruned positions
    masks: dict[str, np.ndarray]  # bool, True = kept; empty when nothing is pruned
    mask_id: int
    server_round: int


def _load_arrays(state: RecordDict, key: str) -> dict[str, np.ndarray]:
    record = state.array_records.get(key)
    return {} if record is None else {k: record[k].numpy() for k in record}


def _save_arrays(state: RecordDict, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    state[key] = ArrayRecord.from_array_dict(
        {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def receive_model(blob: bytes, shapes: Mapping[str, tuple[int, ...]], server_round: int,
                  state: RecordDict) -> ReceivedModel:
    """Validate and unpack the model blob of ``server_round`` (raises ``CodecError``)."""
    decoded = decode_model(blob, max_bytes=model_size_bound(shapes), expected_shapes=shapes,
                           expected_round=server_round,
                           known_masks=_load_arrays(state, MASKS_KEY) or None)
    if decoded.masks_included:
        _save_arrays(state, MASKS_KEY, decoded.masks)
    scales = {name: spec.scale for name, spec in decoded.specs.items()}
    weights = dequantize_model(decoded.dense_all(), scales)
    return ReceivedModel(weights, decoded.masks, decoded.mask_id, decoded.round)


def pack_update(local: Mapping[str, np.ndarray], received: ReceivedModel, *, bits: int,
                clip: float, error_feedback: bool, rng: np.random.Generator,
                state: RecordDict, entropy_coding: bool = False,
                weight: float = 1.0) -> tuple[bytes, TailCounts]:
    """Encode Δ = local − received as the update blob; returns (blob, int8 tail counts).

    float32 updates carry Δ itself (the coordinator weights them); int8 updates carry
    ``weight`` · Δ (see :func:`quantize_update`).
    """
    if bits == 32:
        delta = _delta(local, received)
        blob = encode_update(delta, round=received.server_round, mask_id=received.mask_id,
                             scales={}, masks=received.masks, entropy_coding=entropy_coding)
        return blob, empty_tail()
    q, tail = quantize_update(local, received, clip=clip, error_feedback=error_feedback,
                              rng=rng, state=state, weight=weight)
    scale = int8_scale(clip)
    blob = encode_update(q, round=received.server_round, mask_id=received.mask_id,
                         scales=dict.fromkeys(q, scale), masks=received.masks,
                         entropy_coding=entropy_coding)
    return blob, tail


def quantize_update(local: Mapping[str, np.ndarray], received: ReceivedModel, *, clip: float,
                    error_feedback: bool, rng: np.random.Generator, state: RecordDict,
                    weight: float = 1.0) -> tuple[dict[str, np.ndarray], TailCounts]:
    """int8 ``weight`` · Δ with the shared ``clip`` (full shapes, 0 where pruned), tail counts.

    ``weight`` is the coordinator's ω_k (its example count over the cohort's mean), so that
    the coordinator averages by summing integers — what secure aggregation can do.
    """
    delta = {k: v * np.float32(weight) for k, v in _delta(local, received).items()}
    masks = received.masks
    if not error_feedback:
        return _quantize_plain(delta, masks, clip, rng)
    feedback = ErrorFeedback()
    feedback.load_state_dict(_load_arrays(state, RESIDUAL_KEY))
    q, tail = feedback.compress_all(delta, clip=clip, rng=rng, masks=masks)
    _save_arrays(state, RESIDUAL_KEY, feedback.state_dict())
    return q, tail


def kept_values(q: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Each tensor's unpruned values, flattened in C order (what a sparse update carries)."""
    return {k: sparse_values(v, masks.get(k)) for k, v in q.items()}


def _delta(local: Mapping[str, np.ndarray], received: ReceivedModel) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v, np.float32) - received.weights[k]) for k, v in local.items()}


def _quantize_plain(delta: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                    clip: float, rng: np.random.Generator
                    ) -> tuple[dict[str, np.ndarray], TailCounts]:
    """int8 stochastic rounding without error feedback (what clipping removes is lost)."""
    q, tail = {}, empty_tail()
    for name, d in delta.items():
        kept = d[masks[name]] if name in masks else d
        tail = tail + tail_counts(kept, clip)
        q[name] = quantize_int8(d, clip, rng)
        if name in masks:
            q[name][~masks[name]] = 0
    return q, tail
