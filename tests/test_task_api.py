"""Bring your own model and data: a task defined here, outside the package, runs everything.

``TinyTask`` is a user's task as the README shows it: a subclass of ``fleetfl.Task`` with its
own model (an MLP fleetfl has never heard of) and its own federated data (Gaussian blobs, a
different mean per class, label-skewed over clients). It is named in the config as
``test_task_api:TinyTask`` (``module:attribute``, imported from the path) with
``[task.params]``, and trains through the real round loop (ServerApp, strategy, ClientApp).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid
from torch import nn

import fleetfl
from fleetfl.coordinator.config import ConfigError, load_config
from fleetfl.coordinator.preflight import preflight
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.tasks.registry import TaskError, resolve_task


class TinyTask(fleetfl.Task):
    """4 Gaussian classes in ``dim`` dimensions; an MLP with ``hidden`` units."""

    def __init__(self, dim: int = 12, hidden: int = 24, recurrent: bool = False) -> None:
        self.dim, self.hidden, self.recurrent = dim, hidden, recurrent

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.recurrent:
            return _Recurrent(self.dim, self.hidden)
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, 4))

    def federated_data(self, num_clients: int, seed: int) -> fleetfl.FederatedDataset:
        rng = np.random.default_rng(seed)
        means = rng.normal(0, 1.5, (4, self.dim))

        def split(labels: np.ndarray) -> fleetfl.Split:
            x = means[labels] + rng.normal(0, 1.0, (len(labels), self.dim))
            return fleetfl.Split(x=x.astype(np.float32), y=labels.astype(np.int64))

        clients = tuple((split(rng.choice(4, 60, p=rng.dirichlet([0.5] * 4))),
                         split(rng.integers(0, 4, 20))) for _ in range(num_clients))
        return fleetfl.FederatedDataset(name="tiny", clients=clients,
                                        test=split(rng.integers(0, 4, 400)),
                                        input_shape=(self.dim,), num_classes=4)


class _Recurrent(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.unsqueeze(-1))
        return self.head(out[:, -1])


def tiny_factory(**params: object) -> TinyTask:
    return TinyTask(**params)  # type: ignore[arg-type]


TINY = ["task.name=test_task_api:TinyTask", "task.params={dim = 12, hidden = 24}",
        "federation.num_clients=8", "federation.clients_per_round=8", "federation.rounds=4",
        "federation.local_epochs=2", "federation.lr=0.1", "fleet.mix={rpi4=1}"]


def _run(overrides: list[str]) -> RunOutcome:
    cfg = load_config(None, [*TINY, *overrides])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(cfg.federation.num_clients), cfg, outcome)
    return outcome


def test_a_users_task_learns_with_pruning_int8_and_secure_aggregation() -> None:
    outcome = _run(["compression.update_bits=8", "compression.prune_final_sparsity=0.5",
                    "compression.prune_end_round=3", "secagg.enabled=true"])
    first, last = outcome.initial, outcome.rows[-1]
    assert last["accuracy"] > max(0.8, first["accuracy"] + 0.3), (first, last)
    assert last["loss"] < first["loss"]
    assert last["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(r["aggregated"] == r["selected"] >= 5 and r["secagg_aborted"] == 0
               for r in outcome.rows)
    # Pruning zeroed exactly the task's prunable tensors (the two weight matrices).
    weights = dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"],
                       outcome.final_arrays.to_numpy_ndarrays(), strict=True))
    pruned = sum(int((weights[k] == 0).sum()) for k in ("0.weight", "2.weight"))
    assert pruned / (weights["0.weight"].size + weights["2.weight"].size) == pytest.approx(0.5,
                                                                                       abs=0.01)
    assert (weights["0.bias"] != 0).all() and (weights["2.bias"] != 0).all()


def test_the_task_can_be_a_class_an_instance_or_a_factory() -> None:
    assert isinstance(resolve_task("test_task_api:TinyTask", {"dim": 3}), TinyTask)
    assert resolve_task("test_task_api:tiny_factory", {"hidden": 5}).hidden == 5
    instance = resolve_task("test_task_api:TINY_INSTANCE")
    assert instance is TINY_INSTANCE and instance.name == "test_task_api:TINY_INSTANCE"
    with pytest.raises(TaskError, match="takes no parameters"):
        resolve_task("test_task_api:TINY_INSTANCE", {"dim": 3})
    with pytest.raises(TaskError, match="not a Task"):
        resolve_task("test_task_api:TINY")


TINY_INSTANCE = TinyTask(dim=5)


@pytest.mark.parametrize(("override", "key", "words"), [
    ("task.params.depth=3", "task.params", "unexpected keyword argument 'depth'"),
    ("task.name=test_task_api:NoSuchTask", "task.name", "no attribute 'NoSuchTask'"),
    ("task.name=no_such_module:Task", "task.name", "cannot import 'no_such_module'"),
])
def test_a_bad_task_is_one_error_naming_the_key(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, override])
    assert info.value.key == key and words in str(info.value)


def test_a_layer_qat_cannot_quantize_stops_the_run_at_start_up() -> None:
    cfg = load_config(None, [*TINY, "task.params.recurrent=true", "compression.qat=true"])
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert info.value.key == "compression.qat" and "'rnn' (LSTM)" in str(info.value)
    preflight(load_config(None, [*TINY, "task.params.recurrent=true"]))  # without QAT: fine


def test_the_coordinators_start_up_checks_run_in_a_child_and_name_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fleetfl coordinator start` runs the deployed checks in a child process (its own
    process never loads torch): a failed check is the same ConfigError, key and words."""
    from pathlib import Path

    from fleetfl.coordinator.service_cmd import preflight_in_child

    here = str(Path(__file__).resolve().parent)  # where test_task_api:TinyTask imports from
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here,
                                                                   os.environ.get("PYTHONPATH")])))
    cfg = load_config(None, TINY)  # deployed, TinyTask lacks input_shape: a task.name error
    with pytest.raises(ConfigError) as here:
        preflight(cfg, deployed=True)
    with pytest.raises(ConfigError) as child:
        preflight_in_child(cfg)
    assert (child.value.key, str(child.value)) == (here.value.key, str(here.value))
    assert child.value.key == "task.name" and "input_shape" in str(child.value)
    preflight_in_child(load_config(None, []))  # the built-in digits task passes


def test_a_model_that_does_not_fit_its_data_stops_the_run_at_start_up() -> None:
    class Wrong(TinyTask):
        def build_model(self, seed: int) -> nn.Module:
            return nn.Linear(self.dim + 1, 4)

    cfg = load_config(None, TINY)
    task = Wrong()
    task.name = "Wrong"
    from fleetfl.coordinator.preflight import check_task

    with pytest.raises(ConfigError, match="fails on its data"):
        check_task(cfg, task, task.build_model(0), task.federated_data(2, 0).test.x[:2])


def test_builtin_tasks_keep_their_old_keys() -> None:
    old = load_config(None, ["task.dataset=synthetic", "task.model=logreg", "task.alpha=0.5",
                             "task.partition_alpha=0.3"])  # partition_alpha: digits only
    assert (old.task.name, old.task.params) == ("synthetic", {"model": "logreg", "alpha": 0.5})
    new = load_config(None, ["task.name=synthetic", "task.params.alpha=0.5",
                             "task.params.model=logreg"])
    assert new.task == old.task


@pytest.mark.e2e
def test_simulate_leaves_environment_and_logging_as_it_found_them(tmp_path) -> None:
    import torch
    from threadpoolctl import threadpool_info

    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's; the run uses one in this process, then restores
    pools = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
    before = (dict(os.environ), root.level, list(root.handlers), flwr.level,
              list(flwr.handlers), torch.get_num_threads(), pools)
    try:
        summary = fleetfl.simulate({"federation": {"num_clients": 4, "clients_per_round": 2,
                                                   "rounds": 1}, "fleet": {"mix": {"rpi4": 1}},
                                    "output": {"plot": False}}, out=tmp_path / "run")
        now = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
        after = (dict(os.environ), root.level, list(root.handlers), flwr.level,
                 list(flwr.handlers), torch.get_num_threads(), {k: now[k] for k in pools})
    finally:
        torch.set_num_threads(threads)
    assert summary["rounds"] == 1 and (tmp_path / "run" / "summary.json").is_file()
    assert after == before


def test_ray_workers_get_one_blas_thread_per_reserved_cpu() -> None:
    """Each simulated client's BLAS/OpenMP pool matches the CPUs Ray reserves for it."""
    from fleetfl.coordinator.simulate import worker_thread_env

    for cpus, threads in ((1.0, "1"), (0.5, "1"), (2.0, "2")):
        config = load_config(None, [f"federation.client_cpus={cpus}"])
        assert worker_thread_env(config) == {"OMP_NUM_THREADS": threads,
                                             "MKL_NUM_THREADS": threads,
                                             "OPENBLAS_NUM_THREADS": threads}
