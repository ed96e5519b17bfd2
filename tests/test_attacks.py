"""Lying clients on the real round loop: each lie is bounded or refused, and the model learns.

Every attack runs through the real ServerApp/strategy/ClientApp code (``LoopbackGrid``), with
one client (index 0) lying in every round it is selected. Each test asserts the global model's
accuracy against an honest run, and, where the defence is a setting, that the same attack with
the defence off does real damage (so the test can fail).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Message
from loopback import PLAIN, LoopbackGrid
from lying import (
    everything_clipped,
    out_of_range_secure_inputs,
    rewrite_registration,
    rewrite_update,
)

from fleetfl import protocol as P
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.tasks.builtin import DigitsTask

FLEET = [*PLAIN, "task.dataset=digits", "task.model=logreg", "federation.num_clients=10",
         "federation.clients_per_round=10", "federation.rounds=6", "federation.local_epochs=2",
         "federation.lr=0.1", "fleet.mix={rpi4=1}", "compression.entropy_coding=false"]
INT8 = ["compression.update_bits=8"]


def _run(overrides: list[str], **grid: dict[int, Callable[[Message], Message]]) -> RunOutcome:
    cfg = load_config(None, [*FLEET, *overrides])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(cfg.federation.num_clients, **grid), cfg, outcome)
    return outcome


@pytest.fixture(scope="module")
def honest() -> dict[str, RunOutcome]:
    return {"float": _run([]), "int8": _run(INT8)}


def _final(outcome: RunOutcome) -> float:
    return float(outcome.rows[-1]["accuracy"])


def test_a_float32_update_of_1e30_is_bounded(honest: dict[str, RunOutcome]) -> None:
    huge = {0: lambda r: rewrite_update(r, lambda t: np.full_like(t, 1e30))}
    defended = _run([], tamper=huge)
    assert all(r["norm_bounded"] == 1 and r["rejected"] == 0 for r in defended.rows)
    assert _final(defended) > _final(honest["float"]) - 0.1
    assert np.isfinite(defended.rows[-1]["loss"])
    undefended = _run(["aggregation.norm_bound_ratio=0"], tamper=huge)
    assert _final(undefended) < 0.3  # the attack itself is real


def test_a_client_cannot_buy_weight_with_its_example_count(
        honest: dict[str, RunOutcome]) -> None:
    """It registers 2^62 examples. Uncapped, its weight ω is ~10 of the cohort's 10 and the
    honest clients' int8 updates round to zero: the model learns one client's skewed shard."""
    liar = {"tamper_query": {0: lambda r: rewrite_registration(r, **{P.NUM_EXAMPLES: 2**62})}}
    # The cap a user sets: the most examples an honest device of theirs holds.
    largest = max(len(train) for train, _ in DigitsTask(model="logreg").federated_data(10, 0)
                  .clients)
    defended = _run([*INT8, f"federation.max_examples_per_client={largest}"], **liar)
    assert _final(defended) > _final(honest["int8"]) - 0.1
    undefended = _run(INT8, **liar)  # the default cap (10^6) is far above digits' shards
    assert _final(undefended) < _final(honest["int8"]) - 0.2


@pytest.mark.parametrize("lie", [
    {"device": {"ram_bytes": 10**30, "memory_budget_bytes": 10**30}},
    {"device": {"train_flops_per_s": float("inf")}},
    {P.NUM_EXAMPLES: float("inf")},
    {P.CLIENT_INDEX: -5},
    {P.DEVICE: "[" * 100_000},  # JSON nested deeper than the parser's recursion limit
])
def test_an_impossible_registration_refuses_only_that_node(
        lie: dict, honest: dict[str, RunOutcome]) -> None:
    outcome = _run([], tamper_query={0: lambda r: rewrite_registration(r, **lie)})
    assert outcome.clients_total == 9  # the liar was refused; the run went on without it
    assert all(r["selected"] <= 9 and r["failed"] == 0 for r in outcome.rows)
    assert _final(outcome) > _final(honest["float"]) - 0.1


def test_one_client_cannot_hijack_the_shared_clip_range(honest: dict[str, RunOutcome]) -> None:
    """It reports every value as clipped (all tail levels = all values) and sends +127
    everywhere: its counts are clamped as honest clients clamp theirs, its update bounded."""
    outcome = _run(INT8, tamper={0: everything_clipped})
    clips, honest_clips = ([r["clip"] for r in o.rows] for o in (outcome, honest["int8"]))
    assert max(clips) <= 2 * max(honest_clips), (clips, honest_clips)
    assert _final(outcome) > _final(honest["int8"]) - 0.1


def test_a_secure_sum_out_of_honest_bounds_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SecAgg+, from round 4 on, a client skips its own range check and masks values of
    2000 (the ring for 10 clients has 12 bits: up to 2047). The coordinator cannot see its
    input, but 10 int8 inputs cannot sum past 1270: those rounds are refused, the model kept.
    (The liar is detected, not identified: it can stall the rounds it joins, not poison them.)
    """
    from fleetfl.aggregation import aggregator

    secagg = [*INT8, "secagg.enabled=true"]
    with out_of_range_secure_inputs({1000}, 2000, from_call=4):  # client 0, in every round
        defended = _run(secagg)
    refused = [r["round"] for r in defended.rows if r["secagg_refused"]]
    assert refused == [4, 5, 6] and all(defended.rows[i - 1]["aggregated"] == 0 for i in refused)
    before = defended.rows[2]
    assert before["accuracy"] > defended.initial["accuracy"] + 0.2  # rounds 1-3 learned
    assert defended.rows[-1]["loss"] == before["loss"]  # and the model was kept since
    monkeypatch.setattr(aggregator, "secure_sum_problem", lambda *a: None)
    with out_of_range_secure_inputs({1000}, 2000, from_call=4):
        undefended = _run(secagg)
    assert undefended.rows[-1]["loss"] > 2 * before["loss"]  # the attack itself is real
