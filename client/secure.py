"""The client's side of secure aggregation: SecAgg+ stages carried by Flower messages.

The protocol lives in :mod:`fleetfl.privacy`; this module only moves its messages in and out of
``ConfigRecord``s and keeps the client's round state in ``context.state`` between messages
(private keys included: the state never leaves the device). Stages 1, 2 and 4 arrive as
``query.secagg`` messages, stage 3 rides on the ``train`` message (docs/secagg.md §7).

Keys ahead: a ``train`` message that carries an ``secagg.ahead`` record asks the client to
advertise its next round's keys on its reply; their private halves wait in ``context.state``
(:data:`AHEAD_KEY`) until a stage-2 query arrives with the round's Setup (``secagg.setup``).
They are removed from the state when taken, and when a round starts with a plain Setup: a pair
serves one round at most.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context

from fleetfl import protocol as P
from fleetfl.compression.quantize import TAIL_COUNT_MAX, TailCounts
from fleetfl.privacy import SecAggClient, Setup

STATE_KEY = "fleetfl.secagg"  # context.state ConfigRecord: {"state": SecAggClient.to_state()}
AHEAD_KEY = "fleetfl.secagg.ahead"  # context.state ConfigRecord: {"keys": next round's keys}
__all__ = ["AHEAD_KEY", "STATE_KEY", "TAIL_COUNT_MAX", "answer", "masked_update",
           "secure_vector"]


def answer(request: ConfigRecord, context: Context,
           setup: ConfigRecord | None = None) -> ConfigRecord:
    """Run the SecAgg+ stage ``request`` asks for; the reply's record.

    A ``Setup`` starts a fresh client for the round (new keys); a share-keys request that comes
    with the round's ``setup`` starts one with the keys advertised ahead; every other stage
    continues the client saved in ``context.state``. Protocol errors propagate (Flower sends an
    error reply, which the coordinator treats as this client dropping out).
    """
    client = _start(request, context, setup)
    reply = client.handle(dict(request))
    _save(context, client)
    return ConfigRecord(reply.to_config())


def masked_update(request: ConfigRecord, vector: np.ndarray, context: Context,
                  ahead: bool = False) -> dict[str, ConfigRecord]:
    """Stage 3: mask the int8 ``vector`` (update values, then tail counts) for the secure sum.

    Returns the reply's records: ``secagg`` (the masked input) and, when ``ahead``,
    ``secagg.ahead`` (the next round's keys, whose private halves stay in ``context.state``).
    """
    client = _start(request, context, None)
    reply = client.masked_input(dict(request), vector)
    records = {P.SECAGG: ConfigRecord(reply.to_config())}
    if ahead:
        advert, private = client.keys_ahead()
        context.state[AHEAD_KEY] = ConfigRecord({"keys": private})
        records[P.SECAGG_AHEAD] = ConfigRecord(advert.to_config())
    _save(context, client)
    return records


def secure_vector(values: Mapping[str, np.ndarray], tail: TailCounts) -> np.ndarray:
    """The vector a client masks: its int8 kept values (codec order) and its tail counts
    (already clamped to ``TAIL_COUNT_MAX``, as every client reports them).

    ``values``: tensor name -> int8 kept coordinates, in the order the codec stores them.
    Returns int16 (so that the ring embedding sees values, not int8 wrap-around).
    """
    if max(tail.above, default=0) > TAIL_COUNT_MAX:
        raise ValueError(f"tail counts must be clamped to {TAIL_COUNT_MAX} first")
    parts = [np.asarray(v, dtype=np.int16).ravel() for v in values.values()]
    return np.concatenate([*parts, np.asarray(tail.above, dtype=np.int16)])


def _start(request: ConfigRecord, context: Context,
           setup: ConfigRecord | None) -> SecAggClient:
    node = int(context.node_id)
    if request.get("type") == Setup.TYPE:
        _take_ahead(context)  # a round started without them: the coordinator has forgotten them
        return SecAggClient(node)
    if setup is not None:
        ahead = _take_ahead(context)
        if ahead is None:
            raise ValueError("secure aggregation: the coordinator counts on keys this client "
                             "advertised ahead, but it holds none (used already, or lost); it "
                             "drops out of this round")
        return SecAggClient.with_keys_ahead(node, dict(setup), ahead)
    saved = context.state.config_records.get(STATE_KEY)
    if saved is None or "state" not in saved:
        raise ValueError("secure aggregation: no round in progress on this client (its state "
                         "was lost, e.g. after a restart); it drops out of this round")
    return SecAggClient.from_state(bytes(saved["state"]))  # type: ignore[arg-type]


def _take_ahead(context: Context) -> bytes | None:
    """Remove and return the private keys advertised ahead, if any."""
    saved = context.state.config_records.get(AHEAD_KEY)
    if saved is None:
        return None
    del context.state[AHEAD_KEY]
    keys = saved.get("keys")
    return bytes(keys) if isinstance(keys, bytes) else None


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord({"state": client.to_state()})
