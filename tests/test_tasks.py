"""Tests for fleetfl.tasks: synthetic data, partitioning, digits, models, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fleetfl.tasks import (
    DATASET_NAMES,
    MODEL_NAMES,
    DigitsCNN,
    FederatedDataset,
    LogisticRegression,
    Split,
    build_model,
    dirichlet_label_partition,
    forward_flops_per_sample,
    generate_synthetic,
    iid_partition,
    load_digits_federated,
    load_federated,
    training_flops_per_sample,
)

# ---------------------------------------------------------------- data containers


def _split(n: int, offset: float = 0.0) -> Split:
    x = np.full((n, 3), offset, dtype=np.float32)
    return Split(x=x, y=np.arange(n, dtype=np.int64))


def test_split_validates_dtypes_and_lengths() -> None:
    with pytest.raises(ValueError, match="real numbers"):
        Split(np.zeros((2, 3), dtype=np.complex64), np.zeros(2, dtype=np.int64))
    assert Split(np.zeros((2, 3), dtype=np.uint8), np.zeros(2, dtype=np.int64)).x.dtype == np.uint8
    with pytest.raises(ValueError, match="int64"):
        Split(np.zeros((2, 3), dtype=np.float32), np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        Split(np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.int64))
    assert len(_split(4)) == 4


def test_train_union_concatenates_in_client_order() -> None:
    ds = FederatedDataset(
        name="toy",
        clients=((_split(2, 0.0), _split(1)), (_split(3, 1.0), _split(1))),
        test=_split(1),
        input_shape=(3,),
        num_classes=3,
    )
    union = ds.train_union()
    assert ds.num_clients == 2
    assert len(union) == 5
    np.testing.assert_array_equal(union.x[:, 0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(union.y, [0, 1, 0, 1, 2])


# ---------------------------------------------------------------- synthetic


def _reference_synthetic(alpha: float, beta: float, iid: bool, num_users: int, seed: int):
    """Literal per-sample transcription of litian96/FedProx's generators on a RandomState."""
    rng = np.random.RandomState(seed)
    dimension, num_class = 60, 10

    def softmax(x):
        ex = np.exp(x)
        return ex / np.sum(np.exp(x))

    samples_per_user = rng.lognormal(4, 2, (num_users)).astype(int) + 50
    diagonal = np.zeros(dimension)
    for j in range(dimension):
        diagonal[j] = np.power((j + 1), -1.2)
    cov_x = np.diag(diagonal)
    xs, ys = [], []
    if iid:
        w = rng.normal(0, 1, (dimension, num_class))
        b = rng.normal(0, 1, num_class)
        models = [(w, b)] * num_users
        mean_x = np.zeros((num_users, dimension))
    else:
        mean_w = rng.normal(0, alpha, num_users)
        mean_b = mean_w
        big_b = rng.normal(0, beta, num_users)
        mean_x = np.zeros((num_users, dimension))
        for i in range(num_users):
            mean_x[i] = rng.normal(big_b[i], 1, dimension)
    for i in range(num_users):
        if not iid:
            w = rng.normal(mean_w[i], 1, (dimension, num_class))
            b = rng.normal(mean_b[i], 1, num_class)
        else:
            w, b = models[i]
        xx = rng.multivariate_normal(mean_x[i], cov_x, samples_per_user[i])
        yy = np.zeros(samples_per_user[i])
        for j in range(samples_per_user[i]):
            yy[j] = np.argmax(softmax(np.dot(xx[j], w) + b))
        xs.append(xx)
        ys.append(yy)
    out = []
    for xx, yy in zip(xs, ys, strict=True):
        order = rng.permutation(len(yy))
        n_train = int(0.9 * len(yy))
        out.append((xx[order][:n_train], yy[order][:n_train], xx[order][n_train:]))
    return out


@pytest.mark.parametrize(
    ("alpha", "beta", "iid"), [(1.0, 1.0, False), (0.5, 0.5, False), (0.0, 0.0, True)]
)
def test_synthetic_matches_reference_generator(alpha: float, beta: float, iid: bool) -> None:
    ds = generate_synthetic(alpha, beta, iid=iid, num_users=6, seed=4)
    ref = _reference_synthetic(alpha, beta, iid, num_users=6, seed=4)
    for (train, test), (ref_x, ref_y, ref_test_x) in zip(ds.clients, ref, strict=True):
        np.testing.assert_array_equal(train.x, ref_x.astype(np.float32))
        np.testing.assert_array_equal(train.y, ref_y.astype(np.int64))
        np.testing.assert_array_equal(test.x, ref_test_x.astype(np.float32))


@pytest.fixture(scope="module")
def synthetic_1_1() -> FederatedDataset:
    """Synthetic(1, 1) with the paper's defaults (30 users), shared to keep the tests fast."""
    return generate_synthetic(1.0, 1.0, seed=0)


def test_synthetic_shapes_dtypes_and_sizes(synthetic_1_1: FederatedDataset) -> None:
    ds = synthetic_1_1
    expected = np.random.RandomState(0).lognormal(4, 2, 30).astype(int) + 50
    assert ds.num_clients == 30 and ds.input_shape == (60,) and ds.num_classes == 10
    sizes = np.array([len(train) + len(test) for train, test in ds.clients])
    np.testing.assert_array_equal(sizes, expected)
    assert sizes.min() >= 50
    for train, test in ds.clients:
        n = len(train) + len(test)
        assert len(train) == int(0.9 * n)
        for split in (train, test):
            assert split.x.dtype == np.float32 and split.y.dtype == np.int64
            assert split.x.shape == (len(split), 60)
            assert split.y.min() >= 0 and split.y.max() < 10
    assert len(ds.test) == sum(len(test) for _, test in ds.clients)
    assert len(ds.train_union()) == sum(len(train) for train, _ in ds.clients)


def test_synthetic_sizes_are_heavy_tailed(synthetic_1_1: FederatedDataset) -> None:
    sizes = np.array([len(train) + len(test) for train, test in synthetic_1_1.clients])
    assert sizes.max() > 10 * np.median(sizes)


def test_synthetic_is_deterministic_in_seed() -> None:
    a = generate_synthetic(0.5, 0.5, seed=7, num_users=5)
    b = generate_synthetic(0.5, 0.5, seed=7, num_users=5)
    c = generate_synthetic(0.5, 0.5, seed=8, num_users=5)
    for (ta, sa), (tb, sb) in zip(a.clients, b.clients, strict=True):
        np.testing.assert_array_equal(ta.x, tb.x)
        np.testing.assert_array_equal(ta.y, tb.y)
        np.testing.assert_array_equal(sa.x, sb.x)
    assert not np.array_equal(a.clients[0][0].x[:10], c.clients[0][0].x[:10])


def test_synthetic_does_not_touch_global_numpy_rng() -> None:
    state = np.random.get_state()
    generate_synthetic(1.0, 1.0, num_users=3)
    after = np.random.get_state()
    np.testing.assert_array_equal(state[1], after[1])
    assert state[2] == after[2]


def _label_tv_to_pool(ds: FederatedDataset) -> float:
    """Mean total-variation distance between each user's label histogram and the pooled one."""
    union = ds.train_union()
    pooled = np.bincount(union.y, minlength=10) / len(union)
    tvs = [
        0.5 * np.abs(np.bincount(train.y, minlength=10) / len(train) - pooled).sum()
        for train, _ in ds.clients
    ]
    return float(np.mean(tvs))


def test_synthetic_iid_users_share_distribution(synthetic_1_1: FederatedDataset) -> None:
    iid = generate_synthetic(1.0, 1.0, iid=True, seed=0)
    niid = synthetic_1_1
    iid_norms = [np.linalg.norm(train.x.mean(axis=0)) for train, _ in iid.clients]
    niid_norms = [np.linalg.norm(train.x.mean(axis=0)) for train, _ in niid.clients]
    # IID: x ~ N(0, Sigma) for everyone; non-IID: per-user means v_k ~ N(B_k, 1) in R^60.
    assert max(iid_norms) < 1.0
    assert min(niid_norms) > 3.0
    # One shared (W, b) and input law => similar label mixes across users.
    assert _label_tv_to_pool(iid) < 0.2
    assert _label_tv_to_pool(niid) > 0.4


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_users"):
        generate_synthetic(1.0, 1.0, num_users=0)
    with pytest.raises(ValueError, match="alpha"):
        generate_synthetic(-1.0, 1.0)


# ---------------------------------------------------------------- partition


def _check_partition(parts: list[np.ndarray], n: int, min_size: int) -> None:
    allidx = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted and unique
    assert len(allidx) == n  # disjoint, given coverage below
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    assert min(len(p) for p in parts) >= min_size


def test_iid_partition_is_a_balanced_partition() -> None:
    parts = iid_partition(103, 10, seed=1)
    _check_partition(parts, 103, 10)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    again = iid_partition(103, 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


LABELS = np.repeat(np.arange(10), 100)


def test_dirichlet_partition_is_a_partition_and_deterministic() -> None:
    parts = dirichlet_label_partition(LABELS, 20, alpha=0.5, seed=0, min_size=10)
    _check_partition(parts, len(LABELS), 10)
    again = dirichlet_label_partition(LABELS, 20, alpha=0.5, seed=0, min_size=10)
    other = dirichlet_label_partition(LABELS, 20, alpha=0.5, seed=1, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _mean_label_entropy(parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        freq = np.bincount(LABELS[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log(freq)).sum())
    return float(np.mean(entropies))


def test_smaller_alpha_means_more_label_skew() -> None:
    skewed = dirichlet_label_partition(LABELS, 10, alpha=0.1, seed=0, min_size=10)
    near_iid = dirichlet_label_partition(LABELS, 10, alpha=100.0, seed=0, min_size=10)
    uniform = dirichlet_label_partition(LABELS, 10, alpha=math.inf, seed=0, min_size=10)
    assert _mean_label_entropy(skewed) < 0.6 * math.log(10)
    assert _mean_label_entropy(near_iid) > 0.95 * math.log(10)
    assert _mean_label_entropy(uniform) == pytest.approx(math.log(10))
    _check_partition(uniform, len(LABELS), 10)


def test_dirichlet_partition_errors() -> None:
    with pytest.raises(ValueError, match="not enough samples"):
        dirichlet_label_partition(LABELS[:50], 10, alpha=1.0, seed=0, min_size=10)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_partition(LABELS, 10, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_label_partition(LABELS, 0, alpha=1.0, seed=0)
    # Feasible in principle (exactly 10 each) but not by a random Dirichlet(0.01) split.
    with pytest.raises(ValueError, match="larger alpha"):
        dirichlet_label_partition(LABELS[:200], 20, alpha=0.01, seed=0, min_size=10, max_tries=5)


# ---------------------------------------------------------------- digits


def test_digits_federated_sizes_ranges_and_holdout() -> None:
    ds = load_digits_federated(10, partition_alpha=0.5, seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.num_clients == 10
    client_splits = [s for pair in ds.clients for s in pair]
    assert len(ds.test) + sum(len(s) for s in client_splits) == 1797
    assert len(ds.test) == math.ceil(0.2 * 1797)  # sklearn rounds the test share up
    for split in [ds.test, *client_splits]:
        assert split.x.shape == (len(split), 1, 8, 8) and split.x.dtype == np.float32
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    assert ds.test.x.max() == 1.0  # scaled by 16, not left at 0..16 or squashed
    for train, test in ds.clients:
        assert len(test) >= 1 and len(train) >= len(test)
    # The 1797 images are pairwise distinct, so content identifies an example.
    rows = [x.tobytes() for s in client_splits for x in s.x]
    test_rows = {x.tobytes() for x in ds.test.x}
    assert len(set(rows)) == len(rows)
    assert test_rows.isdisjoint(rows)
    # Stratified global test set: every class present in near-dataset proportions.
    assert np.bincount(ds.test.y, minlength=10).min() >= 30


def test_digits_hundred_clients_and_iid() -> None:
    ds = load_digits_federated(100, partition_alpha=0.5, seed=0)
    assert ds.num_clients == 100
    assert min(len(train) + len(test) for train, test in ds.clients) >= 5
    iid = load_digits_federated(7, partition_alpha=0.5, seed=0, iid=True)
    sizes = [len(train) + len(test) for train, test in iid.clients]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------- models


def test_model_output_shapes() -> None:
    logreg = build_model("logreg", (60,), 10)
    cnn = build_model("cnn", (1, 8, 8), 10)
    assert isinstance(logreg, LogisticRegression) and isinstance(cnn, DigitsCNN)
    assert logreg(torch.zeros(4, 60)).shape == (4, 10)
    assert cnn(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    # logreg flattens image inputs
    assert build_model("logreg", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_build_model_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a = build_model("cnn", (1, 8, 8), 10, seed=5).state_dict()
    b = build_model("cnn", (1, 8, 8), 10, seed=5).state_dict()
    c = build_model("cnn", (1, 8, 8), 10, seed=6).state_dict()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="logreg, cnn"):
        build_model("resnet", (60,), 10)
    with pytest.raises(ValueError, match="image"):
        build_model("cnn", (60,), 10)
    assert MODEL_NAMES == ("logreg", "cnn", "randwire")


def test_flops_logreg_excludes_bias() -> None:
    model = build_model("logreg", (60,), 10)
    assert forward_flops_per_sample(model, (60,)) == 2 * 60 * 10
    assert training_flops_per_sample(model, (60,)) == 3 * 2 * 60 * 10


def test_flops_cnn_hand_computed() -> None:
    conv1 = (16 * 8 * 8) * (1 * 3 * 3)  # output elements x MACs per output
    conv2 = (32 * 8 * 8) * (16 * 3 * 3)
    fc1 = 512 * 64
    fc2 = 64 * 10
    expected = 2 * (conv1 + conv2 + fc1 + fc2)
    model = build_model("cnn", (1, 8, 8), 10)
    model.train()
    assert forward_flops_per_sample(model, (1, 8, 8)) == expected == 675_072
    assert training_flops_per_sample(model, (1, 8, 8)) == 3 * expected
    assert model.training  # mode restored
    assert not model.features[0]._forward_hooks  # hooks removed


# ---------------------------------------------------------------- registry


def test_load_federated_dispatch_and_cache() -> None:
    syn = load_federated("synthetic", num_clients=4, seed=0, alpha=0.5, beta=0.5)
    assert syn.num_clients == 4 and syn.input_shape == (60,)
    assert load_federated("synthetic", num_clients=4, seed=0, alpha=0.5, beta=0.5) is syn
    direct = generate_synthetic(0.5, 0.5, num_users=4, seed=0)
    np.testing.assert_array_equal(syn.test.x, direct.test.x)
    digits = load_federated("digits", num_clients=3, seed=0, partition_alpha=1.0)
    assert digits.input_shape == (1, 8, 8) and digits.num_clients == 3
    assert DATASET_NAMES == ("synthetic", "digits")
    with pytest.raises(ValueError, match="synthetic, digits"):
        load_federated("mnist", num_clients=3, seed=0)
