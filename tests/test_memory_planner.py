"""Tests for training-memory prediction and planning (fleetfl.devices.memory_planner/_stats)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from fleetfl.client.solver import fedprox_train
from fleetfl.devices.memory_planner import (
    ActivationCost,
    TrainingMemoryStats,
    check_plan,
    config_settings,
    fit_training_plan,
    predict_peak,
)
from fleetfl.devices.memory_stats import (
    resident_bytes,
    trace_training_step,
    training_memory_stats,
)
from fleetfl.tasks.models import build_model

KIB, MIB = 1024, 2**20
DIGITS = (1, 8, 8)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, torch's spinning worker threads make
    small models orders of magnitude slower when other jobs hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_stats(checkpointing: bool = True) -> TrainingMemoryStats:
    """1 MiB each of weights, gradients and optimizer state; 100 KiB saved and 20 KiB
    workspace per sample (a quarter of the saved part with checkpointing)."""
    return TrainingMemoryStats(
        weight_bytes=MIB, grad_bytes=MIB, optimizer_state_bytes=MIB, update_workspace_bytes=0,
        plain=ActivationCost(0, 100 * KIB, 0, 20 * KIB, grads_at_peak=MIB // 2),
        checkpointed=ActivationCost(0, 25 * KIB, 0, 20 * KIB, grads_at_peak=MIB // 2)
        if checkpointing else None,
    )


def test_prediction_adds_up_the_parts() -> None:
    stats = toy_stats()
    single = predict_peak(stats, 10, 1, checkpointing=False)
    assert (single.weights, single.gradients, single.optimizer_state) == (MIB, MIB // 2, MIB)
    assert (single.activations, single.workspace) == (1000 * KIB, 200 * KIB)
    assert single.total == MIB + MIB // 2 + MIB + 1200 * KIB
    # Accumulating passes keep every gradient alive; a tiny pass peaks at the update instead.
    assert predict_peak(stats, 10, 2, checkpointing=False).gradients == MIB
    assert predict_peak(stats, 1, 1, checkpointing=False).total == 3 * MIB
    with pytest.raises(ValueError, match="checkpointing"):
        predict_peak(toy_stats(checkpointing=False), 10, 1, checkpointing=True)


def test_plan_keeps_the_batch_when_it_fits() -> None:
    plan = fit_training_plan(toy_stats(), 32, 100 * MIB, slack_bytes=0)
    assert (plan.micro_batch, plan.accumulation_steps, plan.checkpointing) == (32, 1, False)
    assert plan.fits and "fits as is" in plan.reason
    assert plan.predicted_peak_bytes == predict_peak(toy_stats(), 32, 1, False).total


def test_plan_prefers_micro_batches_then_checkpointing() -> None:
    stats = toy_stats()
    budget = 3 * MIB + 20 * 120 * KIB  # room for 20 samples per pass without checkpointing
    plan = fit_training_plan(stats, 64, budget, slack_bytes=0)
    assert plan.fits and not plan.checkpointing
    assert (plan.micro_batch, plan.accumulation_steps) == (16, 4)  # ceil(64 / 4) = 16 <= 20
    assert "gradient accumulation" in plan.reason and str(budget) in plan.reason
    # With room for only 4 plain samples per pass, checkpointing keeps passes >= 8 samples.
    tight = fit_training_plan(stats, 64, 3 * MIB + 4 * 120 * KIB + 1, slack_bytes=0,
                              min_micro_batch=8)
    assert tight.fits and tight.checkpointing and tight.micro_batch >= 8
    assert "activation checkpointing" in tight.reason


def test_plan_says_why_nothing_fits() -> None:
    plan = fit_training_plan(toy_stats(), 64, 2 * MIB, slack_bytes=0)
    assert not plan.fits
    assert plan.micro_batch == 1 and plan.checkpointing
    assert "no plan fits the budget of 2097152 bytes" in plan.reason
    assert "weights 1048576" in plan.reason
    reserved = fit_training_plan(toy_stats(), 8, 20 * MIB, reserved_bytes=18 * MIB,
                                 slack_bytes=0)
    assert not reserved.fits and reserved.predicted_peak_bytes > 20 * MIB
    # The default slack keeps 32 MiB free for what tensors do not show.
    assert not fit_training_plan(toy_stats(), 8, 30 * MIB).fits


def test_client_check_refuses_a_plan_that_does_not_fit() -> None:
    stats = toy_stats()
    assert check_plan(stats, 64, False, 64, 100 * MIB, slack_bytes=0) is None
    reason = check_plan(stats, 64, False, 64, 4 * MIB, slack_bytes=0)
    assert reason is not None and "over this device's budget of 4194304 bytes" in reason
    assert "does not support" in (check_plan(toy_stats(False), 8, True, 8, MIB) or "")


def test_stats_and_plan_travel_as_plain_config() -> None:
    stats = toy_stats()
    assert TrainingMemoryStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    plan = fit_training_plan(stats, 64, 5 * MIB, slack_bytes=0)
    config = plan.to_config()
    assert set(config) == {"plan.micro-batch", "plan.checkpointing", "plan.predicted-peak-bytes",
                           "plan.budget-bytes"}
    assert config_settings(config, 64) == (plan.micro_batch, plan.checkpointing)
    assert config_settings({}, 64) == (64, False)
    with pytest.raises(ValueError, match="plan.checkpointing"):
        config_settings({"plan.checkpointing": 1}, 64)


def test_resident_bytes_rounds_mmapped_blocks_to_pages() -> None:
    assert resident_bytes(1000) == 1000  # heap
    assert resident_bytes(16 * KIB) == 20 * KIB  # header and alignment spill into a 5th page
    assert resident_bytes(MIB) == MIB + 4 * KIB


def test_measured_stats_are_exact_for_weights_and_linear_in_batch() -> None:
    model = build_model("cnn", DIGITS, 10)
    stats = training_memory_stats(model, DIGITS)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert stats.weight_bytes == stats.grad_bytes == stats.optimizer_state_bytes == params
    assert stats.checkpointed is None  # DigitsCNN has no set_checkpointing
    trace = trace_training_step(model, DIGITS, 64)  # no optimizer: a bare forward/backward
    predicted = predict_peak(stats, 64, 1, False)
    step = predicted.total - predicted.weights - predicted.optimizer_state
    assert step == pytest.approx(trace.peak, rel=0.02)


def test_randwire_checkpointing_halves_its_activations() -> None:
    model = build_model("randwire", DIGITS, 10)
    plain = trace_training_step(model, DIGITS, 8)
    ckpt = trace_training_step(model, DIGITS, 8, checkpointing=True)
    assert ckpt.saved < 0.6 * plain.saved


def test_solver_micro_batches_give_the_batch_gradient() -> None:
    x, y = torch.randn(48, *DIGITS), torch.arange(48) % 10
    results = []
    for micro in (None, 7):
        model = build_model("cnn", DIGITS, 10, seed=1)
        fedprox_train(model, x, y, mu=0.1, lr=0.1, batch_size=24, steps=2, seed=0,
                      micro_batch=micro)
        results.append([p.detach().clone() for p in model.parameters()])
    for full, accumulated in zip(*results, strict=True):
        torch.testing.assert_close(full, accumulated, rtol=1e-4, atol=1e-6)


CHILD = """
import copy, json, sys, torch
from fleetfl.devices.memory_stats import peak_rss_delta, pin_mmap_threshold, release_free_memory
from fleetfl.client.solver import fedprox_train
from fleetfl.tasks.models import build_model
pin_mmap_threshold()
torch.set_num_threads(1)
name, batch, micro, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
model = build_model(name, (1, 8, 8), 10)
x, y = torch.randn(batch, 1, 8, 8), torch.arange(batch) % 10
kw = dict(mu=0.01, lr=0.05, batch_size=batch, seed=0, micro_batch=micro, checkpointing=ckpt)
fedprox_train(copy.deepcopy(model), x, y, steps=1, **kw)  # code pages, kernel caches
release_free_memory()
delta = peak_rss_delta(lambda: fedprox_train(model, x, y, steps=2, **kw))
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(delta + weights))
"""


def measured_peak(name: str, batch: int, micro: int, checkpointing: bool) -> int:
    """Peak bytes of two solver steps in a fresh process: VmHWM rise plus the weights."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(batch), str(micro), str(int(checkpointing))],
        capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_prediction_matches_a_measured_peak_cnn() -> None:
    stats = training_memory_stats(build_model("cnn", DIGITS, 10), DIGITS)
    predicted = predict_peak(stats, 256, 1, False).total
    assert predicted == pytest.approx(measured_peak("cnn", 256, 256, False), rel=0.15)


@pytest.fixture(scope="module")
def randwire_stats() -> TrainingMemoryStats:
    return training_memory_stats(build_model("randwire", DIGITS, 10), DIGITS)


@pytest.mark.e2e
@pytest.mark.parametrize(("micro", "checkpointing"), [(128, False), (32, False), (128, True)])
def test_prediction_matches_a_measured_peak_randwire(
    randwire_stats: TrainingMemoryStats, micro: int, checkpointing: bool
) -> None:
    stats = randwire_stats
    predicted = predict_peak(stats, micro, 128 // micro, checkpointing).total
    assert predicted == pytest.approx(measured_peak("randwire", 128, micro, checkpointing),
                                      rel=0.15)
