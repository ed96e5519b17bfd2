"""The whole round loop in-process: real ServerApp code, real ClientApp, loopback delivery."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from loopback import LoopbackGrid

from fleetfl import protocol as P
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds

SMALL = [
    "task.dataset=digits", "task.model=logreg", "federation.num_clients=10",
    "federation.clients_per_round=5", "federation.rounds=4", "federation.local_epochs=2",
    "federation.lr=0.1", "fleet.mix={rpi4=1}",
]


def _run(overrides, **grid_kwargs):
    cfg = load_config(None, SMALL + list(overrides))
    grid = LoopbackGrid(cfg.federation.num_clients, **grid_kwargs)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome)
    return outcome, grid


def _with_update(reply: Message, fn) -> Message:
    record = reply.content[P.ARRAYS]
    arrays = [fn(a) for a in record.to_numpy_ndarrays()]
    content = RecordDict({P.ARRAYS: P.arrays_to_record(list(record.keys()), arrays),
                          P.METRICS: reply.content[P.METRICS]})
    return Message(content, reply_to=_original(reply))


def _original(reply: Message) -> Message:
    # Rebuild a message the reply answers, so Message(..., reply_to=...) keeps the routing.
    msg = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
    msg.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return msg


def test_loop_learns_and_records_every_round():
    outcome, grid = _run([])
    assert [r["round"] for r in outcome.rows] == [1, 2, 3, 4]
    assert outcome.rows[-1]["loss"] < outcome.initial["loss"]
    assert outcome.rows[-1]["accuracy"] > outcome.initial["accuracy"]
    assert all(r["aggregated"] == r["selected"] == 5 for r in outcome.rows)
    assert outcome.clients_total == 10
    # Each client got its own config record (its own plan), and the bytes were measured.
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 20
    assert len({id(m.content[P.CONFIG]) for m in train_msgs}) == 20
    assert sum(r["downlink_bytes"] for r in outcome.rows) == sum(
        P.record_bytes(m.content) for m in train_msgs)


def test_stragglers_are_kept_by_fedprox_and_dropped_by_fedavg():
    kept, _ = _run(["fleet.stragglers=0.6"])
    dropped, _ = _run(["fleet.stragglers=0.6", "fleet.drop_stragglers=true"])
    assert all(r["stragglers"] == 3 for r in kept.rows)
    assert all(r["aggregated"] == 5 and r["dropped_stragglers"] == 0 for r in kept.rows)
    assert all(r["aggregated"] == 2 and r["dropped_stragglers"] == 3 for r in dropped.rows)
    # Stragglers' work is partial: fewer simulated seconds than a full-work round is not
    # guaranteed, but the kept and dropped runs used the same draws and so the same plans.
    assert [r["stragglers"] for r in kept.rows] == [r["stragglers"] for r in dropped.rows]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: np.full_like(a, np.nan),
        lambda a: np.full_like(a, np.inf),
        lambda a: a.reshape(-1),
        lambda a: a.astype(np.int32),
    ],
    ids=["nan", "inf", "wrong-shape", "wrong-dtype"],
)
def test_a_bad_update_is_rejected_and_the_round_goes_on(corrupt, caplog):
    outcome, _ = _run([], tamper={i: lambda r: _with_update(r, corrupt) for i in (0, 1)})
    rejected = sum(r["rejected"] for r in outcome.rows)
    assert rejected >= 1
    assert all(np.isfinite(r["loss"]) for r in outcome.rows)
    assert outcome.rows[-1]["loss"] < outcome.initial["loss"]
    assert "rejected update of client" in caplog.text


def test_missing_tensor_and_crash_are_contained(caplog):
    def drop_tensor(reply: Message) -> Message:
        record = reply.content[P.ARRAYS]
        keys = list(record.keys())[:-1]
        content = RecordDict({P.ARRAYS: ArrayRecord.from_array_dict(
            {k: Array(record[k].numpy()) for k in keys}), P.METRICS: reply.content[P.METRICS]})
        return Message(content, reply_to=_original(reply))

    outcome, _ = _run([], tamper={i: drop_tensor for i in (1, 3, 5)}, crash=[2, 4, 6])
    assert sum(r["rejected"] for r in outcome.rows) >= 1
    assert sum(r["failed"] for r in outcome.rows) >= 1
    assert "device crashed" in caplog.text
    assert outcome.rows[-1]["loss"] < outcome.initial["loss"]


def test_deadline_gives_partial_plans_to_slow_devices():
    # 20 epochs of a ~100-example shard: ~3 ms of compute plus ~5 ms of transfer on a Pi Zero
    # 2 W, under 3 ms in all on a Pi 5, so a 6 ms deadline cuts only the Zeros' work.
    outcome, _ = _run(["fleet.mix={rpi-zero-2w=1,rpi5=1}", "fleet.deadline_s=0.006",
                       "federation.local_epochs=20"])
    assert sum(r["stragglers"] for r in outcome.rows) > 0
    assert sum(r["aggregated"] for r in outcome.rows) > sum(r["stragglers"] for r in outcome.rows)
    assert all(0 < r["round_time_s"] <= 0.006 + 1e-12 for r in outcome.rows)
    assert all(r["missed_deadline"] == 0 for r in outcome.rows)  # the plans fit the deadline
