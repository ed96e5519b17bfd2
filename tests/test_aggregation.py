"""Weighted averaging, and the ω-weighted int8 mean against a float reference."""

import numpy as np
import pytest

from fleetfl.aggregation.average import weighted_average
from fleetfl.aggregation.int8_mean import int8_weighted_mean, update_weights
from fleetfl.compression.quantize import int8_scale, quantize_int8


def test_weighted_average_by_example_counts():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[4.0]], np.float32)]
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [[3.0]])
    assert out[0].dtype == np.float32


def test_weighted_average_rejects_bad_weights():
    a = [np.zeros(2, np.float32)]
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([a], [0])
    with pytest.raises(ValueError):
        weighted_average([a, a], [1, -1])


# ------------------------------------------------------------------ ω-weighted int8 mean
# The coordinator's int8 path (coordinator/strategy.py) against a float64 reference computed
# here independently, so that "secure equals plain" cannot hide a bug both paths share.

COORDS = 20_000  # per client: enough for the mean error to show a bias of 0.05 scale


def _cohort(num_clients: int, seed: int) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """Very unequal example counts (10 · 4^j, 10 to 163 840, shuffled) and float32 updates
    whose per-client offsets differ, so that how replies are weighted shows in the mean."""
    rng = np.random.default_rng(seed)
    counts = {1000 + k: int(10 * 4 ** j) for k, j in enumerate(rng.permutation(num_clients))}
    offsets = rng.uniform(-1.0, 1.0, num_clients)
    deltas = {node: (offsets[k] + rng.normal(0.0, 0.5, COORDS)).astype(np.float32)
              for k, node in enumerate(counts)}
    return counts, deltas


def _reference(counts: dict[int, int], deltas: dict[int, np.ndarray]) -> np.ndarray:
    """Σ n_k Δ_k / Σ n_k in float64, without update weights or quantization."""
    total = np.zeros(COORDS, np.float64)
    for node, n in counts.items():
        total += float(n) * deltas[node].astype(np.float64)
    return total / float(sum(counts.values()))


def _quantize(deltas: dict[int, np.ndarray], weights: dict[int, float], seed: int,
              rounding: str = "stochastic") -> tuple[dict[int, np.ndarray], float]:
    """What the clients send: int8 of ω_k Δ_k (float32, as client/transport.py computes it)
    with a shared clip range covering every value, stochastic rounding seeded per client."""
    scaled = {node: d * np.float32(weights[node]) for node, d in deltas.items()}
    clip = 1.01 * max(float(np.abs(x).max()) for x in scaled.values())
    q = {node: quantize_int8(x, clip, np.random.default_rng([seed, node])
                             if rounding == "stochastic" else None)
         for node, x in scaled.items()}
    scale = int8_scale(clip)
    for node, x in scaled.items():  # nothing clipped, each client's rounding error < scale
        assert np.abs(q[node]).max() <= 126
        assert np.abs(q[node] * np.float64(scale) - x).max() < scale
    return q, clip


def _q_sum(q: dict[int, np.ndarray], nodes) -> np.ndarray:
    return sum(q[node].astype(np.int64) for node in nodes)


@pytest.mark.parametrize("num_clients", [5, 6, 7, 8])
def test_int8_weighted_mean_is_the_example_weighted_mean_within_the_quantization_bound(
        num_clients):
    counts, deltas = _cohort(num_clients, seed=num_clients)
    omega = update_weights(counts)
    q, clip = _quantize(deltas, omega, seed=num_clients)
    scale = int8_scale(clip)
    omega_total = sum(omega.values())
    assert omega_total == pytest.approx(num_clients)
    mean = int8_weighted_mean(_q_sum(q, counts), omega_total, clip)
    assert mean.dtype == np.float64 and mean.shape == (COORDS,)
    err = mean - _reference(counts, deltas)
    # Each client's rounding error is < scale: the mean's is < K scale / Σ ω = scale.
    assert np.abs(err).max() < num_clients * scale / omega_total
    # Stochastic rounding is unbiased: over many coordinates the errors average out.
    assert abs(err.mean()) < 0.05 * scale


@pytest.mark.parametrize("num_clients", [5, 8])
def test_int8_weighted_mean_of_survivors_is_their_example_weighted_mean(num_clients):
    """Dropouts: Σ_S q / Σ_S ω is the survivors' n-weighted mean (|C| / Σ_C n cancels)."""
    counts, deltas = _cohort(num_clients, seed=10 + num_clients)
    omega = update_weights(counts)
    q, clip = _quantize(deltas, omega, seed=10 + num_clients)
    scale = int8_scale(clip)
    survivors = sorted(counts, key=counts.get)[:-1]  # the largest client vanished
    omega_total = sum(omega[n] for n in survivors)
    bound = len(survivors) * scale / omega_total
    reference = _reference({n: counts[n] for n in survivors}, deltas)
    mean = int8_weighted_mean(_q_sum(q, survivors), omega_total, clip)
    assert np.abs(mean - reference).max() < bound
    # Normalizing as if the survivors' weights still averaged 1 (÷ |S|) exceeds the bound.
    wrong = int8_weighted_mean(_q_sum(q, survivors), float(len(survivors)), clip)
    assert np.abs(wrong - reference).max() > 2 * bound


@pytest.mark.parametrize("num_clients", [5, 8])
def test_an_unweighted_int8_mean_exceeds_the_bound(num_clients):
    """The bound discriminates: with these unequal counts, the plain mean (ω_k = 1) is far
    outside it, and so is the int8 sum of n_k Δ_k normalized by |C| (ω_k = n_k)."""
    counts, deltas = _cohort(num_clients, seed=num_clients)
    reference = _reference(counts, deltas)
    for weights in ({node: 1.0 for node in counts}, {n: float(c) for n, c in counts.items()}):
        q, clip = _quantize(deltas, weights, seed=num_clients)
        mean = int8_weighted_mean(_q_sum(q, counts), float(num_clients), clip)
        assert np.abs(mean - reference).max() > 10 * int8_scale(clip)


def test_stochastic_rounding_leaves_no_bias_where_rounding_to_nearest_would():
    """Every coordinate of client k holds one value with ω_k Δ_k = (m_k + 0.3) scale: nearest
    rounding is off by -0.3 scale everywhere, stochastic rounding only by noise."""
    counts, _ = _cohort(6, seed=3)
    omega = update_weights(counts)
    clip = 1.0
    scale = int8_scale(clip)
    levels = np.random.default_rng(3).integers(-100, 100, len(counts))
    deltas = {node: np.full(COORDS, (m + 0.3) * scale / omega[node], np.float32)
              for node, m in zip(counts, levels, strict=True)}
    scaled = {node: d * np.float32(omega[node]) for node, d in deltas.items()}
    reference = _reference(counts, deltas)
    for rounding, bias in (("stochastic", 0.0), ("nearest", -0.3)):
        q = {node: quantize_int8(x, clip, np.random.default_rng([3, node])
                                 if rounding == "stochastic" else None)
             for node, x in scaled.items()}
        err = int8_weighted_mean(_q_sum(q, counts), sum(omega.values()), clip) - reference
        assert abs(err.mean() - bias * scale) < 0.05 * scale, rounding


def test_update_weights_average_one_and_keep_the_cohort_order():
    counts = {7: 10, 3: 40, 12: 160_000, 5: 1}
    omega = update_weights(counts)
    assert list(omega) == [7, 3, 12, 5]
    assert sum(omega.values()) == pytest.approx(len(counts), rel=1e-12)
    total = sum(counts.values())
    for node, n in counts.items():
        assert omega[node] == n * len(counts) / total  # the same float expression, exactly
        assert omega[node] / omega[5] == pytest.approx(n, rel=1e-12)
    assert update_weights({1: 3}) == {1: 1.0}
    assert update_weights({1: 0, 2: 4}) == {1: 0.0, 2: 2.0}


def test_update_weights_and_int8_weighted_mean_reject_bad_input():
    with pytest.raises(ValueError, match="empty"):
        update_weights({})
    with pytest.raises(ValueError, match="positive sum"):
        update_weights({1: 0, 2: 0})
    with pytest.raises(ValueError, match="non-negative"):
        update_weights({1: -1, 2: 5})
    q = np.array([3, -2], np.int64)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="total update weight"):
            int8_weighted_mean(q, bad, 1.0)
    with pytest.raises(ValueError, match="integers"):
        int8_weighted_mean(q.astype(np.float64), 2.0, 1.0)
    np.testing.assert_array_equal(int8_weighted_mean(q, 2.0, 1.0),
                                  q * np.float64(int8_scale(1.0)) / 2.0)


# ------------------------------------------------------------------ the add/result interface
def test_aggregators_add_then_result_match_the_formulas():
    from fleetfl.aggregation.aggregator import FloatMean, Int8Sum
    from fleetfl.aggregation.combine import RobustRule

    rule = RobustRule()  # no bounds: the plain means
    floats = FloatMean(rule)
    assert floats.result() is None  # nothing added: no model update
    floats.add(1, [np.array([1.0, 2.0], np.float32)], 1)
    floats.add(2, [np.array([3.0, 6.0], np.float32)], 3)
    np.testing.assert_allclose(floats.result().delta[0], [2.5, 5.0])
    ints = Int8Sum(rule, clip=1.27)  # s = 0.01
    ints.add(1, [np.array([100, -20], np.int8)], 0.5)
    ints.add(2, [np.array([-100, 127], np.int8)], 1.5)
    # s Σ q_k / Σ ω_k, from the integer sum
    np.testing.assert_allclose(ints.result().delta[0], [0.0, 1.07 / 2.0])


def test_a_server_step_never_revives_a_pruned_weight():
    from fleetfl.aggregation.server_opt import apply_step

    base = {"w": np.array([0.0, 1.0], np.float32), "b": np.array([0.5], np.float32)}
    step = {"w": np.array([0.3, 0.3]), "b": np.array([-0.5])}
    new = apply_step(base, step, {"w": np.array([False, True])})
    np.testing.assert_allclose(new["w"], [0.0, 1.3])
    np.testing.assert_allclose(new["b"], [0.0])
    assert new["w"].dtype == np.float32
