"""int8 quantization: the update transport (shared clip range) and the model downlink.

**Update transport.** Every client of a round quantizes its update Δ with the *same* clip range
``c`` (set by the coordinator, :func:`clip_from_stats`), symmetric int8 with 255 levels:

    scale = c / 127   (rounded to float32, so the codec's f32 field carries it exactly)
    q     = round(clip(x, -c, c) / scale)  in [-127, 127]   (never -128: the range is symmetric)
    x̂     = q * scale

``round`` is stochastic (``floor(y + U[0, 1))``, unbiased: E[x̂] = x for |x| <= c, error < scale)
when an ``rng`` is given, else round-to-nearest (error <= scale / 2). Because the scale is shared,
the cohort's dequantized sum is one integer sum times one scale,

    Σ_k x̂_k = (Σ_k q_k) * scale,   |Σ_k q_k| <= 127 * K   (:func:`sum_bound`),

so secure aggregation can add the int8 vectors as integers (in a ring of ``sum_bound`` size)
and the coordinator dequantizes only the sum (:func:`dequantize_sum`).

**Error feedback** (:class:`ErrorFeedback`, kept on the client): what clipping and rounding
removed is added to the next round's update, so nothing is lost, only delayed (Seide et al.
2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD", EF-SGD).

**Model downlink** (:func:`quantize_model`): per-tensor symmetric int8 (scale = max|w| / 127,
round-to-nearest), float16, or float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

INT8_LEVELS = 127  # q in [-127, 127]
TAIL_STEP = math.sqrt(2.0)  # tail thresholds are clip / TAIL_STEP**j: half-octave resolution
TAIL_LEVELS = 9  # j = 0..8: from the clip range down to clip / 16
_MIN_CLIP = 1e-30  # below this, clip / 127 is a float32 denormal and the scale loses precision


def int8_scale(clip: float) -> float:
    """Step between int8 levels for clip range ``clip``: ``clip / 127``, rounded to float32."""
    if not (math.isfinite(clip) and _MIN_CLIP <= clip <= 1e30):
        raise ValueError(f"clip range must be a finite number in [{_MIN_CLIP}, 1e30], got {clip}")
    return float(np.float32(clip / INT8_LEVELS))


def quantize_int8(x: np.ndarray, clip: float, rng: np.random.Generator | None) -> np.ndarray:
    """``x`` (float, any shape) -> int8 of the same shape, in [-127, 127], with range ``clip``.

    Values are clipped to [-127 * scale, 127 * scale] (= [-clip, clip] up to the float32
    rounding of the scale) first. With ``rng``: stochastic rounding ``floor(x / scale + u)``,
    ``u ~ U[0, 1)`` (unbiased for |x| <= clip, |error| < scale); without: round half to even
    (|error| <= scale / 2). Arithmetic is float64, so rounding of the intermediate adds no bias.
    Raises ``ValueError`` for NaN/Inf or a non-float ``x``.
    """
    scale = int8_scale(clip)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"quantize_int8 takes floating point input, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize NaN or Inf")
    y = x.astype(np.float64)  # a fresh buffer: the steps below work in place
    y /= scale
    np.clip(y, -INT8_LEVELS, INT8_LEVELS, out=y)  # then floor(y + u) and rint stay in range
    if rng is None:
        np.rint(y, out=y)
    else:
        y += rng.random(y.shape)
        np.floor(y, out=y)
    return y.astype(np.int8)


def dequantize_int8(q: np.ndarray, clip: float) -> np.ndarray:
    """int8 ``q`` -> float32 ``q * scale`` (same shape), ``scale = int8_scale(clip)``."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise ValueError(f"dequantize_int8 takes int8, got {q.dtype}")
    return q.astype(np.float32) * np.float32(int8_scale(clip))


def sum_bound(num_clients: int) -> int:
    """Largest ``|Σ_k q_k|`` of ``num_clients`` int8 updates: ``127 * K``.

    A ring of ``2 * sum_bound(K) + 1`` elements (e.g. 2**ceil(log2(254 K + 1))) holds the sum.
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    return INT8_LEVELS * num_clients


def dequantize_sum(q_sum: np.ndarray, clip: float) -> np.ndarray:
    """The sum of the cohort's dequantized updates from the sum of their int8 vectors.

    ``q_sum`` is an integer array (e.g. int32/int64, the secure aggregate); returns float64
    ``q_sum * scale``, equal to ``Σ_k dequantize_int8(q_k, clip)`` up to float rounding.
    """
    q_sum = np.asarray(q_sum)
    if q_sum.dtype.kind not in "iu":
        raise ValueError(f"dequantize_sum takes integers, got {q_sum.dtype}")
    return q_sum.astype(np.float64) * int8_scale(clip)


# Every client clamps its tail counts to this (with or without secure aggregation, so both give
# the same clip ranges): under secure aggregation they ride in the masked vector as int8-range
# values. The coordinator clamps what it receives too, so one client cannot widen the range.
TAIL_COUNT_MAX = 127


@dataclass(frozen=True)
class TailCounts:
    """How many quantized values exceeded each of a ladder of thresholds (for the clip rule).

    ``above[j]`` counts values with ``|v| > clip / TAIL_STEP**j``; ``above[0]`` is the number
    clipped. All fields are counts, so a cohort's are summed with ``+`` (and secure aggregation
    can sum them like the update itself: no client's own magnitudes are revealed).
    """

    total: int  # values quantized (kept coordinates)
    above: tuple[int, ...]  # non-decreasing in j, each <= total

    def __add__(self, other: TailCounts) -> TailCounts:
        if len(self.above) != len(other.above):
            raise ValueError("cannot add tail counts with different numbers of levels")
        above = tuple(a + b for a, b in zip(self.above, other.above, strict=True))
        return TailCounts(self.total + other.total, above)

    @property
    def clipped_fraction(self) -> float:
        """Fraction of values clipped (0.0 if none were quantized)."""
        return self.above[0] / self.total if self.total else 0.0

    def clamped(self, max_count: int) -> TailCounts:
        """Each ``above`` count capped at ``max_count`` (``total`` unchanged).

        Clients cap their counts at 127 so that they sum in the same ring as int8 values under
        secure aggregation; the clip rule then still sees "too much clipping" (any capped
        count is far above the target fraction when ``total`` < 127 / target values), it only
        widens more gently when the range is far too small.
        """
        return TailCounts(self.total, tuple(min(a, max_count) for a in self.above))

    def to_list(self) -> list[int]:
        """``[total, *above]``: for a MetricRecord or a secure sum."""
        return [self.total, *self.above]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> TailCounts:
        """Inverse of :meth:`to_list`; raises ``ValueError`` for inconsistent counts."""
        if len(values) < 2 or any(int(v) != v or v < 0 for v in values):
            raise ValueError(f"tail counts must be >= 2 non-negative integers, got {values!r}")
        total, *above = (int(v) for v in values)
        if any(a > b for a, b in zip(above[:-1], above[1:], strict=True)) or above[-1] > total:
            raise ValueError(f"tail counts must be non-decreasing and <= total, got {values!r}")
        return cls(total, tuple(above))


def empty_tail(levels: int = TAIL_LEVELS) -> TailCounts:
    """The zero of ``+`` for :class:`TailCounts` of ``levels`` thresholds."""
    return TailCounts(0, (0,) * levels)


def tail_counts(v: np.ndarray, clip: float, levels: int = TAIL_LEVELS) -> TailCounts:
    """:class:`TailCounts` of the values ``v`` about to be quantized with range ``clip``."""
    a = np.abs(np.asarray(v, dtype=np.float64)).ravel()
    thresholds = clip * np.exp2(-np.arange(levels) / 2)  # clip / TAIL_STEP**j, exact at even j
    return TailCounts(a.size, tuple(int(np.count_nonzero(a > t)) for t in thresholds))


def clip_from_stats(
    clip: float,
    tail: TailCounts,
    *,
    target: float = 1e-3,
    grow: float = 2.0,
    min_clip: float = 1e-6,
    max_clip: float = 1e3,
) -> float:
    """Next round's shared clip range from this round's cohort-summed ``tail`` at ``clip``.

    The rule aims at the smallest range that clips at most a ``target`` fraction of values
    (a high quantile, 99.9% by default, of |Δ + residual| over the cohort):

    * too much clipping (``clipped_fraction > target``): the counts cannot tell how far the
      tail reaches, so widen by ``grow`` per decade of excess, ``grow ** ceil(log10(f/target))``
      (f = 2x target: x2; 50x: x4; 1000x: x8);
    * otherwise shrink to the lowest threshold ``clip / TAIL_STEP**j`` still clipping at most
      ``target`` (at most 16x per round; unchanged if ``clip / √2`` would clip too much).

    Why this rule: it needs only counts, so it works unchanged under secure aggregation (the
    coordinator never sees a client's |Δ|); with a stationary |Δ| it settles in two or three
    rounds on the half-octave just above the target quantile and then stays (no oscillation);
    a too-small range costs little because error feedback re-sends what was clipped. Result is
    clamped to ``[min_clip, max_clip]``; no data (``total == 0``) keeps ``clip``.
    """
    if not 0.0 < target < 1.0 or grow <= 1.0:
        raise ValueError(f"need 0 < target < 1 and grow > 1, got {target=} {grow=}")
    int8_scale(clip)  # validates clip
    if tail.total == 0:
        return float(min(max(clip, min_clip), max_clip))
    fractions = [a / tail.total for a in tail.above]
    if fractions[0] > target:
        new = clip * grow ** math.ceil(math.log10(fractions[0] / target))
    else:
        j = max(i for i, f in enumerate(fractions) if f <= target)
        new = clip * 2.0 ** (-j / 2)  # = clip / TAIL_STEP**j, the thresholds of tail_counts
    return float(min(max(new, min_clip), max_clip))


class ErrorFeedback:
    """Client-side error feedback for int8 update transport (EF-SGD), one residual per tensor.

    Each round, for tensor ``name`` with update ``x`` and residual ``e`` (0 at first):

        v = x + e;   q = quantize_int8(v[mask], clip, rng);   e <- v - dequantize(q)

    so the cumulative transmitted sum equals the cumulative true sum minus the current residual
    (Σ_t x̂_t = Σ_t x_t - e_T): clipping and rounding errors are re-sent, not lost
    (Seide et al. 2014; Karimireddy et al. 2019 show EF restores SGD's convergence rate under
    biased compressors). Residuals are float32 of the tensor's full shape (memory = one more
    model copy). At pruned positions the residual is dropped: those weights stay 0 for good.
    A changed tensor shape resets that residual. Persist across rounds with
    :meth:`state_dict` / :meth:`load_state_dict` (e.g. in the ClientApp's ``context.state``).
    """

    def __init__(self) -> None:
        self._residual: dict[str, np.ndarray] = {}

    def compress(
        self,
        name: str,
        x: np.ndarray,
        *,
        clip: float,
        rng: np.random.Generator | None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, TailCounts]:
        """Quantize ``x + residual`` under ``mask``; update the residual.

        Returns int8 of ``x``'s shape (0 at pruned positions; only kept ones are rounded and
        meant to be sent) and the :class:`TailCounts` of the quantized values.
        """
        x = np.asarray(x)
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != x.shape):
            raise ValueError(f"mask of {name!r} must be bool of shape {x.shape}")
        e = self._residual.get(name)
        v = x.astype(np.float32) if e is None or e.shape != x.shape else x + e
        kept = v.ravel() if mask is None else v[mask]
        q_kept = quantize_int8(kept, clip, rng)  # raises before any state changes
        tail = tail_counts(kept, clip)
        if mask is None:
            q = q_kept.reshape(x.shape)
            residual = (v - dequantize_int8(q, clip)).astype(np.float32)
        else:
            q = np.zeros(x.shape, dtype=np.int8)
            q[mask] = q_kept
            residual = np.zeros(x.shape, dtype=np.float32)
            residual[mask] = kept - dequantize_int8(q_kept, clip)
        self._residual[name] = residual
        return q, tail

    def compress_all(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        clip: float,
        rng: np.random.Generator | None,
        masks: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], TailCounts]:
        """:meth:`compress` every tensor (masked where ``masks`` has one); summed tail counts."""
        masks = masks or {}
        out, total = {}, empty_tail()
        for name, x in tensors.items():
            out[name], tail = self.compress(name, x, clip=clip, rng=rng, mask=masks.get(name))
            total = total + tail
        return out, total

    def residual(self, name: str) -> np.ndarray | None:
        """The current residual of ``name`` (float32, full shape), or ``None``."""
        return self._residual.get(name)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of all residuals, name -> float32 array."""
        return {k: v.copy() for k, v in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace all residuals by float32 copies of ``state`` (NaN/Inf rejected)."""
        new = {k: np.array(v, dtype=np.float32) for k, v in state.items()}
        if not all(np.isfinite(v).all() for v in new.values()):
            raise ValueError("residuals must be finite")
        self._residual = new


def quantize_model(
    values: Mapping[str, np.ndarray], bits: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Model tensors for the downlink: ``(arrays, scales)`` ready for ``codec.encode_model``.

    ``bits=8``: per-tensor symmetric int8, ``scale = max|w| / 127`` (float32-exact; 1.0 for an
    all-zero tensor), round-to-nearest (|error| <= scale / 2). ``bits=16``: float16 (raises if a
    value overflows float16). ``bits=32``: float32. Shapes are kept; scales are 1.0 for floats.
    The coordinator keeps its float32 master copy: clients compute Δ against the dequantized
    model they received, so downlink error does not accumulate across rounds.
    """
    if bits not in (8, 16, 32):
        raise ValueError(f"bits must be 8, 16 or 32, got {bits}")
    arrays, scales = {}, {}
    for name, w in values.items():
        w = np.asarray(w)
        if w.dtype.kind != "f" or not np.isfinite(w).all():
            raise ValueError(f"tensor {name!r} must be finite floating point, got {w.dtype}")
        if bits == 8:
            top = float(np.abs(w).max()) if w.size else 0.0
            clip = top if top >= _MIN_CLIP else INT8_LEVELS  # all-zero: any scale; use 1.0
            arrays[name], scales[name] = quantize_int8(w, clip, None), int8_scale(clip)
        elif bits == 16:
            if w.size and float(np.abs(w).max()) > float(np.finfo(np.float16).max):
                raise ValueError(f"tensor {name!r} overflows float16; use bits=32")
            arrays[name], scales[name] = w.astype(np.float16), 1.0
        else:
            arrays[name], scales[name] = w.astype(np.float32), 1.0
    return arrays, scales


def dequantize_model(
    arrays: Mapping[str, np.ndarray], scales: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`quantize_model`: float32 arrays (int8 ones times their scale)."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == np.int8:
            out[name] = a.astype(np.float32) * np.float32(scales[name])
        else:
            out[name] = a.astype(np.float32)
    return out
