"""Rewriting a client's replies as a lying client would, validly encoded (tests, benchmarks).

Used with ``LoopbackGrid(tamper=..., tamper_query=...)``: the lie passes the codec and the
protocol checks, so what is tested is the coordinator's judgement, not its parser.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from unittest import mock

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fleetfl import protocol as P
from fleetfl.compression.codec import decode_update, encode_update


def _reply_to(reply: Message, kind: str) -> Message:
    msg = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=kind)
    msg.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return msg


def rewrite_update(reply: Message, values: Callable[[np.ndarray], np.ndarray],
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


def rewrite_registration(reply: Message, **fields: object) -> Message:
    cfg = dict(reply.content[P.CONFIG])
    if isinstance(fields.get("device"), dict):
        device = json.loads(str(cfg[P.DEVICE]))
        cfg[P.DEVICE] = json.dumps({**device, **fields.pop("device")})  # type: ignore[dict-item]
    cfg.update(fields)
    return Message(RecordDict({P.CONFIG: ConfigRecord(cfg)}), reply_to=_reply_to(reply, "query"))


def everything_clipped(reply: Message) -> Message:
    """An int8 reply claiming every value was clipped (all tail levels = all values) and +127
    everywhere: it pushes the shared clip range wider every round."""
    tail = list(reply.content[P.METRICS][P.CLIP_TAIL])  # type: ignore[arg-type]
    return rewrite_update(reply, lambda t: np.full_like(t, 127), [tail[0]] * len(tail))


@contextlib.contextmanager
def out_of_range_secure_inputs(nodes: set[int], value: int, from_call: int = 1
                               ) -> Iterator[None]:
    """Under SecAgg+, ``nodes`` skip their own range check and mask ``value`` for every update
    coordinate, from their ``from_call``-th masked input on (counted in ``context.state``)."""
    from fleetfl.client import secure
    from fleetfl.compression.quantize import TAIL_LEVELS
    from fleetfl.privacy import ring

    honest_embed, honest_masked = ring.embed, secure.masked_update

    def lenient_embed(x: np.ndarray, bits: int, max_abs: int) -> np.ndarray:
        return honest_embed(x, bits, (1 << (bits - 1)) - 1)

    def lying_masked(request: ConfigRecord, vector: np.ndarray, context,
                     ahead: bool = False) -> dict[str, ConfigRecord]:
        if int(context.node_id) in nodes:
            calls = context.state.config_records.setdefault("liar", ConfigRecord({"n": 0}))
            calls["n"] = int(calls["n"]) + 1
            if int(calls["n"]) >= from_call:
                vector = vector.copy()
                vector[:-TAIL_LEVELS] = value
        return honest_masked(request, vector, context, ahead)

    with mock.patch.object(ring, "embed", lenient_embed), \
            mock.patch.object(secure, "masked_update", lying_masked):
        yield
