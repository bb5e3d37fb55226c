"""Qcow2Image: read/write a qcow2 (version 3) image with plain pread/pwrite.

The engine: opening and validating an image, reads, writes, discard, write zeroes,
flush and backing files. The L1/L2 mapping lives in ``l2``, refcounts and cluster
allocation in ``refcount``, the layout of a new image in ``layout``.

Metadata is write-through: every change is pwritten at once, in an order that lets a
crash of this process leak clusters but never leave an L1/L2 entry pointing at
unwritten or unallocated data (each step says so where it happens). The kernel may
reorder writeback, so against power loss the image is only as safe as the last
``flush()``, like a disk with a volatile write cache; but a cluster that an entry
pointed at when the last flush completed takes no other data before the next flush
has made that entry's clearing durable (freed clusters wait for it), so a power loss
never shows one virtual cluster another one's data.

Failures: a table entry changes in memory only once its write is in the file, so a
failed pwrite (EIO, ENOSPC) fails its request and leaves the engine's tables as the
file has them (a cluster taken for the request is given back, or leaked if that
fails too). A failed fsync is final: every later flush and write fails with EIO until
the image is reopened (see ``flush``). Opening an image for writing uncounts the
clusters a crash or a failed request leaked (as 'qemu-img check -r leaks' does); this
costs a read of the refcount blocks besides that of every L2 table, which open
makes anyway.

Clusters freed by discard/write_zeroes are reused by later allocations of the same
session once a flush made their freeing durable; otherwise new clusters are appended
at the end of the file. All public methods take one internal lock, so an image may be
shared by threads.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from typing import Any, Iterator

import numpy as np

from . import fileio, layout
from .compress import Decompressed, check_compression_type
from .format import (
    HEADER_AUTOCLEAR, HEADER_SIZE_FIELD, OFLAG_COPIED, OFLAG_ZERO, Header, Qcow2Error, corrupt,
    read_header,
)
from .l2 import COMPRESSED, DATA, UNALLOC, ZERO, ClusterMap, l1_range, load_l1
from .refcount import Refcounts, load_reftable

__all__ = ["Qcow2Image", "unpin"]

log = logging.getLogger("pyublk_fast.backends.qcow2")

_MAX_BACKING_DEPTH = 16
_QCOW2_MAGIC = b"QFI\xfb"


def _zero_past(size: int, offset: int, mv: memoryview) -> int:
    """Zero the bytes of ``mv`` (read at ``offset``) that lie at or past ``size``;
    return how many lie before it."""
    avail = max(0, min(len(mv), size - offset))
    if avail < len(mv):
        mv[avail:] = bytes(len(mv) - avail)
    return avail


def _in_backing(path: str, e: OSError) -> Qcow2Error:
    """``e``, raised while reading the backing file ``path``, naming that file (the
    image's own errors do not: a chain has several files)."""
    return Qcow2Error(e.errno or errno.EIO, f"backing file {path!r}: {e.strerror or e}")


def _add_run(runs: list, fd: int, where: int, at: int, n: int) -> None:
    """Append the run (fd, where, at, n) to ``runs`` (see ``Qcow2Image.map_data``), or
    extend the last one if it continues it."""
    if n <= 0:
        return
    if runs:
        lfd, lwhere, lat, ln = runs[-1]
        if lfd == fd and lat + ln == at and (fd < 0 or lwhere + ln == where):
            runs[-1] = (fd, lwhere, lat, ln + n)
            return
    runs.append((fd, where, at, n))


class _RawBacking:
    """Read-only raw backing file; reads past its end return zeros."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def _read_clipped(self, offset: int, mv: memoryview) -> None:
        avail = _zero_past(self.size, offset, mv)
        if avail:
            try:
                fileio.pread_into(self._fd, mv[:avail], offset)
            except OSError as e:
                raise _in_backing(self._path, e) from e

    def _map_clipped(self, offset: int, length: int, at: int, runs: list, pins: list,
                     missing: list | None = None) -> None:
        avail = max(0, min(length, self.size - offset))
        _add_run(runs, self._fd, offset, at, avail)
        _add_run(runs, -1, 0, at + avail, length - avail)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def unpin(pins: list) -> None:
    """Let go of the decompressed clusters ``map_data`` pinned (emptying ``pins``)."""
    while pins:
        cache, slot = pins.pop()
        cache.unpin(slot)


def _open_backing(image_path: str, name: str, fmt: str | None, depth: int) -> Any:
    path = name if os.path.isabs(name) else os.path.join(
        os.path.dirname(os.path.abspath(image_path)), name)
    if depth >= _MAX_BACKING_DEPTH:
        raise Qcow2Error(errno.ELOOP, f"backing chain deeper than {_MAX_BACKING_DEPTH} "
                         f"images at {path!r} (a loop?)")
    try:
        if fmt is None:
            with open(path, "rb") as f:
                fmt = "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"
        if fmt == "raw":
            return _RawBacking(path)
        if fmt == "qcow2":
            return Qcow2Image._open(path, True, depth + 1)
    except Qcow2Error:
        raise
    except OSError as e:
        raise Qcow2Error(e.errno or errno.EIO,
                         f"cannot open backing file {path!r}: {e.strerror}") from None
    raise Qcow2Error(errno.ENOTSUP, f"backing file format {fmt!r} is not supported "
                     "(use raw or qcow2)")


class Qcow2Image:
    """A qcow2 image file opened for reading (and writing, for version 3)."""

    _unpacked: Decompressed | None   # the cache of decompressed clusters, once needed

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, path: str, size: int, cluster_bits: int = 16,
               backing_file: str | None = None,
               backing_format: str | None = None) -> "Qcow2Image":
        """Create (or overwrite) ``path`` as an empty qcow2 v3 image of ``size`` bytes
        and return it opened read-write."""
        l1_size = layout.check_new_image(size, cluster_bits, backing_format)
        if backing_file is not None:
            if not backing_file:
                raise ValueError("backing_file must be a non-empty path")
            probe = _open_backing(path, backing_file, backing_format, 0)
            if backing_format is None:
                backing_format = "qcow2" if isinstance(probe, Qcow2Image) else "raw"
            probe.close()
        layout.write_new_image(path, size, cluster_bits, l1_size, backing_file,
                               backing_format)
        return cls.open(path)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, readonly: bool = False) -> "Qcow2Image":
        """Open an existing qcow2 image; raises Qcow2Error for unsupported or corrupt ones."""
        return cls._open(path, readonly, 0)

    @classmethod
    def _open(cls, path: str, readonly: bool, depth: int) -> "Qcow2Image":
        self = cls.__new__(cls)
        self._fd = -1
        self._backing = None
        self._unpacked = None
        try:
            self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise Qcow2Error(e.errno or errno.EIO,
                             f"cannot open qcow2 image {path!r}: {e.strerror}") from None
        try:
            self._init(path, readonly, depth)
        except BaseException:
            self.close()
            raise
        return self

    def _init(self, path: str, readonly: bool, depth: int) -> None:
        self._path = path
        self._readonly = readonly
        self._lock = threading.RLock()
        self._flush_failed: str | None = None  # why the image takes no more writes
        fd = self._fd
        file_size = os.fstat(fd).st_size
        h: Header = read_header(fd, file_size)
        check_compression_type(h.compression_type)
        self._compression = h.compression_type
        if not readonly:
            why = None
            if h.version < 3:
                why = ("version 2 images are read-only here; upgrade with "
                       "'qemu-img amend -f qcow2 -o compat=1.1'")
            elif h.nb_snapshots:
                why = (f"image has {h.nb_snapshots} internal snapshot(s); writing images "
                       "with snapshots is not supported")
            elif h.incompatible & 1:
                why = "image is marked dirty; repair it with 'qemu-img check -r all'"
            elif h.incompatible & 2:
                why = "image is marked corrupt; repair it with 'qemu-img check -r all'"
            if why:
                raise Qcow2Error(errno.ENOTSUP, f"cannot open {path!r} read-write: {why} "
                                 "(open with readonly=True to read it)")
        cb = self._cb = h.cluster_bits
        cs = self._cs = 1 << cb
        self._size = h.size
        self._zeros = memoryview(bytes(cs))
        end = -(-file_size // cs)
        l1, l2c = load_l1(fd, h, end)
        rt, rbc = load_reftable(fd, h, end)
        meta = np.concatenate([
            np.zeros(1, np.uint64),
            np.arange(*l1_range(h), dtype=np.uint64),
            l2c.astype(np.uint64), rbc.astype(np.uint64)])
        self._refs = Refcounts(fd, cb, rt, h.refcount_table_offset, end,
                               np.unique(meta.astype(np.int64)))
        # no two metadata structures may share a cluster
        every = np.concatenate([
            meta, np.arange(*self._refs.table_range(), dtype=np.uint64)])
        uniq, counts = np.unique(every, return_counts=True)
        if uniq.size != every.size:
            c = int(uniq[np.flatnonzero(counts > 1)[0]])
            raise corrupt(f"metadata structures overlap at host offset {c << cb:#x}")
        self._map = ClusterMap(fd, h, l1, self._refs)
        hosts, over = self._map.check_tables(path, end, uniq, not readonly)
        if h.backing_file is not None:
            self._backing = _open_backing(path, h.backing_file, h.backing_format, depth)
        if not readonly and h.autoclear:
            # a writer that does not understand autoclear bits must clear them
            fileio.pwrite_all(fd, bytes(8), HEADER_AUTOCLEAR)
        if not readonly:
            # Every open for writing looks for leaks: the image does not say whether it
            # was closed cleanly (the dirty bit would cost a header write and an fsync at
            # each open and close, and qemu takes it to mean lazy refcounts), and the L2
            # tables, the costly part of the scan, were all read just above.
            leaked = self._refs.reclaim_leaks(np.union1d(uniq.astype(np.int64), hosts), over)
            if leaked:
                log.info("qcow2 image %r: %d leaked cluster(s) reclaimed (left by a crash or "
                         "a failed write)", path, leaked)

    # ---------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self._size

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return self._cs

    @property
    def readonly(self) -> bool:
        """True if the image was opened read-only."""
        return self._readonly

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the image and its backing chain (idempotent)."""
        if self._unpacked is not None:
            self._unpacked.close()
            self._unpacked = None
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Make all written data and metadata durable (fsync).

        Until then the kernel may write back the file in any order, so after a power
        loss only what was written before the last flush is safe, data and metadata.

        A failed flush is final for this open image: the kernel may have dropped the
        pages it could not write (and marked them clean), so a later fsync that works
        would not mean they are on disk, and later writes would build on metadata that
        may not be there. Every later flush and write (discard, write zeroes too) fails
        with EIO saying so, and the failure is logged once; reads still work. Reopening
        the image (which checks it again) lets it take writes again.
        """
        with self._lock:
            token = self.flush_begin()
            err = None
            try:
                fileio.sync(self._fd)
            except OSError as e:
                err = e
            self.flush_done(err, token)

    def flush_begin(self) -> int:
        """Start a flush: this one's fsync, or a sync of the file made elsewhere (an
        fdatasync on an io_uring ring). Checks the image may still be flushed; returns
        the token flush_done() takes (how many freed clusters the flush covers: those
        freed before it began). Call with the lock held."""
        self._check_open()
        self._check_flush_ok()
        return self._refs.pending()

    def flush_done(self, err: OSError | None, token: int) -> None:
        """The end of a flush begun by flush_begin(), ``err`` its failure or None. A
        failure is final: the kernel may have dropped the pages it could not write, so
        every later write and flush fails until the image is reopened. Raises it. Call
        with the lock held."""
        if err is not None:
            self._flush_failed = err.strerror
            log.error("qcow2 image %r: %s; writes since the last good flush may be "
                      "lost: every later write and flush fails with EIO until the image "
                      "is reopened", self._path, err.strerror)
            raise OSError(err.errno, f"{err.strerror}; writes since the last flush may "
                                     "not be on disk") from err
        # what was freed before this flush began is free for good now
        self._refs.flushed(token)

    # ---------------------------------------------------------------- checks
    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError("I/O operation on a closed Qcow2Image")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range offset={offset} length={length} is outside the image "
                             f"(valid: 0 <= offset, offset + length <= {self._size})")

    def _check_writable(self) -> None:
        if self._readonly:
            raise Qcow2Error(errno.EROFS, f"image {self._path!r} is opened read-only")
        self._check_flush_ok()

    def _check_flush_ok(self) -> None:
        if self._flush_failed is not None:
            raise Qcow2Error(errno.EIO, f"an earlier flush of the image failed "
                             f"({self._flush_failed}), so writes before it may be lost; "
                             f"reopen {self._path!r} to write to it again")

    # ---------------------------------------------------------------- reading
    def readinto(self, offset: int, buf: Any) -> None:
        """Read ``len(buf)`` bytes at virtual ``offset`` into the writable buffer ``buf``."""
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            raise TypeError("readinto() needs a writable buffer (bytearray, memoryview "
                            "of a bytearray/mmap/numpy array)")
        with self._lock:
            self._check_range(offset, len(mv))
            self._read(offset, mv)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at virtual ``offset``."""
        buf = bytearray(length if length > 0 else 0)
        with self._lock:
            self._check_range(offset, length)
            self._read(offset, memoryview(buf))
        return bytes(buf)

    def _read_clipped(self, offset: int, mv: memoryview) -> None:
        """Backing-file read: bytes beyond the virtual size read as zeros."""
        avail = _zero_past(self._size, offset, mv)
        with self._lock:
            self._check_open()
            if avail:
                try:
                    self._read(offset, mv[:avail])
                except OSError as e:
                    raise _in_backing(self._path, e) from e

    def _read(self, offset: int, mv: memoryview) -> None:
        for kind, where, out, n in self._runs(offset, len(mv)):
            if kind == COMPRESSED:
                o = (offset + out) & (self._cs - 1)
                self._decompressed().read(where, offset + out - o, o, mv[out:out + n])
            else:
                self._flush_run(kind, where, mv[out:out + n])

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """The bytes [offset, offset + length) in runs (kind, where, out, n), each as long
        as the mapping allows: DATA at host offset ``where``, ZERO, or UNALLOC (from the
        backing file at virtual offset ``where``); ``out`` is where the run starts in
        the range; COMPRESSED, one cluster's part per run, ``where`` its descriptor."""
        cb, cs = self._cb, self._cs
        pos, end, out = offset, offset + length, 0
        run_kind, run_host, run_out, run_len = -1, 0, 0, 0  # merged pending run
        while pos < end:
            vc, o = pos >> cb, pos & (cs - 1)
            n = min(cs - o, end - pos)
            kind, host = self._map.lookup(vc)
            if kind == UNALLOC and self._backing is None:
                kind = ZERO
            if kind != COMPRESSED:
                host = host + o if kind == DATA else pos
            if run_len and kind == run_kind and kind != COMPRESSED and (
                    kind == ZERO or host == run_host + run_len):
                run_len += n
            else:
                if run_len:
                    yield run_kind, run_host, run_out, run_len
                run_kind, run_host, run_out, run_len = kind, host, out, n
            pos += n
            out += n
        if run_len:
            yield run_kind, run_host, run_out, run_len

    # ---------------------------------------------------------------- mapping for ring I/O
    def map_data(self, offset: int, length: int, data_fd: int, pins: list,
                 missing: list | None = None) -> list[tuple[int, int, int, int]]:
        """Where the bytes [offset, offset + length) are, for I/O made elsewhere (on an
        io_uring ring): runs (fd, file offset, at, n) covering the range in order, ``at``
        counted from ``offset``. fd is ``data_fd`` (a descriptor of this image file) for
        this image's data, a backing file's for data it shows through, -1 for zeros, and
        a cache's memfd for a compressed cluster, decompressed there: the cache holds it
        until the caller, its I/O done, calls ``unpin(pins)`` (on failure here, done).

        With ``missing`` (a list), compressed clusters not in their cache are not read
        here but listed there as (cache, descriptor, virtual offset), their runs left
        out: the caller loads them (``Decompressed.unpack``, ``put``) and maps again."""
        runs: list = []
        with self._lock:
            self._check_range(offset, length)
            try:
                self._map_into(offset, length, 0, runs, data_fd, pins, missing)
            except BaseException:
                unpin(pins)
                raise
        return runs

    def _map_into(self, offset: int, length: int, at: int, runs: list, data_fd: int,
                  pins: list, missing: list | None) -> None:
        for kind, where, out, n in self._runs(offset, length):
            if kind == DATA:
                _add_run(runs, data_fd, where, at + out, n)
            elif kind == ZERO:
                _add_run(runs, -1, 0, at + out, n)
            elif kind == COMPRESSED:
                cache = self._decompressed()
                o = (offset + out) & (self._cs - 1)
                if missing is None:
                    slot = cache.pin(where, offset + out - o)
                else:
                    cached = cache.pin_cached(where)
                    if cached is None:
                        missing.append((cache, where, offset + out - o))
                        continue
                    slot = cached
                pins.append((cache, slot))
                _add_run(runs, cache.fd, slot + o, at + out, n)
            else:
                self._backing._map_clipped(where, n, at + out, runs, pins, missing)

    def _map_clipped(self, offset: int, length: int, at: int, runs: list, pins: list,
                     missing: list | None = None) -> None:
        """``map_data`` for an overlay: past the virtual size, zeros."""
        avail = max(0, min(length, self._size - offset))
        with self._lock:
            self._check_open()
            try:
                self._map_into(offset, avail, at, runs, self._fd, pins, missing)
            except OSError as e:
                raise _in_backing(self._path, e) from e
        _add_run(runs, -1, 0, at + avail, length - avail)

    # ---------------------------------------------------------------- compressed clusters
    def _decompressed(self) -> Decompressed:
        """The cache of decompressed clusters, made at the first compressed cluster."""
        if self._unpacked is None:
            self._unpacked = Decompressed(self._fd, self._map.desc, self._compression)
        return self._unpacked

    def _unpack(self, e: int, vc: int, mv: memoryview) -> None:
        """Fill ``mv`` (a cluster) with compressed cluster ``e`` (of ``vc``) decompressed."""
        self._decompressed().read(e, vc << self._cb, 0, mv)

    def _drop_compressed(self, e: int) -> None:
        """Compressed cluster ``e``, which no L2 entry points at any more (cleared
        first: a crash in between leaks), uncounted from each host cluster it touches."""
        if self._unpacked is not None:
            self._unpacked.forget(e)
        for c in self._map.desc.clusters(e):
            self._refs.release(c)

    def _flush_run(self, kind: int, where: int, mv: memoryview) -> None:
        if not len(mv):
            return
        if kind == DATA:
            self._read_data(where, mv)
        elif kind == ZERO:
            mv[:] = bytes(len(mv))
        else:
            self._backing._read_clipped(where, mv)

    # ---------------------------------------------------------------- guest data I/O
    # The only two calls that move guest data to or from the image file (a raw backing
    # file has its own read); metadata goes through fileio directly.
    def _read_data(self, host: int, mv: memoryview) -> None:
        fileio.pread_into(self._fd, mv, host)

    def _write_data(self, host: int, data: Any) -> None:
        fileio.pwrite_all(self._fd, data, host)

    # ---------------------------------------------------------------- writing
    def write(self, offset: int, data: Any) -> None:
        """Write the bytes-like ``data`` at virtual ``offset``."""
        mv = memoryview(data).cast("B")
        with self._lock:
            self._check_range(offset, len(mv))
            self._check_writable()
            cb, cs = self._cb, self._cs
            pos, end, done = offset, offset + len(mv), 0
            while pos < end:
                o = pos & (cs - 1)
                n = min(cs - o, end - pos)
                self._write_cluster(pos >> cb, o, mv[done:done + n])
                pos += n
                done += n

    def _write_cluster(self, vc: int, o: int, data: memoryview) -> None:
        cs, n = self._cs, len(data)
        l2off, t, i = self._map.slot(vc)
        e = int(t[i])
        kind, host = self._map.decode(e, vc)
        if kind == DATA:
            self._map.writable(host, vc, e)
            self._write_data(host + o, data)
            if not e & OFLAG_COPIED:
                self._map.set_entry(l2off, t, i, host | OFLAG_COPIED)
            return
        packed = host if kind == COMPRESSED else 0   # copied on write to a new cluster
        if packed:
            host = 0
        if n == cs:
            buf: Any = data
        else:  # build the whole cluster: zeros, backing or decompressed data, then the new bytes
            ba = bytearray(cs)
            if packed:
                self._unpack(packed, vc, memoryview(ba))
            elif kind == UNALLOC and self._backing is not None:
                self._backing._read_clipped(vc << self._cb, memoryview(ba))
            ba[o:o + n] = data
            buf = ba
        taken = not host
        if host:  # zero cluster with a preallocated host cluster: reuse it
            self._map.writable(host, vc, e)
        else:
            host = self._refs.alloc() << self._cb
        try:
            # The whole cluster (with any copy-on-write data) is on disk before the L2
            # entry points at it: a crash in between keeps the old mapping, never one to
            # a cluster holding stale or no contents.
            self._write_data(host, buf)
            self._map.set_entry(l2off, t, i, host | OFLAG_COPIED)
        except OSError:
            if taken:
                self._refs.abandon(host >> self._cb)  # no entry points at it
            raise
        if packed:
            self._drop_compressed(packed)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros (zero flag for whole clusters)."""
        self._zero_range(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        """Unmap whole clusters (their host clusters are freed) and zero partial ones."""
        self._zero_range(offset, length, discard=True)

    def _zero_range(self, offset: int, length: int, discard: bool) -> None:
        with self._lock:
            self._check_range(offset, length)
            self._check_writable()
            cb, cs = self._cb, self._cs
            pos, end = offset, offset + length
            while pos < end:
                o = pos & (cs - 1)
                n = min(cs - o, end - pos)
                vc = pos >> cb
                if n == cs:
                    self._zero_cluster(vc, discard)
                else:
                    kind, _ = self._map.lookup(vc)
                    if kind in (DATA, COMPRESSED) or (kind == UNALLOC and
                                                       self._backing is not None):
                        self._write_cluster(vc, o, self._zeros[:n])
                pos += n

    def _zero_cluster(self, vc: int, discard: bool) -> None:
        if not self._map.has_table(vc) and self._backing is None:
            return  # no L2 table and no backing file: already reads as zeros
        target = 0 if discard and self._backing is None else OFLAG_ZERO
        l2off, t, i = self._map.slot(vc)
        e = int(t[i])
        kind, host = self._map.decode(e, vc)
        if e == target or (kind == ZERO and not discard and not host):
            return
        if kind == UNALLOC and self._backing is None and target == 0:
            return
        packed = host if kind == COMPRESSED else 0
        c = self._map.writable(host, vc, e) if host and not packed else 0
        # The L2 entry lets go of the cluster before its refcount drops (see release):
        # if the uncounting fails, the cluster is leaked, not reused under the entry.
        self._map.set_entry(l2off, t, i, target)
        if c:
            self._refs.release(c)
        if packed:
            self._drop_compressed(packed)

    # ---------------------------------------------------------------- resizing
    def resize(self, size: int) -> None:
        """Grow the virtual disk to ``size`` bytes, as ``qemu-img resize`` does: the L1
        table moves to a larger one when the new size needs more entries, then the header
        takes the new size; the new part reads as zeros (or from the backing file, as far
        as it reaches). Shrinking is refused: it would drop the data past the new end."""
        with self._lock:
            self._check_open()
            self._check_writable()
            if isinstance(size, int) and size < self._size:
                raise ValueError(f"cannot shrink {self._path!r} from {self._size} to {size} "
                                 "bytes: only growing is supported")
            entries = layout.check_new_image(size, self._cb, None)
            self._map.grow_l1(entries)
            fileio.pwrite_all(self._fd, struct.pack(">Q", size), HEADER_SIZE_FIELD)
            self._size = size

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else ("ro" if self._readonly else "rw")
        return (f"<Qcow2Image {self._path!r} size={self._size} cluster_size={self._cs} "
                f"{state}>")
