"""SecAgg+'s messages: one frozen dataclass each, with canonical bytes and a Flower form.

Every message has the header fields (protocol version, stage, round, sender, receiver; node id
0 is the coordinator) and a tag; subclasses add typed payload fields. :meth:`Message.to_bytes`
is canonical (what the tag covers and what the byte accounting counts) and
:meth:`Message.to_config` is a flat ``dict`` of ints, bytes and lists that fits a Flower
``ConfigRecord`` as it is. The protocol that exchanges them: :mod:`fleetfl.privacy.secagg`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar, get_type_hints

from fleetfl.privacy import crypto
from fleetfl.privacy.crypto import Header, RandomBytes
from fleetfl.privacy.secagg import PROTOCOL_VERSION, MessageError, Stage

_U64_MAX = (1 << 64) - 1


M = TypeVar("M", bound="Message")
_KINDS = {int: "int", bytes: "bytes", tuple[int, ...]: "ints", dict[int, bytes]: "map",
          dict[int, str]: "strmap"}


@dataclass(frozen=True, kw_only=True)
class Message:
    """Header fields and tag shared by every message; subclasses add typed payload fields.

    Payload fields are ``int`` (u64), ``bytes``, ``tuple[int, ...]``, ``dict[int, bytes]`` or
    ``dict[int, str]`` (keys are node ids).
    """

    TYPE: ClassVar[int]
    STAGE: ClassVar[Stage]
    round: int
    sender: int
    receiver: int
    version: int = PROTOCOL_VERSION
    tag: bytes = b""

    def header(self) -> Header:
        """What the tag (and, for shares, the AEAD) binds: version, stage, round, parties."""
        return Header(self.version, int(self.STAGE), self.round, self.sender, self.receiver)

    def signed_bytes(self) -> bytes:
        """The canonical bytes the tag covers: header, type, payload fields."""
        cached = self.__dict__.get("_signed_bytes")
        if cached is None:  # frozen: encode once (signing, checking and counting reuse it)
            parts = [self.header().to_bytes(), bytes([self.TYPE])]
            for name, kind in _payload_fields(type(self)):
                _encode(kind, getattr(self, name), parts, name)
            cached = self.__dict__["_signed_bytes"] = b"".join(parts)
        return cached

    def to_bytes(self) -> bytes:
        """:meth:`signed_bytes` followed by the length-prefixed tag."""
        return self.signed_bytes() + struct.pack("<I", len(self.tag)) + self.tag

    def wire_size(self) -> int:
        """Bytes of :meth:`to_bytes`: what this message costs on the wire (before transport)."""
        return len(self.signed_bytes()) + 4 + len(self.tag)

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        """Parse :meth:`to_bytes`; :class:`MessageError` naming the first problem."""
        if len(data) < 31:
            raise MessageError(f"{cls.__name__}: {len(data)} bytes is too short")
        magic, version, stage, rnd, sender, receiver = struct.unpack_from("<4sBBQQQ", data)
        if magic != crypto.HEADER_MAGIC:
            raise MessageError(f"{cls.__name__}: bad magic")
        if data[30] != cls.TYPE or stage != cls.STAGE:
            raise MessageError(f"expected {cls.__name__}, got message type {data[30]} of "
                               f"stage {stage}")
        pos, values = 31, {}
        for name, kind in _payload_fields(cls):
            values[name], pos = _decode(kind, data, pos, name)
        tag, pos = _decode("bytes", data, pos, "tag")
        if pos != len(data):
            raise MessageError(f"{cls.__name__}: {len(data) - pos} trailing bytes")
        return cls(round=rnd, sender=sender, receiver=receiver, version=version, tag=tag,
                   **values)

    def to_config(self) -> dict[str, Any]:
        """A flat dict for a Flower ``ConfigRecord``: ints, bytes, and lists of them.

        A ``dict`` field ``f`` becomes ``f.ids`` (list[int]) and ``f.values``.
        """
        out: dict[str, Any] = {"type": self.TYPE, "version": self.version, "round": self.round,
                               "sender": self.sender, "receiver": self.receiver,
                               "tag": self.tag}
        for name, kind in _payload_fields(type(self)):
            value = getattr(self, name)
            if kind in ("map", "strmap"):
                out[f"{name}.ids"] = list(value)
                out[f"{name}.values"] = list(value.values())
            else:
                out[name] = list(value) if kind == "ints" else value
        return out

    @classmethod
    def from_config(cls: type[M], config: Mapping[str, Any]) -> M:
        """Inverse of :meth:`to_config`; :class:`MessageError` naming a missing or bad key."""
        if _get(config, "type", int) != cls.TYPE:
            raise MessageError(f"expected {cls.__name__}, got message type {config['type']}")
        head = {k: _get(config, k, int) for k in ("version", "round", "sender", "receiver")}
        values: dict[str, Any] = {}
        for name, kind in _payload_fields(cls):
            if kind == "int":
                values[name] = _get(config, name, int)
            elif kind == "bytes":
                values[name] = _get(config, name, bytes)
            elif kind == "ints":
                values[name] = tuple(_get_list(config, name, int))
            else:
                ids = _get_list(config, f"{name}.ids", int)
                vals = _get_list(config, f"{name}.values", bytes if kind == "map" else str)
                if len(ids) != len(vals) or len(set(ids)) != len(ids):
                    raise MessageError(f"{name}.ids must be distinct and match {name}.values")
                values[name] = dict(zip(ids, vals, strict=True))
        msg = cls(tag=_get(config, "tag", bytes), **head, **values)
        msg.signed_bytes()  # range-checks every integer
        return msg

    def signed(self: M, key: bytes, random_bytes: RandomBytes = os.urandom) -> M:
        """A copy carrying the tag of this message under ``key``."""
        body = self.signed_bytes()
        tag = crypto.mac(key, body[30:], self.header(), random_bytes)
        signed = dataclasses.replace(self, tag=tag)
        signed.__dict__["_signed_bytes"] = body  # the tag is not part of it
        return signed

    def verify(self, key: bytes) -> None:
        """Raise :class:`crypto.CryptoError` unless the tag is valid under ``key``."""
        crypto.verify_mac(key, self.signed_bytes()[30:], self.header(), self.tag)


@dataclass(frozen=True, kw_only=True)
class Setup(Message):
    """Coordinator -> every client (broadcast, ``receiver`` 0): the round's public parameters.

    ``cohort`` sorted node ids (a client's Shamir x-coordinate is its index + 1), ``k`` and
    ``t``, ring ``ring_bits`` and input bound ``max_abs``, ``vector_length`` (values), the
    32-byte ``graph_seed`` of the neighbour graph, and the coordinator's X25519 round key.
    Not tagged (no key exists yet): its SHA-256 salts every key of the round, so a client given
    a different Setup than the coordinator's fails the coordinator's first check.
    """

    TYPE: ClassVar[int] = 1
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    cohort: tuple[int, ...]
    num_neighbours: int
    threshold: int
    ring_bits: int
    max_abs: int
    vector_length: int
    graph_seed: bytes
    server_key: bytes


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeys(Message):
    """Client -> coordinator: the client's two fresh X25519 public keys (32 bytes each).

    ``enc_key`` seals shares and keys the client-coordinator tag (never revealed);
    ``mask_key`` makes the pairwise masks (its private half is rebuilt if the client drops).
    """

    TYPE: ClassVar[int] = 2
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    enc_key: bytes
    mask_key: bytes


@dataclass(frozen=True, kw_only=True)
class ShareKeysRequest(Message):
    """Coordinator -> client: its live neighbours' keys, ``{node: enc_key + mask_key}``."""

    TYPE: ClassVar[int] = 3
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    public_keys: dict[int, bytes]


@dataclass(frozen=True, kw_only=True)
class ShareKeys(Message):
    """Client -> coordinator: ``{neighbour: sealed shares}`` and a commitment to its mask seed.

    Each ciphertext holds the neighbour's Shamir shares of the client's self-mask seed and of
    its mask private key (2 x 36 bytes), sealed for that neighbour only.
    """

    TYPE: ClassVar[int] = 4
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    ciphertexts: dict[int, bytes]
    commitment: bytes


@dataclass(frozen=True, kw_only=True)
class MaskedInputRequest(Message):
    """Coordinator -> client: ``{neighbour: its sealed shares for this client}``.

    The keys are exactly the neighbours whose masked input will be expected: the client adds a
    pairwise mask with each of them.
    """

    TYPE: ClassVar[int] = 5
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True, kw_only=True)
class MaskedInput(Message):
    """Client -> coordinator: the masked vector, bit-packed (``ring.pack``), and the neighbours
    whose sealed shares failed to open (``{node: reason}``; the client holds no share of them).
    """

    TYPE: ClassVar[int] = 6
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    masked: bytes
    rejected: dict[int, str]


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest(Message):
    """Coordinator -> client: neighbours whose input is in the sum (``survivors``: reveal the
    share of their self-mask seed) and those who dropped after sharing keys (``dropped``:
    reveal the share of their mask key). Disjoint, or the client refuses.
    """

    TYPE: ClassVar[int] = 7
    STAGE: ClassVar[Stage] = Stage.UNMASK
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class UnmaskShares(Message):
    """Client -> coordinator: ``seed_shares`` (survivors and itself) and ``key_shares``
    (dropped), 36 bytes each, keyed by the secret's owner."""

    TYPE: ClassVar[int] = 8
    STAGE: ClassVar[Stage] = Stage.UNMASK
    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


@dataclass(frozen=True, kw_only=True)
class KeysAhead(Message):
    """Client -> coordinator, riding on its :class:`MaskedInput`: two fresh X25519 public keys
    for the client's *next* secure round, advertised in advance (fields as in
    :class:`AdvertiseKeys`). That round then needs no advertise exchange with this client: its
    :class:`ShareKeysRequest` travels with the :class:`Setup`. Tagged with this round's channel
    key. Each pair serves at most one later round; both sides forget it once used, and the
    client forgets it when a round starts without it (docs/secagg.md §7)."""

    TYPE: ClassVar[int] = 9
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    enc_key: bytes
    mask_key: bytes


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Setup, AdvertiseKeys, ShareKeysRequest, ShareKeys,
                               MaskedInputRequest, MaskedInput, UnmaskRequest, UnmaskShares,
                               KeysAhead)}


def parse(expected: type[M], raw: M | bytes | Mapping[str, Any]) -> M:
    """``raw`` as an ``expected`` message: already one, its bytes, or its config dict."""
    if isinstance(raw, expected):
        return raw
    if isinstance(raw, Message):
        raise MessageError(f"expected {expected.__name__}, got {type(raw).__name__}")
    if isinstance(raw, bytes | bytearray | memoryview):
        return expected.from_bytes(bytes(raw))
    if isinstance(raw, Mapping):
        return expected.from_config(raw)
    raise MessageError(f"expected {expected.__name__}, got {type(raw).__name__}")


# ----------------------------------------------------------------------------- encoding


@cache
def _payload_fields(cls: type[Message]) -> tuple[tuple[str, str], ...]:
    hints = get_type_hints(cls)
    base = {f.name for f in dataclasses.fields(Message)}
    return tuple((f.name, _KINDS[hints[f.name]]) for f in dataclasses.fields(cls)
                 if f.name not in base)


def _encode(kind: str, value: Any, out: list[bytes], name: str) -> None:
    try:
        if kind == "int":
            out.append(struct.pack("<Q", value))
        elif kind == "bytes":
            out.append(struct.pack("<I", len(value)) + bytes(value))
        elif kind == "ints":
            out.append(struct.pack(f"<I{len(value)}Q", len(value), *value))
        else:
            out.append(struct.pack("<I", len(value)))
            for key in sorted(value):
                item = value[key].encode() if kind == "strmap" else bytes(value[key])
                out.append(struct.pack("<QI", key, len(item)) + item)
    except (struct.error, TypeError, AttributeError, UnicodeError) as err:
        raise MessageError(f"field {name}: {err}") from None


def _decode(kind: str, data: bytes, pos: int, name: str) -> tuple[Any, int]:
    try:
        if kind == "int":
            return struct.unpack_from("<Q", data, pos)[0], pos + 8
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if kind == "bytes":
            return _take(data, pos, count, name), pos + count
        if kind == "ints":
            _take(data, pos, 8 * count, name)
            return struct.unpack_from(f"<{count}Q", data, pos), pos + 8 * count
        out: dict[int, Any] = {}
        for _ in range(count):
            key, size = struct.unpack_from("<QI", data, pos)
            item = _take(data, pos + 12, size, name)
            if key in out:
                raise MessageError(f"field {name}: node {key} twice")
            out[key] = item.decode() if kind == "strmap" else item
            pos += 12 + size
        return out, pos
    except (struct.error, UnicodeError) as err:
        raise MessageError(f"field {name}: truncated or malformed ({err})") from None


def _take(data: bytes, pos: int, size: int, name: str) -> bytes:
    if pos + size > len(data):
        raise MessageError(f"field {name}: truncated")
    return data[pos : pos + size]


def _get(config: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in config:
        raise MessageError(f"missing key {key!r}")
    value = config[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MessageError(f"key {key!r} must be an int, got {type(value).__name__}")
    if kind is int and not 0 <= value <= _U64_MAX:
        raise MessageError(f"key {key!r} must be a u64, got {value}")
    if kind is bytes and not isinstance(value, bytes):
        raise MessageError(f"key {key!r} must be bytes, got {type(value).__name__}")
    return value


def _get_list(config: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    if key not in config:
        raise MessageError(f"missing key {key!r}")
    value = config[key]
    if not isinstance(value, list):
        raise MessageError(f"key {key!r} must be a list, got {type(value).__name__}")
    for item in value:
        if kind is int:
            ok = isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= _U64_MAX
        else:
            ok = isinstance(item, kind)
        if not ok:
            raise MessageError(f"key {key!r} must hold {kind.__name__} values")
    return value
