"""The phone runtime: the task's training program in ExecuTorch trains as the torch client does.

The program is exported once per module through the real CLI (``fleetfl export --format
executorch-train``) and run in ExecuTorch's own runtime (the portable kernels a phone build
has); rounds run the real ServerApp, strategy and ClientApp in-process (``LoopbackGrid``).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback import LoopbackGrid

from fleetfl.client import programs
from fleetfl.client.solver import fedprox_train
from fleetfl.client.solver_executorch import ProgramRunner, fedprox_train_executorch
from fleetfl.client.training_program import (
    ProgramExportError,
    build_training_program,
    load_program,
)
from fleetfl.coordinator.checkpoint import save_checkpoint
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.config_sections import ConfigError
from fleetfl.coordinator.export_cmd import main as export_main
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.devices.fleet import DEFAULT_MIX
from fleetfl.tasks.builtin import DigitsTask
from fleetfl.tasks.task import Task

TASK = {"dataset": "digits", "model": "cnn", "alpha": 1.0, "beta": 1.0, "iid": False,
        "partition_alpha": 0.5, "seed": 0, "num_clients": 8, "input_shape": [1, 8, 8],
        "num_classes": 10}
ROUNDS = ["task.dataset=digits", "task.model=cnn", "federation.num_clients=8",
          "federation.clients_per_round=8", "federation.local_epochs=1",
          "federation.batch_size=32", "federation.lr=0.1"]
ALL_EXECUTORCH = "fleet.runtimes=" + "{" + ", ".join(
    f'{name} = "executorch"' for name in DEFAULT_MIX) + "}"
PHONES_EXECUTORCH = 'fleet.runtimes={phone-low = "executorch", phone-mid = "executorch", ' \
                    'phone-high = "executorch"}'


pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # The [executorch] extra is x86-64 only (pyproject.toml); elsewhere its absence is expected.
    pytest.mark.skipif(platform.machine() == "aarch64", reason="no ExecuTorch extra on aarch64"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN's training program, written by ``fleetfl export``."""
    out = tmp_path_factory.mktemp("executorch")
    model = DigitsTask().build_model(0)
    ckpt = save_checkpoint(out / "model.pt", state_dict=model.state_dict(), task=TASK,
                           server_round=0)
    pte = out / "digits-train.pte"
    argv = ["export", "--checkpoint", str(ckpt), "--format", "executorch-train",
            "--max-batch", "64", "--out", str(pte)]
    assert export_main(argv) == 0
    return pte


def test_export_writes_the_program_and_its_manifest(exported: Path) -> None:
    program = load_program(exported)
    manifest = json.loads(exported.with_name(exported.name + ".json").read_text())
    assert manifest["format"] == 1 and manifest["max_batch"] == 64
    assert [name for name, _ in program.manifest.parameters] == [
        name for name, _ in DigitsTask().build_model(0).named_parameters()]
    assert program.manifest.masked == DigitsTask().prunable(DigitsTask().build_model(0))
    assert program.manifest.planned_bytes > 0 and exported.stat().st_size > 38_000 * 4


def _problem(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], torch.Tensor,
                                     torch.Tensor]:
    """Global weights with 70 % of each prunable tensor pruned, its masks, and a data shard."""
    rng = np.random.default_rng(seed)
    task = DigitsTask()
    model = task.build_model(seed)
    weights = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    masks = {k: (rng.random(weights[k].shape) > 0.7).astype(np.float32)
             for k in task.prunable(model)}
    for name, mask in masks.items():
        weights[name] *= mask
    x = torch.from_numpy(rng.standard_normal((90, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 90))
    return weights, masks, x, y


def _torch_round(weights, masks, x, y, **solve):
    model = DigitsTask().build_model(0)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    params = dict(model.named_parameters())
    tmasks = {k: torch.from_numpy(m) for k, m in masks.items()}

    def keep_pruned() -> None:
        with torch.no_grad():
            for name, mask in tmasks.items():
                params[name].mul_(mask)

    result = fedprox_train(model, x, y, post_step=keep_pruned, loss_fn=DigitsTask().loss,
                           **solve)
    return result, {k: v.detach().numpy() for k, v in model.named_parameters()}


@pytest.mark.parametrize("micro_batch", [None, 7])
def test_a_local_round_in_executorch_equals_the_torch_round(exported: Path,
                                                            micro_batch: int | None) -> None:
    weights, masks, x, y = _problem()
    solve = dict(mu=0.5, lr=0.1, batch_size=32, steps=9, seed=3)
    runner = ProgramRunner(load_program(exported))
    et_result, et_weights = fedprox_train_executorch(runner, weights, masks, x, y,
                                                     micro_batch=micro_batch, **solve)
    ref_result, ref_weights = _torch_round(weights, masks, x, y, **solve)
    assert (et_result.steps, et_result.samples) == (ref_result.steps, ref_result.samples)
    assert (et_result.steps, et_result.samples) == (9, 270)  # 3 epochs of 32 + 32 + 26
    assert et_result.mean_loss == pytest.approx(ref_result.mean_loss, rel=1e-5)
    assert max(float(np.abs(ref - weights[k]).max()) for k, ref in ref_weights.items()) > 0.01
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(et_weights[name], ref, rtol=0, atol=1e-5)


def test_the_program_keeps_pruned_weights_at_exactly_zero(exported: Path) -> None:
    weights, masks, x, y = _problem(seed=1)
    runner = ProgramRunner(load_program(exported))
    _, trained = fedprox_train_executorch(runner, weights, masks, x, y, mu=0.1, lr=0.5,
                                          batch_size=16, steps=12, seed=0)
    for name, mask in masks.items():
        assert np.all(trained[name][mask == 0] == 0.0)
        assert np.count_nonzero(trained[name][mask == 1]) == int(mask.sum())


class _SortTask(Task):
    """A model whose forward uses an op ExecuTorch's CPU runtime has no kernel for."""

    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)

        class Sorting(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = torch.nn.Linear(6, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(torch.sort(x, dim=1).values)

        return Sorting()


def test_a_model_that_cannot_run_in_executorch_fails_naming_the_op() -> None:
    task = _SortTask()
    example = (np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ProgramExportError, match=r"aten::sort"):
        build_training_program(task, task.build_model(0), example)


class _LinearTask(Task):
    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Linear(6, 3)


def test_one_example_and_a_small_max_batch_still_export_a_dynamic_batch() -> None:
    task = _LinearTask()
    example = (np.ones((1, 6), np.float32), np.zeros(1, np.int64))
    program = build_training_program(task, task.build_model(0), example, max_batch=4)
    assert program.manifest.max_batch == 4
    weights = {k: v.detach().numpy() for k, v in task.build_model(0).named_parameters()}
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    result, _ = fedprox_train_executorch(ProgramRunner(program), weights, {}, x, y, mu=0.0,
                                         lr=0.1, batch_size=7, steps=2, seed=0)
    assert (result.steps, result.samples) == (2, 10)  # a batch of 7 in passes of <= 4, then 3


def test_a_model_with_buffers_is_refused_with_the_reason() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64),
                                torch.nn.Linear(64, 10))
    example = (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ProgramExportError, match="BatchNorm"):
        build_training_program(DigitsTask(), model, example)


def _run(*overrides: str, rounds: int, program: Path | None = None
         ) -> tuple[RunOutcome, LoopbackGrid]:
    """The real round loop in-process; ``program``: the clients load this ``.pte`` rather than
    export their task's (the same program, without the export's seconds)."""
    cfg = load_config(None, [*ROUNDS, f"federation.rounds={rounds}", *overrides])
    grid = LoopbackGrid(cfg.federation.num_clients)
    if program is not None:
        for context in grid.contexts.values():
            context.node_config[programs.PROGRAM] = str(program)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome)
    return outcome, grid


def test_one_round_in_executorch_gives_the_torch_round_s_model(exported: Path) -> None:
    """Same weights, plans and seeds: the fleet's fp32 updates, hence the new global model,
    agree to float tolerance whichever runtime the clients train in."""
    small = ["federation.num_clients=4", "federation.clients_per_round=4"]
    torch_run, _ = _run(*small, rounds=1)
    et_run, _ = _run(*small, ALL_EXECUTORCH, rounds=1, program=exported)
    assert et_run.rows[0]["executorch"] == et_run.rows[0]["aggregated"] > 0
    assert torch_run.rows[0]["executorch"] == 0
    mine, ref = et_run.final_arrays, torch_run.final_arrays
    for key in ref:
        np.testing.assert_allclose(mine[key].numpy(), ref[key].numpy(), atol=1e-5)


@pytest.mark.e2e
def test_a_mixed_fleet_learns_as_well_as_an_all_torch_one() -> None:
    """Phones in ExecuTorch, boards in torch, with pruning and int8 updates."""
    # The logistic-regression model: ExecuTorch's portable conv kernels take ~0.1 s per CNN
    # step, too slow for 4 rounds here (the CNN's 30 rounds are in BENCHMARKS.md).
    full = ["task.model=logreg", "compression.update_bits=8",
            "compression.prune_final_sparsity=0.5", "compression.prune_start_round=1",
            "compression.prune_end_round=3",
            "task.params.iid=true", "federation.local_epochs=5", "federation.lr=0.2"]
    torch_run, _ = _run(*full, rounds=4)
    mixed, _ = _run(*full, PHONES_EXECUTORCH, rounds=4)
    assert sum(r["executorch"] for r in mixed.rows) > 0
    assert sum(r["executorch"] for r in mixed.rows) < sum(r["aggregated"] for r in mixed.rows)
    assert torch_run.rows[-1]["accuracy"] > 0.6  # it learns at all
    assert mixed.rows[-1]["accuracy"] >= torch_run.rows[-1]["accuracy"] - 0.02


@pytest.mark.parametrize(("override", "key", "message"), [
    ('fleet.runtimes={pixel-9 = "executorch"}', "fleet.runtimes", "unknown device profile"),
    ('fleet.runtimes={phone-low = "tflite"}', "fleet.runtimes", "valid runtimes"),
    ("compression.qat=true", "compression.qat", "not available in the ExecuTorch runtime"),
])
def test_runtime_config_errors_name_the_key(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [PHONES_EXECUTORCH, override])
    assert err.value.key == key


def test_a_device_picks_its_runtime_and_a_simulated_client_its_profile_s(exported: Path) -> None:
    from fleetfl.client.local import load_local_task, task_settings
    from fleetfl.coordinator.server_app import message_config

    cfg = message_config(load_config(None, [*ROUNDS, PHONES_EXECUTORCH]))
    settings = task_settings(cfg)
    for index in range(8):
        local = load_local_task(settings, {"partition-id": index})
        expected = "executorch" if local.device.name.startswith("phone") else "torch"
        assert programs.runtime_of(cfg, {"partition-id": index}, local) == expected
    device = {"data-path": "x.npz", "runtime": "executorch", "program": str(exported)}
    assert programs.runtime_of(cfg, device, local) == "executorch"
    with pytest.raises(ValueError, match="unknown training runtime"):
        programs.runtime_of(cfg, {**device, "runtime": "coreml"}, local)


def test_the_admission_check_uses_the_program_s_planned_memory() -> None:
    from types import SimpleNamespace

    from fleetfl.client.memory import decide_program
    from fleetfl.devices.memory_planner import MIB
    from fleetfl.devices.profiles import get_profile

    local = SimpleNamespace(device=get_profile("phone-low"))
    budget = get_profile("phone-low").memory_budget_bytes
    program = 20 * MIB
    room = {"fleet.runtime_memory_mib": (budget - 2 * program) / MIB}
    full = {"fleet.runtime_memory_mib": (budget - program // 2) / MIB}
    assert decide_program(room, local, program, 32, measure=False).refusal is None
    refusal = decide_program(full, local, program, 32, measure=False).refusal
    assert refusal is not None and "ExecuTorch training program needs 20971520 bytes" in refusal
