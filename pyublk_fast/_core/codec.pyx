# cython: language_level=3, boundscheck=False, wraparound=False
"""Checked Python views of the bit layouts in codec.pxd: scalar and batch (numpy).

Scalar encoders raise ValueError for out-of-range fields; batch decoders run a
nogil loop over uint64 arrays.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint64_t, uint32_t, uint8_t

cnp.import_array()

USER_DATA_TAG_BITS = UD_TAG_BITS
USER_DATA_OP_BITS = UD_OP_BITS
USER_DATA_TGT_BITS = UD_TGT_BITS
USER_COPY_BASE = UC_BASE
USER_COPY_OFF_BITS = UC_OFF_BITS
USER_COPY_TAG_BITS = UC_TAG_BITS
USER_COPY_QID_BITS = UC_QID_BITS
SPLICE_OFF_BITS = SP_OFF_BITS
SPLICE_TAG_BITS = SP_TAG_BITS
SPLICE_QID_BITS = SP_QID_BITS
_UC_SPAN_BITS = UC_QID_SHIFT + UC_QID_BITS
_UC_END = USER_COPY_BASE + (1 << _UC_SPAN_BITS)


cdef _check(str name, value, bits):
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value} out of range: must be 0 <= {name} < {1 << bits} ({bits} bits)")


def encode_user_data(tag: int, op: int, tgt_data: int = 0, target: bool = False) -> int:
    """Pack (tag, op, target data, target-I/O bit) into a 64-bit user_data."""
    _check("tag", tag, UD_TAG_BITS)
    _check("op", op, UD_OP_BITS)
    _check("tgt_data", tgt_data, UD_TGT_BITS)
    return ud_encode(tag, op, tgt_data, bool(target))


def decode_user_data(ud: int) -> tuple:
    """Unpack a user_data into (tag, op, tgt_data, target)."""
    _check("user_data", ud, 64)
    cdef uint64_t u = ud
    return (ud_tag(u), ud_op(u), ud_tgt_data(u), bool(ud_is_target(u)))


def user_copy_pos(q_id: int, tag: int, offset: int = 0) -> int:
    """Mainline USER_COPY file position of (q_id, tag, offset) on /dev/ublkcN."""
    _check("q_id", q_id, UC_QID_BITS)
    _check("tag", tag, UC_TAG_BITS)
    _check("offset", offset, UC_OFF_BITS)
    return uc_pos(q_id, tag, offset)


def decode_user_copy_pos(pos: int) -> tuple:
    """Inverse of user_copy_pos: (q_id, tag, offset)."""
    if not USER_COPY_BASE <= pos < _UC_END:
        raise ValueError(f"pos={pos:#x} is not a USER_COPY position "
                         f"(must be in [{USER_COPY_BASE:#x}, {_UC_END:#x}))")
    p = pos - UC_BASE
    return (p >> UC_QID_SHIFT, (p >> UC_TAG_SHIFT) & 0xffff, p & ((1 << UC_OFF_BITS) - 1))


def splice_pos(q_id: int, tag: int, offset: int = 0) -> int:
    """The seed's splice zero-copy position: q_id << 42 | tag << 30 | offset."""
    _check("q_id", q_id, SP_QID_BITS)
    _check("tag", tag, SP_TAG_BITS)
    _check("offset", offset, SP_OFF_BITS)
    return sp_pos(q_id, tag, offset)


def decode_splice_pos(pos: int) -> tuple:
    """Inverse of splice_pos: (q_id, tag, offset)."""
    _check("pos", pos, SP_QID_SHIFT + SP_QID_BITS)
    cdef uint64_t p = pos
    return (sp_qid(p), sp_tag(p), sp_off(p))


def decode_user_data_batch(const uint64_t[::1] ud not None):
    """Vectorised decode: returns (tag u16, op u8, tgt_data u32, target bool) arrays."""
    cdef Py_ssize_t i, n = ud.shape[0]
    tags = np.empty(n, np.uint16)
    ops = np.empty(n, np.uint8)
    tgts = np.empty(n, np.uint32)
    targets = np.empty(n, np.bool_)
    cdef unsigned short[::1] t = tags
    cdef uint8_t[::1] o = ops
    cdef uint32_t[::1] g = tgts
    cdef cnp.npy_bool[::1] b = targets.view(np.uint8)
    with nogil:
        for i in range(n):
            t[i] = <unsigned short>ud_tag(ud[i])
            o[i] = <uint8_t>ud_op(ud[i])
            g[i] = ud_tgt_data(ud[i])
            b[i] = ud_is_target(ud[i])
    return tags, ops, tgts, targets


def encode_user_data_batch(const unsigned short[::1] tags not None, const uint8_t[::1] ops not None,
                           const uint32_t[::1] tgt_data not None, const cnp.npy_bool[::1] target not None):
    """Vectorised encode of equally long arrays (dtypes bound the fields, so no range errors)."""
    cdef Py_ssize_t i, n = tags.shape[0]
    if not (ops.shape[0] == n and tgt_data.shape[0] == n and target.shape[0] == n):
        raise ValueError("encode_user_data_batch: arrays must have equal lengths")
    out = np.empty(n, np.uint64)
    cdef uint64_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = ud_encode(tags[i], ops[i], tgt_data[i], target[i])
    return out


def decode_splice_pos_batch(const uint64_t[::1] pos not None):
    """Vectorised decode of splice positions: (q_id, tag, offset) uint32 arrays."""
    cdef Py_ssize_t i, n = pos.shape[0]
    q = np.empty(n, np.uint32); t = np.empty(n, np.uint32); o = np.empty(n, np.uint32)
    cdef uint32_t[::1] qv = q, tv = t, ov = o
    with nogil:
        for i in range(n):
            qv[i] = sp_qid(pos[i]); tv[i] = sp_tag(pos[i]); ov[i] = sp_off(pos[i])
    return q, t, o


def encode_user_copy_pos_batch(uint32_t q_id, const uint32_t[::1] tags not None,
                               const uint32_t[::1] offsets not None):
    """Vectorised USER_COPY positions for one queue; fields are range-checked first."""
    if q_id >= (1 << UC_QID_BITS):
        raise ValueError(f"q_id={q_id} out of range (< {1 << UC_QID_BITS})")
    cdef Py_ssize_t i, n = tags.shape[0]
    if offsets.shape[0] != n:
        raise ValueError("encode_user_copy_pos_batch: tags and offsets differ in length")
    if n and (np.asarray(tags).max() >= (1 << UC_TAG_BITS) or np.asarray(offsets).max() >= (1 << UC_OFF_BITS)):
        raise ValueError("encode_user_copy_pos_batch: a tag or offset is out of range")
    out = np.empty(n, np.uint64)
    cdef uint64_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = uc_pos(q_id, tags[i], offsets[i])
    return out
