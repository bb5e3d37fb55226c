"""qcow2 on-disk constants, header parsing/validation, header building and the
errors every layer raises (Qcow2Error, ``corrupt``).

Facts follow the qcow2 format specification (all fields big-endian).
Nothing here touches a file descriptor except ``read_header``.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Qcow2Error", "Header", "parse_header", "read_header", "build_header", "corrupt",
    "check_entries", "check_in_file", "HEADER_REFTABLE_FIELDS", "HEADER_AUTOCLEAR",
    "HEADER_SIZE_FIELD", "HEADER_L1_FIELDS",
    "MAGIC", "OFFSET_MASK", "L1_RESERVED_MASK", "L2_RESERVED_MASK", "OFLAG_COPIED",
    "OFLAG_COMPRESSED", "OFLAG_ZERO", "MAX_L1_BYTES", "MAX_REFTABLE_BYTES",
    "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS", "REFCOUNT_ORDER", "HEADER_V3_LENGTH",
]


class Qcow2Error(OSError):
    """Any qcow2 problem: ``Qcow2Error(errno, message)``.

    errno is EIO for corrupt images, ENOTSUP for unsupported features, EINVAL for
    bad arguments/not-a-qcow2, EROFS for writes to a read-only image.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


MAGIC = 0x514649FB  # "QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
REFCOUNT_ORDER = 4  # 16-bit refcounts: the only width supported
HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104
HEADER_V3_WRITE_LENGTH = 112  # with compression_type byte + padding, like qemu >= 5.1

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: host offset in L1/L2 entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8 and 56-62
L2_RESERVED_MASK = 0x3F000000000001FE  # bits 1-8 and 56-61 (standard cluster)
REFTABLE_RESERVED_MASK = 0x1FF

MAX_L1_BYTES = 32 << 20  # same caps as qemu
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023

# header fields rewritten in place (byte offsets)
HEADER_SIZE_FIELD = 24  # size (u64)
HEADER_L1_FIELDS = 36  # l1_size (u32), l1_table_offset (u64)
HEADER_REFTABLE_FIELDS = 48  # refcount_table_offset (u64), refcount_table_clusters (u32)
HEADER_AUTOCLEAR = 88  # autoclear_features (u64)

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_NAMES = {
    0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
    4: "extended L2 entries",
}

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes: 72..104


def corrupt(msg: str) -> Qcow2Error:
    """The error for a corrupt image (EIO), to raise."""
    return Qcow2Error(errno.EIO, f"corrupt qcow2 image: {msg}")


def check_entries(what: str, table: np.ndarray, reserved: int) -> None:
    """Refuse entries of a table read from the file that have a ``reserved`` bit set."""
    bad = np.flatnonzero(table & np.uint64(reserved))
    if bad.size:
        i = int(bad[0])
        raise corrupt(f"{what} {i} ({int(table[i]):#x}) has reserved bits set or is not "
                      "cluster aligned")


def check_in_file(what: str, clusters: np.ndarray, end: int, cluster_bits: int) -> None:
    """Refuse table entries that point at or past ``end``, the file's length in clusters."""
    if clusters.size and int(clusters.max()) >= end:
        c = int(clusters.max())
        raise corrupt(f"{what} points at {c << cluster_bits:#x}, beyond the end of the "
                      f"file; the image is truncated")


def _unsupported(msg: str) -> Qcow2Error:
    return Qcow2Error(errno.ENOTSUP, f"unsupported qcow2 feature: {msg}")


@dataclass
class Header:
    """Parsed, validated qcow2 header (v2 or v3)."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _check_table(name: str, offset: int, nbytes: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise corrupt(f"{name} offset {offset:#x} is not aligned to the cluster size {cs}")
    if offset == 0:
        raise corrupt(f"{name} offset is 0 (overlaps the header)")
    if offset + nbytes > -(-file_size // cs) * cs:
        raise corrupt(f"{name} at {offset:#x} (+{nbytes} bytes) lies beyond the end of the "
                      f"file ({file_size} bytes); the image is truncated")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate a header from the first cluster's bytes ``buf``.

    ``buf`` may be shorter than a cluster (truncated file); anything referenced
    outside it is reported as corruption.
    """
    if len(buf) < HEADER_V2_LENGTH:
        raise Qcow2Error(errno.EINVAL, f"not a qcow2 image: file is only {len(buf)} bytes")
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise Qcow2Error(errno.EINVAL, "not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise _unsupported(f"version {version} (only versions 2 and 3 are supported)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _unsupported(f"cluster_bits {cluster_bits} (supported: "
                           f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    cs = 1 << cluster_bits
    h = Header(version, cluster_bits, size, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
               snap_off)
    if version == 3:
        if len(buf) < HEADER_V3_LENGTH:
            raise corrupt("truncated version 3 header")
        (h.incompatible, h.compatible, h.autoclear, refcount_order,
         h.header_length) = _V3_EXTRA.unpack_from(buf, HEADER_V2_LENGTH)
        if h.header_length < HEADER_V3_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise corrupt(f"header_length {h.header_length} (must be a multiple of 8 in "
                          f"{HEADER_V3_LENGTH}..{cs})")
        if h.header_length > len(buf):
            raise corrupt("header extends beyond the end of the file")
        if h.header_length > HEADER_V3_LENGTH:
            h.compression_type = buf[HEADER_V3_LENGTH]
        if refcount_order != REFCOUNT_ORDER:
            width = f"{1 << refcount_order}-bit" if refcount_order < 7 else "invalid"
            raise _unsupported(f"refcount_order {refcount_order} ({width} "
                               "refcounts); only 16-bit refcounts are supported "
                               "(qemu-img convert -O qcow2 -o refcount_bits=16)")
    _parse_extensions(h, buf, HEADER_V2_LENGTH if version == 2 else h.header_length)
    if crypt != 0:
        raise _unsupported(f"encryption (crypt_method {crypt}); decrypt with "
                           "qemu-img convert first")
    _check_incompatible(h)
    # sizes and tables
    if size > (1 << 62):
        raise corrupt(f"virtual size {size} is absurd")
    l2_bits = cluster_bits - 3
    need_l1 = -(-size // (1 << (cluster_bits + l2_bits)))
    if l1_size < need_l1:
        raise corrupt(f"L1 table has {l1_size} entries, {need_l1} are needed for size {size}")
    if l1_size * 8 > MAX_L1_BYTES:
        raise corrupt(f"L1 table of {l1_size * 8} bytes exceeds the {MAX_L1_BYTES} byte limit")
    if l1_size:
        _check_table("L1 table", l1_off, l1_size * 8, cs, file_size)
    if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_BYTES:
        raise corrupt(f"refcount table of {rt_clusters} clusters (allowed 1.."
                      f"{MAX_REFTABLE_BYTES // cs})")
    _check_table("refcount table", rt_off, rt_clusters * cs, cs, file_size)
    if nb_snap and snap_off % cs:
        raise corrupt(f"snapshot table offset {snap_off:#x} is not cluster aligned")
    if backing_off:
        if backing_len == 0 or backing_len > MAX_BACKING_NAME:
            raise corrupt(f"backing file name length {backing_len} (allowed 1..{MAX_BACKING_NAME})")
        end = backing_off + backing_len
        if end > len(buf) or end > cs or backing_off < HEADER_V2_LENGTH:
            raise corrupt(f"backing file name at {backing_off:#x}+{backing_len} is outside "
                          "the header cluster")
        try:
            h.backing_file = bytes(buf[backing_off:end]).decode()
        except UnicodeDecodeError:
            raise corrupt("backing file name is not valid UTF-8") from None
        if "\0" in h.backing_file:
            raise corrupt("backing file name contains a NUL byte")
    return h


def _parse_extensions(h: Header, buf: bytes, pos: int) -> None:
    cs = h.cluster_size
    limit = min(len(buf), cs)
    while pos + 8 <= limit:
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            return
        if pos + elen > limit:
            raise corrupt(f"header extension {etype:#x} of {elen} bytes runs past the "
                          "header cluster")
        data = bytes(buf[pos:pos + elen])
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif etype == EXT_FEATURE_NAMES:
            for i in range(0, elen - 47, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(ftype, bit)] = name
        pos += (elen + 7) & ~7
    if h.version == 3 and pos < limit:
        raise corrupt("header extension list is not terminated")


def _check_incompatible(h: Header) -> None:
    inc = h.incompatible
    if inc & INCOMPAT_DATA_FILE:
        raise _unsupported("external data file (incompatible feature bit 2)")
    if inc & INCOMPAT_EXTL2:
        raise _unsupported("extended L2 entries / subclusters (incompatible feature bit 4); "
                           "convert with qemu-img convert -O qcow2 -o extended_l2=off")
    if not inc & INCOMPAT_COMPRESSION:
        h.compression_type = 0   # the field counts only with the feature bit: zlib
    unknown = inc & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(f"bit {b} ({h.feature_names.get((0, b), 'unknown')})" for b in bits)
        raise _unsupported(f"unknown incompatible feature {names}")


def read_header(fd: int, file_size: int) -> Header:
    """Read the first cluster (or less, if the file is short) and parse it."""
    head = os.pread(fd, HEADER_V3_LENGTH, 0)
    if len(head) >= 24:
        bits = struct.unpack_from(">I", head, 20)[0]
        nbytes = 1 << bits if MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS else len(head)
        head = os.pread(fd, nbytes, 0)
    return parse_header(head, file_size)


def build_header(*, cluster_bits: int, size: int, l1_size: int, l1_offset: int,
                 rt_offset: int, rt_clusters: int, backing_file: str | None,
                 backing_format: str | None) -> bytes:
    """Return the bytes of a fresh version 3 header cluster (extensions, backing name)."""
    cs = 1 << cluster_bits
    ext = b""
    if backing_format:
        fmt = backing_format.encode()
        ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
    ext += struct.pack(">II", EXT_END, 0)
    name = backing_file.encode() if backing_file else b""
    if len(name) > MAX_BACKING_NAME:
        raise Qcow2Error(errno.EINVAL, f"backing file name longer than {MAX_BACKING_NAME} bytes")
    backing_off = HEADER_V3_WRITE_LENGTH + len(ext) if name else 0
    if HEADER_V3_WRITE_LENGTH + len(ext) + len(name) > cs:
        raise Qcow2Error(errno.EINVAL, "header, extensions and backing file name do not fit "
                         f"in one {cs} byte cluster; use a larger cluster_bits")
    head = _V2.pack(MAGIC, 3, backing_off, len(name), cluster_bits, size, 0, l1_size,
                    l1_offset, rt_offset, rt_clusters, 0, 0)
    head += _V3_EXTRA.pack(0, 0, 0, REFCOUNT_ORDER, HEADER_V3_WRITE_LENGTH)
    head += b"\0" * (HEADER_V3_WRITE_LENGTH - len(head))  # compression_type 0 = zlib
    return head + ext + name
