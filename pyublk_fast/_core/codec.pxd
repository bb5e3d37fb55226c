# Bit layouts, defined once: user_data of every SQE we submit, the mainline
# USER_COPY pos and the seed's splice pos. Inline, noexcept nogil.
from libc.stdint cimport uint64_t, uint32_t

cdef enum:
    # user_data: tag bits 0-15 | op bits 16-23 | target data bits 24-55 | bit 63 target I/O
    UD_TAG_BITS = 16
    UD_OP_SHIFT = 16
    UD_OP_BITS = 8
    UD_TGT_SHIFT = 24
    UD_TGT_BITS = 32
    UD_TARGET_SHIFT = 63
    # mainline USER_COPY: 0x80000000 + (q_id << 41 | tag << 25 | offset)
    UC_OFF_BITS = 25
    UC_TAG_SHIFT = 25
    UC_TAG_BITS = 16
    UC_QID_SHIFT = 41
    UC_QID_BITS = 12
    # seed (RFC) splice zero copy: q_id << 42 | tag << 30 | offset
    SP_OFF_BITS = 30
    SP_TAG_SHIFT = 30
    SP_TAG_BITS = 12
    SP_QID_SHIFT = 42
    SP_QID_BITS = 12

cdef const uint64_t UC_BASE = 0x80000000UL  # UBLKSRV_IO_BUF_OFFSET

cdef inline uint64_t ud_encode(uint32_t tag, uint32_t op, uint32_t tgt_data, bint target) noexcept nogil:
    return (<uint64_t>tag | (<uint64_t>op << UD_OP_SHIFT) | (<uint64_t>tgt_data << UD_TGT_SHIFT)
            | (<uint64_t>target << UD_TARGET_SHIFT))

cdef inline uint32_t ud_tag(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud & 0xffff)

cdef inline uint32_t ud_op(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> UD_OP_SHIFT) & 0xff)

cdef inline uint32_t ud_tgt_data(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud >> UD_TGT_SHIFT)

cdef inline bint ud_is_target(uint64_t ud) noexcept nogil:
    return (ud >> UD_TARGET_SHIFT) & 1

cdef inline uint64_t uc_pos(uint32_t q_id, uint32_t tag, uint32_t offset) noexcept nogil:
    return UC_BASE + ((<uint64_t>q_id << UC_QID_SHIFT) | (<uint64_t>tag << UC_TAG_SHIFT) | offset)

cdef inline uint32_t uc_qid(uint64_t pos) noexcept nogil:
    return <uint32_t>(((pos - UC_BASE) >> UC_QID_SHIFT) & ((1 << UC_QID_BITS) - 1))

cdef inline uint32_t uc_tag(uint64_t pos) noexcept nogil:
    return <uint32_t>(((pos - UC_BASE) >> UC_TAG_SHIFT) & ((1 << UC_TAG_BITS) - 1))

cdef inline uint32_t uc_off(uint64_t pos) noexcept nogil:
    return <uint32_t>((pos - UC_BASE) & ((1 << UC_OFF_BITS) - 1))

cdef inline uint64_t sp_pos(uint32_t q_id, uint32_t tag, uint32_t offset) noexcept nogil:
    return (<uint64_t>q_id << SP_QID_SHIFT) | (<uint64_t>tag << SP_TAG_SHIFT) | offset

cdef inline uint32_t sp_qid(uint64_t pos) noexcept nogil:
    return <uint32_t>(pos >> SP_QID_SHIFT)

cdef inline uint32_t sp_tag(uint64_t pos) noexcept nogil:
    return <uint32_t>((pos >> SP_TAG_SHIFT) & ((1 << SP_TAG_BITS) - 1))

cdef inline uint32_t sp_off(uint64_t pos) noexcept nogil:
    return <uint32_t>(pos & ((1 << SP_OFF_BITS) - 1))
