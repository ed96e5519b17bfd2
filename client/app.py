"""fleetfl's ClientApp: registration and FedProx local training on Flower's Message API.

The same app runs in Flower's simulation engine (one virtual SuperNode per client, identified by
``node_config["partition-id"]``) and, unchanged, inside a SuperNode on a device.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fleetfl import protocol as P
from fleetfl.client.local import LocalTask, load_local_task, task_settings
from fleetfl.client.solver import fedprox_train
from fleetfl.devices.workplan import WorkPlan

log = logging.getLogger(__name__)

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the coordinator's ``register`` query with this client's device and data size."""
    cfg = msg.content[P.CONFIG]
    if cfg.get(P.OP) != P.OP_REGISTER:
        raise ValueError(f"unknown query op {cfg.get(P.OP)!r}")
    local = load_local_task(task_settings(cfg), context.node_config)
    reply = ConfigRecord(
        {
            P.DEVICE: json.dumps(local.device.to_dict()),
            P.NUM_EXAMPLES: len(local.y_train),
            P.CLIENT_INDEX: local.index,
        }
    )
    return Message(RecordDict({P.CONFIG: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this client's work plan of FedProx local SGD from the received global model."""
    cfg = msg.content[P.CONFIG]
    local = load_local_task(task_settings(cfg), context.node_config)
    plan = WorkPlan.from_config(cfg)
    model = local.fresh_model()
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    server_round = int(cfg[P.SERVER_ROUND])
    result = fedprox_train(
        model,
        local.x_train,
        local.y_train,
        mu=float(cfg[P.PROXIMAL_MU]),
        lr=float(cfg[P.LR]),
        batch_size=plan.batch_size,
        steps=plan.steps_for(len(local.y_train)),
        seed=_round_seed(local, server_round),
    )
    state = model.state_dict()
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(local.y_train),
            P.SAMPLES_PROCESSED: result.samples,
            P.STEPS: result.steps,
            P.TRAIN_LOSS: result.mean_loss,
        }
    )
    reply = RecordDict(
        {P.ARRAYS: P.arrays_to_record(list(state), [t.numpy() for t in state.values()]),
         P.METRICS: metrics}
    )
    return Message(reply, reply_to=msg)


def _round_seed(local: LocalTask, server_round: int) -> int:
    """Mini-batch order seed: distinct per client and round, reproducible across reruns."""
    return (local.seed * 1_000_003 + local.index * 7919 + server_round) % (2**31)
