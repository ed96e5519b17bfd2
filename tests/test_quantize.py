"""int8 transport: error bounds, unbiased stochastic rounding, error feedback, the clip rule."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetfl.compression.quantize import (
    TAIL_STEP,
    ErrorFeedback,
    TailCounts,
    clip_from_stats,
    dequantize_int8,
    dequantize_model,
    dequantize_sum,
    empty_tail,
    int8_scale,
    quantize_int8,
    quantize_model,
    sum_bound,
    tail_counts,
)

CLIPS = st.floats(1e-4, 1e3)
FLOATS = hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=12),
                    elements=st.floats(-1.0, 1.0, width=32))


@settings(max_examples=80, deadline=None)
@given(x=FLOATS, clip=CLIPS, seed=st.integers(0, 2**32 - 1))
def test_error_bounds_within_the_clip_range(x, clip, seed):
    x = x * np.float32(clip)  # |x| <= clip
    scale = int8_scale(clip)
    slack = 1e-5 * scale  # the float32 scale makes clip / scale = 127 only to an ulp
    nearest = quantize_int8(x, clip, None)
    stochastic = quantize_int8(x, clip, np.random.default_rng(seed))
    for q in (nearest, stochastic):
        assert q.dtype == np.int8 and q.shape == x.shape
        assert q.min(initial=0) >= -127 and q.max(initial=0) <= 127  # never -128
    assert (np.abs(x - dequantize_int8(nearest, clip)) <= scale / 2 + slack).all()
    assert (np.abs(x - dequantize_int8(stochastic, clip)) <= scale + slack).all()


def test_values_beyond_the_range_are_clipped():
    q = quantize_int8(np.array([-5.0, 5.0, 0.5], np.float32), 1.0, np.random.default_rng(0))
    assert q.tolist()[:2] == [-127, 127]
    assert dequantize_int8(q, 1.0)[1] == pytest.approx(1.0, rel=1e-6)


def test_stochastic_rounding_is_unbiased():
    clip, draws = 1.0, 4000
    scale = int8_scale(clip)
    x = np.linspace(-clip, clip, 41).astype(np.float32) + np.float32(scale / 3)
    x = np.clip(x, -clip, clip)
    rng = np.random.default_rng(1)
    samples = dequantize_int8(quantize_int8(np.tile(x, (draws, 1)), clip, rng), clip)
    mean = samples.astype(np.float64).mean(axis=0)
    # each draw is x rounded down or up one step: std <= scale / 2
    stderr = scale / 2 / np.sqrt(draws)
    assert (np.abs(mean - x) <= 5 * stderr).all()
    # round-to-nearest, in contrast, is biased by the fractional part
    near = dequantize_int8(quantize_int8(x, clip, None), clip)
    assert np.abs(near - x).max() > 5 * stderr


def test_rounding_is_reproducible_from_the_seed():
    x = np.random.default_rng(0).normal(size=100).astype(np.float32)
    a = quantize_int8(x, 2.0, np.random.default_rng(7))
    b = quantize_int8(x, 2.0, np.random.default_rng(7))
    assert (a == b).all()


@pytest.mark.parametrize("bad", [np.array([np.nan], np.float32), np.array([np.inf]),
                                 np.array([1, 2], np.int32)])
def test_quantize_rejects_non_finite_or_non_float(bad):
    with pytest.raises(ValueError):
        quantize_int8(bad, 1.0, None)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_quantize_rejects_bad_clip(clip):
    with pytest.raises(ValueError, match="clip range"):
        quantize_int8(np.zeros(3, np.float32), clip, None)


def test_shared_scale_makes_the_cohort_sum_one_integer_sum():
    """Σ_k dequantize(q_k) == dequantize_sum(Σ_k q_k): secure aggregation can add integers."""
    rng = np.random.default_rng(3)
    clip, k = 0.05, 25
    deltas = [rng.uniform(-clip, clip, size=1000).astype(np.float32) for _ in range(k)]
    qs = [quantize_int8(d, clip, rng) for d in deltas]
    int_sum = np.sum([q.astype(np.int32) for q in qs], axis=0)
    assert np.abs(int_sum).max() <= sum_bound(k)
    float_sum = np.sum([dequantize_int8(q, clip).astype(np.float64) for q in qs], axis=0)
    # equal up to float32 rounding of the per-client products
    np.testing.assert_allclose(dequantize_sum(int_sum, clip), float_sum, rtol=0, atol=1e-6 * clip)
    # the mean of the dequantized sum estimates the true mean: each term errs by < one step,
    # unbiased, so the mean's error is a fraction of a step
    err = dequantize_sum(int_sum, clip) / k - np.mean(deltas, axis=0)
    assert np.abs(err).max() <= int8_scale(clip)
    assert abs(err.mean()) <= 5 * int8_scale(clip) / 2 / np.sqrt(k * err.size)


# ------------------------------------------------------------------ error feedback


def test_error_feedback_tracks_the_cumulative_sum():
    """Σ_t x̂_t = Σ_t x_t - e_T exactly, and the residual stays below one step (no clipping)."""
    rng = np.random.default_rng(4)
    ef, clip = ErrorFeedback(), 1.0
    true_sum = np.zeros((20, 10))
    sent_sum = np.zeros((20, 10))
    for _ in range(50):
        x = rng.uniform(-0.9, 0.9, size=(20, 10)).astype(np.float32)
        q, _ = ef.compress("w", x, clip=clip, rng=rng)
        true_sum += x
        sent_sum += dequantize_int8(q, clip)
        residual = ef.residual("w")
        np.testing.assert_allclose(true_sum - sent_sum, residual, atol=1e-4)
        assert np.abs(residual).max() <= int8_scale(clip) * (1 + 1e-5)


def test_error_feedback_delivers_clipped_mass_later():
    ef, clip = ErrorFeedback(), 1.0
    x = np.array([3.5, -2.2, 0.3], np.float32)
    sent = dequantize_int8(ef.compress("w", x, clip=clip, rng=None)[0], clip)
    assert sent.tolist()[:2] == pytest.approx([1.0, -1.0])
    zero = np.zeros(3, np.float32)
    for _ in range(4):  # nothing new: the residual drains at up to clip per round
        sent = sent + dequantize_int8(ef.compress("w", zero, clip=clip, rng=None)[0], clip)
    np.testing.assert_allclose(sent, x, atol=int8_scale(clip) / 2 + 1e-6)


def test_error_feedback_under_a_mask_and_its_state():
    rng = np.random.default_rng(5)
    mask = rng.random((6, 4)) < 0.4
    ef = ErrorFeedback()
    x = rng.normal(scale=0.3, size=(6, 4)).astype(np.float32)
    q, tail = ef.compress("w", x, clip=0.5, rng=rng, mask=mask)
    assert (q[~mask] == 0).all() and (ef.residual("w")[~mask] == 0).all()
    assert tail.total == mask.sum()
    state = ef.state_dict()
    other = ErrorFeedback()
    other.load_state_dict(state)
    q1, _ = ef.compress("w", x, clip=0.5, rng=np.random.default_rng(9), mask=mask)
    q2, _ = other.compress("w", x, clip=0.5, rng=np.random.default_rng(9), mask=mask)
    assert (q1 == q2).all()
    with pytest.raises(ValueError):
        other.load_state_dict({"w": np.full(3, np.nan)})
    with pytest.raises(ValueError, match="NaN"):
        ef.compress("w", np.full((6, 4), np.nan, np.float32), clip=0.5, rng=None)
    assert np.isfinite(ef.residual("w")).all()  # a failed call leaves the state alone


def test_compress_all_sums_tail_counts():
    ef = ErrorFeedback()
    tensors = {"a": np.full(10, 2.0, np.float32), "b": np.zeros((3, 3), np.float32)}
    out, tail = ef.compress_all(tensors, clip=1.0, rng=None)
    assert set(out) == {"a", "b"} and out["a"].dtype == np.int8
    assert tail.total == 19 and tail.above[0] == 10 and tail.clipped_fraction == 10 / 19


# ------------------------------------------------------------------ clip rule


def test_tail_counts_ladder_and_transport():
    v = np.array([2.0, 0.9, 0.6, 0.4, 0.1, 0.0])
    tail = tail_counts(v, 1.0)
    assert tail.total == 6
    assert tail.above[:4] == (1, 2, 3, 4)  # thresholds 1, 0.707, 0.5, 0.354
    assert TailCounts.from_list(tail.to_list()) == tail
    assert (tail + tail).to_list() == [2 * c for c in tail.to_list()]
    assert empty_tail() + tail == tail
    for bad in ([5], [3, 2, 1], [1, 2], [3, -1, 0], [3, 1.5, 2]):
        with pytest.raises(ValueError):
            TailCounts.from_list(bad)


def test_clip_rule_widens_when_too_much_is_clipped():
    assert clip_from_stats(1.0, TailCounts(1000, (2,) * 9)) == 2.0  # 2x target: one doubling
    assert clip_from_stats(1.0, TailCounts(1000, (100,) * 9)) == 4.0  # 100x: two decades
    assert clip_from_stats(1.0, TailCounts(1000, (500,) * 9)) == 8.0  # 500x: three
    assert clip_from_stats(1.0, TailCounts(1000, (1000,) * 9), max_clip=5.0) == 5.0


def test_clip_rule_shrinks_to_the_lowest_safe_threshold():
    # nothing above clip/2 (j = 2), too much above clip/(2√2) (j = 3): shrink to clip/2
    tail = TailCounts(1000, (0, 0, 1, 50, 60, 70, 80, 90, 100))
    assert clip_from_stats(1.0, tail) == pytest.approx(0.5)
    assert clip_from_stats(1.0, TailCounts(1000, (0,) * 9)) == pytest.approx(TAIL_STEP**-8)
    assert clip_from_stats(1.0, TailCounts(1000, (1, 5) + (9,) * 7)) == 1.0  # at the level
    assert clip_from_stats(1.0, empty_tail()) == 1.0  # no data, no change
    with pytest.raises(ValueError):
        clip_from_stats(1.0, empty_tail(), target=0.0)


@pytest.mark.parametrize("start", [1e-4, 0.02, 50.0])
def test_clip_rule_settles_near_the_target_quantile_and_stays(start):
    """Closed loop over a stationary cohort: within a few rounds the range sits on the
    half-octave just above the 99.9 % quantile of |Δ|, from far too small or far too large."""
    rng = np.random.default_rng(6)
    quantile = 3.29 * 0.01  # 99.9 % two-sided quantile of N(0, 0.01^2)
    clip, history = start, []
    for _ in range(12):
        tail = empty_tail()
        for _ in range(10):  # ten clients, counts summed as secure aggregation would
            tail = tail + tail_counts(rng.normal(scale=0.01, size=5000), clip)
        clip = clip_from_stats(clip, tail)
        history.append(clip)
    assert quantile / TAIL_STEP <= clip <= quantile * 2 * TAIL_STEP
    assert len(set(history[-4:])) <= 2  # settled (at most one neighbouring level)


# ------------------------------------------------------------------ model downlink


@settings(max_examples=40, deadline=None)
@given(w=FLOATS, mag=st.floats(1e-3, 1e3))
def test_model_quantization_round_trip(w, mag):
    values = {"w": w * np.float32(mag)}
    for bits, rel in ((8, None), (16, 2.0**-11), (32, 0.0)):
        arrays, scales = quantize_model(values, bits)
        back = dequantize_model(arrays, scales)["w"]
        assert back.dtype == np.float32 and back.shape == w.shape
        if bits == 8:
            assert arrays["w"].dtype == np.int8
            tol = scales["w"] / 2 * (1 + 1e-5)
        else:
            tol = rel * np.abs(values["w"]) + 2.0**-25  # float16 subnormals: absolute
        assert (np.abs(back - values["w"]) <= tol).all()


def test_model_quantization_edge_cases():
    arrays, scales = quantize_model({"z": np.zeros(4, np.float32)}, 8)
    assert scales["z"] == 1.0 and (arrays["z"] == 0).all()
    with pytest.raises(ValueError, match="float16"):
        quantize_model({"big": np.array([1e6], np.float32)}, 16)
    with pytest.raises(ValueError, match="bits"):
        quantize_model({"w": np.zeros(2, np.float32)}, 4)
    with pytest.raises(ValueError, match="finite"):
        quantize_model({"w": np.array([np.nan], np.float32)}, 32)
