"""The message contract between coordinator and clients, on Flower's Message API.

Every message's content is a ``RecordDict`` with explicit keys:

* ``query`` with ``config["op"] == "register"``: the coordinator asks a client what it is. The
  config carries the run's ``task.*`` and ``fleet.*`` keys (a simulated client derives its device
  and data shard from them). The reply's ``config`` has ``device`` (a JSON device profile),
  ``num-examples`` and ``client-index``.
* ``train``: ``config`` with ``server-round``, ``proximal-mu``, ``lr``, ``clip`` (the cohort's
  shared int8 clip range), the ``task.*``/``compression.*`` keys and the client's own work plan
  (``plan.*``), and ``payload["model"]``: the global model as a codec blob
  (:mod:`fleetfl.compression.codec`, kind "model": sparse under the pruning mask, int8/fp16/fp32,
  with the mask bitmaps only when the client may not hold them). With the work plan comes its
  memory plan: ``plan.micro-batch`` (samples per forward/backward pass), ``plan.checkpointing``,
  ``plan.predicted-peak-bytes`` and ``plan.budget-bytes`` (the whole client process's peak and
  limit, bytes); and, for the client's own check, ``memory-stats`` (the model's
  ``TrainingMemoryStats`` as JSON), ``fleet.memory_budget_fraction`` and
  ``fleet.runtime_memory_mib``. A client whose plan does not fit replies with an error of code
  ``ERROR_PLAN_REFUSED`` whose reason gives the bytes needed and the budget. Otherwise the reply has
  ``payload["update"]`` (a codec blob, kind "update": Δ = w_local − w_received on the unpruned
  coordinates, int8 with the shared clip or float32) and ``metrics`` (``num-examples``,
  ``samples-processed``, ``steps``, ``train-loss``, ``clip-tail``).

This module has no logic beyond naming keys and measuring serialized sizes, so both sides (and
mobile clients written against the docs) agree on one spelling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)

from fleetfl.devices.memory_planner import CONFIG_KEYS as _MEMORY_PLAN_KEYS

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PAYLOAD = "payload"  # ConfigRecord of codec blobs (bytes)
MODEL_BLOB = "model"
UPDATE_BLOB = "update"

OP = "op"
OP_REGISTER = "register"

SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx strategy uses
LR = "lr"
CLIP = "clip"

DEVICE = "device"
CLIENT_INDEX = "client-index"
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
RUNTIME_BYTES = "runtime-bytes"  # register: a real device's resident bytes before training
SAMPLES_PROCESSED = "samples-processed"
STEPS = "steps"
TRAIN_LOSS = "train-loss"
TRAINED_IN_EXECUTORCH = "executorch"  # 1: the client trained in ExecuTorch's runtime (a phone's)
CLIP_TAIL = "clip-tail"  # int8 tail counts of the client's quantized values (list[int])
# int8 transport: the client quantizes UPDATE_WEIGHT * Δ, ω_k = n_k |C| / Σ_C n_j (the cohort's
# mean is 1), so the coordinator's average is an integer sum: Σ q_k · scale / Σ ω_k.
UPDATE_WEIGHT = "update-weight"

# Secure aggregation (docs/secagg.md): the SecAgg+ message of the stage, as a ConfigRecord.
SECAGG = "secagg"
SECAGG_QUERY = "query.secagg"  # message type of stages 1, 2 and 4; stage 3 rides on "train"
# Keys ahead (docs/secagg.md §7): in a train message, an empty record asking the client to
# advertise its next round's keys; in its reply, the KeysAhead. In a stage-2 query, the Setup
# of a client whose keys were advertised ahead.
SECAGG_AHEAD = "secagg.ahead"
SECAGG_SETUP = "secagg.setup"

# The memory plan inside a train config (spelled in fleetfl.devices.memory_planner, which the
# coordinator and clients both use to write and read them).
PLAN_MICRO_BATCH = _MEMORY_PLAN_KEYS["micro_batch"]  # "plan.micro-batch"
PLAN_CHECKPOINTING = _MEMORY_PLAN_KEYS["checkpointing"]  # "plan.checkpointing"
PLAN_PREDICTED_PEAK_BYTES = _MEMORY_PLAN_KEYS["predicted_peak_bytes"]  # "plan.predicted-peak-bytes"
PLAN_BUDGET_BYTES = _MEMORY_PLAN_KEYS["budget_bytes"]  # "plan.budget-bytes"
MEMORY_STATS = "memory-stats"  # JSON of the model's TrainingMemoryStats
MEMORY_BUDGET_FRACTION = "fleet.memory_budget_fraction"
RUNTIME_MEMORY_MIB = "fleet.runtime_memory_mib"

# Error code of a train reply refusing a plan that does not fit the device's memory (Flower's
# own codes are small integers; ErrorCode in flwr.common.constant).
ERROR_PLAN_REFUSED = 4001


def arrays_to_record(keys: Sequence[str], arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays`` under ``keys`` (order kept)."""
    return ArrayRecord.from_array_dict(
        {k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )


def record_bytes(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it for transport (sum of its deflated objects).

    This is what crosses the network for the message body; it is measured, not estimated.
    """
    # Flower recomputes an object's id (deflate + SHA-256) every time it is asked, and a
    # parent's id asks for its children's: inside no_object_id_recompute each id is computed
    # once, which makes this 3-4x faster on a model-sized message (same count).
    with no_object_id_recompute():
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
