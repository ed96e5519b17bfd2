"""Federated evaluation and the deployed coordinator's evaluation, on the real round loop.

The cohort evaluates the global model on its own test splits every
``federation.evaluate_every`` rounds; the coordinator reports the example-weighted means. A
deployed coordinator loads no client data: only the task's ``central_test()`` (none here), so
federated evaluation is what it reports.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid

from fleetfl.aggregation.metrics import weighted_metrics
from fleetfl.coordinator.central_eval import evaluation_sets
from fleetfl.coordinator.config import ConfigError, load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.tasks.task import evaluate_task

SMALL = ["task.name=digits", "task.params.model=logreg", "federation.num_clients=6",
         "federation.clients_per_round=4", "federation.rounds=4", "federation.local_epochs=2",
         "federation.lr=0.1", "fleet.mix={rpi4=1}", "federation.evaluate_every=2"]


def _run(overrides=(), deployed=False):
    cfg = load_config(None, [*SMALL, *overrides])
    grid = LoopbackGrid(cfg.federation.num_clients)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome, deployed=deployed)
    return cfg, grid, outcome


def test_the_cohort_evaluates_every_n_rounds_and_the_mean_is_weighted_by_examples() -> None:
    cfg, grid, outcome = _run()
    rows = outcome.rows
    assert ["fed_accuracy" in r for r in rows] == [False, True, False, True]
    last = rows[-1]
    evaluated = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    nodes = {m.metadata.dst_node_id for m in evaluated[-last["fed_clients"]:]}
    assert last["fed_clients"] == last["selected"] == len(nodes) and last["fed_failed"] == 0
    # The same numbers computed here from the clients' own test splits and the final model.
    task = cfg.task.build()
    data = task.federated_data(cfg.federation.num_clients, cfg.task.seed)
    model = task.build_model(0)
    model.load_state_dict(outcome.final_arrays.to_torch_state_dict())
    per_client = []
    for node in nodes:
        test = data.clients[grid.nodes[node]][1]
        values = evaluate_task(task, model, torch.from_numpy(test.x), torch.from_numpy(test.y))
        per_client.append((len(test), values))
    means, examples, _ = weighted_metrics(per_client)
    assert last["fed_examples"] == examples
    assert last["fed_accuracy"] == pytest.approx(means["accuracy"], rel=1e-6)
    assert last["fed_loss"] == pytest.approx(means["loss"], rel=1e-6)
    assert last["evaluation"] == "central" and last["fed_downlink_bytes"] > 0


def test_a_deployed_coordinator_reports_federated_evaluation_only() -> None:
    _, _, outcome = _run(["compression.update_bits=8", "secagg.enabled=true"], deployed=True)
    assert math.isnan(outcome.initial["accuracy"]) and outcome.initial["evaluation"] == "none"
    for row in outcome.rows:
        assert math.isnan(row["train_loss"])  # no client data to compute it on
        if row["round"] % 2 == 0:
            assert row["evaluation"] == "federated"
            assert row["accuracy"] == row["fed_accuracy"] and row["fed_clients"] == 4
        else:
            assert row["evaluation"] == "none" and math.isnan(row["accuracy"])
    assert outcome.rows[-1]["fed_accuracy"] > max(0.6, outcome.rows[1]["fed_accuracy"])


def test_the_deployed_coordinator_never_asks_the_task_for_client_data() -> None:
    cfg = load_config(None, SMALL)
    task = cfg.task.build()

    def no_data(*_args: object) -> None:
        raise AssertionError("the deployed coordinator asked for federated data")

    task.federated_data = no_data  # type: ignore[method-assign]
    sets = evaluation_sets(cfg, task, task.build_model(0), deployed=True)
    assert (sets.input_shape, sets.num_classes, sets.test, sets.train) == ((1, 8, 8), 10,
                                                                          None, None)
    model = task.build_model(0)
    task.input_shape = None  # type: ignore[misc]
    with pytest.raises(ConfigError, match="must set input_shape"):
        evaluation_sets(cfg, task, model, deployed=True)


def test_weighted_metrics_bound_what_a_lying_client_can_do() -> None:
    honest = [(50, {"loss": 1.0, "accuracy": 0.8}), (150, {"loss": 0.5, "accuracy": 0.9})]
    means, examples, problems = weighted_metrics(honest)
    assert examples == 200 and not problems
    assert means == pytest.approx({"loss": 0.625, "accuracy": 0.875})
    lies = [(0, {"loss": 0.0, "accuracy": 1.0}), (-5, {"loss": 0.0, "accuracy": 1.0}),
            (10, {"loss": float("nan"), "accuracy": 1.0}), (10, {"loss": float("inf")}),
            (10**12, {"loss": 0.0, "accuracy": 1.0})]
    means, examples, problems = weighted_metrics([*honest, *lies], max_examples=1000)
    assert len(problems) == 4 and all(np.isfinite(list(means.values())))
    assert examples == 200 + 1000  # the huge claim counts as max_examples
    assert means["accuracy"] == pytest.approx((0.875 * 200 + 1000) / 1200)
