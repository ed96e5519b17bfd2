"""Device traces in FedScale's format: how fast each simulated device is, and when it is online.

FedScale (Lai et al., ICML 2022; its docs, "Device Trace File Formats") describes a fleet with
two per-client mappings, which it ships as pickles:

* **capacity**, ``{client_id: {"computation": ms, "communication": kbit/s}}``: ``computation``
  is the device's inference latency per sample, in milliseconds, and FedScale charges 3x it per
  training sample (forward and backward, ``ClientMetadata.get_completion_time``);
  ``communication`` is its bandwidth in kbit/s, used both ways;
* **availability** (FedScale's "behaviour" trace), ``{client_id: {"active": [s, ...],
  "inactive": [s, ...], "finish_time": s, ...}}``: the device is online during each
  ``[active[j], inactive[j]]``, and the trace repeats every ``finish_time`` seconds
  (``ClientMetadata.is_active``; other keys are ignored).

Simulated client ``i`` takes entry ``i mod T`` of a trace of ``T`` entries, in client-id order.
A capacity entry replaces the speeds of the client's catalog profile (its memory stays the
profile's); an availability entry replaces its online draw: the client can be sampled in a round
that starts, on the virtual clock, inside one of its active windows.

A file is a pickle or the same mapping as JSON. Pickles are read by an unpickler that refuses
every global, so it builds only dicts, lists, strings and numbers: a trace cannot run code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetfl.devices.profiles import DeviceProfile

TRAIN_FACTOR = 3.0  # FedScale's training cost per sample, in units of its inference latency
MAX_ENTRIES = 10_000_000  # a bound on what a trace file may make this process hold


class TraceError(ValueError):
    """A trace file that cannot be read or holds an invalid entry; the message says where."""


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a trace holds only dicts, lists, strings and numbers, "
                                     f"not {module}.{name}")


def read_mapping(path: str | Path) -> dict[Any, Any]:
    """The ``{client_id: entry}`` mapping of a trace file (pickle or JSON), in client-id order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TraceError(f"{path}: {err.strerror or err}") from None
    try:
        data = (json.loads(raw) if raw.lstrip()[:1] in (b"{", b"[")
                else _DataOnly(io.BytesIO(raw)).load())
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError) as err:
        raise TraceError(f"{path}: not a FedScale trace (pickle or JSON): {err}") from None
    if not isinstance(data, dict) or not data:
        raise TraceError(f"{path}: a trace is a non-empty mapping of client id to entry")
    if len(data) > MAX_ENTRIES:
        raise TraceError(f"{path}: {len(data):,} entries, more than {MAX_ENTRIES:,}")
    return {k: data[k] for k in sorted(data, key=_client_order)}


def _entries(path: Path) -> Iterator[tuple[Any, Mapping[str, Any]]]:
    """``(client_id, entry)`` of a trace file, in client-id order; each entry must be a mapping."""
    for client, entry in read_mapping(path).items():
        if not isinstance(entry, Mapping):
            raise TraceError(f"{path}: client {client}: an entry is a mapping")
        yield client, entry


def _client_order(key: Any) -> tuple[int, Any]:
    # Integer ids in numeric order (FedScale's are ints; JSON makes them strings).
    text = str(key)
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


def _positive(path: Path, client: Any, key: str, value: Any) -> float:
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not np.isfinite(value) or value <= 0):
        raise TraceError(f"{path}: client {client}: {key!r} must be a positive number, "
                         f"got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False)
class CapacityTrace:
    """Per entry: inference ms per sample and bandwidth in kbit/s."""

    ms_per_sample: np.ndarray  # float64
    kbps: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.kbps)

    @classmethod
    def load(cls, path: str | Path) -> CapacityTrace:
        """Read FedScale's ``client_device_capacity`` format (raises :class:`TraceError`)."""
        path = Path(path)
        ms, kbps = [], []
        for client, entry in _entries(path):
            ms.append(_positive(path, client, "computation", entry.get("computation")))
            kbps.append(_positive(path, client, "communication", entry.get("communication")))
        return cls(np.array(ms), np.array(kbps))

    def apply(self, profile: DeviceProfile, index: int,
              flops_per_sample: float) -> DeviceProfile:
        """``profile`` with entry ``index mod T``'s speeds: training at 3x the entry's ms per
        sample (as a FLOP rate for a model of ``flops_per_sample`` training FLOP a sample),
        its bandwidth (kbit/s -> bytes/s) both ways."""
        j = index % len(self)
        seconds_per_sample = TRAIN_FACTOR * float(self.ms_per_sample[j]) / 1000.0
        rate = float(self.kbps[j]) * 1000.0 / 8.0
        return dataclasses.replace(profile, train_flops_per_s=flops_per_sample / seconds_per_sample,
                                   uplink_bytes_per_s=rate, downlink_bytes_per_s=rate)


@dataclass(frozen=True, eq=False)
class AvailabilityTrace:
    """Per entry: sorted active-window starts and ends (s), and the period (s)."""

    starts: tuple[np.ndarray, ...]
    ends: tuple[np.ndarray, ...]
    periods: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.periods)

    @classmethod
    def load(cls, path: str | Path) -> AvailabilityTrace:
        """Read FedScale's ``client_behave_trace`` format (raises :class:`TraceError`)."""
        path = Path(path)
        starts, ends, periods = [], [], []
        for client, entry in _entries(path):
            period = _positive(path, client, "finish_time", entry.get("finish_time"))
            a, b = _windows(path, client, entry.get("active"), entry.get("inactive"))
            starts.append(a)
            ends.append(b)
            periods.append(period)
        return cls(tuple(starts), tuple(ends), np.array(periods))

    def online(self, indices: np.ndarray, now_s: float) -> np.ndarray:
        """Whether each of the clients ``indices`` is online at virtual time ``now_s`` (s)."""
        entries = np.asarray(indices) % len(self)
        used, inverse = np.unique(entries, return_inverse=True)
        status = np.array([self._online_entry(int(j), now_s) for j in used], dtype=bool)
        return status[inverse.ravel()]

    def _online_entry(self, j: int, now_s: float) -> bool:
        t = now_s % float(self.periods[j])
        k = int(np.searchsorted(self.starts[j], t, side="right")) - 1
        return k >= 0 and t <= float(self.ends[j][k])


def _windows(path: Path, client: Any, active: Any, inactive: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(active, list) or not isinstance(inactive, list) or \
            len(active) != len(inactive) or not active:
        raise TraceError(f"{path}: client {client}: 'active' and 'inactive' must be non-empty "
                         f"lists of the same length")
    try:
        a, b = np.array(active, dtype=float), np.array(inactive, dtype=float)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: client {client}: windows must be numbers") from None
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(a >= 0)
            and np.all(a <= b) and np.all(np.diff(a) >= 0)):
        raise TraceError(f"{path}: client {client}: each window must have 0 <= active <= "
                         f"inactive, in increasing order")
    return a, b


@dataclass(frozen=True)
class FleetTraces:
    """The traces a simulation follows (either may be absent) and the model's training FLOP
    per sample (to turn ms per sample into the virtual clock's FLOP rate)."""

    capacity: CapacityTrace | None
    availability: AvailabilityTrace | None
    flops_per_sample: float

    def device(self, profile: DeviceProfile, index: int) -> DeviceProfile:
        """Client ``index``'s device: ``profile`` with its capacity entry's speeds."""
        if self.capacity is None:
            return profile
        return self.capacity.apply(profile, index, self.flops_per_sample)


@functools.lru_cache(maxsize=4)
def load_cached(kind: str, path: str, stamp: tuple[int, int]) -> CapacityTrace | AvailabilityTrace:
    """A trace file read once per (path, size and mtime): the preflight and the run share it."""
    del stamp  # part of the cache key only
    return CapacityTrace.load(path) if kind == "capacity" else AvailabilityTrace.load(path)


def load(kind: str, path: str) -> CapacityTrace | AvailabilityTrace:
    """``kind`` ("capacity" or "availability") trace at ``path``, cached."""
    try:
        st = Path(path).stat()
    except OSError as err:
        raise TraceError(f"{path}: {err.strerror or err}") from None
    return load_cached(kind, path, (st.st_size, st.st_mtime_ns))
