"""Synthetic device traces in FedScale's format, for fleets whose own traces are not at hand.

FedScale's traces (``client_device_capacity``, 500,000 entries; ``client_behave_trace``,
107,749 entries) cannot be downloaded here, and FedScale's README and paper publish no
distribution of their values: only where they come from (AI Benchmark for compute, MobiPerf on
Wi-Fi for bandwidth, FLASH's 136k-user week of charging events for availability). So:

**Capacity** is drawn from the quantiles of FedScale's own values. ``COMPUTE_MS_QUANTILES`` and
``BANDWIDTH_KBPS_QUANTILES`` are the 0th, 5th, ..., 100th percentiles of ``computation`` (ms
per sample) and ``communication`` (kbit/s) over the 9,242 entries of FedScale's
``client_device_capacity`` that DistributedML/FedFetch redistributes (commit c32c165,
``benchmark/dataset/data/device_info/client_device_capacity_ul_dl``; its extra Ookla columns
are not used), computed once with a data-only unpickler. Two third-party scripts that read the
full 500k file report a median bandwidth of 6.1 Mbit/s with 26 % under 3 Mbit/s, and compute
values spanning about 15-199 ms; this subset gives 6.2 Mbit/s, 26.6 % and 15-199 ms. A value is
drawn by inverse-CDF: a uniform quantile, interpolated between the table's points in log space.
The two are drawn independently (their rank correlation in that data is 0.02). One artefact:
FedScale's compute values are bimodal, with no entry between 98 and 116 ms; the interpolation
puts 3 % of devices there.

**Availability is an assumption, not a calibration.** No published figure gives the fraction
of devices online over time or their session lengths. The model: each device alternates online
windows and offline gaps, both exponential, with mean window ``mean_window_s`` and a long-run
online fraction ``online_fraction``, starting in a random state; the trace repeats every
``period_s``. The defaults (6 days, 40 %, 7 h windows) are those of the one FedScale entry that
is quoted in public (REFL's ``core/helper/client.py``: 8 windows over ``finish_time`` =
518,400 s, 211,625 s online): one device, not a statistic. FedScale counts a charging device
as available, so real windows cluster at night; this model has no time of day.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Percentiles 0, 5, ..., 100 of FedScale's capacity values (see the module docstring).
COMPUTE_MS_QUANTILES = (15, 19, 21, 23, 23, 24, 25, 27, 28, 31, 41, 50, 72, 118, 140, 148, 154,
                        159, 175, 190, 199)
BANDWIDTH_KBPS_QUANTILES = (1017, 1444, 1841, 2036, 2325, 2903, 3644, 4446, 4837, 5257, 6207,
                            7367, 8648, 9953, 12079, 14457, 19872, 27686, 32546, 54111, 204057)
PERIOD_S = 518_400  # 6 days: the quoted FedScale entry's finish_time
ONLINE_FRACTION = 0.4  # that entry: 211,625 s online of 518,400
MEAN_WINDOW_S = 7 * 3600  # that entry: 8 windows, 7.3 h on average
MODEL = "synthetic"  # the "model" key FedScale's entries carry (a phone model there)


def draw_quantiles(table: tuple[int, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` values whose distribution has ``table`` as its 0, 5, ..., 100th percentiles
    (inverse CDF, linear in log value between the points)."""
    probs = np.linspace(0.0, 1.0, len(table))
    return np.exp(np.interp(rng.random(size), probs, np.log(np.asarray(table, dtype=float))))


def capacity(num_clients: int, seed: int = 0) -> dict[int, dict[str, float]]:
    """``{client: {"computation": ms per sample, "communication": kbit/s}}`` as FedScale's."""
    rng = np.random.default_rng([seed, 0])
    compute = draw_quantiles(COMPUTE_MS_QUANTILES, num_clients, rng)
    bandwidth = draw_quantiles(BANDWIDTH_KBPS_QUANTILES, num_clients, rng)
    return {i: {"computation": round(float(c), 3), "communication": round(float(b), 3)}
            for i, (c, b) in enumerate(zip(compute, bandwidth, strict=True))}


def availability(num_clients: int, seed: int = 0, *, period_s: int = PERIOD_S,
                 online_fraction: float = ONLINE_FRACTION,
                 mean_window_s: float = MEAN_WINDOW_S) -> dict[int, dict[str, Any]]:
    """``{client: {"duration", "active", "inactive", "finish_time", "model"}}`` as FedScale's
    behaviour trace: online during each ``[active[j], inactive[j]]`` (seconds), repeating every
    ``finish_time``; ``duration`` is the seconds online per period. An assumed model (module
    docstring); a device that would have no window at all gets one of ``mean_window_s``."""
    if not 0.0 < online_fraction < 1.0:
        raise ValueError(f"online_fraction must be in (0, 1), got {online_fraction}")
    if not 0 < mean_window_s < period_s:
        raise ValueError(f"mean_window_s must be in (0, period_s = {period_s}), got "
                         f"{mean_window_s}")
    rng = np.random.default_rng([seed, 1])
    mean_gap = mean_window_s * (1.0 - online_fraction) / online_fraction
    return {i: _device_windows(rng, period_s, online_fraction, mean_window_s, mean_gap)
            for i in range(num_clients)}


def _device_windows(rng: np.random.Generator, period_s: int, online_fraction: float,
                    mean_window_s: float, mean_gap_s: float) -> dict[str, Any]:
    """One device's alternating exponential windows and gaps over one period."""
    active: list[int] = []
    inactive: list[int] = []
    online = rng.random() < online_fraction
    # The first state is already under way: its remaining length is exponential too.
    t = 0.0
    while t < period_s:
        length = rng.exponential(mean_window_s if online else mean_gap_s)
        if online:
            start, end = int(t), int(min(t + length, period_s))
            if end > start:
                active.append(start)
                inactive.append(end)
        t += length
        online = not online
    if not active:
        start = int(rng.integers(0, period_s - int(mean_window_s)))
        active, inactive = [start], [start + int(mean_window_s)]
    return {"duration": int(sum(b - a for a, b in zip(active, inactive, strict=True))),
            "active": active, "inactive": inactive, "finish_time": int(period_s),
            "model": MODEL}
