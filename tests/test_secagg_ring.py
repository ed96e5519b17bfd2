"""The ring Z/2^b of secure aggregation: width, embedding, sums, bit-packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetfl.compression.quantize import sum_bound
from fleetfl.privacy import ring


def test_ring_widths_of_the_issue() -> None:
    assert ring.bits_for_sum(258) == 16  # 16 bits cover 258 int8 clients
    assert ring.bits_for_sum(259) == 17
    assert [ring.bits_for_sum(n) for n in (20, 50, 100)] == [13, 14, 15]
    assert ring.bits_for_sum(1) == 8  # [-127, 127]: 255 values


@given(n=st.integers(1, 1 << 20), max_abs=st.integers(1, 1000))
def test_bits_are_the_fewest_that_hold_the_sum(n: int, max_abs: int) -> None:
    if 2 * n * max_abs + 1 > 1 << ring.MAX_BITS:
        with pytest.raises(ValueError):
            ring.bits_for_sum(n, max_abs)
        return
    bits = ring.bits_for_sum(n, max_abs)
    assert 1 << bits >= 2 * n * max_abs + 1 > 1 << (bits - 1)


def test_agrees_with_compression_sum_bound() -> None:
    for n in (1, 7, 100, 258):
        assert 1 << ring.bits_for_sum(n) > 2 * sum_bound(n)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_ring_sum_of_embedded_int8_gives_the_exact_signed_sum(n: int, d: int,
                                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, size=(n, d)).astype(np.int8)
    q[0] = rng.choice([-127, 127])  # extremes too
    bits = ring.bits_for_sum(n)
    total = ring.ring_sum([ring.embed(v, bits, 127) for v in q], bits)
    assert total.dtype == ring.ring_dtype(bits) and int(total.max()) < 1 << bits
    np.testing.assert_array_equal(ring.to_signed(total, bits), q.astype(np.int64).sum(axis=0))


def test_extreme_cohort_sums_fill_but_never_wrap_the_ring() -> None:
    n, bits = 258, 16
    for value in (127, -127):
        q = np.full((n, 4), value, dtype=np.int8)
        total = ring.ring_sum([ring.embed(v, bits, 127) for v in q], bits)
        assert (ring.to_signed(total, bits) == value * n).all()


def test_embed_is_twos_complement_and_checks_its_input() -> None:
    x = np.array([0, 1, -1, 127, -127], dtype=np.int8)
    np.testing.assert_array_equal(ring.embed(x, 13, 127), [0, 1, 8191, 127, 8192 - 127])
    np.testing.assert_array_equal(ring.embed(x.astype(np.int64), 20, 127),
                                  [0, 1, (1 << 20) - 1, 127, (1 << 20) - 127])
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        ring.embed(np.array([-128], dtype=np.int8), 13, 127)
    with pytest.raises(ValueError, match="integer"):
        ring.embed(np.array([0.5]), 13, 127)
    with pytest.raises(ValueError, match="1-D"):
        ring.embed(np.zeros((2, 2), dtype=np.int8), 13, 127)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, ring.MAX_BITS), d=st.integers(0, 200), seed=st.integers(0, 2**32))
def test_pack_unpack_round_trip(bits: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1 << bits, size=d, dtype=np.uint64).astype(ring.ring_dtype(bits))
    packed = ring.pack(x, bits)
    assert len(packed) == ring.packed_size(d, bits) == -(-d * bits // 8)
    out = ring.unpack(packed, bits, d)
    assert out.dtype == ring.ring_dtype(bits)
    np.testing.assert_array_equal(out, x)


def test_pack_layout_is_little_endian_bit_order() -> None:
    # elements 1 and 2 of 3 bits: bits 0-2 hold 1 (001), bits 3-5 hold 2 (010) -> 0b010001
    assert ring.pack(np.array([1, 2], dtype=np.uint8), 3) == bytes([0b010001])
    assert ring.pack(np.array([0xABC, 0x123], dtype=np.uint16), 12) == bytes.fromhex("bc3a12")


def test_unpack_rejects_wrong_length_and_nonzero_padding() -> None:
    packed = ring.pack(np.array([5, 6, 7], dtype=np.uint16), 13)  # 39 bits in 5 bytes
    with pytest.raises(ValueError, match="take 5 bytes"):
        ring.unpack(packed + b"\0", 13, 3)
    with pytest.raises(ValueError, match="padding"):
        ring.unpack(packed[:-1] + bytes([packed[-1] | 0x80]), 13, 3)


def test_pack_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="fit"):
        ring.pack(np.array([1 << 13], dtype=np.uint16), 13)
    with pytest.raises(ValueError, match="unsigned"):
        ring.pack(np.array([1], dtype=np.int16), 13)


def test_packing_saves_bytes_over_uint16() -> None:
    d = 100_000
    for n, bits in ((20, 13), (100, 15)):
        assert ring.bits_for_sum(n) == bits
        assert ring.packed_size(d, bits) == d * bits // 8 < 2 * d
