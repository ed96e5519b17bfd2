"""Pruning masks: the gradual sparsity schedule, global magnitude masks, and how to apply them.

Modelled on ``torch.nn.utils.prune``: a *method* computes a mask and *applying* it is separate.
A mask is a ``bool`` array of the tensor's shape where **True means kept** (unpruned) and False
means pruned (held at exactly 0.0), as in torch's ``weight_mask`` buffers. Masks are keyed by
the tensor's ``state_dict`` name; a tensor without an entry is never pruned (biases, norms).

Flow (decided on the coordinator, applied everywhere):

1. ``cubic_sparsity(t, ...)`` gives round t's target sparsity (Zhu & Gupta 2017).
2. ``global_magnitude_masks(global_model, s, prunable(...), previous)`` picks one threshold over
   all prunable tensors, pruning exactly ``round(s * N)`` of their ``N`` weights, never reviving
   a weight pruned before (masks only lose True bits over rounds).
3. ``apply_masks_`` / ``apply_masks_torch_`` zero pruned weights in place; a client calls the
   torch one after every local SGD step so pruned weights stay exactly 0 through training.
4. Only kept coordinates travel: ``sparse_values`` / ``scatter_values``; the mask itself travels
   as a bitmap (``pack_masks`` / ``unpack_masks``, 1 bit per weight) and is named by
   ``mask_id`` so both sides can tell whether they hold the same one.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

NO_MASK = 0  # mask_id of "no pruning" (an empty mask dict); a real mask never gets this id


def cubic_sparsity(
    server_round: int,
    *,
    start_round: int,
    end_round: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
) -> float:
    """Target sparsity (fraction of prunable weights at 0) in ``server_round``.

    Zhu & Gupta, "To prune, or not to prune" (2017), eq. (1), with one pruning step per round:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3   for t0 <= t <= t1

    clamped to ``s_i`` before ``start_round`` (t0) and ``s_f`` after ``end_round`` (t1). The cubic
    prunes fast while many redundant weights remain and slowly near the end. If ``t1 == t0``
    the schedule is a single step to ``s_f`` at t0.
    """
    if not 0.0 <= initial_sparsity <= final_sparsity <= 1.0:
        raise ValueError(
            f"need 0 <= initial_sparsity <= final_sparsity <= 1, "
            f"got {initial_sparsity} and {final_sparsity}"
        )
    if end_round < start_round:
        raise ValueError(f"end_round {end_round} < start_round {start_round}")
    if server_round >= end_round:  # includes t0 == t1: one step to s_f at t0
        return float(final_sparsity)
    if server_round <= start_round:
        return float(initial_sparsity)
    left = 1.0 - (server_round - start_round) / (end_round - start_round)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * left**3)


# The default schedule: prune from round 10 to round 30, or over the last two thirds of a shorter
# run. Pruning a model that has not learned yet ranks weights by their random initial values
# (masks never give weights back): at 30 rounds of the digits CNN, 75 % pruning from round 5
# lost 1.8-2.8 points, from round 10 none on average (BENCHMARKS.md, "The default schedule").
DEFAULT_PRUNE_START = 10
DEFAULT_PRUNE_END = 30


def pruning_schedule(num_rounds: int, start_round: int = 0, end_round: int = 0) -> tuple[int, int]:
    """(t0, t1) of :func:`cubic_sparsity` for a run of ``num_rounds``; a 0 is the default:
    t0 = min(10, ceil(num_rounds / 3)), t1 = min(30, num_rounds), never before t0."""
    default_start = min(DEFAULT_PRUNE_START, math.ceil(num_rounds / 3))
    if end_round:  # the default start never comes after a given end
        return start_round or min(default_start, end_round), end_round
    start = start_round or default_start
    return start, max(start, min(DEFAULT_PRUNE_END, num_rounds))


def prunable(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[str]:
    """Names of the tensors pruned by default: Linear/Conv weights (ndim >= 2), never biases.

    1-D tensors (biases, norm scales) and scalars hold few parameters and matter a lot for
    accuracy, so pruning them saves little and costs much. Order of ``names`` is kept.
    """
    return [
        name
        for name, shape in zip(names, shapes, strict=True)
        if len(shape) >= 2 and name.rsplit(".", 1)[-1] != "bias"
    ]


def global_magnitude_masks(
    params: Mapping[str, np.ndarray],
    sparsity: float,
    prunable: Sequence[str],
    previous: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Masks (True = kept) pruning the ``k`` smallest ``|w|`` over all ``prunable`` tensors.

    ``k = floor(sparsity * N + 0.5)`` (round half up) with ``N`` the total element count of the
    prunable tensors, so the result has **exactly** ``k`` False bits, unless ``previous`` already
    prunes more: with ``previous`` given, its pruned weights stay pruned (their magnitude counts
    as -1, below every real weight) and the mask is monotone across rounds.

    Ties at the threshold are broken deterministically by position: tensors in the order of
    ``prunable``, elements in C order, earlier pruned first. Work is O(N) (``np.partition``).
    Returns one ``bool`` array per prunable name, of that tensor's shape. Raises ``ValueError``
    for a sparsity outside [0, 1], NaN weights, or ``previous`` masks of the wrong shape.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    names = list(prunable)
    if len(set(names)) != len(names):
        raise ValueError("prunable names must be unique")
    flats = []
    for name in names:
        if name not in params:
            raise ValueError(f"prunable tensor {name!r} is not in params")
        w = np.asarray(params[name])
        score = np.abs(w.astype(np.float64, copy=False)).ravel()
        if np.isnan(score).any():
            raise ValueError(f"tensor {name!r} contains NaN; cannot rank magnitudes")
        if previous is not None and name in previous:
            prev = _check_mask(previous[name], w.shape, name)
            score[~prev.ravel()] = -1.0  # already pruned: ranks below every real magnitude
        flats.append(score)
    scores = np.concatenate(flats) if flats else np.zeros(0)
    n = scores.size
    k = min(n, math.floor(sparsity * n + 0.5))
    if previous is not None:
        k = max(k, int((scores < 0).sum()))  # never revive a pruned weight
    keep = np.ones(n, dtype=bool)
    if k > 0:
        keep[_smallest_k(scores, k)] = False
    out, offset = {}, 0
    for name in names:
        shape = np.shape(params[name])
        size = math.prod(shape)
        out[name] = keep[offset : offset + size].reshape(shape)
        offset += size
    return out


def _smallest_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest scores; ties at the k-th value go to the lowest indices."""
    kth = np.partition(scores, k - 1)[k - 1]
    below = np.flatnonzero(scores < kth)
    ties = np.flatnonzero(scores == kth)[: k - below.size]
    return np.concatenate([below, ties])


def _check_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != tuple(shape):
        raise ValueError(
            f"mask {name!r}: expected bool of shape {tuple(shape)}, got {mask.dtype} {mask.shape}"
        )
    return mask


def sparsity_of(masks: Mapping[str, np.ndarray]) -> float:
    """Fraction of pruned (False) entries over all masks; 0.0 for no masks."""
    total = sum(m.size for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def apply_masks_(tensors: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> None:
    """Set pruned entries of numpy ``tensors`` to exactly +0.0 (0 for integers), in place.

    Assignment (not multiplication) so that NaN or -x at a pruned position also becomes +0.0.
    Tensors without a mask are untouched; a mask naming a missing tensor raises ``ValueError``.
    """
    for name, mask in masks.items():
        if name not in tensors:
            raise ValueError(f"mask {name!r} has no tensor to apply to")
        t = tensors[name]
        t[~_check_mask(mask, t.shape, name)] = 0


def apply_masks_torch_(model_or_params: Any, masks: Mapping[str, Any]) -> None:
    """Set pruned entries of torch tensors to exactly 0, in place, without autograd tracking.

    ``model_or_params`` is an ``nn.Module`` (tensors found by ``state_dict`` name, parameters
    included) or a mapping name -> tensor. ``masks`` hold numpy or torch ``bool`` arrays; numpy
    ones are viewed without a copy. Call after each optimizer step: pruned weights then stay 0
    whatever the optimizer does (momentum, weight decay, the FedProx term).
    """
    import torch  # torch only here: the rest of this module is numpy-only

    if isinstance(model_or_params, torch.nn.Module):
        tensors = model_or_params.state_dict(keep_vars=True)
    else:
        tensors = model_or_params
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in tensors:
                raise ValueError(f"mask {name!r} has no tensor to apply to")
            t = tensors[name]
            m = torch.as_tensor(mask)
            if m.dtype != torch.bool or tuple(m.shape) != tuple(t.shape):
                raise ValueError(
                    f"mask {name!r}: expected bool of shape {tuple(t.shape)}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
            t.masked_fill_(~m.to(t.device), 0)


def mask_id(masks: Mapping[str, np.ndarray]) -> int:
    """A stable 64-bit id of ``masks`` (names, shapes, bits); ``NO_MASK`` (0) for no masks.

    The first 8 bytes (big-endian) of SHA-256 over a canonical serialization (names sorted;
    per mask: utf-8 name, shape, packed bits). Why a hash rather than a counter: both sides
    compute it from the mask alone (no shared state to lose on a restart, no per-client
    bookkeeping), it is the same on every platform and Python process (``hash()`` is salted),
    and a mismatch (a stale or corrupted mask on a client) is caught with probability 1 - 2^-64.
    SHA-256 because it is in the standard library everywhere; 8 bytes fit the codec's u64.
    """
    if not masks:
        return NO_MASK
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = np.asarray(masks[name])
        if mask.dtype != np.bool_:
            raise ValueError(f"mask {name!r} must be bool, got {mask.dtype}")
        raw = name.encode("utf-8")
        digest.update(struct.pack(f"<I{len(raw)}sB", len(raw), raw, mask.ndim))
        digest.update(struct.pack(f"<{mask.ndim}Q", *mask.shape))
        digest.update(np.packbits(mask.ravel()).tobytes())
    value = int.from_bytes(digest.digest()[:8], "big")
    return value or 1  # keep 0 for "no mask"


def pack_masks(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each mask as a 1-D ``uint8`` bitmap: C-order bits, MSB first (``np.packbits``).

    ``ceil(size / 8)`` bytes per mask (1 bit per weight vs 4 bytes of float32); the padding bits
    of the last byte are 0. The shapes travel separately (the codec's tensor specs).
    """
    return {name: np.packbits(_as_bool(m, name).ravel()) for name, m in masks.items()}


def unpack_masks(
    packed: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_masks`: ``bool`` masks of ``shapes[name]``.

    Raises ``ValueError`` if a bitmap has the wrong byte count or non-zero padding bits, so that
    a mask has exactly one encoding (and its ``mask_id`` cannot be dodged by a different one).
    """
    out = {}
    for name, bits in packed.items():
        if name not in shapes:
            raise ValueError(f"bitmap {name!r} has no shape")
        shape = tuple(int(d) for d in shapes[name])
        size = math.prod(shape)
        bits = np.asarray(bits)
        if bits.dtype != np.uint8 or bits.shape != ((size + 7) // 8,):
            raise ValueError(
                f"bitmap {name!r}: expected {(size + 7) // 8} uint8 bytes for shape {shape}, "
                f"got {bits.dtype} {bits.shape}"
            )
        flat = np.unpackbits(bits)
        if flat[size:].any():
            raise ValueError(f"bitmap {name!r}: padding bits are not zero")
        out[name] = flat[:size].astype(bool).reshape(shape)
    return out


def sparse_values(tensor: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The kept entries of ``tensor`` as a 1-D array (C order), same dtype; all if no mask."""
    tensor = np.asarray(tensor)
    if mask is None:
        return tensor.ravel()
    return tensor[_check_mask(mask, tensor.shape, "sparse_values")]


def scatter_values(
    values: np.ndarray, mask: np.ndarray | None, shape: Sequence[int]
) -> np.ndarray:
    """Inverse of :func:`sparse_values`: a new array of ``shape``, 0 at pruned entries.

    ``values`` is 1-D with one entry per True of ``mask`` (or ``prod(shape)`` entries if no mask);
    the result has ``values.dtype``. Raises ``ValueError`` on a count mismatch.
    """
    shape = tuple(int(d) for d in shape)
    values = np.asarray(values)
    if mask is None:
        if values.size != math.prod(shape):
            raise ValueError(f"{values.size} values cannot fill shape {shape}")
        return values.reshape(shape).copy()
    mask = _check_mask(mask, shape, "scatter_values")
    kept = int(mask.sum())
    if values.shape != (kept,):
        raise ValueError(f"expected {kept} values (the mask's kept entries), got {values.shape}")
    out = np.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def _as_bool(mask: Any, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"mask {name!r} must be bool, got {mask.dtype}")
    return mask

