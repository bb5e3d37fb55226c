"""The layout of a new image: header, L1 table, refcount table and refcount blocks.

A new image holds no L2 table and no data: the header cluster, the L1 table right
after it, then the refcount table and the blocks counting all of these.
"""

from __future__ import annotations

import os

import numpy as np

from . import fileio
from .format import MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, build_header
from .refcount import plan_area, write_area

__all__ = ["check_new_image", "write_new_image"]


def check_new_image(size: int, cluster_bits: int, backing_format: str | None) -> int:
    """Validate the arguments of ``Qcow2Image.create``; return the L1 table's entries."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if not isinstance(cluster_bits, int) or not (
            MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS):
        raise ValueError(f"cluster_bits must be in {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}, "
                         f"got {cluster_bits!r}")
    if backing_format not in (None, "raw", "qcow2"):
        raise ValueError(f"backing_format must be 'raw', 'qcow2' or None, "
                         f"got {backing_format!r}")
    cs = 1 << cluster_bits
    l1_size = max(1, -(-size // (cs * (cs // 8))))
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"size {size} needs an L1 table of {l1_size * 8} bytes, more "
                         f"than {MAX_L1_BYTES}; use a larger cluster_bits")
    return l1_size


def write_new_image(path: str, size: int, cluster_bits: int, l1_size: int,
                    backing_file: str | None, backing_format: str | None) -> None:
    """Create (or overwrite) ``path`` as an empty image, durable when this returns."""
    cs = 1 << cluster_bits
    used = 1 + -(-l1_size * 8 // cs)  # header and L1 table
    none = np.zeros(0, dtype=">u8")
    area = plan_area(cluster_bits, used, 0, 1, none)
    header = build_header(cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                          l1_offset=cs, rt_offset=used * cs, rt_clusters=area.table_clusters,
                          backing_file=backing_file, backing_format=backing_format)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, area.stop * cs)
        # the header, written last, is what makes the file a qcow2 image
        write_area(fd, cluster_bits, area, none)
        fileio.pwrite_all(fd, header, 0)
        fileio.sync(fd)
    finally:
        os.close(fd)
