"""The versioned binary wire format of client updates and global models (decode = validate).

Layout (version 1, all integers little-endian)::

    offset  field        type     meaning
    0       magic        4 bytes  b"FLFL"
    4       version      u8       1
    5       kind         u8       1 = update (client -> coordinator), 2 = model (downlink)
    6       round        u32      server round the blob belongs to (replay protection)
    10      mask_id      u64      masks.mask_id of the pruning mask in force (0 = none)
    18      count        u16      number of tensor specs
    20      specs        count x: name_len u16 | name utf-8 | dtype u8 | ndim u8 (<= 8) |
                                  dims u32 x ndim | stored u32 | scale f32
    ..      payloads     in spec order, each ``stored * itemsize`` bytes, no padding
    end-4   crc32        u32      zlib.crc32 of every byte before it

dtype codes: 1 int8, 2 float16, 3 float32 (values), 4 bitmap (uint8, ``stored`` =
``ceil(prod(dims) / 8)`` bytes of a packed mask, models only), 5 uint16 and 6 uint32 (ring elements
of a securely masked int8 sum, for the secure-aggregation layer). ``stored`` is the number of
values sent: ``prod(dims)`` for a dense tensor, the mask's kept count for a sparse one (values in
C order of the kept positions, see ``masks.sparse_values``). ``scale`` multiplies int8 values
(``quantize.int8_scale``); 1.0 for floats.

**Checksum: CRC32** (zlib, in every standard library, ~1 GB/s). It detects all burst errors up to
32 bits and any other accidental corruption with probability 1 - 2^-32, which is its job here.
It is *not* authentication: anyone can recompute it, so every field is validated anyway, the
transport (TLS) and secure aggregation (authenticated, round-bound messages) answer adversaries,
and SHA-256 would cost several times more CPU on a Pi Zero for no added guarantee.

**Why struct + numpy and not a serialization library.** Checked, all already installed with
Flower/Ray: *protobuf* (Flower's own wire format; needs a .proto and generated code, and still
leaves every semantic check to us), *msgpack* (schema-less: we would validate the same fields,
plus its types), *flatbuffers* (zero-copy, but its Python runtime has no buffer verifier, so
untrusted input gets no bounds checking), and *safetensors* (JSON header + raw payload; no
sparse tensors, scales or checksum). The format is twenty lines of fixed layout that a C, Kotlin
or Swift client can implement from the table above, and the decoder checks every length against
the bytes actually present before reading, so no new dependency is worth it.

**Entropy coding (optional envelope).** ``encode_*(..., entropy_coding=True)`` wraps the blob
as ``b"FLFZ" | u8 version (1) | zlib stream of the whole blob above``. Lossless; int8 updates are
heavy-tailed (most values near 0), so zlib shrinks them 2.2-2.9x (measured on digits CNN
updates), float32 barely. Decoders accept both forms. The inflated size is bounded by
``max_bytes`` *while* inflating (``decompressobj.decompress(max_length=...)``), so a
decompression bomb fails fast. zlib (stdlib) over lzma (~15 % smaller, several times slower on a
Pi) and zstd (not in the 3.11 stdlib): it is everywhere, including Android/iOS. Securely masked
vectors are uniformly random and incompressible: do not entropy-code those.

Decoding raises :class:`CodecError` (a ``ValueError``) naming the first problem: oversized
(checked before anything is parsed), truncated, trailing bytes, bad magic, unsupported version,
wrong kind, malformed specs, checksum mismatch, wrong round or mask id, tensor names / shapes /
dtypes / counts / scales different from the expected ones, NaN/Inf, non-positive scales, an int8
-128 (the range is symmetric: a cohort's sum stays within 127 K). No allocation is ever sized by
an unchecked length field. The encoder refuses to write what the decoder would reject.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from fleetfl.compression import masks as pruning

MAGIC = b"FLFL"
VERSION = 1
ZMAGIC = b"FLFZ"  # entropy-coded envelope around a blob
ZVERSION = 1
_ZLIB_LEVEL = 6  # zlib's default: within ~2 % of level 9 on updates, several times faster
KIND_UPDATE, KIND_MODEL = 1, 2
MAX_NDIM = 8
DEFAULT_MAX_ELEMENTS = 1 << 28  # per tensor, dense: 1 GiB of float32

_HEADER = struct.Struct("<4sBBIQH")  # magic, version, kind, round, mask_id, count
_U16, _U32, _CRC = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<I")
_TAIL = struct.Struct("<If")  # stored count, scale
_BITMAP = 4
_DTYPES = {1: np.dtype("<i1"), 2: np.dtype("<f2"), 3: np.dtype("<f4"), _BITMAP: np.dtype("u1"),
           5: np.dtype("<u2"), 6: np.dtype("<u4")}
_CODES = {np.dtype(d).newbyteorder("="): c for c, d in _DTYPES.items() if c != _BITMAP}
_F32_MAX = float(np.finfo(np.float32).max)
_KIND_NAMES = {KIND_UPDATE: "an update", KIND_MODEL: "a model"}


class CodecError(ValueError):
    """A blob that must not be used; ``reason`` says why (for the rejection log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TensorExpect(NamedTuple):
    """What the receiver expects of one tensor; a plain ``(shape, dtype, count)`` also works."""

    shape: tuple[int, ...]
    dtype: Any  # anything np.dtype() accepts
    count: int  # stored values (kept coordinates)
    scale: float | None = None  # if set, the blob's f32 scale must equal float32(scale)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as described in a blob."""

    name: str
    dtype: np.dtype  # native-order dtype of the values (uint8 for a bitmap)
    shape: tuple[int, ...]  # full (dense) shape
    count: int  # values stored (bytes for a bitmap)
    scale: float  # int8 step; 1.0 for floats and bitmaps
    bitmap: bool = False  # a packed pruning mask of tensor ``name`` (models only)


@dataclass(frozen=True)
class DecodedUpdate:
    """A validated blob. ``values[name]`` is 1-D, ``specs[name].count`` long, native dtype."""

    round: int
    mask_id: int
    specs: dict[str, TensorSpec]
    values: dict[str, np.ndarray]

    def dense(self, name: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` at its full shape: scattered under ``mask`` (0 elsewhere) if sparse."""
        return pruning.scatter_values(self.values[name], mask, self.specs[name].shape)


@dataclass(frozen=True)
class DecodedModel(DecodedUpdate):
    """A validated model blob with the masks in force (from the blob or the receiver's own)."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    masks_included: bool = False

    def dense_all(self) -> dict[str, np.ndarray]:
        """Every tensor at full shape (stored dtype), zeros at pruned positions."""
        return {name: self.dense(name, self.masks.get(name)) for name in self.values}


# ----------------------------------------------------------------------------- encoding


def encode_update(
    tensors: Mapping[str, np.ndarray],
    *,
    round: int,
    mask_id: int,
    scales: Mapping[str, float],
    masks: Mapping[str, np.ndarray] | None = None,
    entropy_coding: bool = False,
) -> bytes:
    """Encode a client update. ``tensors`` are full-shape arrays (int8, float16/32, uint16/32).

    A tensor with an entry in ``masks`` is sent sparse (only kept positions); ``mask_id`` must
    then be ``mask_id(masks)``. ``scales[name]`` is required for int8 tensors (the int8 scale)
    and defaults to 1.0 otherwise. Raises ``ValueError`` for inputs the format cannot carry.
    """
    masks = masks or {}
    if masks and mask_id != pruning.mask_id(masks):
        raise ValueError("mask_id does not match the masks the update is sparse under")
    blob = _encode(KIND_UPDATE, tensors, round, mask_id, scales, masks, {})
    return entropy_encode(blob) if entropy_coding else blob


def encode_model(
    tensors: Mapping[str, np.ndarray],
    *,
    round: int,
    scales: Mapping[str, float],
    masks: Mapping[str, np.ndarray] | None = None,
    include_masks: bool = False,
    entropy_coding: bool = False,
) -> bytes:
    """Encode the global model, sparse under ``masks`` (mask id computed from them).

    ``include_masks`` appends the masks as bitmaps (1 bit per weight); send them when the client
    may not hold this mask yet, i.e. when the mask changed since it last received one.
    """
    masks = masks or {}
    bitmaps = pruning.pack_masks(masks) if include_masks else {}
    blob = _encode(KIND_MODEL, tensors, round, pruning.mask_id(masks), scales, masks, bitmaps)
    return entropy_encode(blob) if entropy_coding else blob


def entropy_encode(blob: bytes) -> bytes:
    """Wrap ``blob`` in the lossless zlib envelope (see the module docstring)."""
    return ZMAGIC + bytes([ZVERSION]) + zlib.compress(blob, _ZLIB_LEVEL)


def entropy_decode(data: Any, max_bytes: int) -> bytes:
    """Unwrap an envelope, never inflating past ``max_bytes``; plain blobs pass through."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(ZMAGIC):
        return data
    # zlib adds at most ~0.03 % + a few bytes to incompressible input.
    if len(data) > max_bytes + max_bytes // 1000 + 64:
        raise CodecError(f"oversized: {len(data)} compressed bytes > limit {max_bytes}")
    if len(data) < len(ZMAGIC) + 1 or data[len(ZMAGIC)] != ZVERSION:
        raise CodecError("unsupported or truncated entropy-coding envelope")
    inflater = zlib.decompressobj()
    try:
        blob = inflater.decompress(data[len(ZMAGIC) + 1 :], max_bytes + 1)
    except zlib.error as err:
        raise CodecError(f"corrupt entropy-coded stream: {err}") from None
    if len(blob) > max_bytes:
        raise CodecError(f"oversized: inflates past the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise CodecError("truncated entropy-coded stream")
    if inflater.unused_data:
        raise CodecError(f"{len(inflater.unused_data)} trailing bytes after the zlib stream")
    return blob


def _encode(kind: int, tensors: Mapping[str, np.ndarray], server_round: int, mid: int,
            scales: Mapping[str, float], masks: Mapping[str, np.ndarray],
            bitmaps: Mapping[str, np.ndarray]) -> bytes:
    if not 0 <= server_round < 2**32 or not 0 <= mid < 2**64:
        raise ValueError(f"round must fit u32 and mask_id u64, got {server_round}, {mid}")
    if unknown := set(masks) - set(tensors):
        raise ValueError(f"masks for unknown tensors: {sorted(unknown)[:4]}")
    if len(tensors) + len(bitmaps) > 0xFFFF:
        raise ValueError("at most 65535 tensors per blob")
    specs, payloads = [], []
    for name, tensor in tensors.items():
        a = np.asarray(tensor)
        code = _CODES.get(a.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no wire code")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"tensor {name!r} contains NaN or Inf")
        if code == 1 and a.size and a.min() == -128:
            raise ValueError(f"int8 tensor {name!r} holds -128; the range is [-127, 127]")
        if code == 1 and name not in scales:
            raise ValueError(f"int8 tensor {name!r} needs a scale")
        scale = float(scales.get(name, 1.0))
        if not (0 < scale <= _F32_MAX and np.float32(scale) > 0):  # also rejects NaN
            raise ValueError(f"tensor {name!r}: scale {scale} is not positive finite in f32")
        values = pruning.sparse_values(a, masks.get(name))
        specs.append(_spec_bytes(name, code, a.shape, values.size, scale))
        payloads.append(values.astype(_DTYPES[code], copy=False).tobytes())
    for name, bits in bitmaps.items():
        specs.append(_spec_bytes(name, _BITMAP, np.shape(masks[name]), bits.size, 1.0))
        payloads.append(bits.tobytes())
    body = b"".join([_HEADER.pack(MAGIC, VERSION, kind, server_round, mid, len(specs)),
                     *specs, *payloads])
    return body + _CRC.pack(zlib.crc32(body))


def _spec_bytes(name: str, code: int, shape: Sequence[int], count: int, scale: float) -> bytes:
    raw = name.encode("utf-8")
    if not 0 < len(raw) <= 0xFFFF or len(shape) > MAX_NDIM or max(shape, default=0) >= 2**32:
        raise ValueError(f"tensor {name!r}: name, ndim (<= {MAX_NDIM}) or dims out of range")
    if count >= 2**32:
        raise ValueError(f"tensor {name!r}: {count} values exceed the u32 count")
    return (_U16.pack(len(raw)) + raw + struct.pack(f"<BB{len(shape)}I", code, len(shape), *shape)
            + _TAIL.pack(count, scale))


def update_size(expected: Mapping[str, TensorExpect | tuple]) -> int:
    """Exact byte size of an update blob matching ``expected``: use it as ``max_bytes``."""
    size = _HEADER.size + _CRC.size
    for name, exp in expected.items():
        exp = TensorExpect(*exp)
        size += _U16.size + len(name.encode("utf-8")) + 2 + 4 * len(exp.shape) + _TAIL.size
        size += int(exp.count) * np.dtype(exp.dtype).itemsize
    return size


def model_size_bound(shapes: Mapping[str, Sequence[int]]) -> int:
    """Largest model blob of tensors ``shapes`` (dense float32 + all bitmaps): a ``max_bytes``."""
    size = _HEADER.size + _CRC.size
    for name, shape in shapes.items():
        spec = _U16.size + len(name.encode("utf-8")) + 2 + 4 * len(shape) + _TAIL.size
        elements = math.prod(shape)
        size += 2 * spec + 4 * elements + (elements + 7) // 8
    return size


def expect_update(
    shapes: Mapping[str, Sequence[int]],
    masks: Mapping[str, np.ndarray] | None = None,
    *,
    dtype: Any = np.int8,
    scale: float | None = None,
) -> dict[str, TensorExpect]:
    """Expectations for an update of tensors ``shapes``, sparse where ``masks`` has a mask."""
    masks = masks or {}
    return {
        name: TensorExpect(
            tuple(int(d) for d in shape), np.dtype(dtype),
            int(masks[name].sum()) if name in masks else math.prod(shape), scale)
        for name, shape in shapes.items()
    }


# ----------------------------------------------------------------------------- decoding


class _Reader:
    """Sequential reads that never pass ``end`` (the checksum's offset)."""

    def __init__(self, buf: memoryview, end: int) -> None:
        self.buf, self.pos, self.end = buf, 0, end

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise CodecError(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"{max(self.end - self.pos, 0)} left")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def _parse(blob: Any, kind: int, max_bytes: int,
           max_elements: int) -> tuple[int, int, list[TensorSpec], list[np.ndarray]]:
    """Structure, sizes and checksum; returns (round, mask_id, specs, 1-D arrays)."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(blob).__name__}")
    buf = memoryview(blob).cast("B")
    if buf.nbytes > max_bytes:  # first, before reading anything
        raise CodecError(f"oversized: {buf.nbytes} bytes > limit {max_bytes}")
    if buf.nbytes < _HEADER.size + _CRC.size:
        raise CodecError(f"truncated: {buf.nbytes} bytes, a blob has at least "
                         f"{_HEADER.size + _CRC.size}")
    reader = _Reader(buf, buf.nbytes - _CRC.size)
    magic, version, got_kind, server_round, mid, count = reader.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"unsupported version {version} (this decoder reads {VERSION})")
    if got_kind != kind:
        raise CodecError(f"expected {_KIND_NAMES[kind]} blob, got kind {got_kind}")
    specs = [_read_spec(reader, i, max_elements) for i in range(count)]
    payload = sum(s.count * s.dtype.itemsize for s in specs)
    needed = reader.pos + payload + _CRC.size
    if buf.nbytes < needed:
        raise CodecError(f"truncated: specs announce {needed} bytes, got {buf.nbytes}")
    if buf.nbytes > needed:
        raise CodecError(f"{buf.nbytes - needed} trailing bytes after the checksum")
    (crc,) = _CRC.unpack(buf[-_CRC.size :])
    if crc != zlib.crc32(buf[: -_CRC.size]):
        raise CodecError("checksum mismatch (corrupted in transit)")
    arrays = []
    for spec in specs:
        raw = reader.take(spec.count * spec.dtype.itemsize, f"payload of {spec.name!r}")
        wire = _DTYPES[_code_of(spec)]
        arrays.append(np.frombuffer(raw, dtype=wire).astype(spec.dtype))  # copy, native order
    return server_round, mid, specs, arrays


def _code_of(spec: TensorSpec) -> int:
    return _BITMAP if spec.bitmap else _CODES[spec.dtype]


def _read_spec(reader: _Reader, i: int, max_elements: int) -> TensorSpec:
    (n,) = reader.unpack(_U16, f"name length of tensor {i}")
    try:
        name = bytes(reader.take(n, f"name of tensor {i}")).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"tensor {i}: name is not valid utf-8") from None
    if not name:
        raise CodecError(f"tensor {i}: empty name")
    code, ndim = reader.unpack(struct.Struct("<BB"), f"dtype of {name!r}")
    if code not in _DTYPES:
        raise CodecError(f"tensor {name!r}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise CodecError(f"tensor {name!r}: ndim {ndim} > {MAX_NDIM}")
    shape = reader.unpack(struct.Struct(f"<{ndim}I"), f"dims of {name!r}")
    stored, scale = reader.unpack(_TAIL, f"count of {name!r}")
    size = math.prod(shape)
    if size > max_elements:
        raise CodecError(f"tensor {name!r}: {size} elements > limit {max_elements}")
    if code == _BITMAP:
        if stored != (size + 7) // 8:
            raise CodecError(f"bitmap {name!r}: {stored} bytes for {size} bits")
        return TensorSpec(name, np.dtype(np.uint8), shape, stored, scale, bitmap=True)
    if stored > size:
        raise CodecError(f"tensor {name!r}: {stored} values stored for {size} elements")
    return TensorSpec(name, _DTYPES[code].newbyteorder("="), shape, stored, scale)


def _check_values(specs: list[TensorSpec], arrays: list[np.ndarray]) -> None:
    for spec, a in zip(specs, arrays, strict=True):
        if not (math.isfinite(spec.scale) and spec.scale > 0):
            raise CodecError(f"tensor {spec.name!r}: scale {spec.scale} is not positive finite")
        if spec.dtype.kind == "f" and not np.isfinite(a).all():
            raise CodecError(f"tensor {spec.name!r}: contains NaN or Inf")
        if spec.dtype == np.int8 and a.size and a.min() == -128:  # sums rely on |q| <= 127
            raise CodecError(f"tensor {spec.name!r}: int8 value -128 outside [-127, 127]")


def _check_header(what: str, server_round: int, mid: int, expected_round: int | None,
                  expected_mask_id: int | None) -> None:
    if expected_round is not None and server_round != expected_round:
        raise CodecError(f"{what} is for round {server_round}, expected {expected_round} "
                         f"(stale or replayed)")
    if expected_mask_id is not None and mid != expected_mask_id:
        raise CodecError(f"{what} is under mask {mid:#018x}, expected {expected_mask_id:#018x}")


def _unique(specs: list[TensorSpec]) -> None:
    seen = set()
    for s in specs:
        key = (s.name, s.bitmap)
        if key in seen:
            raise CodecError(f"tensor {s.name!r} appears twice")
        seen.add(key)


def decode_update(
    blob: bytes,
    *,
    max_bytes: int,
    expected: Mapping[str, TensorExpect | tuple] | None = None,
    expected_round: int | None = None,
    expected_mask_id: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> DecodedUpdate:
    """Validate and decode an update blob; raises :class:`CodecError` naming the problem.

    ``expected`` (name -> shape, dtype, count[, scale]) must match the blob's tensors exactly:
    same names, shapes, dtypes, stored counts (and f32 scales if given). ``max_bytes`` bounds
    the blob before parsing (``update_size(expected)`` is the exact size).
    """
    blob = entropy_decode(blob, max_bytes)
    server_round, mid, specs, arrays = _parse(blob, KIND_UPDATE, max_bytes, max_elements)
    _unique(specs)
    if any(s.bitmap for s in specs):
        raise CodecError("an update cannot carry mask bitmaps")
    _check_header("update", server_round, mid, expected_round, expected_mask_id)
    if expected is not None:
        _check_expected(specs, expected)
    _check_values(specs, arrays)
    return DecodedUpdate(server_round, mid, {s.name: s for s in specs},
                         {s.name: a for s, a in zip(specs, arrays, strict=True)})


def _check_expected(specs: list[TensorSpec], expected: Mapping[str, TensorExpect | tuple]) -> None:
    got = [s.name for s in specs]
    if set(got) != set(expected):
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        raise CodecError(f"tensor names differ: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(extra)[:4]}")
    for s in specs:
        exp = TensorExpect(*expected[s.name])
        if s.shape != tuple(exp.shape):
            raise CodecError(f"tensor {s.name!r}: shape {s.shape} != expected {tuple(exp.shape)}")
        if s.dtype != np.dtype(exp.dtype):
            raise CodecError(f"tensor {s.name!r}: dtype {s.dtype} != {np.dtype(exp.dtype)}")
        if s.count != exp.count:
            raise CodecError(f"tensor {s.name!r}: {s.count} values != expected {exp.count}")
        if exp.scale is not None and s.scale != float(np.float32(exp.scale)):
            raise CodecError(f"tensor {s.name!r}: scale {s.scale} != expected "
                             f"{float(np.float32(exp.scale))}")


def decode_model(
    blob: bytes,
    *,
    max_bytes: int,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
    expected_round: int | None = None,
    known_masks: Mapping[str, np.ndarray] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> DecodedModel:
    """Validate and decode a model blob; raises :class:`CodecError` naming the problem.

    Masks in force: the blob's bitmaps if it carries them (their ``mask_id`` must equal the
    header's), else ``known_masks`` (the receiver's cached masks; their id must equal the
    header's, else the receiver needs the bitmaps), else none (header id must be 0). Each tensor
    must then hold exactly its mask's kept count, or all its elements if unmasked.
    ``expected_shapes`` (name -> shape), if given, must match names and shapes exactly.
    """
    blob = entropy_decode(blob, max_bytes)
    server_round, mid, specs, arrays = _parse(blob, KIND_MODEL, max_bytes, max_elements)
    _unique(specs)
    _check_header("model", server_round, mid, expected_round, None)
    values = {s.name: a for s, a in zip(specs, arrays, strict=True) if not s.bitmap}
    vspecs = {s.name: s for s in specs if not s.bitmap}
    bitmaps = {s.name: a for s, a in zip(specs, arrays, strict=True) if s.bitmap}
    shapes = {s.name: s.shape for s in specs if s.bitmap}
    if unknown := set(bitmaps) - set(values):
        raise CodecError(f"bitmaps for unknown tensors: {sorted(unknown)[:4]}")
    for name, shape in shapes.items():
        if vspecs[name].shape != shape:
            raise CodecError(f"bitmap {name!r}: shape {shape} != tensor {vspecs[name].shape}")
    masks = _masks_in_force(mid, bitmaps, shapes, known_masks)
    if expected_shapes is not None:
        got = {n: s.shape for n, s in vspecs.items()}
        want = {n: tuple(int(d) for d in s) for n, s in expected_shapes.items()}
        if got != want:
            diff = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
            raise CodecError(f"tensor names or shapes differ from the model's: {diff[:4]}")
    for name, spec in vspecs.items():
        mask = masks.get(name)
        if mask is not None and mask.shape != spec.shape:
            raise CodecError(f"tensor {name!r}: mask shape {mask.shape} != {spec.shape}")
        want = int(mask.sum()) if mask is not None else math.prod(spec.shape)
        if spec.count != want:
            raise CodecError(f"tensor {name!r}: {spec.count} values, its mask keeps {want}")
    _check_values(specs, arrays)
    return DecodedModel(server_round, mid, vspecs, values, masks, bool(bitmaps))


def _masks_in_force(mid: int, bitmaps: dict[str, np.ndarray], shapes: dict[str, tuple],
                    known: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if bitmaps:
        try:
            masks = pruning.unpack_masks(bitmaps, shapes)
        except ValueError as err:
            raise CodecError(str(err)) from None
        if pruning.mask_id(masks) != mid:
            raise CodecError("the bitmaps do not hash to the header's mask id")
        return masks
    if mid == pruning.NO_MASK:
        return {}
    if known is not None and pruning.mask_id(known) == mid:
        return dict(known)
    raise CodecError(f"model is sparse under mask {mid:#018x}, which the receiver does not hold "
                     f"(resend it with include_masks=True)")
