"""The ClientApp's ``train`` and ``evaluate`` handlers: FedProx local SGD and federated
evaluation with torch (imported here, so :mod:`fleetfl.client.app` imports no torch: a
simulated client registers and every client answers the secure aggregation stages without
it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fleetfl import protocol as P
from fleetfl.aggregation.robust import clip_weights
from fleetfl.client import memory, programs, secure
from fleetfl.client.local import LocalTask, load_local_task, task_settings
from fleetfl.client.solver import SolverResult, fedprox_train
from fleetfl.client.solver_executorch import ProgramRunner, fedprox_train_executorch
from fleetfl.client.transport import (
    ReceivedModel,
    kept_values,
    pack_update,
    quantize_update,
    receive_model,
)
from fleetfl.compression.masks import apply_masks_torch_
from fleetfl.compression.qat import enable_qat
from fleetfl.devices.workplan import WorkPlan
from fleetfl.tasks.task import Task, evaluate_task

log = logging.getLogger(__name__)


def train(msg: Message, context: Context, task: Task | None = None) -> Message:
    """Run this client's work plan of FedProx local SGD from the received global model (in
    torch, or in ExecuTorch's runtime for a phone-like client), or refuse it, without
    training, when its memory plan does not fit this device."""
    cfg = msg.content[P.CONFIG]
    device = memory.is_real_device(context.node_config)
    if device:
        memory.prepare_device_process()
    local = load_local_task(task_settings(cfg), context.node_config, task)
    plan = WorkPlan.from_config(cfg)
    server_round = int(cfg[P.SERVER_ROUND])
    runner = None
    if programs.runtime_of(cfg, context.node_config, local) == programs.EXECUTORCH:
        if bool(cfg["compression.qat"]):
            raise ValueError("compression.qat (fake-quant training) is not available in the "
                             "ExecuTorch runtime")
        runner = programs.runner_for(local, context.node_config)
    fit = _admission(cfg, local, min(plan.batch_size, local.num_examples), runner, device)
    if fit.refusal is not None:
        log.warning("round %d: refusing the work plan: %s", server_round, fit.refusal)
        return Message(Error(code=P.ERROR_PLAN_REFUSED, reason=fit.refusal), reply_to=msg)
    model = local.fresh_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    received = receive_model(msg.content[P.PAYLOAD][P.MODEL_BLOB], shapes, server_round,
                             context.state)
    solve = dict(mu=float(cfg[P.PROXIMAL_MU]), lr=float(cfg[P.LR]), batch_size=plan.batch_size,
                 steps=plan.steps_for(len(local.y_train)), seed=_round_seed(local, server_round),
                 micro_batch=fit.micro_batch)
    if runner is not None:
        result, trained = fedprox_train_executorch(runner, received.weights, received.masks,
                                                   local.x_train, local.y_train, **solve)
    else:
        result, trained = _train_torch(model, local, received, solve, fit.checkpointing,
                                       qat=bool(cfg["compression.qat"]))
    weights = clip_weights(trained, received.weights, float(cfg.get("aggregation.clip_norm", 0.0)))
    metrics: dict[str, int | float | list[int]] = {
        P.NUM_EXAMPLES: len(local.y_train),
        P.SAMPLES_PROCESSED: result.samples,
        P.STEPS: result.steps,
        P.TRAIN_LOSS: result.mean_loss,
        P.TRAINED_IN_EXECUTORCH: int(runner is not None),
    }
    return _reply(msg, context, local, received, weights, metrics)


def _admission(cfg: Any, local: LocalTask, batch: int, runner: ProgramRunner | None,
               device: bool) -> memory.MemoryDecision:
    """The memory check of the plan: traced torch figures, or the ExecuTorch program's own."""
    if runner is None:
        return memory.decide(cfg, local, batch, measure=device)
    program_bytes = runner.manifest.planned_bytes + len(runner.program.buffer)
    return memory.decide_program(cfg, local, program_bytes, batch, measure=device)


def _reply(msg: Message, context: Context, local: LocalTask, received: ReceivedModel,
           weights: dict[str, np.ndarray], metrics: dict[str, int | float | list[int]]
           ) -> Message:
    """Quantize and encode the update (or mask it for secure aggregation) into the reply."""
    cfg = msg.content[P.CONFIG]
    server_round = int(cfg[P.SERVER_ROUND])
    quantization = {
        "clip": float(cfg[P.CLIP]), "error_feedback": bool(cfg["compression.error_feedback"]),
        "rng": np.random.default_rng([local.seed, local.index, server_round]),
        "state": context.state, "weight": float(cfg.get(P.UPDATE_WEIGHT, 1.0)),
    }
    request = msg.content.config_records.get(P.SECAGG)
    if request is not None:
        # Secure aggregation: only the masked int8 vector leaves, tail counts inside it.
        q, tail = quantize_update(weights, received, **quantization)  # type: ignore[arg-type]
        tail = tail.clamped(secure.TAIL_COUNT_MAX)
        vector = secure.secure_vector(kept_values(q, received.masks), tail)
        ahead = P.SECAGG_AHEAD in msg.content.config_records
        records = secure.masked_update(request, vector, context, ahead=ahead)
        reply = RecordDict({**records, P.METRICS: MetricRecord(metrics)})
        return Message(reply, reply_to=msg)
    blob, tail = pack_update(weights, received, bits=int(cfg["compression.update_bits"]),
                             entropy_coding=bool(cfg["compression.entropy_coding"]),
                             **quantization)  # type: ignore[arg-type]
    metrics[P.CLIP_TAIL] = tail.clamped(secure.TAIL_COUNT_MAX).to_list()
    reply = RecordDict({P.PAYLOAD: ConfigRecord({P.UPDATE_BLOB: blob}),
                        P.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(reply, reply_to=msg)


def evaluate(msg: Message, context: Context, task: Task | None = None) -> Message:
    """Federated evaluation: the global model (``arrays``) on this client's local test split.

    Replies ``metrics`` with ``num-examples`` (test examples) and the task's ``loss`` and
    metrics; a client without a test split replies with an error (it is left out).
    """
    cfg = msg.content[P.CONFIG]
    local = load_local_task(task_settings(cfg), context.node_config, task)
    if local.test is None or len(local.test) == 0:
        raise ValueError("this client has no local test split (x_test/y_test)")
    model = local.fresh_model()
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    values = evaluate_task(local.task, model, torch.from_numpy(local.test.x),
                           torch.from_numpy(local.test.y))
    metrics = MetricRecord({P.NUM_EXAMPLES: len(local.test), **values})
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


def _train_torch(model: torch.nn.Module, local: LocalTask, received: ReceivedModel,
                 solve: dict[str, Any], checkpointing: bool, *, qat: bool,
                 ) -> tuple[SolverResult, dict[str, np.ndarray]]:
    """FedProx local SGD in torch from the received global model; the trained state dict."""
    model.load_state_dict({k: torch.from_numpy(v) for k, v in received.weights.items()})
    keep_pruned = _mask_hook(model, received.masks)
    fake_quant = enable_qat(model) if qat else None
    result = fedprox_train(model, local.x_train, local.y_train, post_step=keep_pruned,
                           checkpointing=checkpointing, loss_fn=local.task.loss, **solve)
    if fake_quant is not None:
        fake_quant.remove()
    return result, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _mask_hook(model: torch.nn.Module, masks: dict[str, np.ndarray]) -> Callable[[], None] | None:
    """A post-step hook that keeps pruned weights exactly zero (``None`` if nothing is pruned)."""
    if not masks:
        return None
    params = dict(model.named_parameters())
    torch_masks = {k: torch.from_numpy(m) for k, m in masks.items()}
    return lambda: apply_masks_torch_(params, torch_masks)


def _round_seed(local: LocalTask, server_round: int) -> int:
    """Mini-batch order seed: distinct per client and round, reproducible across reruns."""
    return (local.seed * 1_000_003 + local.index * 7919 + server_round) % (2**31)
