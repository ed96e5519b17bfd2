"""Secure aggregation in the real round loop (ServerApp, strategy, ClientApp; loopback grid).

The coordinator gets only the masked vectors and the unmasked sum, yet the global model must be
the one the plain int8 path computes, bit for bit; clients vanishing at any stage must not stop
the round, and too many vanishing must leave the model unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from loopback import PLAIN, LoopbackGrid

from fleetfl import protocol as P
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.coordinator.transport import ModelTransport

# int8 with error feedback and pruning to 50 % by round 3: the secure sum has to carry all of it.
SETTINGS = [
    *PLAIN,
    "task.dataset=digits", "task.model=cnn", "federation.num_clients=8",
    "federation.clients_per_round=8", "federation.local_epochs=1", "fleet.mix={rpi4=1}",
    "compression.update_bits=8", "compression.prune_final_sparsity=0.5",
    "compression.prune_end_round=3",
]


def _run(overrides, rounds=3, **grid_kwargs) -> tuple[RunOutcome, LoopbackGrid]:
    cfg = load_config(None, [*SETTINGS, f"federation.rounds={rounds}", *overrides])
    grid = LoopbackGrid(cfg.federation.num_clients, **grid_kwargs)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome)
    return outcome, grid


def _weights(outcome: RunOutcome) -> list[np.ndarray]:
    assert outcome.final_arrays is not None
    return outcome.final_arrays.to_numpy_ndarrays()


def _carries_update_blob(reply: Message) -> bool:
    """The reply has a codec update blob (``payload['update']``): one client's own Δ."""
    payload = reply.content.config_records.get(P.PAYLOAD)
    return payload is not None and P.UPDATE_BLOB in payload


def _carries_tail_counts(reply: Message) -> bool:
    """Some metrics record of the reply has the client's own int8 tail counts."""
    return any(P.CLIP_TAIL in record for record in reply.content.metric_records.values())


def _train_replies(grid: LoopbackGrid) -> list[Message]:
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert not any(m.has_error() for m in replies)
    return replies


def test_secure_aggregation_gives_the_plain_int8_model_exactly() -> None:
    plain, plain_grid = _run([])
    secure, grid = _run(["secagg.enabled=true"])
    for a, b in zip(_weights(plain), _weights(secure), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["clip"] for r in plain.rows] == [r["clip"] for r in secure.rows]
    assert secure.rows[-1]["accuracy"] > secure.initial["accuracy"]
    for row in secure.rows:
        assert row["aggregated"] == row["selected"] >= 5 and row["secagg_aborted"] == 0
        assert row["secagg_uplink_bytes"] > 0 and row["secagg_downlink_bytes"] > 0
    # The coordinator never received an update blob or per-client tail counts: every train
    # reply it got back is a masked SecAgg+ input, and no reply of any kind has either.
    replies = _train_replies(grid)
    assert len(replies) == sum(row["selected"] for row in secure.rows)
    assert all(P.SECAGG in m.content.config_records for m in replies)
    assert not any(_carries_update_blob(m) or _carries_tail_counts(m) for m in grid.received)
    # The same checks see them in the plain run (they are not vacuous).
    plain_replies = _train_replies(plain_grid)
    assert len(plain_replies) == sum(row["selected"] for row in plain.rows)
    assert all(_carries_update_blob(m) and _carries_tail_counts(m) for m in plain_replies)
    assert not any(P.SECAGG in m.content.config_records for m in plain_replies)
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"query", "train", P.SECAGG_QUERY}
    assert {m.metadata.message_type for m in grid.received} == kinds


def _vanish(stage_type: int, nodes: set[int]):
    """Nodes that stop answering at the message carrying SecAgg+ message type ``stage_type``."""
    def silent(msg: Message) -> bool:
        record = msg.content.config_records.get(P.SECAGG)
        return (record is not None and record["type"] == stage_type
                and msg.metadata.dst_node_id in nodes)
    return silent


# SecAgg+ message types of the coordinator's requests: Setup 1, ShareKeysRequest 3,
# MaskedInputRequest 5, UnmaskRequest 7 (fleetfl.privacy.messages).
@pytest.mark.parametrize("stage_type", [1, 3, 5, 7])
def test_the_round_survives_two_vanishing_at_any_stage(stage_type: int) -> None:
    outcome, grid = _run(["secagg.enabled=true"], rounds=1,
                         silent=_vanish(stage_type, {1001, 1005}))
    row = outcome.rows[0]
    cohort = {m.metadata.dst_node_id for m in grid.sent
              if m.metadata.message_type == P.SECAGG_QUERY and m.content[P.SECAGG]["type"] == 1}
    gone = len(cohort & {1001, 1005})
    assert gone >= 1 and row["secagg_aborted"] == 0
    # Gone before their masked input: out of the sum; gone at unmasking: still in it.
    assert row["aggregated"] == len(cohort) - (0 if stage_type == 7 else gone)
    assert row["accuracy"] > outcome.initial["accuracy"]


def test_too_many_vanishing_leaves_the_model_unchanged() -> None:
    outcome, _ = _run(["secagg.enabled=true"], rounds=1,
                      silent=_vanish(7, set(range(1000, 1007))))
    row = outcome.rows[0]
    assert row["secagg_aborted"] == 1 and row["aggregated"] == 0
    assert row["accuracy"] == outcome.initial["accuracy"]
    assert row["loss"] == outcome.initial["loss"]


def test_a_tampered_masked_input_is_rejected_and_the_round_goes_on() -> None:
    def flip(reply: Message) -> Message:
        masked = reply.content[P.SECAGG]
        data = bytearray(masked["masked"])
        data[0] ^= 1
        masked["masked"] = bytes(data)
        return reply

    outcome, _ = _run(["secagg.enabled=true"], rounds=1, tamper={3: flip})
    row = outcome.rows[0]
    assert row["rejected"] == 1 and row["secagg_aborted"] == 0
    assert row["aggregated"] == row["selected"] - 1


def test_kept_values_scatter_back_in_order() -> None:
    transport = ModelTransport.__new__(ModelTransport)
    transport.shapes = {"a": (2, 2), "b": (3,)}
    transport.masks = {"a": np.array([[True, False], [False, True]])}
    dense = transport.scatter(np.arange(5))
    np.testing.assert_array_equal(dense["a"], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(dense["b"], [2, 3, 4])
    assert transport.kept_count == 5


def _by_round(grid: LoopbackGrid, record: str, stage_type: int) -> dict[int, set[int]]:
    """round -> nodes sent a ``query.secagg`` whose ``record`` holds SecAgg+ type ``stage_type``."""
    out: dict[int, set[int]] = {}
    for m in grid.sent:
        rec = m.content.config_records.get(record)
        if m.metadata.message_type == P.SECAGG_QUERY and rec is not None \
                and rec["type"] == stage_type:
            out.setdefault(int(rec["round"]), set()).add(m.metadata.dst_node_id)
    return out


def test_keys_ahead_let_returning_clients_skip_the_advertise_exchange() -> None:
    ahead, grid = _run(["secagg.enabled=true"])
    fresh, fresh_grid = _run(["secagg.enabled=true", "secagg.keys_ahead=false"])
    for a, b in zip(_weights(ahead), _weights(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    trained: dict[int, set[int]] = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            rnd = int(m.content[P.CONFIG][P.SERVER_ROUND])
            trained.setdefault(rnd, set()).add(m.metadata.dst_node_id)
    alone = _by_round(grid, P.SECAGG, 1)  # a Setup on its own: stage 1
    with_setup = _by_round(grid, P.SECAGG_SETUP, 1)  # a Setup riding on stage 2
    assert set(trained) == {1, 2, 3} and with_setup  # rounds 2-3 reuse no stage-1 exchange
    for rnd in (2, 3):
        before = set().union(*(trained[r] for r in range(1, rnd)))
        cohort = alone.get(rnd, set()) | with_setup.get(rnd, set())
        assert with_setup.get(rnd, set()) == cohort & before
        assert alone.get(rnd, set()) == cohort - before
    # without keys ahead every round starts with a stage-1 exchange for its whole cohort
    assert set(_by_round(fresh_grid, P.SECAGG, 1)) == {1, 2, 3}
    assert not _by_round(fresh_grid, P.SECAGG_SETUP, 1)
    assert all(r["secagg_aborted"] == 0 for r in ahead.rows)
