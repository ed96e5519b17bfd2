"""Simulated clients' state on the workers' disk (client/state_store.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from loopback import LoopbackGrid

from fleetfl.client import state_store
from fleetfl.client.state_store import offloaded, state_path
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds


def _context(node: int = 7) -> Context:
    return Context(run_id=3, node_id=node, node_config={}, state=RecordDict(), run_config={})


def test_state_goes_to_disk_and_comes_back(tmp_path: Path) -> None:
    ctx = _context()
    with offloaded(ctx, tmp_path):
        ctx.state["ef"] = ArrayRecord.from_array_dict({"w": Array(np.arange(5, dtype=np.float32))})
        ctx.state["cfg"] = ConfigRecord({"round": 4})
    assert len(ctx.state) == 0  # nothing travels back to the coordinator
    assert state_path(tmp_path, ctx).stat().st_mode & 0o777 == 0o600
    with offloaded(ctx, tmp_path):
        np.testing.assert_array_equal(ctx.state.array_records["ef"]["w"].numpy(),
                                      np.arange(5, dtype=np.float32))
        assert ctx.state.config_records["cfg"]["round"] == 4
    other = _context(node=8)
    with offloaded(other, tmp_path):
        assert len(other.state) == 0  # per node


def test_without_a_store_the_context_keeps_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(state_store.ENV, raising=False)
    ctx = _context()
    with offloaded(ctx):
        ctx.state["cfg"] = ConfigRecord({"a": 1})
    assert ctx.state.config_records["cfg"]["a"] == 1


def test_a_torn_file_costs_the_client_its_state_only(tmp_path: Path) -> None:
    ctx = _context()
    path = state_path(tmp_path, ctx)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x0a\xff\xff not a proto")
    with offloaded(ctx, tmp_path):
        assert len(ctx.state) == 0


def test_a_handler_that_raises_keeps_the_state_it_was_given(tmp_path: Path) -> None:
    ctx = _context()
    with offloaded(ctx, tmp_path):
        ctx.state["cfg"] = ConfigRecord({"a": 1})
    with pytest.raises(RuntimeError), offloaded(ctx, tmp_path):
        raise RuntimeError("training failed")
    assert ctx.state.config_records["cfg"]["a"] == 1


def test_the_full_stack_gives_the_same_model_with_state_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults (int8 with error feedback, pruning, SecAgg+): the residual, masks and SecAgg+
    secrets round-trip through the store, and the model is the same, bit for bit."""
    overrides = ["task.dataset=digits", "task.model=logreg", "federation.num_clients=6",
                 "federation.clients_per_round=4", "federation.rounds=2",
                 "federation.local_epochs=1", "fleet.mix={rpi4=1}"]

    def run() -> tuple[list[np.ndarray], LoopbackGrid]:
        cfg = load_config(None, overrides)
        grid, outcome = LoopbackGrid(cfg.federation.num_clients), RunOutcome()
        run_rounds(grid, cfg, outcome)
        assert outcome.final_arrays is not None
        return outcome.final_arrays.to_numpy_ndarrays(), grid

    monkeypatch.delenv(state_store.ENV, raising=False)
    in_context, grid = run()
    assert any(len(c.state) > 0 for c in grid.contexts.values())
    monkeypatch.setenv(state_store.ENV, str(tmp_path))
    on_disk, grid = run()
    assert all(len(c.state) == 0 for c in grid.contexts.values())
    assert len(list(tmp_path.glob("*/*.pb"))) == 6
    for a, b in zip(in_context, on_disk, strict=True):
        np.testing.assert_array_equal(a, b)
