"""Tests for fleetfl.devices: profiles, fleets, the virtual clock and work plans."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.devices import (
    CATALOG,
    DEFAULT_MIX,
    DeviceProfile,
    VirtualClock,
    WorkPlan,
    available_clients,
    build_fleet,
    client_round_time_s,
    compute_time_s,
    get_profile,
    mix_counts,
    parse_mix,
    plan_work,
    round_time_s,
    sample_stragglers,
    transfer_time_s,
)
from fleetfl.devices.profiles import NUMERIC_FIELDS

REQUIRED_PROFILES = {
    "rpi-zero-2w",
    "rpi3",
    "rpi4",
    "rpi5",
    "phone-low",
    "phone-mid",
    "phone-high",
    "jetson-nano",
}


def toy_profile(**overrides: object) -> DeviceProfile:
    """Round numbers for hand-computed expectations: 1 GFLOP/s, 1 MB/s up, 4 MB/s down."""
    fields: dict[str, object] = {
        "name": "toy",
        "ram_bytes": 1000,
        "memory_budget_bytes": 500,
        "train_flops_per_s": 1e9,
        "uplink_bytes_per_s": 1e6,
        "downlink_bytes_per_s": 4e6,
        "availability": 0.5,
        "sources": {"ram_bytes": "made up for the test"},
    }
    fields.update(overrides)
    return DeviceProfile(**fields)  # type: ignore[arg-type]


# --- profiles ------------------------------------------------------------------------------


def test_catalog_has_required_profiles_keyed_by_name() -> None:
    assert set(CATALOG) >= REQUIRED_PROFILES
    for name, profile in CATALOG.items():
        assert profile.name == name


@pytest.mark.parametrize("name", sorted(REQUIRED_PROFILES))
def test_every_numeric_field_is_sourced(name: str) -> None:
    profile = CATALOG[name]
    for field_name in NUMERIC_FIELDS:
        assert field_name in profile.sources, f"{name}.{field_name} has no source"
        assert len(profile.sources[field_name]) > 20, f"{name}.{field_name}: source too thin"


@pytest.mark.parametrize("name", sorted(REQUIRED_PROFILES))
def test_catalog_values_are_sane(name: str) -> None:
    p = CATALOG[name]
    assert 0 < p.memory_budget_bytes <= p.ram_bytes
    assert 0 < p.availability <= 1
    # Effective training rates of these CPUs lie between 0.1 and 100 GFLOP/s.
    assert 1e8 < p.train_flops_per_s < 1e11
    assert p.uplink_bytes_per_s <= p.downlink_bytes_per_s


def test_catalog_ordering_sanity() -> None:
    flops = {name: p.train_flops_per_s for name, p in CATALOG.items()}
    assert flops["rpi5"] > flops["rpi4"] > flops["rpi3"] > flops["rpi-zero-2w"]
    assert flops["phone-high"] > flops["phone-mid"] > flops["phone-low"]
    assert CATALOG["rpi-zero-2w"].ram_bytes == 512 * 2**20
    assert CATALOG["rpi3"].ram_bytes == 2**30
    # Always-on boards are more available than any phone.
    phones = [p.availability for n, p in CATALOG.items() if n.startswith("phone")]
    boards = [p.availability for n, p in CATALOG.items() if not n.startswith("phone")]
    assert min(boards) > max(phones)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_profile_dict_round_trip(name: str) -> None:
    p = CATALOG[name]
    d = json.loads(json.dumps(p.to_dict()))
    assert DeviceProfile.from_dict(d) == p
    assert hash(DeviceProfile.from_dict(d)) == hash(p)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("ram_bytes", -1),
        ("ram_bytes", 0),
        ("ram_bytes", 1.5),
        ("memory_budget_bytes", 2000),  # above ram_bytes=1000
        ("train_flops_per_s", 0.0),
        ("train_flops_per_s", float("nan")),
        ("uplink_bytes_per_s", -5.0),
        ("downlink_bytes_per_s", float("inf")),
        ("availability", 0.0),
        ("availability", 1.5),
        ("availability", True),
        ("name", ""),
    ],
)
def test_from_dict_rejects_bad_field_naming_it(field_name: str, value: object) -> None:
    d = toy_profile().to_dict()
    d[field_name] = value
    with pytest.raises(ValueError, match=field_name):
        DeviceProfile.from_dict(d)


def test_from_dict_names_missing_and_unknown_fields() -> None:
    d = toy_profile().to_dict()
    del d["uplink_bytes_per_s"]
    with pytest.raises(ValueError, match="uplink_bytes_per_s"):
        DeviceProfile.from_dict(d)
    d = {**toy_profile().to_dict(), "gpu_flops": 1.0}
    with pytest.raises(ValueError, match="gpu_flops"):
        DeviceProfile.from_dict(d)
    with pytest.raises(ValueError, match="sources"):
        toy_profile(sources={"not_a_field": "x"})


def test_profile_is_immutable() -> None:
    p = toy_profile()
    with pytest.raises(AttributeError):
        p.availability = 0.9  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.sources["ram_bytes"] = "changed"  # type: ignore[index]


def test_get_profile() -> None:
    assert get_profile("rpi4") is CATALOG["rpi4"]
    with pytest.raises(ValueError, match="rpi9") as err:
        get_profile("rpi9")
    assert "rpi-zero-2w" in str(err.value) and "phone-high" in str(err.value)


# --- fleet ---------------------------------------------------------------------------------


def test_parse_mix_normalises() -> None:
    assert parse_mix({"rpi4": 3, "rpi5": 1}) == {"rpi4": 0.75, "rpi5": 0.25}
    assert math.isclose(sum(parse_mix(DEFAULT_MIX).values()), 1.0)
    assert set(DEFAULT_MIX) == set(CATALOG)


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ({"rpi4": 1, "toaster": 1}, "toaster"),
        ({"rpi4": -1, "rpi5": 2}, "rpi4"),
        ({"rpi4": float("nan")}, "rpi4"),
        ({"rpi4": 0, "rpi5": 0}, "positive sum"),
        ({}, "non-empty"),
    ],
)
def test_parse_mix_errors(mix: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_mix(mix)


def test_parse_mix_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        parse_mix({"toaster": 1})
    assert all(name in str(err.value) for name in CATALOG)


@pytest.mark.parametrize(
    ("num_clients", "mix", "expected"),
    [
        # Quotas 3.5 / 2.1 / 1.4 -> floors 3 / 2 / 1; the spare client goes to remainder 0.5.
        (7, {"rpi4": 0.5, "rpi5": 0.3, "phone-low": 0.2}, {"rpi4": 4, "rpi5": 2, "phone-low": 1}),
        # Exact shares must not lose a client to float error (0.3 * 10 is not 2.999...).
        (10, {"rpi4": 0.5, "rpi5": 0.3, "phone-low": 0.2}, {"rpi4": 5, "rpi5": 3, "phone-low": 2}),
        # Equal remainders and weights: ties go by name.
        (10, {"rpi5": 1, "rpi4": 1, "phone-low": 1}, {"phone-low": 4, "rpi4": 3, "rpi5": 3}),
        # Zero weight gets nobody; a single client goes to the largest quota.
        (1, {"rpi4": 0.6, "rpi5": 0.4, "rpi3": 0}, {"rpi4": 1, "rpi5": 0, "rpi3": 0}),
    ],
)
def test_mix_counts_largest_remainder(
    num_clients: int, mix: dict[str, float], expected: dict[str, int]
) -> None:
    assert mix_counts(num_clients, mix) == expected
    fleet = build_fleet(num_clients, mix, seed=3)
    assert len(fleet) == num_clients
    assert Counter(p.name for p in fleet) == Counter({k: v for k, v in expected.items() if v})


def test_build_fleet_deterministic_per_seed() -> None:
    names = [[p.name for p in build_fleet(50, DEFAULT_MIX, seed=s)] for s in (7, 7, 8)]
    assert names[0] == names[1]
    assert names[0] != names[2]
    assert Counter(names[0]) == Counter(names[2])
    reordered = dict(reversed(list(DEFAULT_MIX.items())))
    assert [p.name for p in build_fleet(50, reordered, seed=7)] == names[0]
    assert all(p is CATALOG[p.name] for p in build_fleet(50, DEFAULT_MIX, seed=7))


def test_build_fleet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_clients"):
        build_fleet(0, DEFAULT_MIX, seed=0)
    with pytest.raises(ValueError, match="seed"):
        build_fleet(5, DEFAULT_MIX, seed=-1)


def test_available_clients_deterministic_and_sorted() -> None:
    fleet = build_fleet(100, DEFAULT_MIX, seed=1)
    first = available_clients(fleet, server_round=3, seed=11)
    assert first == available_clients(fleet, server_round=3, seed=11)
    assert first == sorted(first) and len(set(first)) == len(first)
    assert all(0 <= i < len(fleet) for i in first)
    assert first != available_clients(fleet, server_round=4, seed=11)
    assert first != available_clients(fleet, server_round=3, seed=12)
    # Client i keeps its draw when the fleet grows.
    assert available_clients(fleet[:40], 3, 11) == [i for i in first if i < 40]


def test_available_clients_edge_cases() -> None:
    always = toy_profile(availability=1.0)
    assert available_clients([always] * 5, server_round=0, seed=0) == [0, 1, 2, 3, 4]
    assert available_clients([], server_round=1, seed=0) == []
    with pytest.raises(ValueError, match="server_round"):
        available_clients([always], server_round=-1, seed=0)


def test_available_clients_empirical_rate_matches_availability() -> None:
    fleet = build_fleet(200, DEFAULT_MIX, seed=5)
    rounds = 300
    online = np.zeros(len(fleet))
    for r in range(rounds):
        online[available_clients(fleet, server_round=r, seed=5)] += 1
    for name, profile in CATALOG.items():
        members = [i for i, p in enumerate(fleet) if p.name == name]
        rate = online[members].sum() / (len(members) * rounds)
        # >= 3000 Bernoulli trials per profile: standard error <= 0.01.
        assert abs(rate - profile.availability) < 0.04, (name, rate)


# --- clock ---------------------------------------------------------------------------------


def test_clock_arithmetic_by_hand() -> None:
    p = toy_profile()
    assert compute_time_s(p, 3e9) == pytest.approx(3.0)
    # 2 MB up at 1 MB/s + 8 MB down at 4 MB/s.
    assert transfer_time_s(p, uplink_bytes=2_000_000, downlink_bytes=8_000_000) == (
        pytest.approx(4.0)
    )
    assert client_round_time_s(
        p, flops=3e9, uplink_bytes=2_000_000, downlink_bytes=8_000_000
    ) == pytest.approx(7.0)
    rpi4 = CATALOG["rpi4"]
    assert compute_time_s(rpi4, 2 * rpi4.train_flops_per_s) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="flops"):
        compute_time_s(p, -1.0)


def test_round_time() -> None:
    assert round_time_s([1.0, 5.0, 3.0], None) == 5.0
    assert round_time_s([1.0, 5.0, 3.0], 4.0) == 4.0
    assert round_time_s([1.0, 5.0, 3.0], 10.0) == 5.0
    assert round_time_s([], None) == 0.0
    assert round_time_s([], 30.0) == 0.0
    with pytest.raises(ValueError):
        round_time_s([1.0, -2.0], None)


def test_virtual_clock_accumulates() -> None:
    clock = VirtualClock()
    assert clock.now_s == 0.0
    assert clock.advance(2.5) == 2.5
    clock.advance(round_time_s([1.5, 0.5], None))
    assert clock.now_s == pytest.approx(4.0)
    assert clock.steps_s == (2.5, 1.5)
    with pytest.raises(ValueError, match="dt"):
        clock.advance(-1.0)
    assert clock.now_s == pytest.approx(4.0)


# --- work plans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "max_samples", "batch_size", "num_examples", "steps"),
    [
        (1, 0, 10, 100, 10),
        (1, 0, 10, 95, 10),  # ceil(9.5): the partial batch is a step
        (2.5, 0, 16, 40, 7),  # 100 samples / 16 = 6.25
        (2.5, 50, 16, 40, 3),  # capped at 50 // 16
        (1, 5, 10, 100, 1),  # cap below one batch: still one step
        (0.1, 0, 1, 30, 3),  # 0.1 * 30 is 3.0000000000000004 in floats
        (3, 0, 64, 1, 1),  # batches run across epoch boundaries: ceil(3 / 64)
    ],
)
def test_steps_for(
    epochs: float, max_samples: int, batch_size: int, num_examples: int, steps: int
) -> None:
    assert WorkPlan(epochs, max_samples, batch_size, False).steps_for(num_examples) == steps


def test_workplan_validation() -> None:
    with pytest.raises(ValueError, match="epochs"):
        WorkPlan(0.0, 0, 10, False)
    with pytest.raises(ValueError, match="batch_size"):
        WorkPlan(1.0, 0, 0, False)
    with pytest.raises(ValueError, match="num_examples"):
        WorkPlan(1.0, 0, 10, False).steps_for(0)


def plan(**overrides: object) -> WorkPlan:
    """plan_work on the toy profile (1 GFLOP/s): 2 epochs of 100 samples at 1 MFLOP each."""
    args: dict[str, object] = {
        "local_epochs": 2,
        "batch_size": 10,
        "num_examples": 100,
        "flops_per_sample": 1e6,
        "deadline_s": None,
        "transfer_s": 1.0,
    }
    args.update(overrides)
    return plan_work(toy_profile(), **args)  # type: ignore[arg-type]


def test_plan_work_full_and_straggler() -> None:
    assert plan() == WorkPlan(epochs=2.0, max_samples=0, batch_size=10, straggler=False)
    assert plan().steps_for(100) == 20
    assert plan(straggler_epochs=1) == WorkPlan(1.0, 0, 10, True)
    with pytest.raises(ValueError, match="straggler_epochs"):
        plan(straggler_epochs=2)


def test_plan_work_generous_deadline_is_full_plan() -> None:
    # 9 s of compute at 1 GFLOP/s = 9000 samples, far above the 200 planned.
    assert plan(deadline_s=10.0) == WorkPlan(2.0, 0, 10, False)


def test_plan_work_tight_deadline_caps_samples() -> None:
    # 0.1 s of compute at 1 GFLOP/s and 1 MFLOP/sample = 100 samples = 10 steps.
    p = plan(deadline_s=1.1)
    assert p == WorkPlan(2.0, 100, 10, True)
    assert p.steps_for(100) == 10
    assert p.max_samples * 1e6 / 1e9 + 1.0 <= 1.1


def test_plan_work_deadline_survives_float_rounding() -> None:
    # floor(21.94 s x 1.6 GFLOP/s / 1 MFLOP) = 35104 samples, whose compute time plus transfer
    # comes out at 53.900000000000006 s in floats: one sample too many.
    profile = CATALOG["rpi-zero-2w"]
    p = plan_work(
        profile,
        local_epochs=1,
        batch_size=1,
        num_examples=100_000,
        flops_per_sample=1e6,
        deadline_s=53.9,
        transfer_s=31.96,
    )
    assert p.straggler and p.max_samples == 35103
    assert p.max_samples * 1e6 / profile.train_flops_per_s + 31.96 <= 53.9


def test_plan_work_hopeless_deadline_still_one_step() -> None:
    for deadline in (1.0, 0.5, 1.005):  # no time left, or less than one batch (10 samples)
        p = plan(deadline_s=deadline)
        assert p.straggler and p.max_samples == 10
        assert p.steps_for(100) == 1


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(CATALOG)),
    deadline_s=st.floats(0.01, 600.0),
    transfer_frac=st.floats(0.0, 0.99),
    flops_per_sample=st.floats(1e4, 1e9),
    num_examples=st.integers(1, 5000),
    batch_size=st.integers(1, 128),
    local_epochs=st.integers(1, 10),
)
def test_plan_work_meets_deadline(
    name: str,
    deadline_s: float,
    transfer_frac: float,
    flops_per_sample: float,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
) -> None:
    profile = CATALOG[name]
    transfer_s = deadline_s * transfer_frac
    p = plan_work(
        profile,
        local_epochs=local_epochs,
        batch_size=batch_size,
        num_examples=num_examples,
        flops_per_sample=flops_per_sample,
        deadline_s=deadline_s,
        transfer_s=transfer_s,
    )
    steps = p.steps_for(num_examples)
    budget_s = deadline_s - transfer_s
    affordable = math.floor(budget_s * profile.train_flops_per_s / flops_per_sample)
    if affordable >= batch_size:  # otherwise the one-step fallback applies
        work_s = steps * batch_size * flops_per_sample / profile.train_flops_per_s
        assert work_s + transfer_s <= deadline_s
        if p.max_samples:
            cap_s = p.max_samples * flops_per_sample / profile.train_flops_per_s
            assert cap_s + transfer_s <= deadline_s
    assert p.straggler == (p.max_samples > 0)
    assert steps <= math.ceil(local_epochs * num_examples / batch_size)


def test_plan_config_round_trip() -> None:
    for p in (WorkPlan(2.0, 0, 32, False), WorkPlan(1.5, 640, 32, True)):
        cfg = p.to_config()
        assert set(cfg) == {"plan.epochs", "plan.max-samples", "plan.batch-size", "plan.straggler"}
        assert WorkPlan.from_config({**cfg, "lr": 0.01, "proximal-mu": 0.1}) == p


@pytest.mark.parametrize("key", ["plan.epochs", "plan.max-samples", "plan.batch-size"])
def test_plan_from_config_missing_key(key: str) -> None:
    cfg = WorkPlan(1.0, 0, 8, False).to_config()
    del cfg[key]
    with pytest.raises(ValueError, match=key):
        WorkPlan.from_config(cfg)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("plan.epochs", "2"),
        ("plan.epochs", -1.0),
        ("plan.max-samples", 1.5),
        ("plan.batch-size", 0),
        ("plan.straggler", "yes"),
    ],
)
def test_plan_from_config_bad_value(key: str, value: object) -> None:
    cfg = {**WorkPlan(1.0, 0, 8, False).to_config(), key: value}
    with pytest.raises(ValueError, match=key):
        WorkPlan.from_config(cfg)


def test_sample_stragglers_counts_and_range() -> None:
    rng = np.random.default_rng(0)
    seen: set[float] = set()
    for _ in range(200):
        out = sample_stragglers(10, 0.3, 5, rng)
        assert len(out) == 10
        epochs = [e for e in out if e is not None]
        assert len(epochs) == 3
        assert all(e in {1.0, 2.0, 3.0, 4.0} for e in epochs)
        seen.update(epochs)
    assert seen == {1.0, 2.0, 3.0, 4.0}  # uniform over [1, E): every value occurs, E never


def test_sample_stragglers_edges_and_determinism() -> None:
    def draw(seed: int) -> list[float | None]:
        return sample_stragglers(20, 0.5, 3, np.random.default_rng(seed))

    assert draw(4) == draw(4)
    assert sample_stragglers(8, 0.5, 1, np.random.default_rng(0)) == [None] * 8
    assert sample_stragglers(8, 0.0, 5, np.random.default_rng(0)) == [None] * 8
    assert None not in sample_stragglers(8, 1.0, 5, np.random.default_rng(0))
    assert sample_stragglers(0, 0.5, 5, np.random.default_rng(0)) == []
    # round(0.25 * 10) = round(2.5) = 2: Python rounds ties to even.
    assert sum(e is not None for e in sample_stragglers(10, 0.25, 5, np.random.default_rng(1))) == 2
    with pytest.raises(ValueError, match="fraction"):
        sample_stragglers(8, 1.5, 5, np.random.default_rng(0))


def test_straggler_plan_from_sampled_epochs() -> None:
    sampled = sample_stragglers(6, 0.5, 4, np.random.default_rng(2))
    plans = [plan(local_epochs=4, straggler_epochs=e) for e in sampled]
    assert sum(p.straggler for p in plans) == 3
    assert all(p.epochs < 4 for p in plans if p.straggler)


# --- dependency boundary -------------------------------------------------------------------


def test_devices_imports_only_numpy_and_stdlib() -> None:
    """The rule: importing fleetfl.devices, or any of its modules, loads no torch, flwr, onnx,
    onnxruntime or TFLite runtime, and no other fleetfl package; modules that work on models
    import those inside their functions, so the coordinator can plan without them."""
    code = (
        "import importlib, pkgutil, sys, fleetfl.devices as d\n"
        "for m in pkgutil.iter_modules(d.__path__):\n"
        "    importlib.import_module('fleetfl.devices.' + m.name)\n"
        "heavy = ('torch', 'flwr', 'onnx', 'onnxruntime', 'ai_edge_litert', 'flatbuffers')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy"
        " or (m.startswith('fleetfl.') and not m.startswith('fleetfl.devices'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
