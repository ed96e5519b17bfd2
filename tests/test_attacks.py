"""Lying clients on the real round loop: each lie is bounded or refused, and the model learns.

Every attack runs through the real ServerApp/strategy/ClientApp code (``LoopbackGrid``), with
one client (index 0) lying in every round it is selected. Each test asserts the global model's
accuracy against an honest run, and, where the defence is a setting, that the same attack with
the defence off does real damage (so the test can fail).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from loopback import LoopbackGrid

from fleetfl import protocol as P
from fleetfl.compression.codec import decode_update, encode_update
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.tasks.builtin import DigitsTask

FLEET = ["task.dataset=digits", "task.model=logreg", "federation.num_clients=10",
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


def _reply_to(reply: Message, kind: str) -> Message:
    msg = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=kind)
    msg.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return msg


def _rewrite_update(reply: Message, values: Callable[[np.ndarray], np.ndarray],
                    tail: list[int] | None = None) -> Message:
    """``reply`` with every tensor of its update replaced by ``values(tensor)``, re-encoded
    validly (same round, mask id and int8 scales), and optionally new tail counts."""
    blob = reply.content[P.PAYLOAD][P.UPDATE_BLOB]
    update = decode_update(blob, max_bytes=len(blob))
    tensors = {name: values(update.dense(name)) for name in update.values}
    scales = {name: spec.scale for name, spec in update.specs.items()
              if spec.dtype == np.int8}
    new = encode_update(tensors, round=update.round, mask_id=update.mask_id, scales=scales)
    metrics = dict(reply.content[P.METRICS])
    if tail is not None:
        metrics[P.CLIP_TAIL] = tail
    content = RecordDict({P.PAYLOAD: ConfigRecord({P.UPDATE_BLOB: new}),
                          P.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=_reply_to(reply, "train"))


def _rewrite_registration(reply: Message, **fields: object) -> Message:
    cfg = dict(reply.content[P.CONFIG])
    if isinstance(fields.get("device"), dict):
        device = json.loads(str(cfg[P.DEVICE]))
        cfg[P.DEVICE] = json.dumps({**device, **fields.pop("device")})  # type: ignore[dict-item]
    cfg.update(fields)
    return Message(RecordDict({P.CONFIG: ConfigRecord(cfg)}), reply_to=_reply_to(reply, "query"))


def _final(outcome: RunOutcome) -> float:
    return float(outcome.rows[-1]["accuracy"])


def test_a_float32_update_of_1e30_is_bounded(honest: dict[str, RunOutcome]) -> None:
    huge = {0: lambda r: _rewrite_update(r, lambda t: np.full_like(t, 1e30))}
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
    liar = {"tamper_query": {0: lambda r: _rewrite_registration(r, **{P.NUM_EXAMPLES: 2**62})}}
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
    outcome = _run([], tamper_query={0: lambda r: _rewrite_registration(r, **lie)})
    assert outcome.clients_total == 9  # the liar was refused; the run went on without it
    assert all(r["selected"] <= 9 and r["failed"] == 0 for r in outcome.rows)
    assert _final(outcome) > _final(honest["float"]) - 0.1


def test_one_client_cannot_hijack_the_shared_clip_range(honest: dict[str, RunOutcome]) -> None:
    """It reports every value as clipped (all tail levels = all values) and sends +127
    everywhere: its counts are clamped as honest clients clamp theirs, its update bounded."""
    def everything_clipped(reply: Message) -> Message:
        total = list(reply.content[P.METRICS][P.CLIP_TAIL])[0]  # type: ignore[index]
        levels = len(list(reply.content[P.METRICS][P.CLIP_TAIL])) - 1  # type: ignore[arg-type]
        return _rewrite_update(reply, lambda t: np.full_like(t, 127), [total] + [total] * levels)

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
    from fleetfl.client import secure
    from fleetfl.compression.quantize import TAIL_LEVELS
    from fleetfl.coordinator import secure_strategy
    from fleetfl.privacy import ring

    honest_embed, honest_masked = ring.embed, secure.masked_update

    def lenient_embed(x: np.ndarray, bits: int, max_abs: int) -> np.ndarray:
        return honest_embed(x, bits, (1 << (bits - 1)) - 1)

    def lying_masked(request: ConfigRecord, vector: np.ndarray, context) -> ConfigRecord:
        if int(context.node_id) == 1000:  # client 0, selected in every round here
            calls = context.state.config_records.setdefault("liar", ConfigRecord({"n": 0}))
            calls["n"] = int(calls["n"]) + 1
            if int(calls["n"]) >= 4:
                vector = vector.copy()
                vector[:-TAIL_LEVELS] = 2000
        return honest_masked(request, vector, context)

    monkeypatch.setattr(ring, "embed", lenient_embed)
    monkeypatch.setattr(secure, "masked_update", lying_masked)
    secagg = [*INT8, "secagg.enabled=true"]
    defended = _run(secagg)
    refused = [r["round"] for r in defended.rows if r["secagg_refused"]]
    assert refused == [4, 5, 6] and all(defended.rows[i - 1]["aggregated"] == 0 for i in refused)
    before = defended.rows[2]
    assert before["accuracy"] > defended.initial["accuracy"] + 0.2  # rounds 1-3 learned
    assert defended.rows[-1]["loss"] == before["loss"]  # and the model was kept since
    monkeypatch.setattr(secure_strategy, "secure_sum_problem", lambda *a: None)
    undefended = _run(secagg)
    assert undefended.rows[-1]["loss"] > 2 * before["loss"]  # the attack itself is real
