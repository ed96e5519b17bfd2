"""Fleets: which catalog device each simulated client is, and who is online in a round.

Everything is deterministic given the seed: the fleet from ``seed`` alone, a round's
availability from ``(seed, server_round)``, so re-running an experiment reproduces both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType

import numpy as np

from fleetfl.devices._checks import check_int, check_real
from fleetfl.devices.profiles import CATALOG, DeviceProfile

# Distinct stream tags keep the fleet shuffle and the availability draws independent even when
# both are seeded with the same experiment seed.
_FLEET_STREAM = 0
_AVAILABILITY_STREAM = 1

DEFAULT_MIX: Mapping[str, float] = MappingProxyType(
    {
        # Phones are half the fleet, mostly low/mid tier as in the wild; the rest is hobbyist
        # and lab hardware, weighted towards the common Pi 4.
        "phone-low": 0.20,
        "phone-mid": 0.20,
        "phone-high": 0.10,
        "rpi-zero-2w": 0.10,
        "rpi3": 0.10,
        "rpi4": 0.15,
        "rpi5": 0.10,
        "jetson-nano": 0.05,
    }
)


def _valid_weights(mix: Mapping[str, float]) -> dict[str, float]:
    """The mix's raw weights after validation, in sorted-name order."""
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"device mix must be a non-empty mapping of profile name to weight: {mix}")
    valid = ", ".join(sorted(CATALOG))
    weights: dict[str, float] = {}
    for name in sorted(mix):
        if name not in CATALOG:
            raise ValueError(f"device mix: unknown profile {name!r}; valid profiles: {valid}")
        weights[name] = check_real(f"device mix weight of {name!r}", mix[name], minimum=0.0)
    if sum(weights.values()) <= 0:
        raise ValueError("device mix: weights must have a positive sum")
    return weights


def parse_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """Validate a ``{profile name: weight}`` mix and return it normalised to sum to 1."""
    weights = _valid_weights(mix)
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def mix_counts(num_clients: int, mix: Mapping[str, float]) -> dict[str, int]:
    """How many clients of each profile ``build_fleet`` makes: largest-remainder rounding.

    Each profile first gets ``floor(share * num_clients)``; the clients left over go one each to
    the largest remainders (ties: larger weight, then name). Exact rational arithmetic, so a
    share like 0.3 of 10 is exactly 3 and not 2 plus a remainder.
    """
    num_clients = check_int("num_clients", num_clients, minimum=1)
    weights = {name: Fraction(w) for name, w in _valid_weights(mix).items()}
    total = sum(weights.values())
    quotas = {name: w * num_clients / total for name, w in weights.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    left = num_clients - sum(counts.values())
    by_remainder = sorted(quotas, key=lambda n: (-(quotas[n] - counts[n]), -weights[n], n))
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def build_fleet(num_clients: int, mix: Mapping[str, float], seed: int) -> list[DeviceProfile]:
    """The device of each client: ``fleet[i]`` is client ``i``'s profile.

    Counts follow ``mix_counts``; the assignment is then shuffled with a generator seeded by
    ``seed``, so the same arguments always give the same fleet, whatever the mix's key order.
    """
    profiles, kind = fleet_kinds(num_clients, mix, seed)
    return [profiles[k] for k in kind]


def fleet_kinds(num_clients: int, mix: Mapping[str, float],
                seed: int) -> tuple[tuple[DeviceProfile, ...], np.ndarray]:
    """:func:`build_fleet` as arrays: the mix's profiles, and for each client the position of
    its profile among them (``uint16``: two bytes a client, for populations of 100,000s)."""
    seed = check_int("seed", seed, minimum=0)  # SeedSequence needs non-negative integers
    counts = mix_counts(num_clients, mix)
    profiles = tuple(CATALOG[name] for name in counts)
    assignment = np.repeat(np.arange(len(profiles), dtype=np.uint16), list(counts.values()))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _FLEET_STREAM]))
    order = rng.permutation(num_clients)
    return profiles, assignment[order]


def available_clients(fleet: Sequence[DeviceProfile], server_round: int, seed: int) -> list[int]:
    """Sorted indices of the clients online in ``server_round``.

    Each client is online independently with probability ``profile.availability``. The draws
    are seeded by ``(seed, server_round)`` and client ``i`` always uses the ``i``-th draw, so a
    re-run gives the same clients and growing the fleet does not change existing clients' luck.
    """
    probs = np.array([p.availability for p in fleet], dtype=float)
    return [int(i) for i in np.flatnonzero(online_mask(probs, server_round, seed))]


def online_mask(availability: np.ndarray, server_round: int, seed: int) -> np.ndarray:
    """:func:`available_clients` as a boolean mask: client ``i`` is online with probability
    ``availability[i]``, from the ``i``-th draw of the round's generator."""
    seed = check_int("seed", seed, minimum=0)
    server_round = check_int("server_round", server_round, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _AVAILABILITY_STREAM, server_round]))
    return rng.random(len(availability)) < availability
