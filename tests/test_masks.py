"""Pruning masks: the cubic schedule, global magnitude masks, applying them, bitmaps and ids."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetfl.client.solver import fedprox_train
from fleetfl.compression.masks import (
    NO_MASK,
    apply_masks_,
    apply_masks_torch_,
    cubic_sparsity,
    global_magnitude_masks,
    mask_id,
    pack_masks,
    prunable,
    pruning_schedule,
    scatter_values,
    sparse_values,
    sparsity_of,
    unpack_masks,
)

SCHEDULE = {"start_round": 2, "end_round": 12, "final_sparsity": 0.9}


def _cnn(seed: int = 0) -> torch.nn.Module:
    """A DigitsCNN-like model (fleetfl.tasks would also import scikit-learn: slow to load)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


def _params(seed: int, shapes=((6, 5), (4, 2, 3, 3), (7,))) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = ["fc.weight", "conv.weight", "fc.bias"]
    return {n: rng.normal(size=s).astype(np.float32) for n, s in zip(names, shapes, strict=True)}


# ------------------------------------------------------------------ cubic schedule


def test_cubic_schedule_at_start_middle_and_end():
    assert cubic_sparsity(2, **SCHEDULE) == 0.0
    # halfway, (1 - 1/2)^3 = 1/8 of the way is left: s = 0.9 * (1 - 1/8)
    assert cubic_sparsity(7, **SCHEDULE) == pytest.approx(0.9 * 7 / 8)
    assert cubic_sparsity(12, **SCHEDULE) == pytest.approx(0.9)


def test_cubic_schedule_is_clamped_outside_the_window():
    assert cubic_sparsity(0, **SCHEDULE) == 0.0
    assert cubic_sparsity(1, **SCHEDULE, initial_sparsity=0.3) == 0.3
    assert cubic_sparsity(100, **SCHEDULE) == pytest.approx(0.9)
    # a window of one round is a single step to the final sparsity
    assert cubic_sparsity(4, start_round=5, end_round=5, final_sparsity=0.5) == 0.0
    assert cubic_sparsity(5, start_round=5, end_round=5, final_sparsity=0.5) == 0.5


def test_cubic_schedule_is_monotone_and_front_loaded():
    values = [cubic_sparsity(t, **SCHEDULE) for t in range(15)]
    assert values == sorted(values)
    steps = np.diff(values[2:13])
    assert (np.diff(steps) <= 1e-12).all()  # the increments shrink: prune fast, then slowly


@pytest.mark.parametrize(
    "kwargs",
    [dict(start_round=5, end_round=4, final_sparsity=0.5),
     dict(start_round=0, end_round=4, final_sparsity=1.5),
     dict(start_round=0, end_round=4, final_sparsity=0.2, initial_sparsity=0.5)],
)
def test_cubic_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        cubic_sparsity(1, **kwargs)


# ------------------------------------------------------------------ which tensors, which weights


def test_default_prunable_rule_keeps_conv_and_linear_weights_not_biases():
    state = _cnn().state_dict()
    names = prunable(list(state), [tuple(t.shape) for t in state.values()])
    assert names == ["0.weight", "4.weight", "6.weight"]
    norm = torch.nn.BatchNorm2d(3).state_dict()  # 1-D scales and running stats: not pruned
    assert prunable(list(norm), [tuple(t.shape) for t in norm.values()]) == []


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), sparsity=st.floats(0.0, 1.0))
def test_global_masks_have_exact_sparsity_and_one_threshold(seed, sparsity):
    params = _params(seed)
    names = ["fc.weight", "conv.weight"]
    masks = global_magnitude_masks(params, sparsity, names)
    assert set(masks) == set(names)
    n = sum(params[k].size for k in names)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == math.floor(sparsity * n + 0.5)
    kept_mag = np.concatenate([np.abs(params[k][masks[k]]) for k in names])
    pruned_mag = np.concatenate([np.abs(params[k][~masks[k]]) for k in names])
    if kept_mag.size and pruned_mag.size:
        assert pruned_mag.max() <= kept_mag.min()  # global, not per-layer


def test_ties_are_broken_by_position_deterministically():
    params = {"a": np.ones((2, 3), np.float32), "b": np.ones((4, 1), np.float32)}
    masks = global_magnitude_masks(params, 0.5, ["a", "b"])
    # 10 equal weights, 5 pruned: the first five positions (tensors in order, C order within)
    assert masks["a"].ravel().tolist() == [False] * 5 + [True] and masks["b"].all()
    again = global_magnitude_masks(params, 0.5, ["a", "b"])
    assert all((masks[k] == again[k]).all() for k in masks)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_masks_are_monotone_across_rounds(seed):
    rng = np.random.default_rng(seed)
    params = _params(seed)
    names = ["fc.weight", "conv.weight"]
    masks = None
    for t in range(1, 9):
        s = cubic_sparsity(t, start_round=1, end_round=8, final_sparsity=0.8)
        # weights move between rounds (and pruned ones are 0), so the ranking changes
        params = {k: v + rng.normal(scale=0.5, size=v.shape).astype(np.float32)
                  for k, v in params.items()}
        if masks is not None:
            apply_masks_(params, masks)
        new = global_magnitude_masks(params, s, names, previous=masks)
        if masks is not None:
            assert all((new[k] <= masks[k]).all() for k in names)  # never revived
        n = sum(params[k].size for k in names)
        assert sparsity_of(new) == pytest.approx(math.floor(s * n + 0.5) / n)
        masks = new


def test_previous_mask_pruning_more_is_kept():
    params = _params(0)
    prev = global_magnitude_masks(params, 0.6, ["fc.weight"])
    new = global_magnitude_masks(params, 0.2, ["fc.weight"], previous=prev)
    assert (new["fc.weight"] == prev["fc.weight"]).all()


def test_global_masks_reject_bad_input():
    params = _params(0)
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude_masks(params, 1.2, ["fc.weight"])
    with pytest.raises(ValueError, match="not in params"):
        global_magnitude_masks(params, 0.5, ["nope"])
    params["fc.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        global_magnitude_masks(params, 0.5, ["fc.weight"])
    with pytest.raises(ValueError, match="shape"):
        global_magnitude_masks(_params(0), 0.5, ["fc.weight"],
                               previous={"fc.weight": np.ones((2, 2), bool)})


# ------------------------------------------------------------------ applying masks


def test_apply_masks_makes_pruned_weights_exactly_positive_zero():
    params = _params(1)
    params["fc.weight"][0, :] = [np.nan, -1.0, np.inf, -np.inf, 2.0]
    masks = global_magnitude_masks(_params(1), 0.5, ["fc.weight"])
    masks["fc.weight"][0, :] = False
    before = {k: v.copy() for k, v in params.items()}
    apply_masks_(params, masks)
    w, m = params["fc.weight"], masks["fc.weight"]
    assert (w[~m] == 0).all() and not np.signbit(w[~m]).any()  # +0.0, not -0.0 or NaN
    assert (w[m] == before["fc.weight"][m]).all()
    assert (params["fc.bias"] == before["fc.bias"]).all()  # no mask: untouched
    with pytest.raises(ValueError, match="no tensor"):
        apply_masks_(params, {"other": m})


def test_apply_masks_torch_on_a_module_and_on_a_mapping():
    model = _cnn()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = prunable(list(state), [v.shape for v in state.values()])
    masks = global_magnitude_masks(state, 0.7, names)
    apply_masks_torch_(model, masks)
    for name, mask in masks.items():
        assert (model.state_dict()[name][torch.from_numpy(~mask)] == 0).all()
    tensors = {k: torch.ones(3, 3) for k in ("x",)}
    apply_masks_torch_(tensors, {"x": torch.eye(3, dtype=torch.bool)})
    assert torch.equal(tensors["x"], torch.eye(3))
    with pytest.raises(ValueError, match="expected bool"):
        apply_masks_torch_(tensors, {"x": np.ones((2, 3), bool)})


def test_masks_stay_applied_through_local_fedprox_training():
    """The client pattern: one solver step, then re-apply the mask; pruned weights stay 0."""
    torch.manual_seed(0)
    model = _cnn(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    masks = global_magnitude_masks(state, 0.8, prunable(list(state),
                                                        [v.shape for v in state.values()]))
    apply_masks_torch_(model, masks)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(5):
        fedprox_train(model, x, y, mu=0.1, lr=0.1, batch_size=16, steps=1, seed=step)
        apply_masks_torch_(model, masks)
    after = model.state_dict()
    for name, mask in masks.items():
        pruned = torch.from_numpy(~mask)
        assert (after[name][pruned] == 0).all()
        assert not torch.equal(after[name][~pruned], start[name][~pruned])  # it did train
    # without re-applying, the gradient step revives pruned weights: the test tests something
    fedprox_train(model, x, y, mu=0.1, lr=0.1, batch_size=16, steps=1, seed=9)
    name = "4.weight"
    assert (model.state_dict()[name][torch.from_numpy(~masks[name])] != 0).any()


def test_post_step_hook_keeps_masks_through_fedprox_training():
    """The hook: one multi-step FedProx call (one anchor, one batch order), masks kept."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    def pruned_model() -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
        model = _cnn(1)
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        masks = global_magnitude_masks(state, 0.8, prunable(list(state),
                                                            [v.shape for v in state.values()]))
        apply_masks_torch_(model, masks)
        return model, masks

    model, masks = pruned_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    torch_masks = {k: torch.from_numpy(m) for k, m in masks.items()}
    calls = []

    def hook() -> None:
        calls.append(1)
        apply_masks_torch_(params, torch_masks)

    fedprox_train(model, x, y, mu=0.1, lr=0.1, batch_size=16, steps=8, seed=0, post_step=hook)
    assert len(calls) == 8
    for name, mask in masks.items():
        pruned = torch.from_numpy(~mask)
        assert (model.state_dict()[name][pruned] == 0).all()
        assert not torch.equal(model.state_dict()[name][~pruned], start[name][~pruned])
    # The same call without the hook revives pruned weights in every masked tensor.
    bare, masks = pruned_model()
    fedprox_train(bare, x, y, mu=0.1, lr=0.1, batch_size=16, steps=8, seed=0)
    for name, mask in masks.items():
        assert (bare.state_dict()[name][torch.from_numpy(~mask)] != 0).any(), name


# ------------------------------------------------------------------ ids, bitmaps, sparse values


def test_mask_id_is_stable_order_independent_and_sensitive():
    masks = global_magnitude_masks(_params(2), 0.5, ["fc.weight", "conv.weight"])
    reordered = {k: masks[k] for k in reversed(list(masks))}
    assert mask_id(masks) == mask_id(reordered) != NO_MASK
    assert 0 < mask_id(masks) < 2**64
    flipped = {k: v.copy() for k, v in masks.items()}
    flipped["conv.weight"][0, 0, 0, 0] ^= True
    assert mask_id(flipped) != mask_id(masks)
    assert mask_id({"fc.weight": masks["fc.weight"].reshape(-1)}) != mask_id(
        {"fc.weight": masks["fc.weight"]})  # the shape is part of the id
    assert mask_id({}) == NO_MASK


@settings(max_examples=60, deadline=None)
@given(mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9)))
def test_bitmap_round_trip_and_sparse_values(mask):
    packed = pack_masks({"m": mask})
    assert packed["m"].dtype == np.uint8 and packed["m"].size == (mask.size + 7) // 8
    back = unpack_masks(packed, {"m": mask.shape})["m"]
    assert back.dtype == np.bool_ and (back == mask).all()
    tensor = np.arange(mask.size, dtype=np.float32).reshape(mask.shape) + 1
    values = sparse_values(tensor, mask)
    assert values.shape == (int(mask.sum()),)
    dense = scatter_values(values, mask, mask.shape)
    assert (dense == np.where(mask, tensor, 0)).all()


def test_unpack_rejects_wrong_lengths_and_padding():
    with pytest.raises(ValueError, match="expected 2"):
        unpack_masks({"m": np.zeros(3, np.uint8)}, {"m": (3, 3)})
    with pytest.raises(ValueError, match="padding"):
        unpack_masks({"m": np.array([0, 0b01000000], np.uint8)}, {"m": (3, 3)})
    with pytest.raises(ValueError, match="expected 4 values"):
        scatter_values(np.zeros(3), np.array([1, 1, 0, 1, 1], bool), (5,))


def test_the_default_schedule_prunes_late_and_fits_short_runs() -> None:
    assert pruning_schedule(30) == (10, 30)  # the schedule that measured best (BENCHMARKS.md)
    assert pruning_schedule(60) == (10, 30)
    assert pruning_schedule(12) == (4, 12)
    assert pruning_schedule(1) == (1, 1)
    assert pruning_schedule(30, start_round=2) == (2, 30)
    assert pruning_schedule(30, end_round=6) == (6, 6)  # an explicit end pulls the start back
    assert pruning_schedule(30, 2, 20) == (2, 20)
    assert cubic_sparsity(10, start_round=10, end_round=30, final_sparsity=0.75) == 0.0
    assert cubic_sparsity(30, start_round=10, end_round=30, final_sparsity=0.75) == 0.75
