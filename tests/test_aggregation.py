"""Weighted averaging."""

import numpy as np
import pytest

from fleetfl.aggregation.average import weighted_average


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
