"""Memory plans in the round loop: the coordinator plans each client's memory, the client checks
the plan against its own situation, and refuses one that does not fit (real ServerApp, strategy
and ClientApp code; loopback delivery, or a fresh process per train message)."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
from device_process import ProcessGrid, runtime_bytes
from flwr.app import Message
from loopback import PLAIN, LoopbackGrid

from fleetfl import protocol as P
from fleetfl.client.local import LocalTask, load_local_task, task_settings
from fleetfl.client.memory import decide
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.planning import MemorySettings, PlanSettings, plan_cohort
from fleetfl.coordinator.registry import ClientInfo
from fleetfl.coordinator.server_app import RunOutcome, message_config, run_rounds
from fleetfl.devices.fleet import build_fleet
from fleetfl.devices.memory_planner import (
    DEFAULT_SLACK_BYTES,
    MIB,
    ActivationCost,
    TrainingMemoryStats,
    memory_budget_bytes,
    predict_peak,
)
from fleetfl.devices.memory_stats import training_memory_stats
from fleetfl.devices.profiles import get_profile
from fleetfl.tasks.builtin import DigitsTask
from fleetfl.tasks.data_format import save_npz
from fleetfl.tasks.models import build_model

DIGITS = (1, 8, 8)
BATCH = 64
RPI3 = get_profile("rpi3").memory_budget_bytes  # 512 MiB
CNN = [
    *PLAIN,
    "task.dataset=digits", "task.model=cnn", "federation.num_clients=8",
    "federation.clients_per_round=8", "federation.rounds=1", "federation.local_epochs=1",
    f"federation.batch_size={BATCH}", "federation.lr=0.05",
]


@functools.cache
def cnn_stats() -> TrainingMemoryStats:
    return training_memory_stats(build_model("cnn", DIGITS, 10), DIGITS)


def runtime_leaving(budget: int, room: int) -> str:
    """The override that leaves ``room`` bytes for training tensors inside ``budget``."""
    return f"fleet.runtime_memory_mib={(budget - DEFAULT_SLACK_BYTES - room) / MIB!r}"


def tight_rpi3() -> str:
    """Room on a Pi 3 between a batch of 64 at once and two passes of 32 (digits CNN)."""
    whole = predict_peak(cnn_stats(), BATCH, 1, False).total
    halves = predict_peak(cnn_stats(), BATCH // 2, 2, False).total
    return runtime_leaving(RPI3, (whole + halves) // 2)


def _run(overrides, grid_cls=LoopbackGrid, **grid_kwargs):
    cfg = load_config(None, CNN + list(overrides))
    grid = grid_cls(cfg.federation.num_clients, **grid_kwargs)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome)
    return outcome, grid


def _train_configs(grid):
    """(partition index, config) of every train message sent."""
    return [(m.metadata.dst_node_id - 1000, m.content[P.CONFIG]) for m in grid.sent
            if m.metadata.message_type == "train"]


def _examples(cfg, index: int) -> int:
    return load_local_task(task_settings(cfg), {"partition-id": index}).num_examples


def test_a_small_ram_device_trains_in_micro_batches():
    outcome, grid = _run(["fleet.mix={rpi3=1,rpi5=1}", tight_rpi3()])
    sent = _train_configs(grid)
    assert {cfg[P.PLAN_BUDGET_BYTES] for _, cfg in sent} == {
        RPI3, get_profile("rpi5").memory_budget_bytes}
    split = 0
    for index, cfg in sent:
        batch = min(BATCH, _examples(cfg, index))
        assert cfg[P.PLAN_PREDICTED_PEAK_BYTES] <= cfg[P.PLAN_BUDGET_BYTES]
        assert cfg[P.PLAN_CHECKPOINTING] is False  # the CNN has no set_checkpointing
        if cfg[P.PLAN_BUDGET_BYTES] == RPI3 and batch == BATCH:
            assert cfg[P.PLAN_MICRO_BATCH] == BATCH // 2
            split += 1
        elif cfg[P.PLAN_BUDGET_BYTES] != RPI3:
            assert cfg[P.PLAN_MICRO_BATCH] == batch  # a Pi 5 runs its batch at once
    assert split >= 1
    # Every client accepted its plan and trained with it.
    row = outcome.rows[0]
    assert row["aggregated"] == row["selected"] > 0
    assert row["memory_refused"] == row["unfit"] == 0


def test_the_budget_is_the_profiles_or_a_share_of_ram():
    pi3 = get_profile("rpi3")
    assert memory_budget_bytes(pi3) == pi3.memory_budget_bytes == pi3.ram_bytes // 2
    assert memory_budget_bytes(pi3, 0.75) == 3 * pi3.ram_bytes // 4
    with pytest.raises(ValueError, match="fraction"):
        memory_budget_bytes(pi3, 1.5)


def _client_config(micro: int, runtime_mib: float) -> dict:
    return {"plan.batch-size": BATCH, P.PLAN_MICRO_BATCH: micro, P.PLAN_CHECKPOINTING: False,
            P.MEMORY_STATS: json.dumps(cnn_stats().to_dict()), P.RUNTIME_MEMORY_MIB: runtime_mib,
            P.MEMORY_BUDGET_FRACTION: 0.0}


def test_the_client_check_uses_its_own_resident_memory_on_a_device():
    local = LocalTask(index=0, device=get_profile("rpi3"), x=np.zeros((BATCH, *DIGITS),
                      np.float32), y=np.zeros(BATCH, np.int64), task=DigitsTask(),
                      seed=0)
    whole = predict_peak(cnn_stats(), BATCH, 1, False).total
    # The coordinator assumed a lean 64 MiB runtime: the whole batch fits the Pi 3's 512 MiB...
    lean = _client_config(BATCH, 64.0)
    assert decide(lean, local, BATCH, measure=False).refusal is None
    # ... unless the budget leaves less room than the batch needs.
    cramped = _client_config(BATCH, (RPI3 - DEFAULT_SLACK_BYTES - whole + 1) / MIB)
    assert "over this device's budget of 536870912 bytes" in \
        decide(cramped, local, BATCH, measure=False).refusal
    split = decide(_client_config(BATCH // 2, 64.0), local, BATCH, measure=False)
    assert (split.micro_batch, split.checkpointing, split.refusal) == (BATCH // 2, False, None)
    # A real device measures this process instead (hundreds of MiB under pytest): a 64 MiB
    # budget share, fine for the coordinator's figure, is refused with the measured bytes.
    small = dataclasses.replace(local, device=dataclasses.replace(
        local.device, memory_budget_bytes=100 * MIB))
    tiny = _client_config(BATCH, 1.0)
    assert decide(tiny, small, BATCH, measure=False).refusal is None
    refusal = decide(tiny, small, BATCH, measure=True).refusal
    assert refusal is not None and "already resident" in refusal
    resident = int(refusal.split(" already resident")[0].rsplit(" ", 1)[1])
    assert resident > 100 * MIB
    # Without memory figures (a coordinator that does not plan memory) the plan runs as sent.
    assert decide({"plan.batch-size": BATCH}, local, BATCH, measure=True).refusal is None


def _tiny_client(index: int, device: str) -> ClientInfo:
    return ClientInfo(node_id=100 + index, index=index, device=get_profile(device),
                      num_examples=500)


def test_checkpointing_is_planned_only_for_models_that_have_it():
    kib = 1024
    # RandWire-like: 100 KiB saved per sample, a quarter of it with checkpointing.
    stats = TrainingMemoryStats(
        weight_bytes=MIB, grad_bytes=MIB, optimizer_state_bytes=MIB, update_workspace_bytes=0,
        plain=ActivationCost(0, 100 * kib, 0, 20 * kib, grads_at_peak=MIB // 2),
        checkpointed=ActivationCost(0, 25 * kib, 0, 20 * kib, grads_at_peak=MIB // 2))
    # Room for 3 MiB of state plus 4 plain samples: passes of 8 need checkpointing.
    room = 3 * MIB + 4 * 120 * kib
    runtime = RPI3 - DEFAULT_SLACK_BYTES - room
    settings = PlanSettings(clients_per_round=2, local_epochs=1, batch_size=BATCH, stragglers=0,
                            deadline_s=None, seed=0,
                            memory=MemorySettings(stats, runtime_bytes=runtime))
    cohort = [_tiny_client(0, "rpi3"), _tiny_client(1, "rpi5")]
    plans = plan_cohort(cohort, 1, settings, flops_per_sample=1e4, downlink_bytes=1,
                        uplink_bytes=1)
    small, big = plans[100].memory, plans[101].memory
    assert small.fits and small.checkpointing and 8 <= small.micro_batch < BATCH
    assert big.fits and not big.checkpointing and big.micro_batch == BATCH
    assert plans[100].to_config()[P.PLAN_CHECKPOINTING] is True
    # Without a checkpointed variant the planner goes to smaller passes instead.
    plain_only = dataclasses.replace(stats, checkpointed=None)
    settings = dataclasses.replace(settings, memory=MemorySettings(plain_only,
                                                                   runtime_bytes=runtime))
    plan = plan_cohort(cohort, 1, settings, flops_per_sample=1e4, downlink_bytes=1,
                       uplink_bytes=1)[100].memory
    assert plan.fits and not plan.checkpointing and plan.micro_batch < 8


class _WholeBatchGrid(LoopbackGrid):
    """Delivers train messages with the Pi 3s' micro-batches undone on the way (as from a
    coordinator that did not plan for their memory); ``undone`` lists those clients."""

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients)
        self.undone: list[int] = []

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            cfg, index = msg.content[P.CONFIG], msg.metadata.dst_node_id - 1000
            if msg.metadata.message_type == "train" and cfg[P.PLAN_BUDGET_BYTES] == RPI3 \
                    and cfg[P.PLAN_MICRO_BATCH] < min(BATCH, _examples(cfg, index)):
                cfg[P.PLAN_MICRO_BATCH] = BATCH
                self.undone.append(index)
        return super().send_and_receive(messages, timeout=timeout)


def test_a_client_refuses_a_plan_that_does_not_fit_and_the_round_goes_on(caplog):
    outcome, grid = _run(["fleet.mix={rpi3=1,rpi5=1}", tight_rpi3()], grid_cls=_WholeBatchGrid)
    row = outcome.rows[0]
    assert grid.undone and row["memory_refused"] == len(grid.undone)
    assert row["failed"] == len(grid.undone)  # a refusal is a failed client for the round
    assert row["aggregated"] == row["selected"] - len(grid.undone) > 0
    assert np.isfinite(row["loss"]) and row["loss"] < outcome.initial["loss"]
    assert "refused its work plan" in caplog.text
    assert f"over this device's budget of {RPI3} bytes" in caplog.text
    assert "already resident" in caplog.text


def test_a_device_that_cannot_fit_any_plan_gets_no_work(caplog):
    # A Pi Zero 2 W's 256 MiB budget is below the default 320 MiB client runtime alone.
    caplog.set_level("INFO", logger="fleetfl.coordinator.strategy")
    overrides = ["fleet.mix={rpi-zero-2w=1,rpi4=1}", "federation.rounds=2",
                 "federation.clients_per_round=6"]
    outcome, grid = _run(overrides)
    fleet = build_fleet(8, {"rpi-zero-2w": 1, "rpi4": 1}, 0)
    zeros = {i for i, p in enumerate(fleet) if p.name == "rpi-zero-2w"}
    assert zeros
    trained = {index for index, _ in _train_configs(grid)}
    assert trained and not trained & zeros
    assert sum(r["unfit"] for r in outcome.rows) >= 1
    assert all(r["aggregated"] == r["selected"] > 0 for r in outcome.rows)
    assert "no memory plan fits" in caplog.text and "no plan fits the budget of" in caplog.text


def _device(tmp_path, name: str, budget: int, samples: int) -> dict:
    """node_config of a real device: ``samples`` random digits-shaped examples and a profile
    with ``budget`` bytes (a Pi 4's otherwise, always online)."""
    rng = np.random.default_rng(len(name))
    data = save_npz(tmp_path / f"{name}.npz", rng.random((samples, *DIGITS), np.float32),
                    rng.integers(0, 10, samples))
    profile = dataclasses.replace(get_profile("rpi4"), name=name, ram_bytes=2 * budget,
                                  memory_budget_bytes=budget, availability=1.0)
    return {"data-path": str(data), "device": json.dumps(profile.to_dict()),
            "client-index": len(name)}


@pytest.mark.e2e  # three fresh torch processes: ~12 s idle, 30 s on a busy 2-core machine
def test_device_processes_stay_under_their_budgets_or_refuse(tmp_path):
    """Real devices, a fresh process per train message: one plan is tight (micro-batches) and
    its measured peak stays under the budget; a device whose process holds more than the
    coordinator assumed (a larger data set) measures that and refuses, without training."""
    batch = 256
    base = ["federation.num_clients=2", "federation.clients_per_round=2",
            f"federation.batch_size={batch}"]
    cfg = load_config(None, CNN + base)
    probe = _device(tmp_path, "probe", 2**30, 1024)
    runtime = runtime_bytes(message_config(cfg), probe) + 4 * MIB
    whole = predict_peak(cnn_stats(), batch, 1, False).total
    halves = predict_peak(cnn_stats(), batch // 2, 2, False).total
    tight = runtime + DEFAULT_SLACK_BYTES + (whole + halves) // 2
    # 40 MiB more data than the probe: the coordinator's runtime figure does not cover it.
    big_data = 40 * MIB // (4 * 64)
    devices = [_device(tmp_path, "tight", tight, 1024),
               _device(tmp_path, "bigdata", tight, big_data)]
    cfg = load_config(None, CNN + base + [f"fleet.runtime_memory_mib={runtime / MIB!r}"])
    grid = ProcessGrid(devices)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome)
    sent = {m.metadata.dst_node_id: m.content[P.CONFIG] for m in grid.sent
            if m.metadata.message_type == "train"}
    assert set(sent) == {1000, 1001}, "the coordinator thinks both plans fit"
    assert sent[1000][P.PLAN_MICRO_BATCH] == batch // 2
    assert grid.peaks[1000] <= tight, (grid.peaks[1000], tight)
    assert 1000 not in grid.errors
    assert "already resident" in grid.errors[1001] and f"budget of {tight} bytes" in \
        grid.errors[1001]
    row = outcome.rows[0]
    assert (row["aggregated"], row["memory_refused"], row["failed"]) == (1, 1, 1)
