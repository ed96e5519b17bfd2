"""The update/model wire codec: documented layout, round-trips, and rejection of bad blobs."""

import contextlib
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetfl.compression.codec import (
    CodecError,
    TensorExpect,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    expect_update,
    model_size_bound,
    update_size,
)
from fleetfl.compression.masks import NO_MASK, mask_id, pack_masks
from fleetfl.compression.quantize import int8_scale

MB = 1 << 20
DTYPES = [np.int8, np.float16, np.float32, np.uint16, np.uint32]
SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 8), "fc.bias": (10,)}


def raw_blob(specs, payload=b"", *, kind=1, server_round=0, mid=0, version=1, magic=b"FLFL",
             crc=True):
    """The layout of the codec's docstring, written independently of the encoder."""
    body = struct.pack("<4sBBIQH", magic, version, kind, server_round, mid, len(specs))
    for name, code, shape, count, scale in specs:
        raw = name.encode()
        body += struct.pack(f"<H{len(raw)}sBB{len(shape)}IIf", len(raw), raw, code, len(shape),
                            *shape, count, scale)
    body += payload
    return body + struct.pack("<I", zlib.crc32(body)) if crc else body


def _update(seed=0, sparsity=0.5, server_round=7):
    """A realistic int8 update of SHAPES, sparse under masks of the two weights."""
    rng = np.random.default_rng(seed)
    masks = {n: rng.random(SHAPES[n]) >= sparsity for n in ("conv.weight", "fc.weight")}
    tensors = {n: rng.integers(-127, 128, size=s).astype(np.int8) for n, s in SHAPES.items()}
    scale = int8_scale(0.05)
    blob = encode_update(tensors, round=server_round, mask_id=mask_id(masks),
                         scales=dict.fromkeys(SHAPES, scale), masks=masks)
    expected = expect_update(SHAPES, masks, scale=0.05 / 127)
    return blob, tensors, masks, expected


def _decode(blob, **kwargs):
    kwargs.setdefault("max_bytes", MB)
    return decode_update(blob, **kwargs)


# ------------------------------------------------------------------ layout and round-trips


def test_encoder_writes_the_documented_layout():
    q = np.array([[1, -2], [3, 4]], np.int8)
    mask = np.array([[True, False], [True, True]])
    blob = encode_update({"w": q}, round=3, mask_id=mask_id({"w": mask}), scales={"w": 0.5},
                         masks={"w": mask})
    expected = raw_blob([("w", 1, (2, 2), 3, 0.5)], bytes(np.array([1, 3, 4], np.int8)),
                        server_round=3, mid=mask_id({"w": mask}))
    assert blob == expected
    assert len(blob) == update_size({"w": ((2, 2), np.int8, 3)})


def test_update_round_trip_with_expectations():
    blob, tensors, masks, expected = _update()
    assert len(blob) == update_size(expected)
    out = decode_update(blob, max_bytes=update_size(expected), expected=expected,
                        expected_round=7, expected_mask_id=mask_id(masks))
    assert out.round == 7 and out.mask_id == mask_id(masks)
    for name, q in tensors.items():
        assert out.values[name].ndim == 1 and out.values[name].dtype == np.int8
        assert (out.dense(name, masks.get(name)) == np.where(masks.get(name, True), q, 0)).all()
        assert out.specs[name].scale == np.float32(0.05 / 127)


@st.composite
def tensor_sets(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=5, unique=True))
    tensors, masks, scales = {}, {}, {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
        elements = (st.floats(-1e4, 1e4, width=16 if dtype == np.float16 else 32)
                    if np.dtype(dtype).kind == "f" else st.integers(-127, 127)
                    if dtype == np.int8 else None)
        tensors[name] = draw(hnp.arrays(dtype, shape, elements=elements))
        if len(shape) and draw(st.booleans()):
            masks[name] = draw(hnp.arrays(np.bool_, shape))
        scales[name] = draw(st.floats(2.0**-60, 2.0**60, width=32))
    return tensors, masks, scales


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensor_sets(), server_round=st.integers(0, 2**32 - 1))
def test_update_round_trip_property(case, server_round):
    tensors, masks, scales = case
    blob = encode_update(tensors, round=server_round, mask_id=mask_id(masks), scales=scales,
                         masks=masks)
    expected = {n: TensorExpect(t.shape, t.dtype, int(masks[n].sum()) if n in masks else t.size,
                                scales[n]) for n, t in tensors.items()}
    out = decode_update(blob, max_bytes=len(blob), expected=expected,
                        expected_round=server_round, expected_mask_id=mask_id(masks))
    assert list(out.values) == list(tensors)
    for name, t in tensors.items():
        dense = out.dense(name, masks.get(name))
        assert dense.dtype == t.dtype and dense.shape == t.shape
        assert np.array_equal(dense, np.where(masks.get(name, True), t, 0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensor_sets(), include=st.booleans())
def test_model_round_trip_property(case, include):
    tensors, masks, scales = case
    blob = encode_model(tensors, round=5, scales=scales, masks=masks, include_masks=include)
    bound = model_size_bound({n: t.shape for n, t in tensors.items()})
    assert len(blob) <= bound
    known = masks if not include else None
    out = decode_model(blob, max_bytes=len(blob), expected_round=5, known_masks=known,
                       expected_shapes={n: t.shape for n, t in tensors.items()})
    assert out.mask_id == mask_id(masks) and out.masks_included == (include and bool(masks))
    assert set(out.masks) == set(masks)
    dense = out.dense_all()
    for name, t in tensors.items():
        assert np.array_equal(dense[name], np.where(masks.get(name, True), t, 0))


def test_model_masks_are_cheaper_than_values_and_sent_only_when_asked():
    rng = np.random.default_rng(0)
    w = {"fc.weight": rng.normal(size=(100, 100)).astype(np.float32)}
    masks = {"fc.weight": np.abs(w["fc.weight"]) > 1.0}
    with_bits = encode_model(w, round=1, scales={}, masks=masks, include_masks=True)
    without = encode_model(w, round=1, scales={}, masks=masks)
    assert len(with_bits) - len(without) < 10_000 / 8 + 64  # 1 bit per weight
    with pytest.raises(CodecError, match="does not hold"):
        decode_model(without, max_bytes=MB)
    stale = {"fc.weight": ~masks["fc.weight"]}
    with pytest.raises(CodecError, match="does not hold"):
        decode_model(without, max_bytes=MB, known_masks=stale)
    assert decode_model(without, max_bytes=MB, known_masks=masks).masks_included is False


# ------------------------------------------------------------------ rejection, one reason each


def test_rejects_oversized_before_parsing():
    with pytest.raises(CodecError, match="oversized"):
        _decode(b"garbage" * 100, max_bytes=100)  # not even the magic is read


def test_rejects_non_bytes_truncated_and_trailing():
    blob, *_ = _update()
    with pytest.raises(CodecError, match="expected bytes"):
        _decode("FLFL")
    for n in (0, 5, 23, 40, len(blob) - 1):
        with pytest.raises(CodecError, match="truncated"):
            _decode(blob[:n])
    with pytest.raises(CodecError, match="trailing"):
        _decode(blob + b"\0")


def test_rejects_bad_magic_version_and_kind():
    with pytest.raises(CodecError, match="bad magic"):
        _decode(raw_blob([], magic=b"FLFX"))
    with pytest.raises(CodecError, match="unsupported version 2"):
        _decode(raw_blob([], version=2))
    with pytest.raises(CodecError, match="expected an update"):
        _decode(raw_blob([], kind=2))
    with pytest.raises(CodecError, match="expected a model"):
        decode_model(raw_blob([], kind=1), max_bytes=MB)


def test_rejects_checksum_mismatch():
    blob, *_ = _update()
    bad = bytearray(blob)
    bad[-10] ^= 0x01  # one bit of the last payload byte
    with pytest.raises(CodecError, match="checksum"):
        _decode(bytes(bad))


def test_rejects_replayed_round_and_foreign_mask():
    blob, _, masks, _ = _update(server_round=6)
    with pytest.raises(CodecError, match="round 6, expected 7"):
        _decode(blob, expected_round=7)
    with pytest.raises(CodecError, match="under mask"):
        _decode(blob, expected_mask_id=mask_id(masks) ^ 1)


def test_rejects_updates_that_differ_from_expectations():
    blob, _, masks, expected = _update()
    cases = {
        "names differ": {**expected, "extra": expected["fc.bias"]},
        "shape": {**expected, "fc.bias": expected["fc.bias"]._replace(shape=(11,))},
        "dtype": {**expected, "fc.bias": expected["fc.bias"]._replace(dtype=np.float32)},
        "values != expected": {**expected, "fc.weight": expected["fc.weight"]._replace(count=3)},
        "scale": {**expected, "fc.bias": expected["fc.bias"]._replace(scale=1.0)},
    }
    for reason, exp in cases.items():
        with pytest.raises(CodecError, match=reason):
            _decode(blob, expected=exp)


@pytest.mark.parametrize(
    ("specs", "payload", "reason"),
    [
        ([("w", 3, (2,), 2, 1.0)], np.array([1, np.nan], "<f4").tobytes(), "NaN or Inf"),
        ([("w", 2, (1,), 1, 1.0)], np.array([np.inf], "<f2").tobytes(), "NaN or Inf"),
        ([("w", 1, (2,), 2, 0.0)], b"\1\2", "scale 0.0"),
        ([("w", 1, (2,), 2, 1.0)], b"\x80\1", "-128 outside"),
        ([("w", 1, (2,), 2, -1.0)], b"\1\2", "scale -1.0"),
        ([("w", 1, (2,), 2, float("nan"))], b"\1\2", "scale nan"),
        ([("w", 1, (1,), 1, 1.0), ("w", 1, (1,), 1, 1.0)], b"\1\2", "twice"),
        ([("w", 1, (2,), 3, 1.0)], b"\1\2\3", "3 values stored for 2"),
        ([("w", 9, (2,), 2, 1.0)], b"\1\2", "unknown dtype code 9"),
        ([("w", 1, (1,) * 9, 1, 1.0)], b"\1", "ndim 9"),
        ([("", 1, (1,), 1, 1.0)], b"\1", "empty name"),
        ([("w", 4, (3,), 1, 1.0)], b"\1", "cannot carry mask bitmaps"),
        ([("w", 1, (65536, 65536), 0, 1.0)], b"", "elements > limit"),
    ],
)
def test_rejects_well_formed_but_invalid_content(specs, payload, reason):
    with pytest.raises(CodecError, match=reason):
        _decode(raw_blob(specs, payload))


def test_rejects_invalid_utf8_names():
    blob = raw_blob([("w", 1, (1,), 1, 1.0)], b"\1")
    bad = blob.replace(b"\x01\x00w", b"\x01\x00\xff")  # the name's single byte
    bad = bad[:-4] + struct.pack("<I", zlib.crc32(bad[:-4]))
    with pytest.raises(CodecError, match="utf-8"):
        _decode(bad)


def test_model_rejects_inconsistent_masks():
    w = {"w": np.ones((4, 4), np.float32)}
    m = {"w": np.eye(4, dtype=bool)}
    bits = pack_masks(m)["w"].tobytes()
    values = np.ones(4, "<f4").tobytes()
    spec_w, spec_bits = ("w", 3, (4, 4), 4, 1.0), ("w", 4, (4, 4), 2, 1.0)
    lying = raw_blob([spec_w, spec_bits], values + bits, kind=2, mid=mask_id(m) ^ 1)
    with pytest.raises(CodecError, match="do not hash"):
        decode_model(lying, max_bytes=MB)
    padded = raw_blob([("w", 3, (3, 3), 3, 1.0), ("w", 4, (3, 3), 2, 1.0)],
                      np.ones(3, "<f4").tobytes() + b"\x88\x81", kind=2, mid=1)
    with pytest.raises(CodecError, match="padding"):
        decode_model(padded, max_bytes=MB)
    wrong_count = raw_blob([("w", 3, (4, 4), 5, 1.0), spec_bits],
                           np.ones(5, "<f4").tobytes() + bits, kind=2, mid=mask_id(m))
    with pytest.raises(CodecError, match="5 values, its mask keeps 4"):
        decode_model(wrong_count, max_bytes=MB)
    sparse_without_mask = raw_blob([("w", 3, (4, 4), 4, 1.0)], values, kind=2, mid=NO_MASK)
    with pytest.raises(CodecError, match="its mask keeps 16"):
        decode_model(sparse_without_mask, max_bytes=MB)
    blob = encode_model(w, round=1, scales={})
    with pytest.raises(CodecError, match="differ from the model"):
        decode_model(blob, max_bytes=MB, expected_shapes={"w": (4, 5)})


def test_a_tiny_blob_claiming_gigabytes_fails_fast():
    header = raw_blob([("w", 3, (65535, 16384), 2**30, 1.0)], crc=False)[:40]
    started = time.perf_counter()
    for blob in (header[:10], header, header + b"\0" * 4):
        with pytest.raises(CodecError, match="truncated"):
            _decode(blob, max_bytes=2**40)
    assert time.perf_counter() - started < 0.5


def test_encoder_refuses_what_the_format_cannot_carry():
    ok = {"w": np.zeros(3, np.int8)}
    with pytest.raises(ValueError, match="-128"):
        encode_update({"w": np.array([-128], np.int8)}, round=0, mask_id=0, scales={"w": 1.0})
    with pytest.raises(ValueError, match="needs a scale"):
        encode_update(ok, round=0, mask_id=0, scales={})
    with pytest.raises(ValueError, match="NaN"):
        encode_update({"w": np.array([np.nan], np.float32)}, round=0, mask_id=0, scales={})
    with pytest.raises(ValueError, match="wire code"):
        encode_update({"w": np.zeros(3, np.float64)}, round=0, mask_id=0, scales={})
    with pytest.raises(ValueError, match="mask_id"):
        encode_update(ok, round=0, mask_id=5, scales={"w": 1.0}, masks={"w": np.ones(3, bool)})
    with pytest.raises(ValueError, match="u32"):
        encode_update(ok, round=2**32, mask_id=0, scales={"w": 1.0})
    with pytest.raises(ValueError, match="scale"):
        encode_update(ok, round=0, mask_id=0, scales={"w": 1e39})


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_byte_flips_are_always_rejected(data):
    blob, *_ = _update(seed=data.draw(st.integers(0, 3)))
    bad = bytearray(blob)
    positions = data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8,
                                   unique=True))
    for pos in positions:
        bad[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CodecError):
        _decode(bytes(bad))


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 10_000), extra=st.binary(min_size=1, max_size=64),
       model=st.booleans())
def test_fuzz_truncations_and_extensions_are_always_rejected(cut, extra, model):
    if model:
        rng = np.random.default_rng(0)
        masks = {"w": rng.random((8, 8)) > 0.5}
        blob = encode_model({"w": rng.normal(size=(8, 8)).astype(np.float16)}, round=1,
                            scales={}, masks=masks, include_masks=True)
        decode = decode_model
    else:
        blob, decode = _update()[0], decode_update
    for bad in (blob[: cut % len(blob)], blob + extra):
        with pytest.raises(CodecError):
            decode(bad, max_bytes=MB)


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=200), prefix=st.booleans())
def test_fuzz_random_bytes_are_always_rejected(junk, prefix):
    blob = (b"FLFL\x01\x01" + junk) if prefix else junk
    with pytest.raises(CodecError):
        _decode(blob)
    with pytest.raises(CodecError):
        decode_model(blob, max_bytes=MB)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), model=st.booleans())
def test_fuzz_past_the_checksum_never_raises_anything_but_codec_error(data, model):
    """Mutations with a recomputed CRC reach the structural checks: a blob decodes (a payload
    byte changed is a valid blob) or raises CodecError, never another exception."""
    if model:
        masks = {"w": np.arange(12).reshape(3, 4) % 3 > 0}
        blob = encode_model({"w": np.ones((3, 4), np.float16), "b": np.zeros(2, np.int8)},
                            round=1, scales={"b": 0.5}, masks=masks, include_masks=True)
        decode = decode_model
    else:
        blob, decode = _update()[0], decode_update
    bad = bytearray(blob[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        bad[data.draw(st.integers(0, len(bad) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 8))
    bad = bytes(bad[: len(bad) - cut]) + data.draw(st.binary(max_size=8))
    with contextlib.suppress(CodecError):
        decode(bad + struct.pack("<I", zlib.crc32(bad)), max_bytes=MB)


# ------------------------------------------------------------------ entropy-coding envelope


def _int8_update(n: int = 5000, seed: int = 0) -> tuple[dict, bytes, bytes]:
    from fleetfl.compression.quantize import int8_scale, quantize_int8

    rng = np.random.default_rng(seed)
    # Heavy-tailed, most values a few int8 steps from 0, as the adapted clip range makes them.
    delta = (rng.standard_t(3, n) * 0.001).astype(np.float32)
    q = {"w": quantize_int8(delta, 0.05, rng)}
    args = dict(round=3, mask_id=0, scales={"w": int8_scale(0.05)})
    return q, encode_update(q, **args), encode_update(q, **args, entropy_coding=True)


def test_entropy_coding_is_lossless_and_smaller():
    q, plain, packed = _int8_update()
    assert len(packed) < 0.6 * len(plain)
    exp = {"w": ((5000,), np.int8, 5000)}
    a = decode_update(plain, max_bytes=update_size(exp), expected=exp)
    b = decode_update(packed, max_bytes=update_size(exp), expected=exp)
    np.testing.assert_array_equal(a.values["w"], b.values["w"])
    np.testing.assert_array_equal(b.values["w"], q["w"])


def test_entropy_envelope_rejects_bombs_corruption_and_trailing_bytes():
    import zlib

    _, plain, packed = _int8_update()
    exp = {"w": ((5000,), np.int8, 5000)}
    limit = update_size(exp)
    bomb = b"FLFZ\x01" + zlib.compress(b"\0" * (100 * limit))
    for bad, reason in [
        (bomb, "inflates past"),
        (packed[:-7], "truncated"),
        (packed + b"junk", "trailing"),
        (packed[:5] + bytes([packed[5] ^ 0xFF]) + packed[6:], "corrupt"),
        (b"FLFZ\x02" + packed[5:], "unsupported"),
    ]:
        with pytest.raises(CodecError, match=reason):
            decode_update(bad, max_bytes=limit, expected=exp)
