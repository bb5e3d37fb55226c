"""Positional reads and writes of the image file, and its fsync.

Every write the engine makes goes through ``pwrite_all`` and every fsync through
``sync``; the other modules call them as ``fileio.pwrite_all`` and ``fileio.sync`` so
that a test can record or fail each one by replacing it. A failed read or write
raises OSError with its errno and a message naming the operation, its length and its
file offset.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["pread_into", "pread_padded", "pwrite_all", "store_entry", "sync"]


def _failed(e: OSError, what: str, n: int, offset: int) -> OSError:
    return OSError(e.errno, f"cannot {what} {n} bytes at file offset {offset:#x}: "
                            f"{e.strerror}")


def pread_into(fd: int, mv: memoryview, offset: int) -> None:
    """Fill ``mv`` from ``offset``; bytes past the end of the file read as zeros."""
    done, n = 0, len(mv)
    try:
        while done < n:
            got = os.preadv(fd, [mv[done:]], offset + done)
            if got <= 0:
                mv[done:] = bytes(n - done)
                return
            done += got
    except OSError as e:
        raise _failed(e, "read", n, offset) from e


def pread_padded(fd: int, n: int, offset: int) -> bytearray:
    buf = bytearray(n)
    pread_into(fd, memoryview(buf), offset)
    return buf


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], offset + done)
    except OSError as e:
        raise _failed(e, "write", len(mv), offset) from e


def sync(fd: int) -> None:
    """fsync the image file: every write made so far is durable when this returns."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, f"fsync of the image file failed: {e.strerror}") from e


def store_entry(fd: int, table: np.ndarray, i: int, value: int, table_offset: int) -> None:
    """Write ``value`` as entry ``i`` of the copy of the big-endian ``table`` at
    ``table_offset`` in the file, then set it in ``table``, held in memory.

    The file first: if the write fails (EIO, ENOSPC) the table in memory keeps the
    value the file has, so no later read follows, and no later allocation builds on,
    an entry that is not in the file.
    """
    entry = np.array([value], dtype=table.dtype)
    pwrite_all(fd, entry.tobytes(), table_offset + table.itemsize * i)
    table[i] = value
