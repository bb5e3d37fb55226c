"""pyublk_fast.uapi against the C layout/values of ublk_cmd.h and the kernel's documented behaviour."""

from __future__ import annotations

import enum
import errno
import re
import shutil
import subprocess

import numpy as np
import pytest

from pyublk_fast import uapi

# ---------------------------------------------------------------------------
# Test data: the struct definitions and #defines of the mainline 7.x
# include/uapi/linux/ublk_cmd.h (comments stripped). Debian 12's linux-libc-dev
# is too old to #include it, so the C compiler sees this copy instead.
# ---------------------------------------------------------------------------
C_STRUCTS = r"""
struct ublk_shmem_buf_reg { __u64 addr; __u64 len; __u32 flags; __u32 reserved; };

struct ublksrv_ctrl_cmd {
    __u32 dev_id; __u16 queue_id; __u16 len; __u64 addr; __u64 data[1];
    __u16 dev_path_len; __u16 pad; __u32 reserved;
};

struct ublksrv_ctrl_dev_info {
    __u16 nr_hw_queues; __u16 queue_depth; __u16 state; __u16 pad0;
    __u32 max_io_buf_bytes; __u32 dev_id; __s32 ublksrv_pid; __u32 pad1;
    __u64 flags; __u64 ublksrv_flags; __u32 owner_uid; __u32 owner_gid;
    __u64 reserved1; __u64 reserved2;
};

struct ublksrv_io_desc {
    __u32 op_flags;
    union { __u32 nr_sectors; __u32 nr_zones; };
    __u64 start_sector; __u64 addr;
};

struct ublk_auto_buf_reg { __u16 index; __u8 flags; __u8 reserved0; __u32 reserved1; };

struct ublksrv_io_cmd {
    __u16 q_id; __u16 tag; __s32 result;
    union { __u64 addr; __u64 zone_append_lba; };
};

struct ublk_elem_header { __u16 tag; __u16 buf_index; __s32 result; };

struct ublk_batch_io {
    __u16 q_id; __u16 flags; __u16 nr_elem; __u8 elem_bytes; __u8 reserved; __u64 reserved2;
};

struct ublk_param_basic {
    __u32 attrs; __u8 logical_bs_shift; __u8 physical_bs_shift; __u8 io_opt_shift;
    __u8 io_min_shift; __u32 max_sectors; __u32 chunk_sectors; __u64 dev_sectors;
    __u64 virt_boundary_mask;
};

struct ublk_param_discard {
    __u32 discard_alignment; __u32 discard_granularity; __u32 max_discard_sectors;
    __u32 max_write_zeroes_sectors; __u16 max_discard_segments; __u16 reserved0;
};

struct ublk_param_devt { __u32 char_major; __u32 char_minor; __u32 disk_major; __u32 disk_minor; };

struct ublk_param_zoned {
    __u32 max_open_zones; __u32 max_active_zones; __u32 max_zone_append_sectors; __u8 reserved[20];
};

struct ublk_param_dma_align { __u32 alignment; __u8 pad[4]; };

struct ublk_param_segment {
    __u64 seg_boundary_mask; __u32 max_segment_size; __u16 max_segments; __u8 pad[2];
};

struct ublk_param_integrity {
    __u32 flags; __u16 max_integrity_segments; __u8 interval_exp; __u8 metadata_size;
    __u8 pi_offset; __u8 csum_type; __u8 tag_size; __u8 pad[5];
};

struct ublk_params {
    __u32 len; __u32 types;
    struct ublk_param_basic basic; struct ublk_param_discard discard;
    struct ublk_param_devt devt; struct ublk_param_zoned zoned;
    struct ublk_param_dma_align dma; struct ublk_param_segment seg;
    struct ublk_param_integrity integrity;
};
"""

C_DEFINES = r"""
#define UBLK_CMD_GET_QUEUE_AFFINITY 0x01
#define UBLK_CMD_GET_DEV_INFO 0x02
#define UBLK_CMD_ADD_DEV 0x04
#define UBLK_CMD_DEL_DEV 0x05
#define UBLK_CMD_START_DEV 0x06
#define UBLK_CMD_STOP_DEV 0x07
#define UBLK_CMD_SET_PARAMS 0x08
#define UBLK_CMD_GET_PARAMS 0x09
#define UBLK_CMD_START_USER_RECOVERY 0x10
#define UBLK_CMD_END_USER_RECOVERY 0x11
#define UBLK_CMD_GET_DEV_INFO2 0x12
#define UBLK_U_CMD_GET_QUEUE_AFFINITY _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO2 _IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_FEATURES _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV_ASYNC _IOR('u', 0x14, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_UPDATE_SIZE _IOWR('u', 0x15, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_QUIESCE_DEV _IOWR('u', 0x16, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_TRY_STOP_DEV _IOWR('u', 0x17, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_REG_BUF _IOWR('u', 0x18, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_UNREG_BUF _IOWR('u', 0x19, struct ublksrv_ctrl_cmd)
#define UBLK_SHMEM_BUF_READ_ONLY (1U << 0)
#define UBLK_FEATURES_LEN 8
#define UBLK_IO_FETCH_REQ 0x20
#define UBLK_IO_COMMIT_AND_FETCH_REQ 0x21
#define UBLK_IO_NEED_GET_DATA 0x22
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_NEED_GET_DATA _IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)
#define UBLK_U_IO_REGISTER_IO_BUF _IOWR('u', 0x23, struct ublksrv_io_cmd)
#define UBLK_U_IO_UNREGISTER_IO_BUF _IOWR('u', 0x24, struct ublksrv_io_cmd)
#define UBLK_U_IO_PREP_IO_CMDS _IOWR('u', 0x25, struct ublk_batch_io)
#define UBLK_U_IO_COMMIT_IO_CMDS _IOWR('u', 0x26, struct ublk_batch_io)
#define UBLK_U_IO_FETCH_IO_CMDS _IOWR('u', 0x27, struct ublk_batch_io)
#define UBLK_IO_RES_OK 0
#define UBLK_IO_RES_NEED_GET_DATA 1
#define UBLK_IO_RES_ABORT (-ENODEV)
#define UBLKSRV_CMD_BUF_OFFSET 0
#define UBLKSRV_IO_BUF_OFFSET 0x80000000
#define UBLK_MAX_QUEUE_DEPTH 4096
#define UBLK_IO_BUF_OFF 0
#define UBLK_IO_BUF_BITS 25
#define UBLK_IO_BUF_BITS_MASK ((1ULL << UBLK_IO_BUF_BITS) - 1)
#define UBLK_TAG_OFF UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS 16
#define UBLK_TAG_BITS_MASK ((1ULL << UBLK_TAG_BITS) - 1)
#define UBLK_QID_OFF (UBLK_TAG_OFF + UBLK_TAG_BITS)
#define UBLK_QID_BITS 12
#define UBLK_QID_BITS_MASK ((1ULL << UBLK_QID_BITS) - 1)
#define UBLK_MAX_NR_QUEUES (1U << UBLK_QID_BITS)
#define UBLKSRV_IO_BUF_TOTAL_BITS (UBLK_QID_OFF + UBLK_QID_BITS)
#define UBLKSRV_IO_BUF_TOTAL_SIZE (1ULL << UBLKSRV_IO_BUF_TOTAL_BITS)
#define UBLK_INTEGRITY_FLAG_OFF 62
#define UBLKSRV_IO_INTEGRITY_FLAG (1ULL << UBLK_INTEGRITY_FLAG_OFF)
#define UBLK_F_SUPPORT_ZERO_COPY (1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK (1ULL << 1)
#define UBLK_F_NEED_GET_DATA (1UL << 2)
#define UBLK_F_USER_RECOVERY (1UL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE (1UL << 4)
#define UBLK_F_UNPRIVILEGED_DEV (1UL << 5)
#define UBLK_F_CMD_IOCTL_ENCODE (1UL << 6)
#define UBLK_F_USER_COPY (1UL << 7)
#define UBLK_F_ZONED (1ULL << 8)
#define UBLK_F_USER_RECOVERY_FAIL_IO (1ULL << 9)
#define UBLK_F_UPDATE_SIZE (1ULL << 10)
#define UBLK_F_AUTO_BUF_REG (1ULL << 11)
#define UBLK_F_QUIESCE (1ULL << 12)
#define UBLK_F_PER_IO_DAEMON (1ULL << 13)
#define UBLK_F_BUF_REG_OFF_DAEMON (1ULL << 14)
#define UBLK_F_BATCH_IO (1ULL << 15)
#define UBLK_F_INTEGRITY (1ULL << 16)
#define UBLK_F_SAFE_STOP_DEV (1ULL << 17)
#define UBLK_F_NO_AUTO_PART_SCAN (1ULL << 18)
#define UBLK_F_SHMEM_ZC (1ULL << 19)
#define UBLK_S_DEV_DEAD 0
#define UBLK_S_DEV_LIVE 1
#define UBLK_S_DEV_QUIESCED 2
#define UBLK_S_DEV_FAIL_IO 3
#define UBLK_IO_OP_READ 0
#define UBLK_IO_OP_WRITE 1
#define UBLK_IO_OP_FLUSH 2
#define UBLK_IO_OP_DISCARD 3
#define UBLK_IO_OP_WRITE_SAME 4
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_OP_ZONE_OPEN 10
#define UBLK_IO_OP_ZONE_CLOSE 11
#define UBLK_IO_OP_ZONE_FINISH 12
#define UBLK_IO_OP_ZONE_APPEND 13
#define UBLK_IO_OP_ZONE_RESET_ALL 14
#define UBLK_IO_OP_ZONE_RESET 15
#define UBLK_IO_OP_REPORT_ZONES 18
#define UBLK_IO_F_FAILFAST_DEV (1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT (1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER (1U << 10)
#define UBLK_IO_F_META (1U << 11)
#define UBLK_IO_F_FUA (1U << 13)
#define UBLK_IO_F_NOUNMAP (1U << 15)
#define UBLK_IO_F_SWAP (1U << 16)
#define UBLK_IO_F_NEED_REG_BUF (1U << 17)
#define UBLK_IO_F_INTEGRITY (1UL << 18)
#define UBLK_IO_F_SHMEM_ZC (1U << 19)
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)
#define UBLK_AUTO_BUF_REG_F_MASK UBLK_AUTO_BUF_REG_FALLBACK
#define UBLK_BATCH_F_HAS_ZONE_LBA (1 << 0)
#define UBLK_BATCH_F_HAS_BUF_ADDR (1 << 1)
#define UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK (1 << 2)
#define UBLK_ATTR_READ_ONLY (1 << 0)
#define UBLK_ATTR_ROTATIONAL (1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define UBLK_ATTR_FUA (1 << 3)
#define UBLK_MIN_SEGMENT_SIZE 4096
#define UBLK_PARAM_TYPE_BASIC (1 << 0)
#define UBLK_PARAM_TYPE_DISCARD (1 << 1)
#define UBLK_PARAM_TYPE_DEVT (1 << 2)
#define UBLK_PARAM_TYPE_ZONED (1 << 3)
#define UBLK_PARAM_TYPE_DMA_ALIGN (1 << 4)
#define UBLK_PARAM_TYPE_SEGMENT (1 << 5)
#define UBLK_PARAM_TYPE_INTEGRITY (1 << 6)
#define UBLK_SHMEM_ZC_OFF_MASK 0xffffffffULL
#define UBLK_SHMEM_ZC_IDX_OFF 32
#define UBLK_SHMEM_ZC_IDX_MASK 0xffffULL
"""

# numpy dtype -> C struct it mirrors
DTYPES = {
    "ublksrv_ctrl_cmd": uapi.CTRL_CMD_DTYPE,
    "ublksrv_ctrl_dev_info": uapi.DEV_INFO_DTYPE,
    "ublksrv_io_desc": uapi.IO_DESC_DTYPE,
    "ublksrv_io_cmd": uapi.IO_CMD_DTYPE,
    "ublk_batch_io": uapi.BATCH_IO_DTYPE,
    "ublk_elem_header": uapi.ELEM_HEADER_DTYPE,
    "ublk_auto_buf_reg": uapi.AUTO_BUF_REG_DTYPE,
    "ublk_shmem_buf_reg": uapi.SHMEM_BUF_REG_DTYPE,
    "ublk_param_basic": uapi.PARAM_BASIC_DTYPE,
    "ublk_param_discard": uapi.PARAM_DISCARD_DTYPE,
    "ublk_param_devt": uapi.PARAM_DEVT_DTYPE,
    "ublk_param_zoned": uapi.PARAM_ZONED_DTYPE,
    "ublk_param_dma_align": uapi.PARAM_DMA_DTYPE,
    "ublk_param_segment": uapi.PARAM_SEGMENT_DTYPE,
    "ublk_param_integrity": uapi.PARAM_INTEGRITY_DTYPE,
    "ublk_params": uapi.PARAMS_DTYPE,
}

SIZES = {
    "ublksrv_ctrl_cmd": 32, "ublksrv_ctrl_dev_info": 64, "ublksrv_io_desc": 24,
    "ublksrv_io_cmd": 16, "ublk_batch_io": 16, "ublk_elem_header": 8,
    "ublk_auto_buf_reg": 8, "ublk_shmem_buf_reg": 24, "ublk_param_basic": 32,
    "ublk_param_discard": 20, "ublk_param_devt": 16, "ublk_param_zoned": 32,
    "ublk_param_dma_align": 8, "ublk_param_segment": 16, "ublk_param_integrity": 16,
    "ublk_params": 152,
}


def _leaves(dt: np.dtype, prefix: str = "", base: int = 0):
    """(dotted C member path, absolute offset, size) of every leaf field of a dtype."""
    for name in dt.names:
        sub, off = dt.fields[name][:2]
        if sub.names:
            yield from _leaves(sub, f"{prefix}{name}.", base + off)
        else:
            yield f"{prefix}{name}", base + off, sub.itemsize


def _c_members(struct: str) -> list[str]:
    """Member names of a struct in C_STRUCTS, in declaration order (anonymous unions inlined)."""
    text = re.sub(r"union \{(.*?)\};", r"\1", C_STRUCTS, flags=re.S)
    body = re.search(r"struct %s \{(.*?)\};" % struct, text, re.S).group(1)
    return re.findall(r"(\w+)(?:\[\d+\])?;", body)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    """Compile and run a C program printing sizeof/offsetof of every field and every #define."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH: cannot cross-check the C layout")
    lines = []
    for struct, dt in DTYPES.items():
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for path, _, _ in _leaves(dt):
            lines.append(f'printf("off {struct}.{path} %zu\\n", offsetof(struct {struct}, {path}));')
            lines.append(f'printf("size {struct}.{path} %zu\\n", sizeof(((struct {struct} *)0)->{path}));')
    for name in re.findall(r"#define (\w+)", C_DEFINES):
        lines.append(f'printf("def {name} %lld\\n", (long long)({name}));')
    src = "\n".join([
        "#include <stdio.h>", "#include <stddef.h>", "#include <errno.h>",
        "#include <linux/types.h>", "#include <linux/ioctl.h>",
        C_STRUCTS, C_DEFINES,
        "int main(void) {", *lines, "return 0; }",
    ])
    work = tmp_path_factory.mktemp("uapi_c")
    (work / "layout.c").write_text(src)
    build = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(work / "layout"),
                            str(work / "layout.c")], capture_output=True, text=True)
    assert build.returncode == 0, f"C layout program failed to build:\n{build.stderr}"
    out = subprocess.run([str(work / "layout")], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        result[f"{kind} {key}"] = int(value)
    return result


@pytest.mark.parametrize("struct", list(DTYPES))
def test_struct_matches_c(struct, c_layout):
    dt = DTYPES[struct]
    assert dt.itemsize == SIZES[struct] == c_layout[f"sizeof {struct}"]
    leaves = list(_leaves(dt))
    for path, off, size in leaves:
        assert c_layout[f"off {struct}.{path}"] == off, f"{struct}.{path} offset"
        assert c_layout[f"size {struct}.{path}"] == size, f"{struct}.{path} size"
    # Every C member is mirrored, in order, with its verbatim name.
    assert list(dt.names) == _c_members(struct)


def test_struct_sizes_and_param_offsets_match_design():
    for struct, size in SIZES.items():
        assert DTYPES[struct].itemsize == size, struct
    parts = {n: uapi.PARAMS_DTYPE.fields[n][1] for n in uapi.PARAMS_DTYPE.names}
    assert parts == {"len": 0, "types": 4, "basic": 8, "discard": 40, "devt": 60, "zoned": 76,
                     "dma": 108, "seg": 120, "integrity": 136}


def test_every_define_matches_c(c_layout):
    names = re.findall(r"#define (\w+)", C_DEFINES)
    assert len(names) > 100
    for name in names:
        assert getattr(uapi, name) == c_layout[f"def {name}"], name
    # ... and the module has no UBLK_* constant the header lacks (RFC splice pos excepted).
    ours = {n for n in dir(uapi) if re.match(r"UBLK(SRV)?_[A-Z0-9_]+$", n)}
    extra = {n for n in ours - set(names) if not n.startswith("UBLK_SPLICE_")}
    assert extra == set()


def test_struct_round_trip_bytes():
    """Bytes written through the dtype land where the C layout says."""
    rec = np.zeros((), uapi.PARAMS_DTYPE)
    rec["len"] = 152
    rec["basic"]["dev_sectors"] = 0x1122334455667788
    rec["seg"]["seg_boundary_mask"] = 0xFFF
    rec["integrity"]["tag_size"] = 7
    raw = rec.tobytes()
    assert len(raw) == 152
    assert int.from_bytes(raw[0:4], "little") == 152
    assert int.from_bytes(raw[8 + 16:8 + 24], "little") == 0x1122334455667788
    assert int.from_bytes(raw[120:128], "little") == 0xFFF
    assert raw[136 + 10] == 7
    back = np.frombuffer(raw, uapi.PARAMS_DTYPE)[0]
    assert back["basic"]["dev_sectors"] == 0x1122334455667788
    # Union members alias the same bytes.
    desc = np.zeros((), uapi.IO_DESC_DTYPE)
    desc["nr_zones"] = 9
    assert desc["nr_sectors"] == 9


def test_constants_from_design_md():
    assert uapi.UBLK_U_CMD_ADD_DEV == 0xC0207504
    assert uapi.UBLK_U_CMD_GET_FEATURES == 0x80207513
    assert uapi.UBLK_U_IO_FETCH_REQ == 0xC0107520
    for name in ("GET_QUEUE_AFFINITY", "GET_DEV_INFO", "GET_DEV_INFO2", "GET_PARAMS",
                 "GET_FEATURES", "DEL_DEV_ASYNC"):
        assert getattr(uapi, f"UBLK_U_CMD_{name}") >> 8 == 0x802075, name
    nrs = {"ADD_DEV": 0x04, "DEL_DEV": 0x05, "START_DEV": 0x06, "STOP_DEV": 0x07,
           "SET_PARAMS": 0x08, "START_USER_RECOVERY": 0x10, "END_USER_RECOVERY": 0x11,
           "UPDATE_SIZE": 0x15, "QUIESCE_DEV": 0x16, "TRY_STOP_DEV": 0x17,
           "REG_BUF": 0x18, "UNREG_BUF": 0x19}
    for name, nr in nrs.items():
        assert getattr(uapi, f"UBLK_U_CMD_{name}") == 0xC0207500 | nr, name
    assert uapi.UBLK_U_IO_PREP_IO_CMDS == 0xC0107525
    assert uapi.UBLK_IO_RES_ABORT == -errno.ENODEV
    assert uapi.UBLKSRV_IO_BUF_OFFSET == 0x80000000
    assert (uapi.UBLK_IO_BUF_BITS, uapi.UBLK_TAG_BITS, uapi.UBLK_QID_BITS) == (25, 16, 12)
    assert uapi.UBLK_QID_OFF == 41
    assert uapi.UBLKSRV_IO_INTEGRITY_FLAG == 1 << 62
    assert uapi.MAINLINE_FEATURE_MASK == 0xFFFFF
    assert uapi.UBLK_F_SHMEM_ZC == 1 << 19 and uapi.UBLK_F_USER_COPY == 1 << 7


def test_feature_names():
    # the bits 7.2's ADD_DEV sets on every device (its returned flags: `| 0x26042`)
    assert uapi.feature_names(0x26042) == [
        "URING_CMD_COMP_IN_TASK", "CMD_IOCTL_ENCODE", "PER_IO_DAEMON",
        "BUF_REG_OFF_DAEMON", "SAFE_STOP_DEV"]
    assert uapi.feature_names(0) == []
    assert uapi.feature_names(1 << 20 | 1) == ["SUPPORT_ZERO_COPY", "bit 20"]
    assert uapi.feature_names(uapi.SIM_F_SPLICE_ZC) == ["bit 63"]
    assert uapi.feature_names(np.uint64(1 << 19)) == ["SHMEM_ZC"]
    assert len(uapi.feature_names(uapi.MAINLINE_FEATURE_MASK)) == 20
    with pytest.raises(ValueError, match="u64"):
        uapi.feature_names(-1)
    with pytest.raises(ValueError, match="u64"):
        uapi.feature_names(1 << 64)
    with pytest.raises(TypeError, match="int"):
        uapi.feature_names("0x1")


def test_feature_intflag_round_trip():
    assert len(uapi.Feature) == 20
    for member in uapi.Feature:
        assert getattr(uapi, f"UBLK_F_{member.name}") == member.value
        assert uapi.Feature(member.value) is member
        assert uapi.Feature[member.name] is member
    combo = uapi.Feature.USER_COPY | uapi.Feature.ZONED
    assert int(combo) == (1 << 7) | (1 << 8)
    assert uapi.Feature(int(combo)) == combo
    assert sorted(uapi.feature_names(int(combo))) == ["USER_COPY", "ZONED"]


def test_kernel_versions_cover_every_feature():
    assert set(uapi.KERNEL_VERSION_OF_FEATURE) == {int(f) for f in uapi.Feature}
    v = uapi.KERNEL_VERSION_OF_FEATURE
    assert v[uapi.UBLK_F_SUPPORT_ZERO_COPY] == "6.15"
    assert v[uapi.UBLK_F_USER_COPY] == "6.5"
    assert v[uapi.UBLK_F_AUTO_BUF_REG] == v[uapi.UBLK_F_QUIESCE] == "6.16"
    assert v[uapi.UBLK_F_BUF_REG_OFF_DAEMON] == "6.17"
    assert v[uapi.UBLK_F_BATCH_IO] == v[uapi.UBLK_F_NO_AUTO_PART_SCAN] == "7.0"
    assert v[uapi.UBLK_F_SHMEM_ZC] == "7.1"
    for value in v.values():
        assert re.fullmatch(r"[67]\.\d+", value), value


def test_splice_bit_is_ours_only():
    assert uapi.SIM_F_SPLICE_ZC >= 1 << 32
    assert uapi.SIM_F_SPLICE_ZC & uapi.MAINLINE_FEATURE_MASK == 0
    for member in uapi.Feature:
        assert member.value & uapi.SIM_F_SPLICE_ZC == 0
    assert uapi.SIM_FEATURE_MASK & uapi.SIM_F_SPLICE_ZC
    assert uapi.SIM_F_SPLICE_ZC < 1 << 64          # still fits the u64 flags word
    assert not hasattr(uapi, "UBLK_F_SPLICE_ZC")   # never in the kernel namespace
    # RFC splice flags sit above mainline SPLICE_F_MOVE|NONBLOCK|MORE|GIFT (0xf).
    assert uapi.SPLICE_F_DIRECT & 0xF == 0 and uapi.SPLICE_F_READ_TO_READ & 0xF == 0
    assert uapi.SPLICE_F_DIRECT != uapi.SPLICE_F_READ_TO_READ
    pos = 3 << uapi.UBLK_SPLICE_QID_OFF | 5 << uapi.UBLK_SPLICE_TAG_OFF | 4096
    assert pos == (3 << 42) | (5 << 30) | 4096
    assert uapi.UBLK_SPLICE_TAG_OFF + uapi.UBLK_SPLICE_TAG_BITS == uapi.UBLK_SPLICE_QID_OFF


def test_enums():
    assert issubclass(uapi.Op, enum.IntEnum) and issubclass(uapi.DevState, enum.IntEnum)
    assert [(m.name, m.value) for m in uapi.DevState] == [
        ("DEAD", 0), ("LIVE", 1), ("QUIESCED", 2), ("FAIL_IO", 3)]
    for m in uapi.Op:
        assert getattr(uapi, f"UBLK_IO_OP_{m.name}") == m
    assert uapi.Op.REPORT_ZONES == 18 and len(uapi.Op) == 13


def test_accessors():
    assert uapi.ioc_nr(uapi.UBLK_U_CMD_ADD_DEV) == uapi.UBLK_CMD_ADD_DEV
    assert uapi.ioc_nr(uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ) == 0x21
    assert uapi.legacy_op(uapi.UBLK_U_CMD_START_DEV) == 0x06
    assert uapi.legacy_op(uapi.UBLK_U_IO_FETCH_REQ) == uapi.UBLK_IO_FETCH_REQ
    assert uapi.legacy_op(uapi.UBLK_CMD_GET_DEV_INFO2) == 0x12
    with pytest.raises(ValueError, match="6.4"):
        uapi.legacy_op(uapi.UBLK_U_CMD_GET_FEATURES)
    with pytest.raises(ValueError, match="'u'"):
        uapi.legacy_op(0xC0207404)
    with pytest.raises(ValueError, match="u32"):
        uapi.ioc_nr(-1)
    for nr, cmd_op in ((uapi.UBLK_IO_FETCH_REQ, uapi.UBLK_U_IO_FETCH_REQ),
                       (uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ),
                       (uapi.UBLK_IO_NEED_GET_DATA, uapi.UBLK_U_IO_NEED_GET_DATA),
                       (0x25, uapi.UBLK_U_IO_PREP_IO_CMDS)):
        assert uapi.io_cmd_op(nr) == cmd_op == 0xC0107500 | nr
    with pytest.raises(ValueError, match="command number"):
        uapi.io_cmd_op(0x100)
    assert 1 << uapi.SECTOR_SHIFT == 512
    op_flags = uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA | uapi.UBLK_IO_F_SHMEM_ZC
    assert uapi.op_of(op_flags) == uapi.Op.WRITE
    assert uapi.flags_of(op_flags) & uapi.UBLK_IO_F_FUA
    assert uapi.flags_of(op_flags) == uapi.UBLK_IO_F_FUA | uapi.UBLK_IO_F_SHMEM_ZC
    assert uapi.flags_of(uapi.UBLK_IO_OP_READ) == 0
    with pytest.raises(TypeError):
        uapi.op_of(1.0)
