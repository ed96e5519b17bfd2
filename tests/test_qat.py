"""Fake-quant QAT: int8 grids, straight-through gradients, state_dict left unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fleetfl.compression.qat import WEIGHT_QMAX, RangeObserver, enable_qat, fake_quant_weight
from fleetfl.tasks.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cnn() -> nn.Module:
    return build_model("cnn", (1, 8, 8), 10, seed=0)


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_weight_fake_quant_is_per_channel_symmetric_int8() -> None:
    w = torch.randn(6, 4, 3, 3) * torch.arange(1, 7).view(-1, 1, 1, 1)  # very different scales
    q = fake_quant_weight(w)
    scale = w.abs().amax(dim=(1, 2, 3)) / WEIGHT_QMAX
    levels = q / scale.view(-1, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= WEIGHT_QMAX + 1e-3
    # The largest weight of each channel is exactly representable; rounding error <= scale/2.
    assert torch.allclose(q.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)))
    assert ((q - w).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-6).all()


def test_weight_fake_quant_passes_gradient_straight_through() -> None:
    w = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    (fake_quant_weight(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_all_zero_channel_stays_zero() -> None:
    w = torch.randn(3, 4)
    w[1] = 0.0  # e.g. a channel removed by pruning
    assert torch.equal(fake_quant_weight(w)[1], torch.zeros(4))


def test_activation_observer_range_contains_zero_and_averages() -> None:
    obs = RangeObserver(momentum=0.5)
    obs.observe(torch.tensor([1.0, 3.0]))
    assert (obs.low, obs.high) == (1.0, 3.0)
    obs.observe(torch.tensor([-1.0, 5.0]))
    assert (obs.low, obs.high) == (0.0, 4.0)
    x = torch.linspace(-1, 5, 101)
    y = RangeObserver().fake_quant(x, update=True)
    scale = 6.0 / 255
    assert (y - x).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(RangeObserver().fake_quant(x, update=False), x)  # nothing observed yet


@pytest.mark.parametrize("name", ["cnn", "logreg", "randwire"])
def test_state_dict_and_parameters_unchanged(name: str) -> None:
    model = build_model(name, (1, 8, 8), 10, seed=0).eval()  # eval: batch-norm stats frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    handle = enable_qat(model)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert list(model.parameters()) == params
    assert all(p.grad is not None for p in params)
    handle.remove()


def test_forward_is_close_to_float_and_remove_restores_it(cnn: nn.Module) -> None:
    x, _ = _batch()
    cnn.eval()
    ref = cnn(x)
    with enable_qat(cnn) as handle:
        cnn.train()
        out = cnn(x)
        assert not torch.equal(out, ref)  # really fake-quantized
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()
        assert set(handle.activation_ranges()) == {
            "features.0:input", "features.2:input", "classifier.1:input", "classifier.3:input",
            "output"}
    cnn.eval()
    assert torch.equal(cnn(x), ref)
    assert all("forward" not in m.__dict__ for m in cnn.modules())


def test_training_under_qat_updates_every_parameter(cnn: nn.Module) -> None:
    x, y = _batch()
    with enable_qat(cnn):
        cnn.train()
        nn.functional.cross_entropy(cnn(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cnn.parameters())


def test_eval_mode_freezes_ranges(cnn: nn.Module) -> None:
    x, _ = _batch()
    with enable_qat(cnn) as handle:
        cnn.train()
        cnn(x)
        frozen = handle.activation_ranges()
        cnn.eval()
        cnn(x * 10)
        assert handle.activation_ranges() == frozen


def test_enabling_twice_is_an_error_and_remove_is_idempotent(cnn: nn.Module) -> None:
    handle = enable_qat(cnn)
    with pytest.raises(ValueError, match="already"):
        enable_qat(cnn)
    handle.remove()
    handle.remove()
    enable_qat(cnn).remove()
    with pytest.raises(ValueError, match="momentum"):
        enable_qat(cnn, momentum=0.0)


def test_deepcopy_keeps_its_own_fake_quant(cnn: nn.Module) -> None:
    with enable_qat(cnn):
        clone = copy.deepcopy(cnn)
    layer = clone.features[0]
    assert layer.forward.__self__ is layer  # bound to the copy, not to the original


def test_logreg_and_its_flatten_input() -> None:
    model = build_model("logreg", (1, 8, 8), 10, seed=0)
    x, y = _batch()
    with enable_qat(model):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    assert model.linear.weight.grad is not None
