"""Bit-layout codecs: round trips at the field boundaries, known values, batch == scalar."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyublk_fast._core import codec

UD_FIELDS = {"tag": 16, "op": 8, "tgt_data": 32}
UC_FIELDS = {"q_id": 12, "tag": 16, "offset": 25}
SP_FIELDS = {"q_id": 12, "tag": 12, "offset": 30}


def field(bits: int):
    """Integers in range, weighted towards 0 and the maximum."""
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


# -- reference layouts (written from the spec, independently of codec.pxd) ----------------

def ref_user_data(tag, op, tgt, target):
    return tag | op << 16 | tgt << 24 | int(target) << 63


def ref_user_copy(q_id, tag, off):
    return 0x8000_0000 + (q_id << 41 | tag << 25 | off)


def ref_splice(q_id, tag, off):
    return q_id << 42 | tag << 30 | off


def test_constants():
    assert (codec.USER_DATA_TAG_BITS, codec.USER_DATA_OP_BITS, codec.USER_DATA_TGT_BITS) == (16, 8, 32)
    assert codec.USER_COPY_BASE == 0x8000_0000
    assert (codec.USER_COPY_QID_BITS, codec.USER_COPY_TAG_BITS, codec.USER_COPY_OFF_BITS) == (12, 16, 25)
    assert (codec.SPLICE_QID_BITS, codec.SPLICE_TAG_BITS, codec.SPLICE_OFF_BITS) == (12, 12, 30)


# -- user_data ----------------------------------------------------------------------------

@given(field(16), field(8), field(32), st.booleans())
def test_user_data_round_trip(tag, op, tgt, target):
    ud = codec.encode_user_data(tag, op, tgt, target)
    assert ud == ref_user_data(tag, op, tgt, target)
    assert codec.decode_user_data(ud) == (tag, op, tgt, target)


def test_user_data_known_values():
    assert codec.encode_user_data(0, 0) == 0
    assert codec.encode_user_data(0xFFFF, 0xFF, 0xFFFF_FFFF, True) == 0x80FF_FFFF_FFFF_FFFF
    assert codec.encode_user_data(2, 1, 3, True) == (1 << 63) | (3 << 24) | (1 << 16) | 2
    # bits 56-62 are unused: decode ignores them
    assert codec.decode_user_data(0x7F00_0000_0000_0000) == (0, 0, 0, False)
    assert codec.decode_user_data(2**64 - 1) == (0xFFFF, 0xFF, 0xFFFF_FFFF, True)


@pytest.mark.parametrize("encode,fields,name,bits", [
    pytest.param(encode, fields, name, bits, id=f"{encode.__name__}-{name}")
    for encode, fields in ((codec.encode_user_data, UD_FIELDS), (codec.user_copy_pos, UC_FIELDS),
                           (codec.splice_pos, SP_FIELDS))
    for name, bits in fields.items()])
def test_field_out_of_range(encode, fields, name, bits):
    """Every encoder refuses each field just past its width, and below zero, naming both."""
    kw = dict.fromkeys(fields, 0)
    for bad in (1 << bits, -1):
        kw[name] = bad
        with pytest.raises(ValueError, match=f"{name}={bad} out of range.*{bits} bits"):
            encode(**kw)


def test_decode_user_data_out_of_range():
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match="user_data="):
            codec.decode_user_data(bad)


# -- USER_COPY pos ------------------------------------------------------------------------

@given(field(12), field(16), field(25))
def test_user_copy_round_trip(q_id, tag, off):
    pos = codec.user_copy_pos(q_id, tag, off)
    assert pos == ref_user_copy(q_id, tag, off)
    assert codec.decode_user_copy_pos(pos) == (q_id, tag, off)


def test_user_copy_known_values():
    assert codec.user_copy_pos(1, 2, 3) == 0x8000_0000 + (1 << 41 | 2 << 25 | 3)
    assert codec.user_copy_pos(0, 0) == 0x8000_0000
    assert codec.user_copy_pos(0, 1) == 0x8000_0000 + (1 << 25)
    assert codec.user_copy_pos(4095, 65535, (1 << 25) - 1) == 0x8000_0000 + (1 << 53) - 1


@pytest.mark.parametrize("pos", [0, 0x7FFF_FFFF, 0x8000_0000 + (1 << 53), 2**64 - 1])
def test_decode_user_copy_rejects_foreign_pos(pos):
    with pytest.raises(ValueError, match="not a USER_COPY position"):
        codec.decode_user_copy_pos(pos)


# -- splice pos ---------------------------------------------------------------------------

@given(field(12), field(12), field(30))
def test_splice_round_trip(q_id, tag, off):
    pos = codec.splice_pos(q_id, tag, off)
    assert pos == ref_splice(q_id, tag, off)
    assert codec.decode_splice_pos(pos) == (q_id, tag, off)


def test_splice_known_values():
    assert codec.splice_pos(1, 2, 3) == (1 << 42) | (2 << 30) | 3
    assert codec.splice_pos(4095, 4095, (1 << 30) - 1) == (1 << 54) - 1


def test_decode_splice_out_of_range():
    with pytest.raises(ValueError, match="pos="):
        codec.decode_splice_pos(1 << 54)


# -- batch == scalar ----------------------------------------------------------------------

def random_ud(rng, n):
    return rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300))
def test_decode_user_data_batch_matches_scalar(seed, n):
    ud = random_ud(np.random.default_rng(seed), n)
    tags, ops, tgts, targets = codec.decode_user_data_batch(ud)
    assert (tags.dtype, ops.dtype, tgts.dtype, targets.dtype) == (np.uint16, np.uint8, np.uint32, np.bool_)
    got = list(zip(tags.tolist(), ops.tolist(), tgts.tolist(), targets.tolist()))
    assert got == [codec.decode_user_data(int(u)) for u in ud]


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300))
def test_encode_user_data_batch_matches_scalar(seed, n):
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    ops = rng.integers(0, 1 << 8, n, dtype=np.uint8)
    tgts = rng.integers(0, 1 << 32, n, dtype=np.uint32)
    targets = rng.integers(0, 2, n).astype(np.bool_)
    out = codec.encode_user_data_batch(tags, ops, tgts, targets)
    assert out.dtype == np.uint64
    expect = [codec.encode_user_data(int(t), int(o), int(g), bool(b))
              for t, o, g, b in zip(tags, ops, tgts, targets)]
    assert out.tolist() == expect
    back = codec.decode_user_data_batch(out)
    for a, b in zip(back, (tags, ops, tgts, targets)):
        assert np.array_equal(a, b)


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300))
def test_splice_pos_batch_matches_scalar(seed, n):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 1 << 54, n, dtype=np.uint64)
    q, t, o = codec.decode_splice_pos_batch(pos)
    assert list(zip(q.tolist(), t.tolist(), o.tolist())) == [codec.decode_splice_pos(int(p)) for p in pos]


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), field(12))
def test_user_copy_pos_batch_matches_scalar(seed, n, q_id):
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, 1 << 16, n, dtype=np.uint32)
    offs = rng.integers(0, 1 << 25, n, dtype=np.uint32)
    out = codec.encode_user_copy_pos_batch(q_id, tags, offs)
    assert out.tolist() == [codec.user_copy_pos(q_id, int(t), int(o)) for t, o in zip(tags, offs)]


def test_batch_out_of_range_rejected():
    ok = np.zeros(4, np.uint32)
    with pytest.raises(ValueError, match="q_id=4096 out of range"):
        codec.encode_user_copy_pos_batch(4096, ok, ok)
    with pytest.raises(ValueError, match="tag or offset is out of range"):
        codec.encode_user_copy_pos_batch(0, np.array([0, 1 << 16], np.uint32), ok[:2])
    with pytest.raises(ValueError, match="tag or offset is out of range"):
        codec.encode_user_copy_pos_batch(0, ok[:2], np.array([1 << 25, 0], np.uint32))
    with pytest.raises(ValueError, match="differ in length"):
        codec.encode_user_copy_pos_batch(0, ok, ok[:3])
    with pytest.raises(ValueError, match="equal lengths"):
        codec.encode_user_data_batch(np.zeros(2, np.uint16), np.zeros(3, np.uint8),
                                     np.zeros(2, np.uint32), np.zeros(2, np.bool_))


def test_batch_wrong_dtype_rejected():
    with pytest.raises(ValueError, match="dtype mismatch"):
        codec.decode_user_data_batch(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="dtype mismatch"):
        codec.encode_user_copy_pos_batch(0, np.zeros(4, np.uint64), np.zeros(4, np.uint32))
    with pytest.raises(TypeError):
        codec.decode_user_data_batch(None)


def test_batch_empty():
    e = np.zeros(0, np.uint64)
    assert all(len(a) == 0 for a in codec.decode_user_data_batch(e))
    assert all(len(a) == 0 for a in codec.decode_splice_pos_batch(e))
    assert len(codec.encode_user_copy_pos_batch(0, np.zeros(0, np.uint32), np.zeros(0, np.uint32))) == 0
