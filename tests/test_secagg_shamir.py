"""Vectorized Shamir sharing over GF(2^31 - 1)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency

from fleetfl.privacy import shamir


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32))
def test_encode_decode_round_trip(secret: bytes) -> None:
    chunks = shamir.encode_secret(secret)
    assert chunks.shape == (shamir.CHUNKS,) and (chunks < shamir.PRIME).all()
    assert shamir.decode_secret(chunks) == secret


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_t_shares_rebuild_every_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secrets = [os.urandom(32), bytes(32), b"\xff" * 32]
    xs = data.draw(st.lists(st.integers(1, shamir.MAX_HOLDERS), min_size=n, max_size=n,
                            unique=True))
    shares = shamir.split(secrets, t, xs)
    assert shares.shape == (n, 3, shamir.CHUNKS) and shares.dtype == np.uint32
    subset = data.draw(st.lists(st.sampled_from(range(n)), min_size=t, max_size=t,
                                unique=True))
    for index, secret in enumerate(secrets):
        got = shamir.combine({xs[i]: shares[i].tobytes() for i in subset}, index, 3)
        assert got == secret


def test_fewer_than_t_shares_give_a_different_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split([secret], 4, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(range(5), 3):
        try:
            got = shamir.combine({i + 1: shares[i].tobytes() for i in subset})
        except ValueError:  # chunks that do not even decode: as good a failure
            continue
        assert got != secret


def test_t_minus_one_shares_do_not_depend_on_the_secret() -> None:
    """Shares seen by t - 1 holders have the same distribution whatever the secret."""

    def first_chunk_bins(secret: bytes, t: int) -> np.ndarray:
        values = np.stack([shamir.split([secret], t, [1, 2, 3])[:2, 0, 0]
                           for _ in range(3000)])
        return np.bincount((values[:, 1] >> 27).astype(np.int64), minlength=16)

    low, high = bytes(32), b"\xff" * 32
    table = np.stack([first_chunk_bins(low, 3), first_chunk_bins(high, 3)])
    assert chi2_contingency(table).pvalue > 1e-3
    # with t = 1 a share is the secret itself: the same test must notice
    table = np.stack([first_chunk_bins(low, 1), first_chunk_bins(high, 1)])
    assert chi2_contingency(table + 1).pvalue < 1e-12


def test_combine_many_rebuilds_each_row_from_its_own_holders() -> None:
    secrets = [os.urandom(32) for _ in range(6)]
    xs = list(range(1, 9))
    shares = shamir.split(secrets, 3, xs)
    rng = np.random.default_rng(0)
    rows = [sorted(rng.choice(8, 3, replace=False)) for _ in secrets]
    x = np.array([[xs[i] for i in row] for row in rows])
    y = np.stack([shares[row, s] for s, row in enumerate(rows)])
    out = shamir.combine_many(x, y)
    assert [shamir.decode_secret(c) for c in out] == secrets


def test_lagrange_coefficients_sum_to_one() -> None:
    xs = np.array([[1, 2, 3], [5, 9, 2000], [7, 100_000, shamir.MAX_HOLDERS]])
    lam = shamir.lagrange_at_zero(xs)
    assert (lam.sum(axis=1) % shamir.PRIME == 1).all()  # interpolating the constant 1


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split([bytes(32)], 2, [1, 1, 2])
    with pytest.raises(ValueError, match=r"\[1, "):
        shamir.split([bytes(32)], 2, [0, 1])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split([bytes(32)], 4, [1, 2, 3])
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split([b"short"], 1, [1])
    with pytest.raises(ValueError, match="same x"):
        shamir.combine_many(np.array([[1, 1]]), np.zeros((1, 2, shamir.CHUNKS)))
    with pytest.raises(ValueError, match="bytes"):
        shamir.share_values(b"x" * 35)
    with pytest.raises(ValueError, match="out of the field"):
        shamir.share_values(b"\xff" * shamir.SHARE_BYTES)
    with pytest.raises(ValueError, match="valid secret"):
        shamir.decode_secret(np.full(shamir.CHUNKS, 1 << 30))


def test_random_field_is_in_range() -> None:
    values = shamir.random_field((10_000,))
    assert values.min() >= 0 and values.max() < shamir.PRIME
    assert np.unique(values).size > 9_990
