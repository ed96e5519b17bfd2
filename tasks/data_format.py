"""A real device's local training data: one ``.npz`` file of examples ``x`` and labels ``y``.

Format (``numpy.savez``/``savez_compressed``; documented in docs/deploy.md):

* ``x``: the examples, shape ``(n, *input_shape)``: real numbers (read as float32, finite), or
  integer ids (read as int64; e.g. a text task's token ids). A task casts them to its
  ``input_dtype`` (:func:`as_input`): integers become floats for a float task, and an
  integer task refuses floats and ids its dtype cannot hold.
  For the built-in tasks ``input_shape`` is ``(1, 8, 8)`` (digits, pixel values in [0, 1]) or
  ``(60,)`` (synthetic).
* ``y``: integer class labels, shape ``(n,)``, values in ``[0, num_classes)``.
* optional ``x_test``/``y_test``: a held-out local test split, same rules.

Only numpy is imported here: the ClientApp reads the file in a fresh process for every message,
so this path must stay cheap. Every problem raises :class:`DataFormatError` naming the file and
the array.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED = ("x", "y")
OPTIONAL = ("x_test", "y_test")


class DataFormatError(ValueError):
    """Local data that cannot be used; the message names the file and the array."""


@dataclass(frozen=True)
class LocalData:
    """Validated local data: ``x`` float32 or int64 ``(n, *input_shape)``, ``y`` int64
    ``(n,)``."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        """Number of training examples ``n``."""
        return len(self.y)


def _examples(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise DataFormatError(f"{path}: '{name}' must have shape (n, *input_shape), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataFormatError(f"{path}: '{name}' must hold real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer):
        return np.ascontiguousarray(x, dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataFormatError(f"{path}: '{name}' contains NaN or Inf")
    return x


def as_input(x: np.ndarray, input_dtype: str, path: str | Path, name: str = "x") -> np.ndarray:
    """``x`` cast to a task's ``input_dtype``: any real ``x`` for a float task; for an integer
    task, integers that its dtype holds exactly. Raises :class:`DataFormatError`."""
    want = np.dtype(input_dtype)
    if x.dtype == want:
        return x
    if np.issubdtype(want, np.floating):
        return x.astype(want)
    if not np.issubdtype(x.dtype, np.integer):
        raise DataFormatError(f"{path}: '{name}' holds {x.dtype} values; the task takes "
                              f"integer ids ({want})")
    info = np.iinfo(want)
    if x.size and (int(x.min()) < info.min or int(x.max()) > info.max):
        raise DataFormatError(f"{path}: '{name}' has ids in [{int(x.min())}, {int(x.max())}]; "
                              f"the task's {want} holds [{info.min}, {info.max}]")
    return x.astype(want)


def _labels(path: Path, name: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise DataFormatError(f"{path}: '{name}' must have shape ({n},) to match its examples, "
                              f"got {y.shape}")
    if np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)  # labels saved as floats by some tools; exact integers only
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(f"{path}: '{name}' must hold integer class labels, "
                              f"got dtype {y.dtype}")
    y = np.ascontiguousarray(y, dtype=np.int64)
    if n and y.min() < 0:
        raise DataFormatError(f"{path}: '{name}' has a negative label ({int(y.min())})")
    return y


def load_npz(path: str | Path) -> LocalData:
    """Read and validate the ``.npz`` at ``path`` (raises :class:`DataFormatError`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file (expected an .npz with arrays x and y)")
    try:
        with np.load(path, allow_pickle=False) as npz:  # no pickles: data never runs code
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataFormatError(f"{path}: not a readable .npz file ({err})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataFormatError(f"{path}: missing array(s) {', '.join(missing)}; "
                              f"found {', '.join(sorted(arrays)) or 'none'}")
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataFormatError(f"{path}: unknown array(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(REQUIRED + OPTIONAL)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataFormatError(f"{path}: 'x_test' and 'y_test' must come together")
    x = _examples(path, "x", arrays["x"])
    if len(x) == 0:
        raise DataFormatError(f"{path}: 'x' has no examples")
    y = _labels(path, "y", arrays["y"], len(x))
    if "x_test" not in arrays:
        return LocalData(x, y)
    x_test = _examples(path, "x_test", arrays["x_test"])
    if x_test.shape[1:] != x.shape[1:]:
        raise DataFormatError(f"{path}: 'x_test' examples have shape {x_test.shape[1:]}, "
                              f"'x' examples {x.shape[1:]}")
    return LocalData(x, y, x_test, _labels(path, "y_test", arrays["y_test"], len(x_test)))


def check_task(data: Any, path: str | Path, input_shape: tuple[int, ...] | None,
               num_classes: int | None) -> None:
    """Check ``data`` (``x``, ``y`` and, if it has them, ``y_test``: a :class:`LocalData` or a
    ``Split``) fits a task's ``input_shape`` and ``num_classes``; ``None`` is not checked.
    Raises :class:`DataFormatError`."""
    shape = tuple(data.x.shape[1:])
    if input_shape is not None and shape != tuple(input_shape):
        raise DataFormatError(f"{path}: examples have shape {shape}, the task needs "
                              f"{tuple(input_shape)}")
    if num_classes is None:
        return
    for name, y in (("y", data.y), ("y_test", getattr(data, "y_test", None))):
        if y is not None and len(y) and int(y.max()) >= num_classes:
            raise DataFormatError(f"{path}: '{name}' has label {int(y.max())}, the task has "
                                  f"{num_classes} classes (0..{num_classes - 1})")


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray, x_test: np.ndarray | None = None,
             y_test: np.ndarray | None = None) -> Path:
    """Write a shard in this format (compressed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": _stored(x), "y": np.asarray(y, np.int64)}
    if x_test is not None and y_test is not None:
        arrays.update(x_test=_stored(x_test), y_test=np.asarray(y_test, np.int64))
    np.savez_compressed(path, **arrays)
    return path


def _stored(x: np.ndarray) -> np.ndarray:
    """Integer ids as they are (the smallest dtype compresses best), real values as float32."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
