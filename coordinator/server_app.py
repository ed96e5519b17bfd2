"""fleetfl's ServerApp: registration, FleetFedProx rounds, central evaluation, round records.

``make_server_app(config, on_round)`` builds the app for an in-process simulation; the module
attribute ``app`` is the same app reading its configuration from Flower's ``run_config`` (the
flattened TOML of :func:`fleetfl.coordinator.config.to_run_config`), for a deployed SuperLink.

After every round the global model is saved as a checkpoint (with masks, clip range and the
task it needs to be rebuilt): to ``checkpoint_path`` in simulation (``DIR/model.pt``), and, in
the service, committed to the round store under ``$FLEETFL_STATE_DIR`` — where a restarted
ServerApp resumes after the last committed round (:mod:`fleetfl.coordinator.state`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fleetfl import protocol as P
from fleetfl.aggregation.combine import RobustRule
from fleetfl.aggregation.server_opt import ServerOptimizer
from fleetfl.coordinator.central_eval import evaluation_sets
from fleetfl.coordinator.checkpoint import save_checkpoint
from fleetfl.coordinator.config import Config, from_run_config, to_run_config
from fleetfl.coordinator.fed_eval import federated_evaluation
from fleetfl.coordinator.grid import fast_polling
from fleetfl.coordinator.planning import MemorySettings, PlanSettings
from fleetfl.coordinator.population import SimulatedFleet
from fleetfl.coordinator.registry import FleetRegistry
from fleetfl.coordinator.state import RoundState, RoundStore
from fleetfl.coordinator.strategy import FleetFedProx
from fleetfl.coordinator.transport import ModelTransport, TransportSettings
from fleetfl.devices.clock import VirtualClock
from fleetfl.devices.memory_planner import TrainingMemoryStats
from fleetfl.devices.traces import FleetTraces
from fleetfl.logs import log_to_stderr
from fleetfl.tasks.models import training_flops_per_sample

RoundCallback = Callable[[dict[str, Any]], None]
IDLE_ROUND_S = 60.0  # virtual seconds a round with no client online lasts
log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What the ServerApp leaves behind for the caller (filled as rounds finish)."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # one per finished round
    initial: dict[str, Any] = field(default_factory=dict)  # round-0 evaluation
    final_arrays: ArrayRecord | None = None
    clients_total: int = 0


def message_config(config: Config) -> ConfigRecord:
    """The settings every client needs, as one flat ``ConfigRecord``."""
    flat = to_run_config(config)
    keep = ("task.", "fleet.mix", "fleet.seed", "fleet.memory_budget_fraction",
            "fleet.runtime_memory_mib", "fleet.runtimes", "federation.num_clients",
            "federation.data_partitions",
            "compression.update_bits", "compression.error_feedback", "compression.qat",
            "compression.entropy_coding", "aggregation.clip_norm")
    cfg = {k: v for k, v in flat.items() if k.startswith(keep)}
    cfg[P.LR] = config.federation.lr
    return ConfigRecord(cfg)


def run_rounds(grid: Grid, config: Config, outcome: RunOutcome,
               on_round: RoundCallback | None = None, *,
               checkpoint_path: Path | None = None, store: RoundStore | None = None,
               deployed: bool = False) -> None:
    """Run ``config.federation.rounds`` FleetFedProx rounds on ``grid``, filling ``outcome``.

    After each round the global model is written to ``checkpoint_path`` (if given) and
    committed to ``store`` (if given); with a ``store`` holding a commit, the run continues
    after that round instead of starting over. ``deployed``: real devices; the coordinator
    loads no client data (central evaluation only on the task's ``central_test()``), and a
    device is online when its node is connected.
    """
    task_cfg, fed = config.task, config.federation
    task = task_cfg.build()
    model = task.build_model(task_cfg.seed)
    sets = evaluation_sets(config, task, model, deployed)
    input_shape, num_classes = sets.input_shape, sets.num_classes
    shared = message_config(config)
    registry = _fleet(config, grid, shared, sets.sizes)
    memory_stats = model_memory_stats(model, input_shape, sets.input_dtype,
                                      qat=config.compression.qat)
    flops_per_sample = training_flops_per_sample(model, input_shape, sets.input_dtype)
    clock = VirtualClock()
    settings = PlanSettings(
        clients_per_round=fed.clients_per_round,
        local_epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        stragglers=config.fleet.stragglers,
        deadline_s=config.fleet.deadline_s or None,
        seed=config.fleet.seed,
        memory=MemorySettings(memory_stats, config.fleet.memory_budget_fraction,
                              config.fleet.runtime_memory_bytes),
        simulated_availability=not deployed,
        traces=None if deployed else _traces(config, flops_per_sample),
        # SecAgg+ needs 2 clients: a round of 1 would abort, so by default it waits for 2.
        min_clients=fed.min_clients or (2 if config.secagg.enabled else 1),
        round_wait_s=fed.round_wait_s,
    )
    comp = config.compression
    prune_start, prune_end = comp.pruning_rounds(fed.rounds)
    transport = ModelTransport(
        TransportSettings(
            prune_final_sparsity=comp.prune_final_sparsity,
            prune_start_round=prune_start,
            prune_end_round=prune_end,
            update_bits=comp.update_bits,
            downlink_bits=comp.downlink_bits,
            initial_clip=comp.initial_clip,
            clip_target=comp.clip_target,
            entropy_coding=comp.entropy_coding,
            tail_trim=config.aggregation.trim_fraction,
        ),
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        prunable_names=task.prunable(model),
    )
    strategy = _strategy(
        config,
        registry=registry,
        transport=transport,
        settings=settings,
        proximal_mu=config.strategy.mu,
        flops_per_sample=flops_per_sample,
        drop_stragglers=config.fleet.drop_stragglers,
        robust=RobustRule(config.aggregation.clip_norm, config.aggregation.norm_bound_ratio,
                          config.aggregation.robust, config.aggregation.trim_fraction),
        server_opt=ServerOptimizer(config.strategy.server_optimizer, config.strategy.server_lr,
                                   config.strategy.server_momentum),
        clock=clock,
    )
    started = time.perf_counter()
    task_record = {**asdict(task_cfg), "input_shape": list(input_shape),
                   "input_dtype": sets.input_dtype,
                   "num_classes": num_classes, "num_clients": fed.num_clients}
    done = _resume(store, config, model, transport, clock, outcome, strategy.server_opt)
    strategy.round_offset = done

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        model.load_state_dict(arrays.to_torch_state_dict())
        if server_round == 0 and done:
            return None  # resumed: the initial evaluation is in the committed history
        server_round += done
        every = fed.evaluate_every
        federated = (federated_evaluation(grid, strategy.cohort_nodes, arrays, shared,
                                          server_round, fed.round_timeout_s)
                     if every and server_round > 0 and server_round % every == 0 else {})
        row: dict[str, Any] = {"round": server_round, **sets.evaluate(task, model), **federated}
        if row["evaluation"] == "none" and federated:
            row.update(accuracy=federated.get("fed_accuracy", math.nan),
                       loss=federated.get("fed_loss", math.nan), evaluation="federated")
        if server_round == 0:
            outcome.initial = row
            return _metric_record(row)
        stats = strategy.history[-1]
        # A round nobody could join (an availability trace's quiet hours) still moves the
        # virtual clock, or every later round would start at the same instant.
        clock.advance(stats.round_time_s or (IDLE_ROUND_S if stats.selected == 0 else 0.0))
        row.update({k: v for k, v in asdict(stats).items() if k != "server_round"})
        row.update(simulated_time_s=clock.now_s, wall_time_s=time.perf_counter() - started)
        outcome.rows.append(row)
        outcome.final_arrays = arrays
        outcome.clients_total = registry.size
        state = RoundState(
            server_round=server_round, arrays=dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(),
                                                       strict=True)),
            task=task_record, strategy={"simulated_time_s": clock.now_s,
                                        "server_opt": strategy.server_opt.state()},
            pruning={"sparsity": transport.sparsity},
            quantization={"qat": config.compression.qat, "clip": transport.clip,
                          "update_bits": config.compression.update_bits},
            masks=transport.masks or None, history=list(outcome.rows), config=config.to_dict())
        _save(state, checkpoint_path, store)
        if on_round is not None:
            on_round(row)
        return _metric_record(row)

    if done >= fed.rounds:
        log.warning("all %d rounds were already committed; nothing to do", fed.rounds)
        return
    strategy.start(
        grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=fed.rounds - done,
        timeout=fed.round_timeout_s,
        train_config=ConfigRecord(
            {**shared, P.MEMORY_STATS: json.dumps(memory_stats.to_dict(), separators=(",", ":"))}),
        evaluate_fn=evaluate_fn,
    )


def _traces(config: Config, flops_per_sample: float) -> FleetTraces | None:
    """The simulation's FedScale-format traces (``fleet.capacity_trace``,
    ``fleet.availability_trace``), or None without either."""
    fleet = config.fleet
    if not (fleet.capacity_trace or fleet.availability_trace):
        return None
    from fleetfl.devices import traces

    return FleetTraces(
        capacity=traces.load("capacity", fleet.capacity_trace) if fleet.capacity_trace else None,
        availability=(traces.load("availability", fleet.availability_trace)
                      if fleet.availability_trace else None),
        flops_per_sample=flops_per_sample)


def _fleet(config: Config, grid: Grid, shared: ConfigRecord,
           sizes: tuple[int, ...] | None) -> FleetRegistry | SimulatedFleet:
    """Who can be sampled: on the local engine's grid, the simulated population derived from
    the config with no messages; on any other grid (deployed, Flower's Ray engine), the nodes
    that register."""
    from fleetfl.coordinator.local_engine import LocalGrid

    fed = config.federation
    if not isinstance(grid, LocalGrid) or sizes is None:
        return FleetRegistry(shared, timeout_s=fed.round_timeout_s,
                             max_examples=fed.max_examples_per_client)
    from fleetfl.devices.fleet import fleet_kinds

    profiles, kind = fleet_kinds(fed.num_clients, config.fleet.mix, config.fleet.seed)
    per_client = np.resize(np.asarray(sizes, dtype=np.int64), fed.num_clients)  # i mod P
    return SimulatedFleet(profiles, kind, per_client, grid.node_id_of,
                          fed.max_examples_per_client)


def model_memory_stats(model: torch.nn.Module, input_shape: tuple[int, ...],
                       input_dtype: str = "float32", *, qat: bool) -> TrainingMemoryStats:
    """The model's training-memory figures, traced once per run on a copy (with the fake-quant
    clients train under when ``qat``: it adds quantized copies of weights and activations)."""
    from fleetfl.compression.qat import enable_qat
    from fleetfl.devices.memory_stats import training_memory_stats

    if not qat:
        return training_memory_stats(model, input_shape, input_dtype=input_dtype)
    work = copy.deepcopy(model)
    enable_qat(work)
    return training_memory_stats(work, input_shape, input_dtype=input_dtype)


def _strategy(config: Config, **kwargs: Any) -> FleetFedProx:
    """FleetFedProx, or its secure-aggregation variant when ``[secagg] enabled``."""
    sec = config.secagg
    if not sec.enabled:
        return FleetFedProx(**kwargs)
    from fleetfl.coordinator.secure_strategy import SecureFleetFedProx
    from fleetfl.privacy import SecAggParams

    params = SecAggParams(num_neighbours=sec.num_neighbours or None,
                          threshold=sec.threshold or None,
                          corrupt_fraction=sec.corrupt_fraction,
                          dropout_fraction=sec.dropout_fraction)
    return SecureFleetFedProx(secagg=params, timeout_s=config.federation.round_timeout_s,
                              keys_ahead=sec.keys_ahead, **kwargs)


def _resume(store: RoundStore | None, config: Config, model: torch.nn.Module,
            transport: ModelTransport, clock: VirtualClock, outcome: RunOutcome,
            server_opt: ServerOptimizer) -> int:
    """Load the store's last commit into the run's pieces; the number of finished rounds."""
    if store is None:
        return 0
    store.acquire()
    state = store.resume(config.to_dict())
    if state is None:
        return 0
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.arrays.items()})
    transport.restore(state.masks, float(state.quantization.get("clip", transport.clip)))
    clock.advance(float(state.strategy.get("simulated_time_s", 0.0)))
    server_opt.restore(dict(state.strategy.get("server_opt", {})))
    outcome.rows = list(state.history)
    log.warning("resuming after committed round %d", state.server_round)
    return state.server_round


def _save(state: RoundState, checkpoint_path: Path | None, store: RoundStore | None) -> None:
    """Write the round's checkpoint file and/or commit it to the round store."""
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, state_dict=state.arrays, task=state.task,
                        server_round=state.server_round, masks=state.masks,
                        quantization=state.quantization)
    if store is not None:
        store.commit(state)


def make_server_app(config: Config | None = None, on_round: RoundCallback | None = None,
                    outcome: RunOutcome | None = None,
                    checkpoint_path: Path | None = None, deployed: bool = False) -> ServerApp:
    """A ServerApp running ``config`` (or, if ``None``, the config in Flower's run_config).

    The ServerApp commits and resumes rounds in ``$FLEETFL_STATE_DIR/rounds`` when that is
    set (``fleetfl coordinator start`` sets it). ``deployed``: see :func:`run_rounds`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if deployed:
            log_to_stderr()  # into serverapp.log, and its warnings onto the console
        cfg = config if config is not None else from_run_config(context.run_config)
        store = RoundStore.from_env()
        try:
            run_rounds(fast_polling(grid), cfg,
                       outcome if outcome is not None else RunOutcome(), on_round,
                       checkpoint_path=checkpoint_path, store=store, deployed=deployed)
        finally:
            if store is not None:
                store.release()

    return server_app


def _metric_record(row: dict[str, Any]) -> MetricRecord:
    """The numeric fields of a round's row (what Flower's log shows)."""
    return MetricRecord({k: v for k, v in row.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})


def _log_round(row: dict[str, Any]) -> None:
    print(json.dumps({k: row[k] for k in ("round", "accuracy", "loss", "aggregated")}), flush=True)


app = make_server_app(on_round=_log_round, deployed=True)
