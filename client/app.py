"""fleetfl's ClientApp: registration and FedProx local training on Flower's Message API.

The same app runs in Flower's simulation engine (one virtual SuperNode per client, identified by
``node_config["partition-id"]``) and, unchanged, inside a SuperNode on a device. This module
imports no torch: the secure aggregation stages and a simulated client's registration run
without it, and the training and evaluation handlers (:mod:`fleetfl.client.training`) import
it on first use. A real device's registration does load it, to report the memory its process
holds ready to train (its runner pre-loads torch while the SuperNode connects).
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fleetfl import protocol as P
from fleetfl.client import programs, secure
from fleetfl.client.local import load_local_task, task_settings
from fleetfl.client.memory import is_real_device, measured_runtime
from fleetfl.client.state_store import offloaded
from fleetfl.tasks.task import Task


def client_app(task: Task | None = None) -> ClientApp:
    """The Flower ``ClientApp`` that trains the run's task (or ``task``, if given).

    The module attribute ``app`` (what ``fleetfl`` deploys) is ``client_app()``: it resolves the
    run's ``task.name`` from each message. Pass a :class:`~fleetfl.Task` object to embed the
    client in a program that builds its task itself (its data, model, loss), e.g. in
    ``flwr.simulation.run_simulation(client_app=fleetfl.client_app(MyTask()), ...)``.
    """
    client = ClientApp()

    @client.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, task)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        from fleetfl.client.training import train

        with offloaded(context):  # simulation: the node's state lives on the workers' disk
            return train(msg, context, task)

    @client.query("secagg")
    def _secagg(msg: Message, context: Context) -> Message:
        with offloaded(context):
            return secagg(msg, context)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        from fleetfl.client.training import evaluate

        return evaluate(msg, context, task)

    return client


def query(msg: Message, context: Context, task: Task | None = None) -> Message:
    """Answer the coordinator's ``register`` query with this client's device and data size."""
    cfg = msg.content[P.CONFIG]
    if cfg.get(P.OP) != P.OP_REGISTER:
        raise ValueError(f"unknown query op {cfg.get(P.OP)!r}")
    local = load_local_task(task_settings(cfg), context.node_config, task)
    reply = ConfigRecord(
        {
            P.DEVICE: json.dumps(local.device.to_dict()),
            P.NUM_EXAMPLES: local.num_examples,
            P.CLIENT_INDEX: local.index,
        }
    )
    if is_real_device(context.node_config):
        if programs.runtime_of(cfg, context.node_config, local) == programs.EXECUTORCH:
            programs.runner_for(local, context.node_config)  # loaded before it is measured
        runtime = measured_runtime(local)
        if runtime is not None:
            reply[P.RUNTIME_BYTES] = runtime
    return Message(RecordDict({P.CONFIG: reply}), reply_to=msg)


def secagg(msg: Message, context: Context) -> Message:
    """Stages 1, 2 and 4 of secure aggregation (keys, shares, unmasking); see client/secure.py."""
    record = secure.answer(msg.content[P.SECAGG], context,
                           msg.content.config_records.get(P.SECAGG_SETUP))
    return Message(RecordDict({P.SECAGG: record}), reply_to=msg)


app = client_app()
