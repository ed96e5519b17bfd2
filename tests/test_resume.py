"""Checkpoints and crash recovery of the round loop: real ServerApp code, loopback clients.

A run interrupted after round 2 and resumed from its round store must end with the same global
model as a run that was never interrupted (nothing lost, nothing applied twice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from loopback import PLAIN, LoopbackGrid

from fleetfl import protocol as P
from fleetfl.coordinator.checkpoint import load_checkpoint
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.coordinator.state import RoundStore, StateError

# Pruning reaches 50 % at round 3 and int8 clip ranges adapt, so a resume must restore both.
# Error feedback is off: its residual lives in each client's context, which a loopback grid
# rebuilt for the second process does not carry over (a real SuperNode keeps it per run).
SETTINGS = [
    *PLAIN,
    "task.dataset=digits", "task.model=cnn", "federation.num_clients=6",
    "federation.clients_per_round=3", "federation.local_epochs=1", "fleet.mix={rpi4=1}",
    "compression.update_bits=8", "compression.error_feedback=false",
    "compression.prune_final_sparsity=0.5", "compression.prune_start_round=1",
    "compression.prune_end_round=3",
]


def _run(rounds: int, **kwargs) -> tuple[RunOutcome, LoopbackGrid]:
    cfg = load_config(None, [*SETTINGS, f"federation.rounds={rounds}"])
    grid = LoopbackGrid(cfg.federation.num_clients)
    outcome = RunOutcome()
    run_rounds(grid, cfg, outcome, **kwargs)
    return outcome, grid


def _weights(outcome: RunOutcome) -> list[np.ndarray]:
    assert outcome.final_arrays is not None
    return outcome.final_arrays.to_numpy_ndarrays()


def test_resume_after_a_crash_gives_the_uninterrupted_model(tmp_path: Path) -> None:
    whole, _ = _run(4)
    store = RoundStore(tmp_path / "rounds")
    first, _ = _run(2, store=store)  # "crashes" after committing round 2
    store.release()
    assert RoundStore(tmp_path / "rounds").last_round() == 2
    resumed, grid = _run(4, store=RoundStore(tmp_path / "rounds"))

    sent_rounds = {m.content[P.CONFIG][P.SERVER_ROUND] for m in grid.sent
                   if m.metadata.message_type == "train"}
    assert sent_rounds == {3, 4}  # only the unfinished rounds run again
    assert [r["round"] for r in resumed.rows] == [1, 2, 3, 4]
    assert resumed.rows[:2] == first.rows
    for a, b in zip(_weights(whole), _weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_store_made_with_another_configuration_is_refused(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    _run(1, store=store)
    store.release()
    cfg = load_config(None, [*SETTINGS, "federation.rounds=2", "federation.lr=0.5"])
    with pytest.raises(StateError, match="federation.lr"):
        run_rounds(LoopbackGrid(6), cfg, RunOutcome(), store=RoundStore(tmp_path))


def test_the_final_checkpoint_rebuilds_the_global_model(tmp_path: Path) -> None:
    outcome, _ = _run(3, checkpoint_path=tmp_path / "model.pt")
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt.server_round == 3
    assert ckpt.task["name"] == "digits" and ckpt.task["params"]["model"] == "cnn"
    assert tuple(ckpt.task["input_shape"]) == (1, 8, 8)
    assert ckpt.masks is not None and ckpt.quantization["update_bits"] == 8
    model = ckpt.build_model()
    for got, want in zip(model.state_dict().values(), _weights(outcome), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
