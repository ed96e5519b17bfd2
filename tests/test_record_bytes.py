"""protocol.record_bytes: the bytes Flower's transport carries for a message body."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fleetfl import protocol as P


def test_record_bytes_counts_every_deflated_object_once() -> None:
    blob = bytes(range(256)) * 200
    content = RecordDict({
        P.CONFIG: ConfigRecord({"a": 1, "b": "x"}),
        P.PAYLOAD: ConfigRecord({P.MODEL_BLOB: blob}),
        P.METRICS: MetricRecord({"loss": 0.5}),
        P.ARRAYS: ArrayRecord({"w": Array(np.ones((3, 4), np.float32))}),
    })
    # Flower's own way, recomputing ids: what crosses the network
    expected = sum(len(o.deflate()) for o in get_all_nested_objects(content).values())
    assert P.record_bytes(content) == expected > len(blob)
    content[P.PAYLOAD] = ConfigRecord({P.MODEL_BLOB: blob + b"more"})  # no stale cached ids
    assert P.record_bytes(content) == expected + 4
