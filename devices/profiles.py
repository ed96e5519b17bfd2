"""Device profiles: what one kind of edge device can give a background FL client.

Units: bytes, bytes/s, FLOP/s; ``availability`` is a probability per round. Every figure in
``CATALOG`` has a ``sources`` entry: where it comes from or, for an estimate, how it was
derived. Rules: compute is the *effective* FP32 rate of small-model PyTorch CPU training, not
peak (``_RATE_RULE``); the memory budget is 50 % of RAM on headless boards and 25 % on phones;
boards sit behind home broadband; phones are online a minority of rounds. A vendor's "GB" of
RAM is read as GiB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from fleetfl.devices._checks import is_int, is_real

MIB = 2**20
GIB = 2**30
MBIT_PER_S = 125_000.0  # bytes/s in one Mbit/s

# Effective training rate per core per GHz, in GFLOP/s/GHz; derivation in _RATE_RULE.
A53 = 0.4  # in-order Cortex-A53/A55
A72 = 0.8  # Cortex-A57/A72
A76 = 1.25  # Cortex-A76-class

_INT_FIELDS = ("ram_bytes", "memory_budget_bytes")
_FLOAT_FIELDS = ("train_flops_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s", "availability")
NUMERIC_FIELDS: tuple[str, ...] = _INT_FIELDS + _FLOAT_FIELDS
# What a device can physically have, far above any phone or board (a profile arrives from the
# device itself and may lie): 1 TiB of RAM, 1 PFLOP/s of training, 100 GB/s of link. A value
# above is refused, so plans built from profiles stay well inside int64 and float64.
PHYSICAL_LIMITS: dict[str, float] = {
    "ram_bytes": 2.0**40, "memory_budget_bytes": 2.0**40, "train_flops_per_s": 1e15,
    "uplink_bytes_per_s": 1e11, "downlink_bytes_per_s": 1e11, "availability": 1.0,
}


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device. Sizes in bytes, rates in bytes/s and FLOP/s."""

    name: str
    ram_bytes: int
    memory_budget_bytes: int
    train_flops_per_s: float
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    availability: float
    # Excluded from the hash: a mapping is unhashable, and the numbers identify the profile.
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _validate(self)
        # Plain Python numbers (not NumPy scalars), so to_dict() is JSON-serialisable.
        for name in _INT_FIELDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        # A read-only copy, so a frozen profile cannot be changed through its sources.
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of every field."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sources"] = dict(self.sources)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceProfile:
        """Build a profile from ``to_dict`` output; ValueError names any bad or missing field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DeviceProfile field(s): {', '.join(unknown)}")
        missing = [name for name in known - {"sources"} if name not in d]
        if missing:
            raise ValueError(f"missing DeviceProfile field(s): {', '.join(sorted(missing))}")
        return cls(**{**d, "sources": d.get("sources", {})})


def _validate(p: DeviceProfile) -> None:
    if not isinstance(p.name, str) or not p.name:
        raise ValueError(f"name: must be a non-empty string, got {p.name!r}")
    for name in _INT_FIELDS:
        value = getattr(p, name)
        if not is_int(value) or value <= 0:
            raise ValueError(f"{name}: must be a positive integer (bytes), got {value!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(p, name)
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    for name, limit in PHYSICAL_LIMITS.items():
        if getattr(p, name) > limit:
            raise ValueError(f"{name}: {getattr(p, name)!r} is more than a device can have "
                             f"(at most {limit:g})")
    if p.memory_budget_bytes > p.ram_bytes:
        raise ValueError(
            f"memory_budget_bytes: {p.memory_budget_bytes} exceeds ram_bytes {p.ram_bytes}"
        )
    if not isinstance(p.sources, Mapping):
        raise ValueError(f"sources: must be a mapping of field name to text, got {p.sources!r}")
    allowed = {f.name for f in fields(DeviceProfile)} - {"sources"}
    for key, text in p.sources.items():
        if key not in allowed:
            raise ValueError(f"sources: key {key!r} is not a DeviceProfile field")
        if not isinstance(text, str) or not text:
            raise ValueError(f"sources: entry for {key!r} must be a non-empty string")


# --- shared derivations, quoted in the per-profile sources -------------------------------------

_RATE_RULE = (
    "Estimate. Effective training rate = cores x GHz x per-core rate: 0.4 GFLOP/s per GHz for "
    "in-order Cortex-A53/A55, 0.8 for Cortex-A57/A72, 1.25 for Cortex-A76-class. A72: 10 % of "
    "an assumed peak of 8 FP32 FLOP/cycle (one 128-bit NEON FMA per cycle); the 10 % is an "
    "assumed, not measured, efficiency of small-batch PyTorch CPU training (framework "
    "overhead, memory-bound and non-GEMM ops). A53 at half the A72 rate per clock: 4-thread "
    "sysbench measured 5901 events/s on a Pi 4 vs 2459 on a Pi 3B+ (A53, 1.4 GHz), ~2.2x per "
    "clock if the Pi 4 ran at 1.5 GHz, ~1.9x at 1.8 GHz (leoncode.co.uk, 'Raspberry Pi CPU "
    "Benchmarks'; an integer workload, so only indicative for FP). A76: Pi 5 = 2.5x Pi 4, the "
    "midpoint of Raspberry Pi's launch claim of 2-3x Pi 4 CPU performance. Sanity check: HPL "
    "on a Pi 4 measured ~8 GFLOP/s FP64 (Feiereisen 2022, feiereisen.net), so 4.8 GFLOP/s of "
    "FP32 training is a modest fraction of tuned dense BLAS."
)
_BUDGET_SBC = "Rule: 50 % of RAM for a headless board dedicated to the fleet (OS needs the rest)."
_BUDGET_PHONE = "Rule: 25 % of RAM for a background client; the OS and foreground apps come first."
_HOME_NET = (
    "Estimate: typical home broadband, {up} Mbit/s up / {down} Mbit/s down; the broadband "
    "uplink, not the board's {link}, is the bottleneck. bytes/s = Mbit/s x 125000."
)
_PHONE_NET = (
    "Estimate, {up} Mbit/s up / {down} Mbit/s down for the {tier} tier. FedScale (Lai et al., "
    "ICML 2022) derives client bandwidth from MobiPerf measurements (its README says Wi-Fi "
    "bandwidth); its trace values were not inspected here, so the tiers span a plausible "
    "cellular/Wi-Fi range, with the low tier at the ~1-2 Mbit/s uplink of poor cellular links."
)
_SBC_AVAIL = (
    "Assumed: an always-on, mains-powered board is online except for reboots, updates and "
    "network drops; 0.95, or 0.9 where noted."
)
_PHONE_AVAIL = (
    "Assumed: FedScale's availability trace (from FLASH, 136k users) counts a phone available "
    "only while charging, as deployed FL requires idle, charging and unmetered (Bonawitz et "
    "al., 'Towards Federated Learning at Scale', 2019); that is a "
    "minority of the day. Tiers low/mid/high = 0.3/0.4/0.5 are an assumed ordering, not a "
    "measurement; the trace itself was not inspected."
)


def _profile(
    name: str,
    *,
    ram: int,
    budget_fraction: float,
    gflops: float,
    up_mbit: float,
    down_mbit: float,
    availability: float,
    sources: Mapping[str, str],
) -> DeviceProfile:
    """Apply the module's rules; sources must explain every figure for this device."""
    return DeviceProfile(
        name=name,
        ram_bytes=ram,
        memory_budget_bytes=int(ram * budget_fraction),
        train_flops_per_s=float(round(gflops * 1e9)),
        uplink_bytes_per_s=up_mbit * MBIT_PER_S,
        downlink_bytes_per_s=down_mbit * MBIT_PER_S,
        availability=availability,
        sources=sources,
    )


def _sbc_sources(ram: str, cpu: str, link: str, up: int, down: int, avail: str) -> dict[str, str]:
    return {
        "ram_bytes": ram,
        "memory_budget_bytes": _BUDGET_SBC,
        "train_flops_per_s": f"{cpu} {_RATE_RULE}",
        "uplink_bytes_per_s": _HOME_NET.format(up=up, down=down, link=link),
        "downlink_bytes_per_s": _HOME_NET.format(up=up, down=down, link=link),
        "availability": f"{_SBC_AVAIL} {avail}",
    }


def _phone_sources(
    tier: str, ram: str, cpu: str, up: float, down: float, avail: float
) -> dict[str, str]:
    net = _PHONE_NET.format(up=up, down=down, tier=tier)
    cpu_note = (
        "FedScale's compute trace comes from AI Benchmark per-device latencies; its values "
        "were not inspected, so this tier is an estimate from a representative SoC."
    )
    return {
        "ram_bytes": ram,
        "memory_budget_bytes": _BUDGET_PHONE,
        "train_flops_per_s": f"{cpu} {cpu_note} {_RATE_RULE}",
        "uplink_bytes_per_s": net,
        "downlink_bytes_per_s": net,
        "availability": f"{_PHONE_AVAIL} This tier: {avail}.",
    }


def _build_catalog() -> dict[str, DeviceProfile]:
    # Tabular data: one profile's figures read better together than one per line.
    # fmt: off
    brief = "Raspberry Pi product brief"
    profiles = [
        _profile(
            "rpi-zero-2w", ram=512 * MIB, budget_fraction=0.5, gflops=4 * 1.0 * A53,
            up_mbit=10, down_mbit=50, availability=0.9,
            sources=_sbc_sources(
                f"{brief} (Zero 2 W): 512 MB SDRAM.",
                f"{brief} (Zero 2 W): 4x Cortex-A53 at 1 GHz -> 4 x 1.0 x 0.4.",
                "2.4 GHz 802.11n Wi-Fi", 10, 50,
                "0.9: Wi-Fi only, and 512 MB makes out-of-memory restarts likelier.",
            ),
        ),
        _profile(
            "rpi3", ram=GIB, budget_fraction=0.5, gflops=4 * 1.2 * A53,
            up_mbit=10, down_mbit=50, availability=0.95,
            sources=_sbc_sources(
                f"{brief} (3 Model B): 1 GB LPDDR2.",
                f"{brief} (3 Model B): 4x Cortex-A53 at 1.2 GHz -> 4 x 1.2 x 0.4.",
                "2.4 GHz 802.11n Wi-Fi / 100 Mbit Ethernet", 10, 50, "0.95.",
            ),
        ),
        _profile(
            "rpi4", ram=4 * GIB, budget_fraction=0.5, gflops=4 * 1.5 * A72,
            up_mbit=20, down_mbit=100, availability=0.95,
            sources=_sbc_sources(
                f"{brief} (4 Model B): 1/2/4/8 GB LPDDR4; the 4 GB variant is used.",
                f"{brief} (4 Model B): 4x Cortex-A72 at 1.5 GHz -> 4 x 1.5 x 0.8.",
                "802.11ac Wi-Fi / Gigabit Ethernet", 20, 100, "0.95.",
            ),
        ),
        _profile(
            "rpi5", ram=4 * GIB, budget_fraction=0.5, gflops=4 * 2.4 * A76,
            up_mbit=20, down_mbit=100, availability=0.95,
            sources=_sbc_sources(
                f"{brief} (Pi 5): 4 or 8 GB LPDDR4X at launch; 4 GB is used.",
                f"{brief} (Pi 5): 4x Cortex-A76 at 2.4 GHz -> 4 x 2.4 x 1.25 "
                "(= 2.5x the Pi 4 figure).",
                "802.11ac Wi-Fi / Gigabit Ethernet", 20, 100, "0.95.",
            ),
        ),
        _profile(
            "jetson-nano", ram=4 * GIB, budget_fraction=0.5, gflops=4 * 1.43 * A72,
            up_mbit=20, down_mbit=100, availability=0.9,
            sources=_sbc_sources(
                "NVIDIA Jetson Nano specifications: 4 GB LPDDR4, shared by CPU and GPU.",
                "NVIDIA Jetson Nano specifications: 4x Cortex-A57 at 1.43 GHz -> "
                "4 x 1.43 x 0.8. CPU only, as the field defines; the 128-core Maxwell GPU "
                "(NVIDIA quotes 472 GFLOPS FP16) would be far faster with CUDA training.",
                "Gigabit Ethernet", 20, 100,
                "0.9: such boards are often shared with other GPU workloads.",
            ),
        ),
        _profile(
            "phone-low", ram=3 * GIB, budget_fraction=0.25, gflops=4 * 1.8 * A53,
            up_mbit=1.5, down_mbit=5, availability=0.3,
            sources=_phone_sources(
                "low",
                "Estimate: entry-level Android with 3 GB (FedScale keeps devices with more "
                "than 2 GB RAM).",
                "Representative entry-level SoC: Cortex-A53 cores at ~1.8 GHz; a background "
                "job is assumed to get 4 of them -> 4 x 1.8 x 0.4.",
                1.5, 5, 0.3,
            ),
        ),
        _profile(
            "phone-mid", ram=6 * GIB, budget_fraction=0.25, gflops=2 * 2.2 * A76 + 2 * 1.8 * A53,
            up_mbit=5, down_mbit=20, availability=0.4,
            sources=_phone_sources(
                "mid",
                "Estimate: a typical mid-range phone with 6 GB.",
                "Representative mid-range 2+6 SoC: 2x Cortex-A76-class at ~2.2 GHz plus "
                "Cortex-A55 at ~1.8 GHz; a 4-thread job gets both big cores and 2 little ones "
                "-> 2 x 2.2 x 1.25 + 2 x 1.8 x 0.4.",
                5, 20, 0.4,
            ),
        ),
        _profile(
            "phone-high", ram=8 * GIB, budget_fraction=0.25, gflops=4 * 2.6 * A76,
            up_mbit=10, down_mbit=50, availability=0.5,
            sources=_phone_sources(
                "high",
                "Estimate: a typical flagship with 8 GB.",
                "Representative flagship 1+3+4 SoC: a 4-thread job gets the 4 big cores, "
                "taken as A76-class at ~2.6 GHz average -> 4 x 2.6 x 1.25; newer big cores are "
                "faster per clock, sustained thermal throttling is slower.",
                10, 50, 0.5,
            ),
        ),
    ]
    # fmt: on
    return {p.name: p for p in profiles}


CATALOG: Mapping[str, DeviceProfile] = MappingProxyType(_build_catalog())


def get_profile(name: str) -> DeviceProfile:
    """The catalog profile called ``name``; ValueError listing the valid names otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        valid = ", ".join(sorted(CATALOG))
        raise ValueError(f"unknown device profile {name!r}; valid profiles: {valid}") from None
