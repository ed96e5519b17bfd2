"""Federated evaluation: the round's cohort evaluates the global model on its local test data.

Every ``federation.evaluate_every`` rounds the coordinator sends the new global model (a plain
``ArrayRecord``, float32) to the clients that were selected for the round, in an ``evaluate``
message; each replies with its test-example count and the task's metrics (loss, accuracy, ...)
on its own test split, and the coordinator reports their example-weighted means
(:func:`fleetfl.aggregation.metrics.weighted_metrics`) as ``fed_<metric>``. A client that
fails or lies (a non-positive count, a non-finite value) is left out and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fleetfl import protocol as P
from fleetfl.aggregation.metrics import weighted_metrics

log = logging.getLogger(__name__)


def federated_evaluation(grid: Grid, nodes: Iterable[int], arrays: ArrayRecord,
                         config: ConfigRecord, server_round: int,
                         timeout_s: float) -> dict[str, Any]:
    """Evaluate ``arrays`` on ``nodes``; return the row fields ``fed_*`` (means and counts)."""
    cfg = ConfigRecord({**config, P.SERVER_ROUND: server_round})
    messages = [Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: cfg}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]
    down = sum(P.record_bytes(m.content) for m in messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    answers, failed, up = [], len(messages), 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("round %d: node %d did not evaluate: %s", server_round, node,
                        reply.error.reason)
            continue
        up += P.record_bytes(reply.content)
        try:
            metrics = reply.content.metric_records[P.METRICS]
            n = metrics[P.NUM_EXAMPLES]
            values = {k: v for k, v in metrics.items() if k != P.NUM_EXAMPLES}
        except (KeyError, TypeError) as err:
            log.warning("round %d: node %d sent no evaluation metrics: %r", server_round, node,
                        err)
            continue
        answers.append((n, values))
        failed -= 1
    means, examples, problems = weighted_metrics(answers)
    for problem in problems:
        log.warning("round %d: evaluation %s; left out", server_round, problem)
    row: dict[str, Any] = {f"fed_{k}": v for k, v in means.items()}
    row.update(fed_clients=len(answers) - len(problems), fed_failed=failed + len(problems),
               fed_examples=examples, fed_downlink_bytes=down, fed_uplink_bytes=up)
    return row
