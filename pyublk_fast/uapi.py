"""Constants and struct layouts of Linux's ``include/uapi/linux/ublk_cmd.h``.

Mirrors the mainline header as of 7.x (kernel names kept verbatim), plus our own
simulator-only namespace ``SIM_*`` for the never-merged splice zero-copy RFC (Nov 2022).
Structs are numpy structured dtypes whose sizes are asserted at import and checked
against a C compiler in ``tests/test_uapi.py``. No logic beyond tiny bit accessors.
"""

from __future__ import annotations

import enum
import errno

import numpy as np

# --------------------------------------------------------------------------
# ioctl encoding (asm-generic: dir<<30 | size<<16 | type<<8 | nr)
# --------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir_: int, type_: int, nr: int, size: int) -> int:
    return (dir_ << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


_U = ord("u")
_SIZEOF_CTRL_CMD = 32   # struct ublksrv_ctrl_cmd
_SIZEOF_IO_CMD = 16     # struct ublksrv_io_cmd
_SIZEOF_BATCH_IO = 16   # struct ublk_batch_io

# --------------------------------------------------------------------------
# Control commands (/dev/ublk-control)
# --------------------------------------------------------------------------
# Legacy (bare nr) encoding: the only one 6.0-6.3 kernels accept.
UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12

UBLK_U_CMD_GET_QUEUE_AFFINITY = _IOR(_U, UBLK_CMD_GET_QUEUE_AFFINITY, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_GET_DEV_INFO = _IOR(_U, UBLK_CMD_GET_DEV_INFO, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_ADD_DEV = _IOWR(_U, UBLK_CMD_ADD_DEV, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_DEL_DEV = _IOWR(_U, UBLK_CMD_DEL_DEV, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_START_DEV = _IOWR(_U, UBLK_CMD_START_DEV, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_STOP_DEV = _IOWR(_U, UBLK_CMD_STOP_DEV, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_SET_PARAMS = _IOWR(_U, UBLK_CMD_SET_PARAMS, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_GET_PARAMS = _IOR(_U, UBLK_CMD_GET_PARAMS, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_START_USER_RECOVERY = _IOWR(_U, UBLK_CMD_START_USER_RECOVERY, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_END_USER_RECOVERY = _IOWR(_U, UBLK_CMD_END_USER_RECOVERY, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_GET_DEV_INFO2 = _IOR(_U, UBLK_CMD_GET_DEV_INFO2, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_GET_FEATURES = _IOR(_U, 0x13, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_DEL_DEV_ASYNC = _IOR(_U, 0x14, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_UPDATE_SIZE = _IOWR(_U, 0x15, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_QUIESCE_DEV = _IOWR(_U, 0x16, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_TRY_STOP_DEV = _IOWR(_U, 0x17, _SIZEOF_CTRL_CMD)
UBLK_U_CMD_REG_BUF = _IOWR(_U, 0x18, _SIZEOF_CTRL_CMD)    # addr -> struct ublk_shmem_buf_reg
UBLK_U_CMD_UNREG_BUF = _IOWR(_U, 0x19, _SIZEOF_CTRL_CMD)  # data[0] = buffer index

UBLK_SHMEM_BUF_READ_ONLY = 1 << 0   # ublk_shmem_buf_reg.flags
UBLK_FEATURES_LEN = 8

# --------------------------------------------------------------------------
# I/O commands (/dev/ublkcN)
# --------------------------------------------------------------------------
UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22

UBLK_U_IO_FETCH_REQ = _IOWR(_U, UBLK_IO_FETCH_REQ, _SIZEOF_IO_CMD)
UBLK_U_IO_COMMIT_AND_FETCH_REQ = _IOWR(_U, UBLK_IO_COMMIT_AND_FETCH_REQ, _SIZEOF_IO_CMD)
UBLK_U_IO_NEED_GET_DATA = _IOWR(_U, UBLK_IO_NEED_GET_DATA, _SIZEOF_IO_CMD)
UBLK_U_IO_REGISTER_IO_BUF = _IOWR(_U, 0x23, _SIZEOF_IO_CMD)
UBLK_U_IO_UNREGISTER_IO_BUF = _IOWR(_U, 0x24, _SIZEOF_IO_CMD)
UBLK_U_IO_PREP_IO_CMDS = _IOWR(_U, 0x25, _SIZEOF_BATCH_IO)
UBLK_U_IO_COMMIT_IO_CMDS = _IOWR(_U, 0x26, _SIZEOF_BATCH_IO)
UBLK_U_IO_FETCH_IO_CMDS = _IOWR(_U, 0x27, _SIZEOF_BATCH_IO)  # needs IORING_URING_CMD_MULTISHOT

# Only ABORT means "no re-fetch".
UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -errno.ENODEV

# Descriptor sectors (nr_sectors, start_sector) are 512 bytes whatever the logical block
# size: bytes = sectors << SECTOR_SHIFT (the block layer's SECTOR_SHIFT, not ublk_cmd.h's).
SECTOR_SHIFT = 9

# --------------------------------------------------------------------------
# mmap / USER_COPY pread-pwrite offsets
# --------------------------------------------------------------------------
UBLKSRV_CMD_BUF_OFFSET = 0
UBLKSRV_IO_BUF_OFFSET = 0x80000000

UBLK_MAX_QUEUE_DEPTH = 4096

UBLK_IO_BUF_OFF = 0
UBLK_IO_BUF_BITS = 25
UBLK_IO_BUF_BITS_MASK = (1 << UBLK_IO_BUF_BITS) - 1

UBLK_TAG_OFF = UBLK_IO_BUF_BITS
UBLK_TAG_BITS = 16
UBLK_TAG_BITS_MASK = (1 << UBLK_TAG_BITS) - 1

UBLK_QID_OFF = UBLK_TAG_OFF + UBLK_TAG_BITS
UBLK_QID_BITS = 12
UBLK_QID_BITS_MASK = (1 << UBLK_QID_BITS) - 1

UBLK_MAX_NR_QUEUES = 1 << UBLK_QID_BITS

UBLKSRV_IO_BUF_TOTAL_BITS = UBLK_QID_OFF + UBLK_QID_BITS
UBLKSRV_IO_BUF_TOTAL_SIZE = 1 << UBLKSRV_IO_BUF_TOTAL_BITS

UBLK_INTEGRITY_FLAG_OFF = 62
UBLKSRV_IO_INTEGRITY_FLAG = 1 << UBLK_INTEGRITY_FLAG_OFF

# --------------------------------------------------------------------------
# Feature flags (u64, ublksrv_ctrl_dev_info.flags / GET_FEATURES)
# --------------------------------------------------------------------------
UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_UNPRIVILEGED_DEV = 1 << 5
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_USER_COPY = 1 << 7
UBLK_F_ZONED = 1 << 8
UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9
UBLK_F_UPDATE_SIZE = 1 << 10
UBLK_F_AUTO_BUF_REG = 1 << 11
UBLK_F_QUIESCE = 1 << 12
UBLK_F_PER_IO_DAEMON = 1 << 13
UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14
UBLK_F_BATCH_IO = 1 << 15
UBLK_F_INTEGRITY = 1 << 16
UBLK_F_SAFE_STOP_DEV = 1 << 17
UBLK_F_NO_AUTO_PART_SCAN = 1 << 18
UBLK_F_SHMEM_ZC = 1 << 19


class Feature(enum.IntFlag):
    """UBLK_F_* feature bits (names without the UBLK_F_ prefix)."""

    SUPPORT_ZERO_COPY = UBLK_F_SUPPORT_ZERO_COPY
    URING_CMD_COMP_IN_TASK = UBLK_F_URING_CMD_COMP_IN_TASK
    NEED_GET_DATA = UBLK_F_NEED_GET_DATA
    USER_RECOVERY = UBLK_F_USER_RECOVERY
    USER_RECOVERY_REISSUE = UBLK_F_USER_RECOVERY_REISSUE
    UNPRIVILEGED_DEV = UBLK_F_UNPRIVILEGED_DEV
    CMD_IOCTL_ENCODE = UBLK_F_CMD_IOCTL_ENCODE
    USER_COPY = UBLK_F_USER_COPY
    ZONED = UBLK_F_ZONED
    USER_RECOVERY_FAIL_IO = UBLK_F_USER_RECOVERY_FAIL_IO
    UPDATE_SIZE = UBLK_F_UPDATE_SIZE
    AUTO_BUF_REG = UBLK_F_AUTO_BUF_REG
    QUIESCE = UBLK_F_QUIESCE
    PER_IO_DAEMON = UBLK_F_PER_IO_DAEMON
    BUF_REG_OFF_DAEMON = UBLK_F_BUF_REG_OFF_DAEMON
    BATCH_IO = UBLK_F_BATCH_IO
    INTEGRITY = UBLK_F_INTEGRITY
    SAFE_STOP_DEV = UBLK_F_SAFE_STOP_DEV
    NO_AUTO_PART_SCAN = UBLK_F_NO_AUTO_PART_SCAN
    SHMEM_ZC = UBLK_F_SHMEM_ZC


# Every mainline feature bit this module knows (0xfffff; 7.2's GET_FEATURES answer).
MAINLINE_FEATURE_MASK = 0
for _f in Feature:
    MAINLINE_FEATURE_MASK |= int(_f)
del _f

# First mainline kernel where the feature works. Confidence per entry:
#   sure     - checked against the header's history (the release that first carries the bit
#              or makes it work).
#   likely   - dated upstream commit (merge window right after the date), not a release tag.
#   unsure   - neither; verify on a real kernel before relying on it in error hints.
KERNEL_VERSION_OF_FEATURE: dict[int, str] = {
    UBLK_F_SUPPORT_ZERO_COPY: "6.15",       # sure: bit defined since 6.0, usable zero copy 6.15
    UBLK_F_URING_CMD_COMP_IN_TASK: "6.0",   # sure: in the initial driver (Jul 2022)
    UBLK_F_NEED_GET_DATA: "6.0",            # likely: commit 2022-08-02 (6.0 merge window)
    UBLK_F_USER_RECOVERY: "6.1",            # likely: commit 2022-09-23 (6.1 merge window)
    UBLK_F_USER_RECOVERY_REISSUE: "6.1",    # likely: commit 2022-09-23 (6.1 merge window)
    UBLK_F_UNPRIVILEGED_DEV: "6.3",         # likely: commit 2023-01-29 (6.3 merge window)
    UBLK_F_CMD_IOCTL_ENCODE: "6.4",         # likely: commit 2023-04-18 (6.4 merge window)
    UBLK_F_USER_COPY: "6.5",                # sure: header history
    UBLK_F_ZONED: "6.6",                    # likely: commit Aug 2023 (6.6 merge window)
    UBLK_F_USER_RECOVERY_FAIL_IO: "6.13",   # likely: commit 2024-10-07 (6.13 merge window)
    UBLK_F_UPDATE_SIZE: "6.16",             # unsure: added with bits 11-13, which are 6.16
    UBLK_F_AUTO_BUF_REG: "6.16",            # sure: header history
    UBLK_F_QUIESCE: "6.16",                 # sure: commit 2025-05-22, released in 6.16
    UBLK_F_PER_IO_DAEMON: "6.16",           # sure: header history
    UBLK_F_BUF_REG_OFF_DAEMON: "6.17",      # sure: header history
    UBLK_F_BATCH_IO: "7.0",                 # sure: header history
    UBLK_F_INTEGRITY: "7.0",                # sure: header history
    UBLK_F_SAFE_STOP_DEV: "7.0",            # sure: header history
    UBLK_F_NO_AUTO_PART_SCAN: "7.0",        # sure: header history
    UBLK_F_SHMEM_ZC: "7.1",                 # sure: header history
}


def feature_names(flags: int) -> list[str]:
    """Names of the set bits of a u64 feature word, low bit first; unknown bits as "bit N"."""
    if not isinstance(flags, (int, np.integer)) or isinstance(flags, bool):
        raise TypeError(f"feature flags must be an int, got {type(flags).__name__}")
    flags = int(flags)
    if not 0 <= flags < 1 << 64:
        raise ValueError(f"feature flags {flags:#x} are not a u64 (0 .. 2**64-1)")
    names = []
    bit = 0
    while flags >> bit:
        if (flags >> bit) & 1:
            value = 1 << bit
            names.append(Feature(value).name if value & MAINLINE_FEATURE_MASK else f"bit {bit}")
        bit += 1
    return names


# --------------------------------------------------------------------------
# Simulator-only namespace: the splice zero-copy RFC (never merged)
# --------------------------------------------------------------------------
# The RFC's UBLK_F_SPLICE_ZC used bit 5, which mainline gave to UNPRIVILEGED_DEV. We keep
# it as our own capability bit, far above any mainline UBLK_F_*; it must never be sent
# to a real kernel (mask with ~SIM_FEATURE_MASK before ADD_DEV).
SIM_F_SPLICE_ZC = 1 << 63
SIM_FEATURE_MASK = SIM_F_SPLICE_ZC

# The RFC's splice flags (include/linux/splice.h in the series), above mainline's
# SPLICE_F_MOVE 1, NONBLOCK 2, MORE 4, GIFT 8.
SPLICE_F_DIRECT = 0x10
SPLICE_F_READ_TO_READ = 0x20

# Splice file position: pos = q_id << 42 | tag << 30 | offset (no 0x80000000 base).
UBLK_SPLICE_OFF_BITS = 30
UBLK_SPLICE_TAG_OFF = 30
UBLK_SPLICE_TAG_BITS = 12
UBLK_SPLICE_QID_OFF = 42

# --------------------------------------------------------------------------
# Device states, ops, I/O flags, attrs, param types
# --------------------------------------------------------------------------
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2
UBLK_S_DEV_FAIL_IO = 3


class DevState(enum.IntEnum):
    """UBLK_S_DEV_* (ublksrv_ctrl_dev_info.state)."""

    DEAD = UBLK_S_DEV_DEAD
    LIVE = UBLK_S_DEV_LIVE
    QUIESCED = UBLK_S_DEV_QUIESCED
    FAIL_IO = UBLK_S_DEV_FAIL_IO


UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4
UBLK_IO_OP_WRITE_ZEROES = 5
UBLK_IO_OP_ZONE_OPEN = 10
UBLK_IO_OP_ZONE_CLOSE = 11
UBLK_IO_OP_ZONE_FINISH = 12
UBLK_IO_OP_ZONE_APPEND = 13
UBLK_IO_OP_ZONE_RESET_ALL = 14
UBLK_IO_OP_ZONE_RESET = 15
UBLK_IO_OP_REPORT_ZONES = 18


class Op(enum.IntEnum):
    """UBLK_IO_OP_* (bits 0-7 of ublksrv_io_desc.op_flags)."""

    READ = UBLK_IO_OP_READ
    WRITE = UBLK_IO_OP_WRITE
    FLUSH = UBLK_IO_OP_FLUSH
    DISCARD = UBLK_IO_OP_DISCARD
    WRITE_SAME = UBLK_IO_OP_WRITE_SAME
    WRITE_ZEROES = UBLK_IO_OP_WRITE_ZEROES
    ZONE_OPEN = UBLK_IO_OP_ZONE_OPEN
    ZONE_CLOSE = UBLK_IO_OP_ZONE_CLOSE
    ZONE_FINISH = UBLK_IO_OP_ZONE_FINISH
    ZONE_APPEND = UBLK_IO_OP_ZONE_APPEND
    ZONE_RESET_ALL = UBLK_IO_OP_ZONE_RESET_ALL
    ZONE_RESET = UBLK_IO_OP_ZONE_RESET
    REPORT_ZONES = UBLK_IO_OP_REPORT_ZONES


# In place in op_flags (test with op_flags & UBLK_IO_F_*).
UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16
UBLK_IO_F_NEED_REG_BUF = 1 << 17
UBLK_IO_F_INTEGRITY = 1 << 18
UBLK_IO_F_SHMEM_ZC = 1 << 19

# ublk_auto_buf_reg.flags (AUTO_BUF_REG: index bits 0-15, flags 16-23 of sqe->addr)
UBLK_AUTO_BUF_REG_FALLBACK = 1 << 0
UBLK_AUTO_BUF_REG_F_MASK = UBLK_AUTO_BUF_REG_FALLBACK

# ublk_batch_io.flags
UBLK_BATCH_F_HAS_ZONE_LBA = 1 << 0
UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1
UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK = 1 << 2

# ublk_param_basic.attrs
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

# ublk_params.types
UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2
UBLK_PARAM_TYPE_ZONED = 1 << 3
UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4
UBLK_PARAM_TYPE_SEGMENT = 1 << 5
UBLK_PARAM_TYPE_INTEGRITY = 1 << 6  # requires UBLK_F_INTEGRITY

UBLK_MIN_SEGMENT_SIZE = 4096

# UBLK_IO_F_SHMEM_ZC iod addr: bits 0-31 byte offset, 32-47 buffer index, 48-63 zero.
UBLK_SHMEM_ZC_OFF_MASK = 0xFFFFFFFF
UBLK_SHMEM_ZC_IDX_OFF = 32
UBLK_SHMEM_ZC_IDX_MASK = 0xFFFF

# --------------------------------------------------------------------------
# Structs (native endianness, explicit offsets = the C layout on Linux ABIs)
# --------------------------------------------------------------------------
_u8, _u16, _u32, _u64 = np.uint8, np.uint16, np.uint32, np.uint64
_s32 = np.int32


def _struct(fields: list[tuple], itemsize: int) -> np.dtype:
    """dtype from (name, format, offset) triples; union members share an offset."""
    return np.dtype({
        "names": [f[0] for f in fields],
        "formats": [f[1] for f in fields],
        "offsets": [f[2] for f in fields],
        "itemsize": itemsize,
    })


# struct ublksrv_ctrl_cmd (the SQE's cmd area for control commands)
CTRL_CMD_DTYPE = _struct([
    ("dev_id", _u32, 0),
    ("queue_id", _u16, 4),
    ("len", _u16, 6),
    ("addr", _u64, 8),
    ("data", (_u64, (1,)), 16),
    ("dev_path_len", _u16, 24),
    ("pad", _u16, 26),
    ("reserved", _u32, 28),
], 32)
assert CTRL_CMD_DTYPE.itemsize == 32

# struct ublksrv_ctrl_dev_info
DEV_INFO_DTYPE = _struct([
    ("nr_hw_queues", _u16, 0),
    ("queue_depth", _u16, 2),
    ("state", _u16, 4),
    ("pad0", _u16, 6),
    ("max_io_buf_bytes", _u32, 8),
    ("dev_id", _u32, 12),
    ("ublksrv_pid", _s32, 16),
    ("pad1", _u32, 20),
    ("flags", _u64, 24),
    ("ublksrv_flags", _u64, 32),
    ("owner_uid", _u32, 40),
    ("owner_gid", _u32, 44),
    ("reserved1", _u64, 48),
    ("reserved2", _u64, 56),
], 64)
assert DEV_INFO_DTYPE.itemsize == 64

# struct ublksrv_io_desc (read-only mmap array, one per tag)
IO_DESC_DTYPE = _struct([
    ("op_flags", _u32, 0),
    ("nr_sectors", _u32, 4),  # union
    ("nr_zones", _u32, 4),    # union: UBLK_IO_OP_REPORT_ZONES
    ("start_sector", _u64, 8),
    ("addr", _u64, 16),
], 24)
assert IO_DESC_DTYPE.itemsize == 24

# struct ublksrv_io_cmd
IO_CMD_DTYPE = _struct([
    ("q_id", _u16, 0),
    ("tag", _u16, 2),
    ("result", _s32, 4),
    ("addr", _u64, 8),             # union
    ("zone_append_lba", _u64, 8),  # union
], 16)
assert IO_CMD_DTYPE.itemsize == 16

# struct ublk_batch_io
BATCH_IO_DTYPE = _struct([
    ("q_id", _u16, 0),
    ("flags", _u16, 2),
    ("nr_elem", _u16, 4),
    ("elem_bytes", _u8, 6),
    ("reserved", _u8, 7),
    ("reserved2", _u64, 8),
], 16)
assert BATCH_IO_DTYPE.itemsize == 16

# struct ublk_elem_header (mandatory 8 B of each batch element)
ELEM_HEADER_DTYPE = _struct([
    ("tag", _u16, 0),
    ("buf_index", _u16, 2),
    ("result", _s32, 4),
], 8)
assert ELEM_HEADER_DTYPE.itemsize == 8

# struct ublk_auto_buf_reg
AUTO_BUF_REG_DTYPE = _struct([
    ("index", _u16, 0),
    ("flags", _u8, 2),
    ("reserved0", _u8, 3),
    ("reserved1", _u32, 4),
], 8)
assert AUTO_BUF_REG_DTYPE.itemsize == 8

# struct ublk_shmem_buf_reg (REG_BUF's buffer): addr u64, len u64, flags u32, reserved u32 =
# 24 B, as 7.1 released it (an earlier 7.1-rc header had len u32 and no reserved: 16 B). The
# 7.2 driver reads flags at offset 16 and refuses a nonzero reserved (checked in the VM).
SHMEM_BUF_REG_DTYPE = _struct([
    ("addr", _u64, 0),
    ("len", _u64, 8),
    ("flags", _u32, 16),
    ("reserved", _u32, 20),
], 24)
assert SHMEM_BUF_REG_DTYPE.itemsize == 24

# struct ublk_param_basic
PARAM_BASIC_DTYPE = _struct([
    ("attrs", _u32, 0),
    ("logical_bs_shift", _u8, 4),
    ("physical_bs_shift", _u8, 5),
    ("io_opt_shift", _u8, 6),
    ("io_min_shift", _u8, 7),
    ("max_sectors", _u32, 8),
    ("chunk_sectors", _u32, 12),
    ("dev_sectors", _u64, 16),
    ("virt_boundary_mask", _u64, 24),
], 32)
assert PARAM_BASIC_DTYPE.itemsize == 32

# struct ublk_param_discard
PARAM_DISCARD_DTYPE = _struct([
    ("discard_alignment", _u32, 0),
    ("discard_granularity", _u32, 4),
    ("max_discard_sectors", _u32, 8),
    ("max_write_zeroes_sectors", _u32, 12),
    ("max_discard_segments", _u16, 16),
    ("reserved0", _u16, 18),
], 20)
assert PARAM_DISCARD_DTYPE.itemsize == 20

# struct ublk_param_devt (GET_PARAMS only)
PARAM_DEVT_DTYPE = _struct([
    ("char_major", _u32, 0),
    ("char_minor", _u32, 4),
    ("disk_major", _u32, 8),
    ("disk_minor", _u32, 12),
], 16)
assert PARAM_DEVT_DTYPE.itemsize == 16

# struct ublk_param_zoned
PARAM_ZONED_DTYPE = _struct([
    ("max_open_zones", _u32, 0),
    ("max_active_zones", _u32, 4),
    ("max_zone_append_sectors", _u32, 8),
    ("reserved", (_u8, (20,)), 12),
], 32)
assert PARAM_ZONED_DTYPE.itemsize == 32

# struct ublk_param_dma_align
PARAM_DMA_DTYPE = _struct([
    ("alignment", _u32, 0),
    ("pad", (_u8, (4,)), 4),
], 8)
assert PARAM_DMA_DTYPE.itemsize == 8

# struct ublk_param_segment
PARAM_SEGMENT_DTYPE = _struct([
    ("seg_boundary_mask", _u64, 0),
    ("max_segment_size", _u32, 8),
    ("max_segments", _u16, 12),
    ("pad", (_u8, (2,)), 14),
], 16)
assert PARAM_SEGMENT_DTYPE.itemsize == 16

# struct ublk_param_integrity
PARAM_INTEGRITY_DTYPE = _struct([
    ("flags", _u32, 0),
    ("max_integrity_segments", _u16, 4),
    ("interval_exp", _u8, 6),
    ("metadata_size", _u8, 7),
    ("pi_offset", _u8, 8),
    ("csum_type", _u8, 9),
    ("tag_size", _u8, 10),
    ("pad", (_u8, (5,)), 11),
], 16)
assert PARAM_INTEGRITY_DTYPE.itemsize == 16

# struct ublk_params: seg holds a u64, so it is 8-aligned (116..119 padding).
PARAMS_DTYPE = _struct([
    ("len", _u32, 0),
    ("types", _u32, 4),
    ("basic", PARAM_BASIC_DTYPE, 8),
    ("discard", PARAM_DISCARD_DTYPE, 40),
    ("devt", PARAM_DEVT_DTYPE, 60),
    ("zoned", PARAM_ZONED_DTYPE, 76),
    ("dma", PARAM_DMA_DTYPE, 108),
    ("seg", PARAM_SEGMENT_DTYPE, 120),
    ("integrity", PARAM_INTEGRITY_DTYPE, 136),
], 152)
assert PARAMS_DTYPE.itemsize == 152

# --------------------------------------------------------------------------
# Tiny accessors
# --------------------------------------------------------------------------
_LEGACY_NRS = frozenset({
    UBLK_CMD_GET_QUEUE_AFFINITY, UBLK_CMD_GET_DEV_INFO, UBLK_CMD_ADD_DEV, UBLK_CMD_DEL_DEV,
    UBLK_CMD_START_DEV, UBLK_CMD_STOP_DEV, UBLK_CMD_SET_PARAMS, UBLK_CMD_GET_PARAMS,
    UBLK_CMD_START_USER_RECOVERY, UBLK_CMD_END_USER_RECOVERY, UBLK_CMD_GET_DEV_INFO2,
    UBLK_IO_FETCH_REQ, UBLK_IO_COMMIT_AND_FETCH_REQ, UBLK_IO_NEED_GET_DATA,
})


def _check_u32(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{name} {value:#x} is not a u32 (0 .. 0xffffffff)")
    return value


def ioc_nr(cmd_op: int) -> int:
    """Command number (low 8 bits) of an ioctl-encoded or legacy cmd_op."""
    return _check_u32("cmd_op", cmd_op) & 0xFF


def legacy_op(cmd_op: int) -> int:
    """Bare-nr encoding of cmd_op, as 6.0-6.3 kernels (no CMD_IOCTL_ENCODE) expect it.

    Raises ValueError for commands that never had a legacy number (they need 6.4+).
    """
    value = _check_u32("cmd_op", cmd_op)
    nr = value & 0xFF
    if value > 0xFF and (value >> _IOC_TYPESHIFT) & 0xFF != _U:
        raise ValueError(f"cmd_op {value:#x} is not a ublk command (ioctl type must be 'u')")
    if nr not in _LEGACY_NRS:
        raise ValueError(
            f"cmd_op {value:#x} (nr {nr:#x}) has no legacy encoding; it needs an "
            "ioctl-encoding kernel (6.4+, UBLK_F_CMD_IOCTL_ENCODE)")
    return nr


def io_cmd_op(nr: int) -> int:
    """The ioctl-encoded I/O command for command number ``nr`` (``UBLK_IO_*``, or any number
    a test wants to send): ``_IOWR('u', nr, struct ublksrv_io_cmd)``, like ``UBLK_U_IO_*``."""
    if not isinstance(nr, (int, np.integer)) or isinstance(nr, bool):
        raise TypeError(f"nr must be an int, got {type(nr).__name__}")
    if not 0 <= nr <= 0xFF:
        raise ValueError(f"nr {nr:#x} is not a command number (0 .. 0xff)")
    return _IOWR(_U, int(nr), _SIZEOF_IO_CMD)


def op_of(op_flags: int) -> int:
    """UBLK_IO_OP_* of an ublksrv_io_desc.op_flags word (bits 0-7)."""
    return _check_u32("op_flags", op_flags) & 0xFF


def flags_of(op_flags: int) -> int:
    """The UBLK_IO_F_* bits of op_flags, left in place (so `flags_of(x) & UBLK_IO_F_FUA` works).

    Unlike the header's ublksrv_get_flags(), which returns op_flags >> 8.
    """
    return _check_u32("op_flags", op_flags) & ~0xFF
