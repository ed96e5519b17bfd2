"""Server optimizers (FedAvgM, FedAdam, FedYogi): the update rules, and in the round loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from loopback import LoopbackGrid

from fleetfl.aggregation.server_opt import ServerOptimizer
from fleetfl.coordinator.config import ConfigError, load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds


def test_none_is_the_plain_update() -> None:
    delta = {"w": np.array([1.0, -2.0], np.float32)}
    assert np.array_equal(ServerOptimizer().step(delta)["w"], delta["w"])


def test_fedavgm_accumulates_momentum() -> None:
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    d = {"w": np.array([1.0])}
    assert opt.step(d)["w"][0] == pytest.approx(0.5)
    assert opt.step(d)["w"][0] == pytest.approx(0.5 * 1.9)


def test_fedadam_matches_reddi_with_adams_bias_correction() -> None:
    opt = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    d1, d2 = np.array([0.2, -0.4]), np.array([0.1, 0.3])
    m, v = 0.1 * d1, 0.01 * d1**2
    s1 = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9) * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(opt.step({"w": d1})["w"], s1)
    m, v = 0.9 * m + 0.1 * d2, 0.99 * v + 0.01 * d2**2
    s2 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(opt.step({"w": d2})["w"], s2)


def test_fedyogi_moves_v_additively_towards_the_squared_update() -> None:
    opt = ServerOptimizer("fedyogi", beta2=0.99)
    opt.step({"w": np.array([1.0])})
    assert opt.v["w"][0] == pytest.approx(0.01)  # from 0: v - 0.01 * 1 * sign(0 - 1)
    opt.step({"w": np.array([0.0])})
    assert opt.v["w"][0] == pytest.approx(0.01)  # Δ² = 0: v unchanged (Adam would decay it)


def test_the_state_round_trips() -> None:
    a = ServerOptimizer("fedadam")
    for x in (0.3, -0.2):
        a.step({"w": np.array([x])})
    b = ServerOptimizer("fedadam")
    b.restore(a.state())
    d = {"w": np.array([0.5])}
    assert b.step(d)["w"][0] == a.step(d)["w"][0]


def test_fedadam_trains_in_the_round_loop_and_keeps_pruned_weights_at_zero() -> None:
    cfg = load_config(None, [
        "task.dataset=digits", "task.model=logreg", "federation.num_clients=10",
        "federation.clients_per_round=10", "federation.rounds=5", "federation.local_epochs=2",
        "federation.lr=0.1", "fleet.mix={rpi4=1}", "strategy.server_optimizer=fedadam",
        "strategy.server_lr=0.03", "compression.prune_final_sparsity=0.5",
        "compression.prune_end_round=3"])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(10), cfg, outcome)
    assert outcome.rows[-1]["accuracy"] > outcome.initial["accuracy"] + 0.3
    weight = outcome.final_arrays.to_numpy_ndarrays()[0]
    assert (weight == 0).mean() == pytest.approx(0.5, abs=0.01)


def test_a_bad_server_optimizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.server_optimizer=adamw"])
    assert err.value.key == "strategy.server_optimizer"
