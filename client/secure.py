"""The client's side of secure aggregation: SecAgg+ stages carried by Flower messages.

The protocol lives in :mod:`fleetfl.privacy`; this module only moves its messages in and out of
``ConfigRecord``s and keeps the client's round state in ``context.state`` between messages
(private keys included: the state never leaves the device). Stages 1, 2 and 4 arrive as
``query.secagg`` messages, stage 3 rides on the ``train`` message (docs/secagg.md §7).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context

from fleetfl.compression.quantize import TAIL_COUNT_MAX, TailCounts
from fleetfl.privacy import SecAggClient, Setup

STATE_KEY = "fleetfl.secagg"  # context.state ConfigRecord: {"state": SecAggClient.to_state()}
__all__ = ["STATE_KEY", "TAIL_COUNT_MAX", "answer", "masked_update", "secure_vector"]


def answer(request: ConfigRecord, context: Context) -> ConfigRecord:
    """Run the SecAgg+ stage ``request`` asks for; the reply's record.

    A ``Setup`` starts a fresh client for the round (new keys); every other stage continues the
    client saved in ``context.state``. Protocol errors propagate (Flower sends an error reply,
    which the coordinator treats as this client dropping out).
    """
    client = _fresh_or_saved(request, context)
    reply = client.handle(dict(request))
    _save(context, client)
    return ConfigRecord(reply.to_config())


def masked_update(request: ConfigRecord, vector: np.ndarray, context: Context) -> ConfigRecord:
    """Stage 3: mask the int8 ``vector`` (update values, then tail counts) for the secure sum."""
    client = _fresh_or_saved(request, context)
    reply = client.masked_input(dict(request), vector)
    _save(context, client)
    return ConfigRecord(reply.to_config())


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


def _fresh_or_saved(request: ConfigRecord, context: Context) -> SecAggClient:
    if request.get("type") == Setup.TYPE:
        return SecAggClient(int(context.node_id))
    saved = context.state.config_records.get(STATE_KEY)
    if saved is None or "state" not in saved:
        raise ValueError("secure aggregation: no round in progress on this client (its state "
                         "was lost, e.g. after a restart); it drops out of this round")
    return SecAggClient.from_state(bytes(saved["state"]))  # type: ignore[arg-type]


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord({"state": client.to_state()})
