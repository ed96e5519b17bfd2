"""The thin crypto layer of secure aggregation: X25519, HKDF, AEAD with headers, mask PRG."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import chisquare

from fleetfl.privacy import crypto
from fleetfl.privacy.crypto import CryptoError, Header, KeyPair

HEADER = Header(version=1, stage=2, round=7, sender=11, receiver=22)


def test_x25519_agreement_is_symmetric_and_pairwise_distinct() -> None:
    a, b, c = (KeyPair.generate() for _ in range(3))
    assert a.agree(b.public) == b.agree(a.public)
    assert len(a.agree(b.public)) == crypto.KEY_BYTES
    assert a.agree(b.public) != a.agree(c.public)


def test_private_key_round_trip_and_public_from_private() -> None:
    a = KeyPair.generate()
    again = KeyPair.from_private_bytes(a.private_bytes())
    assert again.public == a.public == crypto.public_from_private(a.private_bytes())


def test_bad_public_keys_are_refused() -> None:
    a = KeyPair.generate()
    with pytest.raises(CryptoError):
        a.agree(b"short")
    with pytest.raises(CryptoError):  # a low-order point: the shared secret would be 0
        a.agree(bytes(32))
    with pytest.raises(CryptoError):
        crypto.check_public_key(b"x" * 31)
    with pytest.raises(CryptoError):
        KeyPair.from_private_bytes(b"x" * 31)


def test_hkdf_separates_domains() -> None:
    secret = b"s" * 32
    base = crypto.hkdf(secret, salt=b"salt", info=b"a")
    assert base == crypto.hkdf(secret, salt=b"salt", info=b"a")
    assert base != crypto.hkdf(secret, salt=b"salt", info=b"b")
    assert base != crypto.hkdf(secret, salt=b"other", info=b"a")
    assert len(crypto.hkdf(secret, salt=b"", info=b"a", length=64)) == 64


def test_digest_is_unambiguous() -> None:
    assert crypto.digest(b"ab", b"c") != crypto.digest(b"a", b"bc")
    assert len(crypto.digest(b"x")) == 32


def test_seal_round_trip_and_overhead() -> None:
    key = crypto.hkdf(b"k" * 32, salt=b"", info=b"t")
    sealed = crypto.seal(key, b"secret shares", HEADER)
    assert len(sealed) == len(b"secret shares") + crypto.SEAL_OVERHEAD
    assert crypto.open_sealed(key, sealed, HEADER) == b"secret shares"
    assert crypto.seal(key, b"secret shares", HEADER) != sealed  # fresh random nonce


@pytest.mark.parametrize("field", ["version", "stage", "round", "sender", "receiver"])
def test_open_fails_for_any_other_header(field: str) -> None:
    """A ciphertext replayed to another round, stage or pair of parties does not open."""
    key = b"k" * 32
    sealed = crypto.seal(key, b"payload", HEADER)
    other = dataclasses.replace(HEADER, **{field: getattr(HEADER, field) + 1})
    with pytest.raises(CryptoError, match="authentication failed"):
        crypto.open_sealed(key, sealed, other)


def test_open_fails_for_tampering_wrong_key_or_truncation() -> None:
    key = b"k" * 32
    sealed = crypto.seal(key, b"payload", HEADER)
    for i in (0, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        bad = sealed[:i] + bytes([sealed[i] ^ 0x80]) + sealed[i + 1 :]
        with pytest.raises(CryptoError):
            crypto.open_sealed(key, bad, HEADER)
    with pytest.raises(CryptoError):
        crypto.open_sealed(b"j" * 32, sealed, HEADER)
    with pytest.raises(CryptoError, match="too short"):
        crypto.open_sealed(key, sealed[:20], HEADER)


def test_mac_authenticates_message_and_header() -> None:
    key = b"m" * 32
    message = bytes(range(256)) * 100
    tag = crypto.mac(key, message, HEADER)
    assert len(tag) == crypto.SEAL_OVERHEAD
    crypto.verify_mac(key, message, HEADER, tag)
    with pytest.raises(CryptoError):
        crypto.verify_mac(key, message[:-1] + b"\0", HEADER, tag)
    with pytest.raises(CryptoError):
        crypto.verify_mac(key, message, dataclasses.replace(HEADER, round=8), tag)
    with pytest.raises(CryptoError):
        crypto.verify_mac(key, message, HEADER, tag[:-1])


def test_header_fields_are_range_checked() -> None:
    assert len(HEADER.to_bytes()) == 30
    with pytest.raises(ValueError, match="u64"):
        dataclasses.replace(HEADER, sender=-1).to_bytes()
    with pytest.raises(ValueError, match="u8"):
        dataclasses.replace(HEADER, stage=256).to_bytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_mask_prg_is_deterministic_sized_and_seed_dependent(dtype: type) -> None:
    a = crypto.expand_mask(b"a" * 32, 1000, dtype)
    assert a.dtype == np.dtype(dtype) and a.shape == (1000,)
    np.testing.assert_array_equal(a, crypto.expand_mask(b"a" * 32, 1000, dtype))
    assert (a != crypto.expand_mask(b"b" * 32, 1000, dtype)).mean() > 0.9
    # a prefix of a longer expansion: the mask of d values does not depend on how it is read
    np.testing.assert_array_equal(a[:10], crypto.expand_mask(b"a" * 32, 10, dtype))


def test_mask_prg_output_is_uniform_and_the_test_can_tell() -> None:
    values = crypto.expand_mask(b"u" * 32, 1 << 18, np.uint8).astype(np.int64)
    assert chisquare(np.bincount(values, minlength=256)).pvalue > 1e-3
    skewed = np.minimum(values, 250)  # a generator that never says 251..255
    assert chisquare(np.bincount(skewed, minlength=256)).pvalue < 1e-12


def test_mask_prg_rejects_a_short_seed() -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        crypto.expand_mask(b"short", 10, np.uint16)


def test_seeded_random_bytes_is_reproducible() -> None:
    a, b = crypto.seeded_random_bytes(b"s"), crypto.seeded_random_bytes(b"s")
    assert a(10) + a(5) == b(15)
    assert crypto.seeded_random_bytes(b"t")(15) != crypto.seeded_random_bytes(b"s")(15)
    assert KeyPair.generate(crypto.seeded_random_bytes(b"k")).public == KeyPair.generate(
        crypto.seeded_random_bytes(b"k")).public
