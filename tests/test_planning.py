"""Cohort selection and per-client plans (pure coordinator logic)."""

import dataclasses

import pytest

from fleetfl.coordinator.planning import PlanSettings, plan_cohort, select_cohort
from fleetfl.coordinator.registry import ClientInfo
from fleetfl.devices.profiles import get_profile


def _clients(names):
    return [ClientInfo(node_id=100 + i, index=i, device=get_profile(n), num_examples=50 + i)
            for i, n in enumerate(names)]


SETTINGS = PlanSettings(clients_per_round=4, local_epochs=5, batch_size=10, stragglers=0.5,
                        deadline_s=None, seed=7)


def test_selection_is_reproducible_and_bounded():
    clients = _clients(["rpi4"] * 12)
    first = select_cohort(clients, 3, SETTINGS)
    assert first == select_cohort(clients, 3, SETTINGS)
    assert len(first) == 4 and len({c.node_id for c in first}) == 4
    rounds = {tuple(c.index for c in select_cohort(clients, r, SETTINGS)) for r in range(1, 20)}
    assert len(rounds) > 5  # different rounds sample different cohorts


def test_offline_devices_are_not_selected_more_than_their_availability():
    # phone-low is online ~30 % of rounds, rpi5 ~95 %: over many rounds the Pis dominate.
    clients = _clients(["phone-low"] * 6 + ["rpi5"] * 6)
    picks = [c.device.name for r in range(1, 201) for c in select_cohort(clients, r, SETTINGS)]
    assert picks.count("rpi5") > 2 * picks.count("phone-low") > 0


def test_plans_mark_the_drawn_fraction_as_stragglers():
    clients = _clients(["rpi4"] * 10)
    cohort = select_cohort(clients, 1, SETTINGS)
    plans = plan_cohort(cohort, 1, SETTINGS, flops_per_sample=1e4, downlink_bytes=10_000,
                        uplink_bytes=10_000)
    assert set(plans) == {c.node_id for c in cohort}
    stragglers = [p for p in plans.values() if p.straggler]
    assert len(stragglers) == 2
    assert all(1 <= p.epochs < 5 for p in stragglers)
    assert all(p.epochs == 5 and p.max_samples == 0 for p in plans.values() if not p.straggler)


def _registration(**extra):
    import json

    from flwr.app import ConfigRecord

    from fleetfl import protocol as P

    return ConfigRecord({P.DEVICE: json.dumps(get_profile("rpi4").to_dict()),
                         P.NUM_EXAMPLES: 40, P.CLIENT_INDEX: 2, **extra})


@pytest.mark.parametrize("lie", [-1, 0, 2**62, 1.5, True, "300"])
def test_a_runtime_footprint_beyond_the_devices_ram_refuses_the_registration(lie):
    from fleetfl import protocol as P
    from fleetfl.coordinator.registry import parse_registration

    with pytest.raises(ValueError, match="runtime-bytes"):
        parse_registration(7, _registration(**{P.RUNTIME_BYTES: lie}))


def test_a_device_is_planned_with_the_runtime_it_measured():
    """The coordinator reserves what the device reported, not fleet.runtime_memory_mib: a
    board the default reserve leaves no room on trains when its runtime is lean."""
    from fleetfl import protocol as P
    from fleetfl.coordinator.planning import MemorySettings, memory_plan
    from fleetfl.coordinator.registry import parse_registration
    from fleetfl.devices.memory_planner import MIB
    from fleetfl.devices.memory_stats import training_memory_stats
    from fleetfl.tasks.models import build_model

    zero = get_profile("rpi-zero-2w")
    lean = parse_registration(7, _registration(**{P.RUNTIME_BYTES: 150 * MIB}))
    plain = parse_registration(8, _registration())
    assert (lean.runtime_bytes, plain.runtime_bytes) == (150 * MIB, None)
    lean, plain = (dataclasses.replace(c, device=zero) for c in (lean, plain))
    stats = training_memory_stats(build_model("cnn", (1, 8, 8), 10), (1, 8, 8))
    settings = PlanSettings(clients_per_round=2, local_epochs=1, batch_size=32, stragglers=0.0,
                            deadline_s=None, seed=0,
                            memory=MemorySettings(stats, 0.0, 320 * MIB))
    lean_plan, plain_plan = memory_plan(lean, settings), memory_plan(plain, settings)
    assert lean_plan.fits and not plain_plan.fits
    assert 150 * MIB < lean_plan.predicted_peak_bytes <= zero.memory_budget_bytes
