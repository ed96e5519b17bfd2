"""The device data format: valid shards load, every kind of bad file gives a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetfl.tasks.data_format import DataFormatError, check_task, load_npz, save_npz


def _shard(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "shard.npz"
    np.savez(path, **arrays)
    return path


def test_round_trip_keeps_arrays_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((7, 1, 8, 8)), rng.integers(0, 10, 7)
    path = save_npz(tmp_path / "a" / "c.npz", x, y, x[:2], y[:2])
    data = load_npz(path)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    assert data.input_shape == (1, 8, 8) and len(data) == 7
    np.testing.assert_allclose(data.x, x.astype(np.float32))
    assert data.x_test is not None and data.x_test.shape == (2, 1, 8, 8)
    check_task(data, path, (1, 8, 8), 10)


def test_integer_valued_float_labels_are_accepted(tmp_path: Path) -> None:
    data = load_npz(_shard(tmp_path, x=np.zeros((3, 4)), y=np.array([0.0, 1.0, 2.0])))
    assert data.y.tolist() == [0, 1, 2]


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((3, 4))}, "missing array(s) y"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(3, int), "z": np.zeros(1)}, "unknown array(s) z"),
    ({"x": np.zeros(3), "y": np.zeros(3, int)}, "'x' must have shape (n, *input_shape)"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(2, int)}, "'y' must have shape (3,)"),
    ({"x": np.zeros((3, 4)), "y": np.array([0.5, 1, 2])}, "integer class labels"),
    ({"x": np.full((3, 4), np.nan), "y": np.zeros(3, int)}, "NaN or Inf"),
    ({"x": np.zeros((3, 4)), "y": np.array([0, -1, 2])}, "negative label"),
    ({"x": np.array([["a"] * 4] * 3), "y": np.zeros(3, int)}, "must hold real numbers"),
    ({"x": np.zeros((0, 4)), "y": np.zeros(0, int)}, "no examples"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(3, int), "x_test": np.zeros((1, 4))},
     "'x_test' and 'y_test' must come together"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(3, int), "x_test": np.zeros((1, 5)),
      "y_test": np.zeros(1, int)}, "'x_test' examples have shape (5,)"),
])
def test_bad_shards_name_file_and_array(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _shard(tmp_path, **arrays)
    with pytest.raises(DataFormatError) as err:
        load_npz(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_not_a_file_and_not_an_npz(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        load_npz(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="not a readable .npz"):
        load_npz(junk)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    path = _shard(tmp_path, x=np.array([{"a": 1}] * 2, dtype=object), y=np.zeros(2, int))
    with pytest.raises(DataFormatError):
        load_npz(path)


def test_check_task_rejects_wrong_shape_and_labels(tmp_path: Path) -> None:
    data = load_npz(_shard(tmp_path, x=np.zeros((3, 64)), y=np.array([0, 1, 12])))
    with pytest.raises(DataFormatError, match=r"shape \(64,\), the task needs \(1, 8, 8\)"):
        check_task(data, "f.npz", (1, 8, 8), 10)
    with pytest.raises(DataFormatError, match="label 12, the task has 10 classes"):
        check_task(data, "f.npz", (64,), 10)
