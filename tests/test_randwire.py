"""Tests for the RandWire model: wiring, registration, checkpointing, export, fleet training."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback import PLAIN, LoopbackGrid

from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.server_app import RunOutcome, run_rounds
from fleetfl.tasks.models import MODEL_NAMES, build_model
from fleetfl.tasks.randwire import RandWire, random_dag, sinks

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, torch's spinning worker threads make
    small models orders of magnitude slower when other jobs hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_dag_is_a_connected_ws_graph_pointing_forward() -> None:
    preds = random_dag(32, 4, 0.75, seed=0)
    assert len(preds) == 32
    assert all(p < i for i, ps in enumerate(preds) for p in ps)  # acyclic, indices topological
    assert sum(len(ps) for ps in preds) == 32 * 4 // 2  # WS keeps n*k/2 edges
    assert preds == random_dag(32, 4, 0.75, seed=0)
    assert preds != random_dag(32, 4, 0.75, seed=1)
    # Connected: every node reaches a sink, and every node is reached from a source.
    succ: list[list[int]] = [[] for _ in preds]
    for i, ps in enumerate(preds):
        for p in ps:
            succ[p].append(i)
    reach_sink = set(sinks(preds))
    for i in reversed(range(32)):
        if any(s in reach_sink for s in succ[i]):
            reach_sink.add(i)
    assert reach_sink == set(range(32))
    with pytest.raises(ValueError, match="even"):
        random_dag(8, 3, 0.5, seed=0)


def test_randwire_is_registered_for_digits() -> None:
    assert "randwire" in MODEL_NAMES
    model = build_model("randwire", (1, 8, 8), 10, seed=3)
    assert isinstance(model, RandWire)
    again = build_model("randwire", (1, 8, 8), 10, seed=3).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert all(v.is_floating_point() for v in again.values())  # what the update codec carries
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    # The wiring is fixed by graph_seed, not by the weight seed: every client has the same.
    assert build_model("randwire", (1, 8, 8), 10, seed=4).stage1.preds == model.stage1.preds
    with pytest.raises(ValueError, match="image"):
        build_model("randwire", (64,), 10)


def test_checkpointing_gives_the_same_gradients() -> None:
    model = build_model("randwire", (1, 8, 8), 10, seed=0)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    grads = []
    for enabled in (False, True):
        model.set_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(plain, ckpt, rtol=1e-5, atol=1e-6)


def _fixture_model() -> torch.nn.Module:
    """The model tests/fixtures/make_fixtures.py exported (seed 0)."""
    torch.manual_seed(0)
    return RandWire(10, 1).eval()


def test_onnx_fixture_is_the_current_architecture() -> None:
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(1).standard_normal((1, 1, 128, 128)).astype(np.float32)
    session = ort.InferenceSession(str(FIXTURES / "randwire_128.onnx"),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = _fixture_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_tflite_fixture_is_the_current_architecture() -> None:
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    x = np.random.default_rng(1).standard_normal((1, 1, 128, 128)).astype(np.float32)
    interpreter = interpreter_module.Interpreter(str(FIXTURES / "randwire_128.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    with torch.no_grad():
        expected = _fixture_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
def test_randwire_trains_in_the_fleet() -> None:
    """Real ServerApp and ClientApp over loopback delivery: every update decodes, passes
    screening and is aggregated, and local training makes progress from chance (ln 10)."""
    cfg = load_config(None, [
        *PLAIN, "task.dataset=digits", "task.model=randwire", "federation.num_clients=4",
        "federation.clients_per_round=2", "federation.rounds=2", "federation.local_epochs=1",
        "federation.batch_size=32", "federation.lr=0.1", "fleet.mix={rpi4=1}",
    ])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(cfg.federation.num_clients), cfg, outcome)
    assert [(r["aggregated"], r["rejected"], r["failed"]) for r in outcome.rows] == [(2, 0, 0)] * 2
    losses = [r["client_train_loss"] for r in outcome.rows]
    assert losses[1] < losses[0] < math.log(10)
