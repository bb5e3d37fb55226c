# C views of the ublk_cmd.h structs and constants the hot paths use.
# Values are checked against pyublk_fast.uapi (itself checked against the header) in tests.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t

cdef struct ublksrv_io_desc:
    uint32_t op_flags
    uint32_t nr_sectors
    uint64_t start_sector
    uint64_t addr

cdef struct ublksrv_io_cmd:
    uint16_t q_id
    uint16_t tag
    int32_t result
    uint64_t addr

# struct ublk_batch_io: the command area of PREP_IO_CMDS / COMMIT_IO_CMDS / FETCH_IO_CMDS
cdef struct ublk_batch_io:
    uint16_t q_id
    uint16_t flags               # UBLK_BATCH_F_*
    uint16_t nr_elem
    uint8_t elem_bytes
    uint8_t reserved
    uint64_t reserved2

# struct ublk_elem_header: the first 8 bytes of each PREP/COMMIT element (a u64 buffer
# address follows with UBLK_BATCH_F_HAS_BUF_ADDR)
cdef struct ublk_elem_header:
    uint16_t tag
    uint16_t buf_index
    int32_t result

cdef enum:
    UBLK_IO_OP_READ = 0
    UBLK_IO_OP_WRITE = 1
    UBLK_IO_OP_FLUSH = 2
    UBLK_IO_OP_DISCARD = 3
    UBLK_IO_OP_WRITE_SAME = 4
    UBLK_IO_OP_WRITE_ZEROES = 5
    UBLK_IO_F_FUA = 1 << 13
    UBLK_IO_F_NOUNMAP = 1 << 15
    UBLK_IO_F_SHMEM_ZC = 1 << 19     # addr = shared buffer index << 32 | offset in it
    UBLK_IO_RES_OK = 0
    UBLK_IO_RES_NEED_GET_DATA = 1
    # legacy command numbers; the ioctl-encoded ones are these | 0xc0107500
    UBLK_IO_FETCH_REQ = 0x20
    UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
    UBLK_IO_NEED_GET_DATA = 0x22
    UBLK_IO_REGISTER_IO_BUF = 0x23
    UBLK_IO_UNREGISTER_IO_BUF = 0x24
    # BATCH_IO (7.0); struct ublk_batch_io is 16 bytes too, so io_cmd_op() encodes these
    UBLK_IO_PREP_IO_CMDS = 0x25
    UBLK_IO_COMMIT_IO_CMDS = 0x26
    UBLK_IO_FETCH_IO_CMDS = 0x27
    UBLK_BATCH_F_HAS_ZONE_LBA = 1 << 0
    UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1
    UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK = 1 << 2
    UBLK_IO_CMD_IOCTL_BASE = 0xc0107500
    UBLK_MAX_QUEUE_DEPTH = 4096
    SECTOR_SHIFT = 9

cdef inline uint32_t io_cmd_op(uint32_t nr) noexcept nogil:
    """ioctl-encoded _IOWR('u', nr, struct ublksrv_io_cmd)."""
    return UBLK_IO_CMD_IOCTL_BASE | nr
