"""Compressed clusters: their descriptors, decompression, and the cache of decompressed
clusters.

A compressed cluster's L2 entry (bit 62 set) is a descriptor, not a cluster offset: its
low ``62 - (cluster_bits - 8)`` bits give the byte offset of the compressed data in the
file (any byte, not aligned), the ``cluster_bits - 8`` bits above them how many 512-byte
sectors the data takes after the one it starts in. Several compressed clusters may
share a host cluster and one may span two; each host cluster a compressed cluster's
sectors touch counts it once in its refcount.

The data is raw deflate (window of 4 KiB, as qemu writes it) or, when the header's
compression type says so, a zstd frame; either is followed by padding up to the sector
end. Decompressed clusters are kept in a small LRU cache held in a memfd, so that ring
I/O can read a request's bytes out of it on any data path (the request is filled from
a file descriptor); a cluster is pinned while such a read is in flight.
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from . import fileio
from .format import Qcow2Error, corrupt

__all__ = ["Descriptors", "Decompressed", "check_compression_type"]

_ZLIB, _ZSTD = 0, 1
_CACHE_BYTES = 4 << 20   # decompressed clusters kept (at least _MIN_SLOTS of them)
_MIN_SLOTS = 4


def check_compression_type(ctype: int) -> None:
    """Refuse a compression type this engine cannot decompress (ENOTSUP, one line)."""
    if ctype == _ZLIB:
        return
    if ctype == _ZSTD:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise Qcow2Error(errno.ENOTSUP, "unsupported qcow2 feature: compression type "
                             "zstd needs the Python package zstandard (pip install "
                             "'pyublk_fast[zstd]')") from None
        return
    raise Qcow2Error(errno.ENOTSUP, f"unsupported qcow2 feature: compression type {ctype} "
                     "(zlib and zstd are understood)")


def _inflate(raw: bytes, cs: int) -> bytes:
    return zlib.decompressobj(-12).decompress(raw, cs)


def _unzstd(raw: bytes, cs: int) -> bytes:
    import zstandard
    # one frame, at most a cluster and a byte: a frame claiming more is corrupt, and is
    # not inflated in memory to find out
    return zstandard.ZstdDecompressor().stream_reader(raw).read(cs + 1)


class Descriptors:
    """The layout of compressed cluster descriptors for one cluster size."""

    def __init__(self, cluster_bits: int) -> None:
        self.cb = cluster_bits
        self.shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def span(self, e: int) -> tuple[int, int]:
        """(file offset, length) of the compressed data of descriptor ``e``."""
        off = e & self.offset_mask
        sectors = ((e >> self.shift) & self.sectors_mask) + 1
        return off, sectors * 512 - (off & 511)

    def clusters(self, e: int) -> range:
        """The host clusters the compressed data of ``e`` touches (one or two)."""
        off, n = self.span(e)
        return range(off >> self.cb, ((off + n - 1) >> self.cb) + 1)

    def clusters_of(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last host cluster of each descriptor in ``entries``."""
        e = entries.astype(np.uint64)
        off = e & np.uint64(self.offset_mask)
        sectors = ((e >> np.uint64(self.shift)) & np.uint64(self.sectors_mask)) + np.uint64(1)
        end = (off & ~np.uint64(511)) + sectors * np.uint64(512)
        cb = np.uint64(self.cb)
        return (off >> cb).astype(np.int64), ((end - np.uint64(1)) >> cb).astype(np.int64)


class Decompressed:
    """The LRU cache of decompressed clusters of one image, in a memfd.

    ``pin`` returns where the cluster is in ``fd`` (decompressing it on a miss) and
    keeps it there until ``unpin``; least recently used clusters that no read holds
    are dropped once more than the budget is cached. Its own lock: the reads that
    unpin may belong to another image's queue (a backing chain)."""

    def __init__(self, fd: int, desc: Descriptors, ctype: int) -> None:
        check_compression_type(ctype)
        self._img_fd = fd
        self._desc = desc
        self._cb = desc.cb
        self._cs = 1 << desc.cb
        self._unpack: Callable[[bytes, int], bytes] = _unzstd if ctype == _ZSTD else _inflate
        self._max = max(_MIN_SLOTS, _CACHE_BYTES >> desc.cb)
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, int] = OrderedDict()  # descriptor -> slot, LRU first
        self._pins: dict[int, int] = {}   # slot -> reads holding it
        self._orphans: set[int] = set()   # pinned slots whose descriptor was forgotten
        self._free: list[int] = []
        self._made = 0
        self.loads = 0                    # clusters cached, in all (for tests)
        self.fd = os.memfd_create("qcow2-decompressed", os.MFD_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pin(self, e: int, voff: int) -> int:
        """The offset in ``fd`` of descriptor ``e``'s cluster (of virtual offset
        ``voff``, for errors), read and decompressed here if not cached (a pread: for
        the engine's own calls), held until ``unpin``."""
        where = self.pin_cached(e)
        if where is None:
            off, n = self._desc.span(e)
            where = self.put(e, self.unpack(fileio.pread_padded(self._img_fd, n, off), e, voff))
        return where

    def pin_cached(self, e: int) -> int | None:
        """``pin`` if descriptor ``e``'s cluster is cached, else None."""
        with self._lock:
            s = self._slots.get(e)
            return None if s is None else self._hold(e, s)

    def put(self, e: int, data: Any) -> int:
        """Cache ``data``, descriptor ``e``'s cluster (from ``unpack``), pinned: its
        offset in ``fd``, for ``unpin``. Loaded meanwhile by another request, the copy
        already there is pinned instead."""
        with self._lock:
            s = self._slots.get(e)
            if s is None:
                s = self._free.pop() if self._free else self._take()
                try:
                    # not fileio.pwrite_all: that is the image file's seam (tests record
                    # or fail its writes), and this is memory
                    mv, done = memoryview(data), 0
                    while done < len(mv):
                        done += os.pwrite(self.fd, mv[done:], (s << self._cb) + done)
                except OSError:
                    self._free.append(s)
                    raise
                self._slots[e] = s
                self.loads += 1
            where = self._hold(e, s)
            self._trim()
            return where

    def _hold(self, e: int, s: int) -> int:
        """Pin slot ``s`` (of ``e``), now the most recently used; its offset in ``fd``."""
        self._slots.move_to_end(e)
        self._pins[s] = self._pins.get(s, 0) + 1
        return s << self._cb

    def span(self, e: int) -> tuple[int, int]:
        """(file offset, length) of descriptor ``e``'s compressed data in the image."""
        return self._desc.span(e)

    @property
    def image_fd(self) -> int:
        """The image file, where the compressed data is."""
        return self._img_fd

    def unpack(self, raw: Any, e: int, voff: int) -> bytes:
        """Decompress ``raw``, descriptor ``e``'s data (of virtual offset ``voff``), into
        one cluster; Qcow2Error (EIO) if it is not exactly one. Touches nothing shared:
        for a worker thread too."""
        off, n = self._desc.span(e)
        try:
            data = self._unpack(bytes(raw), self._cs)
        except Exception as ex:  # zlib.error, zstandard.ZstdError: the data is bad
            raise corrupt(f"compressed cluster at virtual offset {voff:#x} (host offset "
                          f"{off:#x}, {n} bytes) does not decompress: {ex}") from None
        if len(data) != self._cs:
            raise corrupt(f"compressed cluster at virtual offset {voff:#x} (host offset "
                          f"{off:#x}, {n} bytes) decompresses to "
                          f"{'more' if len(data) > self._cs else len(data)} bytes, "
                          f"not {self._cs}")
        return data

    def unpin(self, where: int) -> None:
        """Let go of the cluster ``pin`` returned ``where`` for."""
        s = where >> self._cb
        with self._lock:
            n = self._pins[s] - 1
            if n:
                self._pins[s] = n
                return
            del self._pins[s]
            if s in self._orphans:
                self._orphans.discard(s)
                self._free.append(s)
            self._trim()

    def read(self, e: int, voff: int, o: int, mv: memoryview) -> None:
        """Fill ``mv`` with the bytes from ``o`` of descriptor ``e``'s cluster."""
        where = self.pin(e, voff)
        try:
            fileio.pread_into(self.fd, mv, where + o)
        finally:
            self.unpin(where)

    def forget(self, e: int) -> None:
        """Descriptor ``e`` is no longer in the image (its cluster was rewritten or
        unmapped): drop its cluster, once no read holds it."""
        with self._lock:
            s = self._slots.pop(e, None)
            if s is not None:
                if s in self._pins:
                    self._orphans.add(s)
                else:
                    self._free.append(s)

    def _take(self) -> int:
        self._made += 1
        return self._made - 1

    def _trim(self) -> None:
        if len(self._slots) <= self._max:
            return
        for e, s in list(self._slots.items()):
            if len(self._slots) <= self._max:
                break
            if s not in self._pins:
                del self._slots[e]
                self._free.append(s)
