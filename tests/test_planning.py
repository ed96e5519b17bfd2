"""Cohort selection and per-client plans (pure coordinator logic)."""

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
