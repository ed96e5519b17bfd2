"""fleetfl's ServerApp: registration, FleetFedProx rounds, central evaluation, round records.

``make_server_app(config, on_round)`` builds the app for an in-process simulation; the module
attribute ``app`` is the same app reading its configuration from Flower's ``run_config`` (the
flattened TOML of :func:`fleetfl.coordinator.config.to_run_config`), for a deployed SuperLink.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fleetfl import protocol as P
from fleetfl.coordinator.config import Config, from_run_config, to_run_config
from fleetfl.coordinator.planning import PlanSettings
from fleetfl.coordinator.registry import FleetRegistry
from fleetfl.coordinator.strategy import FleetFedProx
from fleetfl.coordinator.transport import ModelTransport, TransportSettings
from fleetfl.devices.clock import VirtualClock
from fleetfl.tasks.evaluation import evaluate
from fleetfl.tasks.models import build_model, training_flops_per_sample
from fleetfl.tasks.registry import load_federated

RoundCallback = Callable[[dict[str, Any]], None]


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
    keep = ("task.", "fleet.mix", "fleet.seed", "federation.num_clients",
            "compression.update_bits", "compression.error_feedback", "compression.qat",
            "compression.entropy_coding")
    cfg = {k: v for k, v in flat.items() if k.startswith(keep)}
    cfg[P.LR] = config.federation.lr
    return ConfigRecord(cfg)


def run_rounds(grid: Grid, config: Config, outcome: RunOutcome,
               on_round: RoundCallback | None = None) -> None:
    """Run ``config.federation.rounds`` FleetFedProx rounds on ``grid``, filling ``outcome``."""
    task, fed = config.task, config.federation
    data = load_federated(task.dataset, num_clients=fed.num_clients, seed=task.seed,
                          alpha=task.alpha, beta=task.beta, iid=task.iid,
                          partition_alpha=task.partition_alpha)
    model = build_model(task.model, data.input_shape, data.num_classes, seed=task.seed)
    train_all, test = data.train_union(), data.test
    tensors = {name: torch.from_numpy(s.x) for name, s in (("train", train_all), ("test", test))}
    labels = {name: torch.from_numpy(s.y) for name, s in (("train", train_all), ("test", test))}
    shared = message_config(config)
    registry = FleetRegistry(shared, timeout_s=fed.round_timeout_s)
    settings = PlanSettings(
        clients_per_round=fed.clients_per_round,
        local_epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        stragglers=config.fleet.stragglers,
        deadline_s=config.fleet.deadline_s or None,
        seed=config.fleet.seed,
    )
    comp = config.compression
    transport = ModelTransport(
        TransportSettings(
            prune_final_sparsity=comp.prune_final_sparsity,
            prune_start_round=comp.prune_start_round,
            prune_end_round=comp.prune_end_round,
            update_bits=comp.update_bits,
            downlink_bits=comp.downlink_bits,
            initial_clip=comp.initial_clip,
            clip_target=comp.clip_target,
            entropy_coding=comp.entropy_coding,
        ),
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
    )
    strategy = FleetFedProx(
        registry=registry,
        transport=transport,
        settings=settings,
        proximal_mu=config.strategy.mu,
        flops_per_sample=training_flops_per_sample(model, data.input_shape),
        drop_stragglers=config.fleet.drop_stragglers,
    )
    clock = VirtualClock()
    started = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, tensors["test"], labels["test"])
        train_loss, _ = evaluate(model, tensors["train"], labels["train"])
        row: dict[str, Any] = {"round": server_round, "accuracy": acc, "loss": loss,
                               "train_loss": train_loss}
        if server_round == 0:
            outcome.initial = row
            return MetricRecord(row)
        stats = strategy.history[-1]
        clock.advance(stats.round_time_s)
        row.update({k: v for k, v in asdict(stats).items() if k != "server_round"})
        row.update(simulated_time_s=clock.now_s, wall_time_s=time.perf_counter() - started)
        outcome.rows.append(row)
        outcome.final_arrays = arrays
        outcome.clients_total = len(registry.clients)
        if on_round is not None:
            on_round(row)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float)})

    strategy.start(
        grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=fed.rounds,
        timeout=fed.round_timeout_s,
        train_config=ConfigRecord(dict(shared)),
        evaluate_fn=evaluate_fn,
    )


def make_server_app(config: Config | None = None, on_round: RoundCallback | None = None,
                    outcome: RunOutcome | None = None) -> ServerApp:
    """A ServerApp running ``config`` (or, if ``None``, the config in Flower's run_config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else from_run_config(context.run_config)
        run_rounds(grid, cfg, outcome if outcome is not None else RunOutcome(), on_round)

    return server_app


def _log_round(row: dict[str, Any]) -> None:
    print(json.dumps({k: row[k] for k in ("round", "accuracy", "loss", "aggregated")}), flush=True)


app = make_server_app(on_round=_log_round)
