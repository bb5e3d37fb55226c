"""Refcounts and cluster allocation.

The refcount table is held in memory, the 16-bit refcount blocks in a TableCache;
both are write-through, the file written before memory (``fileio.store_entry``).
Clusters freed in a session are reused first, once a flush has made their freeing
durable; otherwise new clusters are appended at the end of the file, growing the
refcount structures when the new cluster has no refcount block yet. Clusters that a
crash leaked (counted, but used by nothing) are uncounted when the image is opened for
writing (``reclaim_leaks``).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import numpy as np

from . import fileio
from .cache import TableCache
from .format import (
    HEADER_REFTABLE_FIELDS, MAX_REFTABLE_BYTES, REFTABLE_RESERVED_MASK, Header, Qcow2Error,
    check_entries, check_in_file, corrupt,
)

__all__ = ["Area", "Refcounts", "load_reftable", "plan_area", "write_area"]

_RB_CACHE_BYTES = 8 << 20


def load_reftable(fd: int, h: Header, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the refcount table of an image whose file has ``end`` clusters;
    return it and the clusters of its refcount blocks."""
    cb, cs = h.cluster_bits, h.cluster_size
    table = np.frombuffer(
        fileio.pread_padded(fd, h.refcount_table_clusters * cs, h.refcount_table_offset),
        dtype=">u8").copy()
    check_entries("refcount table entry", table, REFTABLE_RESERVED_MASK | (cs - 1))
    blocks = table >> np.uint64(cb)
    blocks = blocks[blocks != 0]
    check_in_file("refcount table entry (refcount block)", blocks, end, cb)
    return table, blocks


def _block_bytes(cluster_bits: int, idx: int, lo: int, hi: int) -> bytes:
    """Refcount block ``idx`` in which clusters ``lo``..``hi`` - 1 have refcount 1."""
    first = idx << (cluster_bits - 1)
    blk = np.zeros(1 << (cluster_bits - 1), dtype=">u2")
    blk[lo - first:hi - first] = 1
    return blk.tobytes()


@dataclass
class Area:
    """A refcount table at cluster ``start`` and, right after it up to ``stop``, the
    refcount blocks it lacks; they count every cluster from ``covered`` to ``stop``."""

    start: int
    covered: int
    table_clusters: int
    missing: list[int]  # refcount table indexes that get a new block, in file order
    stop: int


def plan_area(cluster_bits: int, start: int, covered: int, entries: int,
              old: np.ndarray) -> Area:
    """Size a refcount table of at least ``entries`` entries (more if its own area
    needs them) placed at ``start``, which keeps the blocks of the table ``old``."""
    cs, rbb = 1 << cluster_bits, cluster_bits - 1
    per_cluster = cs // 8
    nb = 0
    while True:  # the new blocks need refcounts too: grow until they count themselves
        rtc = -(-entries // per_cluster)
        if rtc * cs > MAX_REFTABLE_BYTES:
            raise Qcow2Error(errno.EFBIG, "qcow2 refcount table would exceed "
                             f"{MAX_REFTABLE_BYTES} bytes; the host file is too large")
        stop = start + rtc + nb
        first, last = covered >> rbb, (stop - 1) >> rbb
        missing = [i for i in range(first, last + 1) if i >= len(old) or int(old[i]) == 0]
        if len(missing) != nb:
            nb = len(missing)
            continue
        if last >= rtc * per_cluster:
            entries = last + 1
            continue
        return Area(start, covered, rtc, missing, stop)


def write_area(fd: int, cluster_bits: int, area: Area, old: np.ndarray) -> np.ndarray:
    """Write the new refcount blocks of ``area``, then the table pointing at them and
    at the blocks of ``old``; return the new table."""
    cb, rbb = cluster_bits, cluster_bits - 1
    table = np.zeros(area.table_clusters * (1 << cb) // 8, dtype=">u8")
    table[:len(old)] = old
    for bc, idx in enumerate(area.missing, area.start + area.table_clusters):
        lo, hi = max(area.covered, idx << rbb), min(area.stop, (idx + 1) << rbb)
        fileio.pwrite_all(fd, _block_bytes(cb, idx, lo, hi), bc << cb)
        table[idx] = bc << cb
    fileio.pwrite_all(fd, table.tobytes(), area.start << cb)
    return table


class Refcounts:
    """The refcounts of an open image and the allocation of its clusters.

    ``end`` is the length of the file in clusters: where appending starts.
    ``meta`` (sorted) lists the clusters that held metadata at open besides the
    refcount table: the header, the L1 table, L2 tables and refcount blocks.
    """

    def __init__(self, fd: int, cluster_bits: int, table: np.ndarray, table_offset: int,
                 end: int, meta: np.ndarray) -> None:
        self._fd = fd
        self._cb = cluster_bits
        self._cs = 1 << cluster_bits
        self._rb_bits = cluster_bits - 1  # cluster_bits + 3 - refcount_order (4)
        self._rb_mask = (1 << self._rb_bits) - 1
        self._table = table
        self._table_off = table_offset
        self._blocks = TableCache(fd, self._cs, ">u2", _RB_CACHE_BYTES)
        self._meta = meta
        self._meta_new: set[int] = set()
        self._freed: list[int] = []    # free, and no entry in the file points at them
        self._pending: list[int] = []  # freed since the last flush (see release)
        self.end = end

    def table_range(self) -> tuple[int, int]:
        """First cluster of the refcount table and the cluster after it."""
        first = self._table_off >> self._cb
        return first, first + len(self._table) * 8 // self._cs

    def is_meta(self, c: int) -> bool:
        """True if cluster ``c`` holds metadata (which data must never overwrite)."""
        lo, hi = self.table_range()
        if lo <= c < hi or c in self._meta_new:
            return True
        m = self._meta
        i = int(np.searchsorted(m, c))
        return i < m.size and int(m[i]) == c

    def mark_meta(self, c: int) -> None:
        """Record that the newly allocated cluster ``c`` now holds an L2 table."""
        self._meta_new.add(c)

    def _block(self, idx: int) -> np.ndarray | None:
        """Refcount block ``idx`` (None if not allocated)."""
        if idx >= len(self._table):
            return None
        off = int(self._table[idx])
        if off == 0:
            return None
        return self._blocks.get(off)

    def get(self, c: int) -> int:
        """The refcount of cluster ``c``."""
        b = self._block(c >> self._rb_bits)
        return 0 if b is None else int(b[c & self._rb_mask])

    def set(self, c: int, value: int) -> None:
        """Set the refcount of an existing cluster (its refcount block must exist)."""
        idx = c >> self._rb_bits
        b = self._block(idx)
        if b is None:
            raise corrupt(f"cluster {c << self._cb:#x} is in use but has no refcount block")
        fileio.store_entry(self._fd, b, c & self._rb_mask, value, int(self._table[idx]))

    def alloc(self) -> int:
        """Return a cluster whose refcount is now 1 (on disk) and whose contents are free.

        The refcount is written before the caller writes the cluster or points an entry
        at it, so a crash in between leaks the cluster (past the end of the file if it
        was to be appended), which ``reclaim_leaks`` repairs at the next open, but never
        hands out a cluster that something else also uses. Clusters at or past ``end``
        are free: a count left there by a crash is reclaimed at open.
        """
        if self._freed:
            c = self._freed[-1]
            self.set(c, 1)
            self._freed.pop()
            return c
        while True:
            c = self.end
            idx = c >> self._rb_bits
            if idx >= len(self._table):
                self._grow_table(idx)
            elif int(self._table[idx]) == 0:
                self._new_block(idx)
            else:
                break
        self.set(c, 1)
        self.end = c + 1
        return c

    def abandon(self, c: int) -> None:
        """Give back cluster ``c``, just returned by ``alloc``, that nothing points at
        yet: the step that was to use it failed.

        Since no entry in the file ever pointed at ``c``, the next allocation may take
        it at once. If uncounting it fails too, it stays counted (memory keeps what the
        file has): a leak, which ``reclaim_leaks`` repairs when the image is next opened.
        """
        try:
            self.set(c, 0)
        except OSError:
            return
        if c == self.end - 1:
            self.end = c
        else:
            self._freed.append(c)

    def alloc_run(self, n: int) -> int:
        """Return the first of ``n`` clusters in a row appended at the end of the file, each
        with refcount 1 (on disk): for a table, which must be contiguous. Freed clusters
        are not used; a refcount block placed among them starts the run again, and the
        clusters before it are released for reuse."""
        freed, self._freed = self._freed, []
        try:
            run = [self.alloc()]
            while len(run) < n:
                c = self.alloc()
                if c != run[-1] + 1:
                    for old in run:
                        self.release(old)
                    run = []
                run.append(c)
        finally:
            self._freed = freed + self._freed
        return run[0]

    def release(self, c: int) -> None:
        """Drop one reference to cluster ``c``; once none is left, reuse it.

        Callers clear the entry that pointed at ``c`` first: a crash in between leaks
        the cluster rather than leaving an entry to a cluster that may be reused.
        """
        rc = self.get(c)
        if rc == 0:
            raise corrupt(f"data cluster {c << self._cb:#x} in use but its refcount is 0")
        self.set(c, rc - 1)
        if rc == 1:
            # The entry that pointed at c may be durable while its clearing is not: until
            # a flush, a power loss can bring it back. Were c to take other data before
            # then, that entry would read it: c waits for the next flush.
            self._pending.append(c)

    def pending(self) -> int:
        """How many freed clusters wait for a flush (a flush_begin token)."""
        return len(self._pending)

    def flushed(self, n: int) -> None:
        """A flush made every write before it durable, so the entries that pointed at the
        first ``n`` clusters freed (those freed before it began) are gone for good: those
        clusters may be taken again."""
        self._freed += self._pending[:n]
        del self._pending[:n]

    def reclaim_leaks(self, used: np.ndarray, over: dict[int, int]) -> int:
        """Uncount every counted cluster that is not in ``used`` (sorted: every cluster
        the image's structures and L2 entries use), and set each cluster of ``over`` to
        its count there (host clusters of compressed data counted more often than used),
        as 'qemu-img check -r leaks' does; return how many clusters were leaked.

        A crash leaks clusters: a refcount is set before the entry that uses the
        cluster, and an entry is cleared before its cluster's refcount drops. The writes
        of the process that crashed may still be in the page cache only, so they are
        made durable first: otherwise a power loss could keep an uncounting and lose the
        clearing that made the cluster a leak, leaving an entry to an uncounted cluster.
        Once they are durable no entry on disk points at a leaked cluster, so it is free
        for the next allocation at once.
        """
        span = 1 << self._rb_bits
        leaked: list[int] = []
        for idx in np.flatnonzero(self._table):
            first = int(idx) << self._rb_bits
            counted = self._blocks.get(int(self._table[idx])) != 0
            lo, hi = np.searchsorted(used, [first, first + span])
            counted[used[lo:hi] - first] = False
            leaked += (np.flatnonzero(counted) + first).tolist()
        if leaked or over:
            fileio.sync(self._fd)
            for c in leaked:
                self.set(c, 0)
                if c < self.end:  # those past the end are where appending goes anyway
                    self._freed.append(c)
            for c, n in over.items():
                self.set(c, n)
        return len(leaked) + len(over)

    def _new_block(self, idx: int) -> None:
        """Write a refcount block for index ``idx`` at the end of the file, covering itself."""
        b = self.end
        assert b >> self._rb_bits == idx, f"refcount block {idx} placed at cluster {b}"
        # the block is written before the table entry that makes it count, and the
        # block taken (end, meta) only once that entry is in the file
        fileio.pwrite_all(self._fd, _block_bytes(self._cb, idx, b, b + 1), b << self._cb)
        fileio.store_entry(self._fd, self._table, idx, b << self._cb, self._table_off)
        self.end = b + 1
        self._meta_new.add(b)

    def _grow_table(self, need_idx: int) -> None:
        """Move the refcount table to a larger one at the end of the file."""
        cb = self._cb
        old = self._table
        # the new area lies past every block of the old table: its own blocks count it
        assert self.end >> self._rb_bits >= len(old), "refcount table moved too early"
        area = plan_area(cb, self.end, self.end, max(need_idx + 1, 2 * len(old)), old)
        table = write_area(self._fd, cb, area, old)
        # The new table and blocks are complete before the header switches to them, and
        # the old table is freed only after: a crash, or a failed write, leaves one whole
        # table in force.
        fileio.pwrite_all(self._fd, struct.pack(">QI", area.start << cb, area.table_clusters),
                          HEADER_REFTABLE_FIELDS)
        old_range = self.table_range()
        self._table, self._table_off, self.end = table, area.start << cb, area.stop
        self._meta_new.update(range(area.start + area.table_clusters, area.stop))
        for c in range(*old_range):
            self.set(c, 0)
            # the header on disk may point at the old table until the next flush
            self._pending.append(c)
