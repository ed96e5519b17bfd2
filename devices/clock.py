"""The virtual clock: how long simulated devices take, in seconds, without waiting for them.

A client's round time is its download, its local compute and its upload, one after another
(a client cannot train before it has the model, nor upload before it has trained). A round
lasts until the slowest reporting client finishes, or until the deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetfl.devices._checks import check_real
from fleetfl.devices.profiles import DeviceProfile


def compute_time_s(profile: DeviceProfile, flops: float) -> float:
    """Seconds for ``profile`` to execute ``flops`` FLOP at its effective training rate."""
    check_real("flops", flops, minimum=0.0)
    return flops / profile.train_flops_per_s


def transfer_time_s(profile: DeviceProfile, *, uplink_bytes: int, downlink_bytes: int) -> float:
    """Seconds to download ``downlink_bytes`` and upload ``uplink_bytes`` (bytes, bytes/s)."""
    check_real("uplink_bytes", uplink_bytes, minimum=0.0)
    check_real("downlink_bytes", downlink_bytes, minimum=0.0)
    return uplink_bytes / profile.uplink_bytes_per_s + downlink_bytes / profile.downlink_bytes_per_s


def client_round_time_s(
    profile: DeviceProfile, *, flops: float, uplink_bytes: int, downlink_bytes: int
) -> float:
    """Seconds for one client's round: compute plus transfer, sequential."""
    return compute_time_s(profile, flops) + transfer_time_s(
        profile, uplink_bytes=uplink_bytes, downlink_bytes=downlink_bytes
    )


def round_time_s(client_times: Sequence[float], deadline_s: float | None) -> float:
    """Seconds the round lasts: the slowest client's time, capped at ``deadline_s`` if given.

    An empty cohort takes 0.0 s: nothing was waited for.
    """
    for t in client_times:
        check_real("client time", t, minimum=0.0)
    if deadline_s is not None:
        check_real("deadline_s", deadline_s, minimum=0.0)
    if not client_times:
        return 0.0
    slowest = float(max(client_times))
    return slowest if deadline_s is None else min(slowest, float(deadline_s))


class VirtualClock:
    """Simulated wall-clock time, in seconds since the start of the experiment."""

    def __init__(self, start_s: float = 0.0) -> None:
        check_real("start_s", start_s, minimum=0.0)
        self._now_s = float(start_s)
        self._steps_s: list[float] = []

    @property
    def now_s(self) -> float:
        """Current simulated time, seconds."""
        return self._now_s

    @property
    def steps_s(self) -> tuple[float, ...]:
        """Every ``advance`` so far (typically one per round), seconds."""
        return tuple(self._steps_s)

    def advance(self, dt: float) -> float:
        """Move time forward by ``dt`` seconds (>= 0) and return the new ``now_s``."""
        check_real("dt", dt, minimum=0.0)
        self._steps_s.append(float(dt))
        self._now_s += float(dt)
        return self._now_s

    def __repr__(self) -> str:
        return f"VirtualClock(now_s={self._now_s!r}, steps={len(self._steps_s)})"
