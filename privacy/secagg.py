"""SecAgg+ (Bell et al., CCS 2020) as pure state machines: shared definitions.

Four exchanges, each a request from the coordinator and a reply from every live client; the
coordinator (:class:`~fleetfl.privacy.secagg_server.SecAggServer`) and the client
(:class:`~fleetfl.privacy.secagg_client.SecAggClient`) exchange only the message dataclasses
below, so any transport (Flower's Message API in fleetfl) just carries their bytes:

=================  ========================  =========================  =======================
stage              coordinator -> client     client -> coordinator      what happens
=================  ========================  =========================  =======================
advertise keys     :class:`Setup`            :class:`AdvertiseKeys`     two X25519 public keys
share keys         :class:`ShareKeysRequest` :class:`ShareKeys`         Shamir shares, sealed
masked input       :class:`MaskedInputReq..` :class:`MaskedInput`       the bit-packed masked
                                                                        vector
unmask             :class:`UnmaskRequest`    :class:`UnmaskShares`      shares to remove masks
=================  ========================  =========================  =======================

**Authentication on everything.** Every message carries a header (protocol version, stage,
round, sender, receiver; node id 0 is the coordinator) and, except the broadcast
:class:`Setup`, a 28-byte tag: ChaCha20-Poly1305 over the header and the message, keyed by a
client-coordinator key ``HKDF(X25519(client enc key, round key of the coordinator), salt =
SHA-256 of the Setup)``. Shares travel client to client through the coordinator sealed with a
directional pairwise key, with the header as associated data. Keys are fresh every round. So a
message that is tampered with, replayed from another round or stage, delivered to the wrong
party, or forged by a node outside the cohort fails a check that names the sender
(:class:`SecAggRejected`); the coordinator then goes on without that client where the protocol
allows (it counts as a dropout at that stage).

**Keys ahead.** A client may advertise the key pairs of its next round early, in a
:class:`KeysAhead` riding on its masked input. In that next round the coordinator sends it the
:class:`Setup` together with its :class:`ShareKeysRequest`, and the advertise exchange is
skipped for it: a returning cohort needs three exchanges, not four. Nothing is reused: a pair
still serves exactly one round, and every key of that round is salted with its Setup.

The messages themselves, their bytes and their Flower form are :mod:`fleetfl.privacy.messages`;
this module holds the stages, errors, parameters, accounting and key derivations they share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from fleetfl.privacy import crypto
from fleetfl.privacy.crypto import Header

if TYPE_CHECKING:
    from fleetfl.privacy.messages import Setup

PROTOCOL_VERSION = 1
SERVER_ID = 0  # the coordinator's id in headers; Flower never gives a SuperNode id 0
_LABEL = b"fleetfl/secagg/v1/"
MAX_VECTOR_LENGTH = 1 << 28  # values per client: far above any edge model


class Stage(IntEnum):
    """The protocol's stages, in order (the header's stage byte)."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    UNMASK = 4


# ----------------------------------------------------------------------------- errors


class SecAggError(Exception):
    """Base of every secure-aggregation error."""


class SecAggAbort(SecAggError):
    """The round cannot complete (too few survivors or shares): no model update this round."""


class SecAggStateError(SecAggError):
    """A stage was run out of order, twice, or after the round ended."""


class MessageError(SecAggError, ValueError):
    """Bytes or a record that do not parse as the expected message (names the field)."""


class SecAggRejected(SecAggError):
    """A message that must not be used. ``sender`` is the node it came from (0: the coordinator).

    On the coordinator this drops only that client; on a client it refuses the stage.
    """

    def __init__(self, sender: int, stage: Stage | None, reason: str) -> None:
        where = stage.name.lower().replace("_", " ") if stage is not None else "unknown stage"
        who = "the coordinator" if sender == SERVER_ID else f"node {sender}"
        super().__init__(f"rejected {where} message from {who}: {reason}")
        self.sender, self.stage, self.reason = sender, stage, reason


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SecAggParams:
    """What the coordinator configures (``[secagg]``); ``None`` means derived from the rest.

    ``num_neighbours`` (k) and ``threshold`` (t) are derived per cohort by
    :func:`fleetfl.privacy.graph.choose_parameters` from ``corrupt_fraction`` (colluding
    clients), ``dropout_fraction``, ``security_bits`` (σ) and ``correctness_bits`` (η).
    ``max_abs`` bounds every input element (127 for int8 updates); the ring has the fewest bits
    that hold ``n * max_abs`` (:func:`fleetfl.privacy.ring.bits_for_sum`).
    """

    num_neighbours: int | None = None
    threshold: int | None = None
    corrupt_fraction: float = 0.1
    dropout_fraction: float = 0.3
    security_bits: int = 40
    correctness_bits: int = 30
    max_abs: int = 127


# ----------------------------------------------------------------------------- accounting


@dataclass
class SecAggStats:
    """Bytes (serialized messages, :meth:`Message.wire_size`) and compute seconds per stage.

    ``uplink_bytes`` flow client -> coordinator, ``downlink_bytes`` the other way. On the
    coordinator they are totals over clients and ``uplink_by_client`` splits the uplink.
    """

    uplink_bytes: dict[str, int] = field(default_factory=dict)
    downlink_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    uplink_by_client: dict[int, int] = field(default_factory=dict)

    def add_bytes(self, stage: Stage, *, up: int = 0, down: int = 0) -> None:
        name = stage_name(stage)
        self.uplink_bytes[name] = self.uplink_bytes.get(name, 0) + up
        self.downlink_bytes[name] = self.downlink_bytes.get(name, 0) + down

    @contextmanager
    def timed(self, stage: Stage) -> Iterator[None]:
        """Add the wall-clock seconds of the ``with`` block to ``seconds[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            name = stage_name(stage)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able totals: bytes, seconds, and their sums over stages."""
        return {
            "uplink_bytes": dict(self.uplink_bytes),
            "downlink_bytes": dict(self.downlink_bytes),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "uplink_bytes_total": sum(self.uplink_bytes.values()),
            "downlink_bytes_total": sum(self.downlink_bytes.values()),
            "seconds_total": round(sum(self.seconds.values()), 6),
        }


def stage_name(stage: Stage) -> str:
    """``Stage.SHARE_KEYS`` -> ``"share_keys"`` (keys of :class:`SecAggStats`)."""
    return stage.name.lower()


# ----------------------------------------------------------------------------- keys


def transcript(setup: Setup) -> bytes:
    """SHA-256 of the Setup: the salt of every key of the round."""
    return crypto.digest(setup.to_bytes())


def channel_key(secret: bytes, salt: bytes, client: int) -> bytes:
    """Client-coordinator tag key from their X25519 secret."""
    return crypto.hkdf(secret, salt=salt, info=_LABEL + b"channel" + _u64(client))


def share_keys(secret: bytes, salt: bytes, me: int, peer: int) -> tuple[bytes, bytes]:
    """``(key sealing me -> peer, key opening peer -> me)`` from the two enc keys' secret.

    One HKDF call of 64 bytes: the lower id's outgoing key comes first, so both ends agree.
    """
    lo, hi = min(me, peer), max(me, peer)
    okm = crypto.hkdf(secret, salt=salt, info=_LABEL + b"share" + _u64(lo) + _u64(hi),
                      length=2 * crypto.KEY_BYTES)
    lo_to_hi, hi_to_lo = okm[: crypto.KEY_BYTES], okm[crypto.KEY_BYTES :]
    return (lo_to_hi, hi_to_lo) if me == lo else (hi_to_lo, lo_to_hi)


def pairwise_seed(secret: bytes, salt: bytes, a: int, b: int) -> bytes:
    """Seed of the pairwise mask of ``a`` and ``b`` (symmetric, from the mask keys)."""
    lo, hi = min(a, b), max(a, b)
    return crypto.hkdf(secret, salt=salt, info=_LABEL + b"pairwise" + _u64(lo) + _u64(hi))


def seed_commitment(salt: bytes, owner: int, seed: bytes) -> bytes:
    """32-byte commitment to ``owner``'s self-mask seed (checked after reconstruction)."""
    return crypto.digest(_LABEL + b"self-mask", salt, _u64(owner), seed)


def share_header(rnd: int, sender: int, receiver: int) -> Header:
    """Associated data of ``sender``'s sealed shares for ``receiver``."""
    return Header(PROTOCOL_VERSION, int(Stage.SHARE_KEYS), rnd, sender, receiver)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")
