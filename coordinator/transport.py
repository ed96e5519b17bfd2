"""The coordinator's side of model/update transport: pruning masks, model blobs, updates.

Per round (:meth:`ModelTransport.begin_round`): advance the cubic pruning schedule and, when the
target sparsity grows, recompute the global magnitude mask on the global model (monotone: pruned
weights never return); zero the pruned weights; encode the model blob at ``downlink_bits``, once
without and once with the mask bitmaps (sent only to clients that may not hold this mask yet).
Per reply (:meth:`decode_update`): validate the update blob against exactly what this round
expects (names, shapes, unpruned counts, dtype, the shared int8 scale, round, mask id) and
dequantize it. At the end (:meth:`end_round`): set the next round's shared clip range from the
cohort's summed tail counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fleetfl.aggregation.robust import trimmed_tail_sum
from fleetfl.compression.codec import decode_update, encode_model, expect_update, update_size
from fleetfl.compression.masks import (
    apply_masks_,
    cubic_sparsity,
    global_magnitude_masks,
    mask_id,
    prunable,
    scatter_values,
    sparsity_of,
)
from fleetfl.compression.quantize import (
    TAIL_COUNT_MAX,
    TailCounts,
    clip_from_stats,
    dequantize_int8,
    empty_tail,
    int8_scale,
    quantize_model,
)


@dataclass(frozen=True)
class TransportSettings:
    """The ``[compression]`` knobs the coordinator acts on."""

    prune_final_sparsity: float = 0.0
    prune_start_round: int = 1
    prune_end_round: int = 10
    update_bits: int = 32
    downlink_bits: int = 32
    initial_clip: float = 0.05
    clip_target: float = 1e-3
    entropy_coding: bool = True
    tail_trim: float = 0.1  # aggregation.trim_fraction: readable tail counts, trimmed


class ModelTransport:
    """Masks, clip range and blobs of the global model; which client holds which mask."""

    def __init__(self, settings: TransportSettings, shapes: Mapping[str, Sequence[int]],
                 prunable_names: Sequence[str] | None = None) -> None:
        """``prunable_names``: the tensors pruning may zero (the task's ``prunable``);
        ``None``: every tensor of 2 or more dimensions but biases."""
        self.settings = settings
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.prunable_names = (list(prunable_names) if prunable_names is not None else
                               prunable(list(self.shapes), list(self.shapes.values())))
        self.masks: dict[str, np.ndarray] = {}
        self.mask_id = mask_id({})
        self.clip = settings.initial_clip
        self._holds: dict[int, int] = {}  # node id -> mask id it last acknowledged
        self._blobs: tuple[bytes, bytes] = (b"", b"")
        self._round = 0
        self._tail = empty_tail()  # summed counts that arrive summed (secure aggregation)
        self._tails: list[TailCounts] = []  # each readable client's counts, combined robustly

    def begin_round(self, server_round: int, weights: dict[str, np.ndarray]) -> None:
        """Prune ``weights`` in place per the schedule and encode this round's model blobs."""
        s = self.settings
        target = cubic_sparsity(server_round, start_round=s.prune_start_round,
                                end_round=s.prune_end_round,
                                final_sparsity=s.prune_final_sparsity)
        if target > sparsity_of(self.masks):
            self.masks = global_magnitude_masks(weights, target, self.prunable_names,
                                                previous=self.masks or None)
            self.mask_id = mask_id(self.masks)
        apply_masks_(weights, self.masks)
        arrays, scales = quantize_model(weights, s.downlink_bits)
        zipped = s.entropy_coding
        lean = encode_model(arrays, round=server_round, scales=scales, masks=self.masks,
                            entropy_coding=zipped)
        full = encode_model(arrays, round=server_round, scales=scales, masks=self.masks,
                            include_masks=bool(self.masks), entropy_coding=zipped)
        self._blobs, self._round, self._tail = (lean, full), server_round, empty_tail()
        self._tails = []

    def model_blob(self, node_id: int) -> bytes:
        """This round's model blob for ``node_id``: with bitmaps unless it holds the mask."""
        lean, full = self._blobs
        return lean if self._holds.get(node_id) == self.mask_id else full

    def decode_update(self, node_id: int, blob: bytes, tail: Sequence[int], *,
                      dequantize: bool = True) -> dict[str, np.ndarray]:
        """Validate and dequantize one client's update (float32 Δ, full shapes; with
        ``dequantize=False`` an int8 update stays int8, for summing integers).

        Raises ``ValueError`` (``CodecError`` for the blob) naming the problem; on success the
        client is known to hold this round's mask and its tail counts join the cohort's.
        """
        int8 = self.settings.update_bits == 8
        expected = expect_update(self.shapes, self.masks,
                                 dtype=np.int8 if int8 else np.float32,
                                 scale=int8_scale(self.clip) if int8 else None)
        update = decode_update(blob, max_bytes=update_size(expected), expected=expected,
                               expected_round=self._round, expected_mask_id=self.mask_id)
        # Clamped as honest clients clamp them, then combined with a trimmed mean at
        # end_round: one client reporting "everything clipped" cannot widen the range alone.
        counts = TailCounts.from_list(tail).clamped(TAIL_COUNT_MAX) if int8 else empty_tail()
        kept = sum(e.count for e in expected.values())
        if int8 and counts.total != kept:
            raise ValueError(f"clip-tail counts {counts.total} values, the update has {kept}")
        delta = {}
        for name in self.shapes:
            dense = update.dense(name, self.masks.get(name))
            delta[name] = dequantize_int8(dense, self.clip) if int8 and dequantize else dense
        self._holds[node_id] = self.mask_id
        if int8:
            self._tails.append(counts)
        return delta

    def restore(self, masks: Mapping[str, np.ndarray] | None, clip: float) -> None:
        """Continue from a committed round: its pruning masks and shared int8 clip range.

        No client is assumed to hold the mask, so the next blobs carry the bitmaps.
        """
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in (masks or {}).items()}
        self.mask_id = mask_id(self.masks)
        self.clip = float(clip)
        self._holds.clear()

    def record_tail(self, counts: TailCounts) -> None:
        """Add a cohort's summed tail counts (secure aggregation: they arrive in the sum; a
        sum beyond what honest clients can report was refused before, ``sum_bounds``)."""
        self._tail = self._tail + counts

    @property
    def total_count(self) -> int:
        """Values of the whole model: what a dense update carries."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def kept_count(self) -> int:
        """Values a client's update carries: unpruned coordinates over all tensors."""
        return sum(int(self.masks[k].sum()) if k in self.masks else math.prod(shape)
                   for k, shape in self.shapes.items())

    def scatter(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Kept values (tensors in order, each flattened in C order) -> full-shape arrays."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            mask = self.masks.get(name)
            count = int(mask.sum()) if mask is not None else math.prod(shape)
            out[name] = scatter_values(values[start : start + count], mask, shape)
            start += count
        if start != len(values):
            raise ValueError(f"{len(values)} values for {start} kept coordinates")
        return out

    def forget(self, node_id: int) -> None:
        """``node_id`` failed: it may have lost its cached mask, so resend the bitmaps."""
        self._holds.pop(node_id, None)

    def end_round(self) -> None:
        """Adapt the shared int8 clip range to this round's cohort (int8 transport only)."""
        if self.settings.update_bits == 8:
            tail = self._tail + trimmed_tail_sum(self._tails, self.settings.tail_trim)
            self.clip = clip_from_stats(self.clip, tail, target=self.settings.clip_target)

    @property
    def sparsity(self) -> float:
        """Fraction of prunable weights currently pruned."""
        return sparsity_of(self.masks)

    def max_update_bytes(self) -> int:
        """Largest update blob of this round: its exact plain size, plus zlib's worst case."""
        dtype = np.int8 if self.settings.update_bits == 8 else np.float32
        size = update_size(expect_update(self.shapes, self.masks, dtype=dtype))
        # zlib never grows its input by more than ~0.03 % + a few bytes; the envelope adds 5.
        return size + size // 1000 + 64 if self.settings.entropy_coding else size
