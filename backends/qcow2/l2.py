"""ClusterMap: virtual cluster -> host cluster, through the L1 table (held in memory)
and the L2 tables (in a TableCache); both write-through, the file written before
memory (``fileio.store_entry``)."""

from __future__ import annotations

import os
import struct

import numpy as np

from . import fileio
from .cache import TableCache
from .compress import Descriptors
from .format import (
    HEADER_L1_FIELDS, L1_RESERVED_MASK, L2_RESERVED_MASK, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, Header, check_entries, check_in_file, corrupt,
)
from .refcount import Refcounts

__all__ = ["ClusterMap", "load_l1", "l1_range", "DATA", "ZERO", "UNALLOC", "COMPRESSED"]

_L2_CACHE_BYTES = 32 << 20

# what a virtual cluster maps to (ClusterMap.lookup, ClusterMap.decode)
DATA, ZERO, UNALLOC, COMPRESSED = 0, 1, 2, 3


def l1_range(h: Header) -> tuple[int, int]:
    """First cluster of the L1 table and the cluster after it."""
    if h.l1_size == 0:
        return 0, 0
    return (h.l1_table_offset >> h.cluster_bits,
            (h.l1_table_offset + h.l1_size * 8 + h.cluster_size - 1) >> h.cluster_bits)


def load_l1(fd: int, h: Header, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the L1 table of an image whose file has ``end`` clusters;
    return it and the clusters of its L2 tables."""
    cb, cs = h.cluster_bits, h.cluster_size
    l1 = np.frombuffer(fileio.pread_padded(fd, h.l1_size * 8, h.l1_table_offset),
                       dtype=">u8").copy()
    check_entries("L1 entry", l1, L1_RESERVED_MASK | (cs - 1) & OFFSET_MASK)
    tables = (l1 & np.uint64(OFFSET_MASK)) >> np.uint64(cb)
    tables = tables[tables != 0]
    check_in_file("L1 entry (L2 table)", tables, end, cb)
    return l1, tables


class ClusterMap:
    """Looks up and updates the L1/L2 entries of an open image (write-through)."""

    def __init__(self, fd: int, h: Header, l1: np.ndarray, refs: Refcounts) -> None:
        self._fd = fd
        self._refs = refs
        self._version = h.version
        self._cb = h.cluster_bits
        self._cs = h.cluster_size
        self._l2_bits = self._cb - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self._l1 = l1
        self._l1_off = h.l1_table_offset
        self._tables = TableCache(fd, self._cs, ">u8", _L2_CACHE_BYTES)
        self.desc = Descriptors(self._cb)

    def check_tables(self, path: str, end: int, meta: np.ndarray,
                     writable: bool) -> tuple[np.ndarray, dict[int, int]]:
        """Read each L2 table once at open (qemu-img check reads them all too) and refuse,
        to an image opened for writing, entries whose host cluster is not theirs alone:
        past ``end``, the file's length in clusters (a cluster appended later would be
        theirs too), one of the metadata clusters ``meta``, or mapped by another entry
        (compressed clusters may share theirs, with each other only, each counted in its
        refcount). A write through such an entry would change another cluster's data;
        a release of a compressed cluster counted too few times would free a cluster
        other compressed clusters still use.

        Returns the host clusters the L2 entries use (sorted) and the host clusters of
        compressed data counted more often than compressed clusters use them, with the
        count they should have (a crash between an L2 entry's clearing and the
        uncounting leaves that); both empty if not ``writable``."""
        over: dict[int, int] = {}
        if not writable:
            return np.zeros(0, np.int64), over
        flag, om = np.uint64(OFLAG_COMPRESSED), np.uint64(OFFSET_MASK)
        hosts, vcs, packed, packed_vcs = [], [], [], []
        for i in np.flatnonzero(self._l1 & om):
            off = int(self._l1[i]) & OFFSET_MASK
            t = np.frombuffer(fileio.pread_padded(self._fd, self._cs, off), dtype=">u8")
            comp = (t & flag) != 0
            used = np.flatnonzero((t & om != 0) & ~comp)
            hosts.append((t[used] & om) >> np.uint64(self._cb))
            vcs.append(used + (int(i) << self._l2_bits))
            if comp.any():
                idx = np.flatnonzero(comp)
                packed.append(t[idx])
                packed_vcs.append(idx + (int(i) << self._l2_bits))
        if not hosts:
            return np.zeros(0, np.int64), over
        host = np.concatenate(hosts).astype(np.int64)
        vc = np.concatenate(vcs)
        chost, cvc = self._compressed_hosts(packed, packed_vcs)
        why = None
        if (bad := np.flatnonzero(host >= end)).size:
            why = "beyond the end of the file"
        elif (bad := np.flatnonzero(np.isin(host, meta))).size:
            why = "which holds metadata"
        elif (bad := np.flatnonzero(np.isin(host, chost))).size:
            why = "which holds compressed data"
        else:
            uniq, first, counts = np.unique(host, return_index=True, return_counts=True)
            if (twice := np.flatnonzero(counts > 1)).size:
                c = uniq[twice[0]]
                why = (f"also mapped at virtual offset "
                       f"{int(vc[np.flatnonzero(host == c)[1]]) << self._cb:#x}")
                bad = first[twice[:1]]
        if why is None:
            host, vc = chost, cvc
            if (bad := np.flatnonzero(host >= end)).size:
                why = "beyond the end of the file"
            elif (bad := np.flatnonzero(np.isin(host, meta))).size:
                why = "which holds metadata"
            else:
                uniq, first, counts = np.unique(host, return_index=True, return_counts=True)
                for j, hc in enumerate(uniq.tolist()):
                    rc, n = self._refs.get(hc), int(counts[j])
                    if rc < n:
                        why = (f"whose refcount {rc} is less than the {n} compressed "
                               "clusters in it")
                        bad = first[j:j + 1]
                        break
                    if rc > n:
                        over[hc] = n
        if why:
            k = int(bad[0])
            raise corrupt(f"L2 entry for virtual offset {int(vc[k]) << self._cb:#x} points at "
                          f"host cluster {int(host[k]) << self._cb:#x}, {why}; writing the "
                          f"image could change other data: repair {path!r} with 'qemu-img "
                          "check -r all', or open it read-only")
        return np.union1d(np.concatenate(hosts).astype(np.int64), chost), over

    def _compressed_hosts(self, packed: list, packed_vcs: list) -> tuple[np.ndarray, np.ndarray]:
        """The host clusters the compressed descriptors ``packed`` touch, one per touch
        (a cluster shared by n descriptors n times), and the virtual cluster of each."""
        if not packed:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        e, vc = np.concatenate(packed), np.concatenate(packed_vcs)
        first, last = self.desc.clusters_of(e)
        two = np.flatnonzero(last != first)
        return (np.concatenate([first, last[two]]),
                np.concatenate([vc, vc[two]]).astype(np.int64))

    # ---------------------------------------------------------------- lookup
    def has_table(self, vc: int) -> bool:
        """True if the L1 entry covering virtual cluster ``vc`` points at an L2 table."""
        return int(self._l1[vc >> self._l2_bits]) & OFFSET_MASK != 0

    def lookup(self, vc: int) -> tuple[int, int]:
        """Map virtual cluster ``vc`` to (DATA, host) / (ZERO, host or 0) / (UNALLOC, 0) /
        (COMPRESSED, its descriptor: the L2 entry)."""
        l2off = int(self._l1[vc >> self._l2_bits]) & OFFSET_MASK
        if l2off == 0:
            return UNALLOC, 0
        e = int(self._tables.get(l2off)[vc & self._l2_mask])
        return self.decode(e, vc)

    def entry(self, vc: int) -> int:
        """The L2 entry of virtual cluster ``vc`` as stored (0 if it has no L2 table)."""
        l2off = int(self._l1[vc >> self._l2_bits]) & OFFSET_MASK
        return int(self._tables.get(l2off)[vc & self._l2_mask]) if l2off else 0

    def decode(self, e: int, vc: int) -> tuple[int, int]:
        """Decode L2 entry ``e`` of virtual cluster ``vc`` like ``lookup``."""
        if e & OFLAG_COMPRESSED:
            self._compressed(e, vc << self._cb)
            return COMPRESSED, e
        if e & L2_RESERVED_MASK or (e & OFLAG_ZERO and self._version < 3):
            raise corrupt(f"L2 entry {e:#x} for virtual offset {vc << self._cb:#x} has "
                          "reserved bits set")
        if e & OFLAG_ZERO:
            return ZERO, e & OFFSET_MASK
        host = e & OFFSET_MASK
        if host == 0:
            return UNALLOC, 0
        self._host_cluster(host, vc << self._cb)
        return DATA, host

    def _compressed(self, e: int, voff: int) -> None:
        """Validate compressed cluster descriptor ``e`` (of virtual offset ``voff``)."""
        if e & OFLAG_COPIED:
            raise corrupt(f"L2 entry {e:#x} for virtual offset {voff:#x} is compressed and "
                          "has the copied flag set")
        off, n = self.desc.span(e)
        if (off + n - 1) >> self._cb >= self._refs.end:
            raise corrupt(f"compressed cluster at virtual offset {voff:#x} lies at host "
                          f"offset {off:#x} (+{n} bytes), beyond the end of the file")

    def _host_cluster(self, host: int, voff: int) -> int:
        """Validate a data cluster offset taken from an L2 entry, return its index."""
        c = host >> self._cb
        if host & (self._cs - 1):
            raise corrupt(f"L2 entry for virtual offset {voff:#x} points at unaligned host "
                          f"offset {host:#x}")
        if c >= self._refs.end:
            raise corrupt(f"L2 entry for virtual offset {voff:#x} points at {host:#x}, "
                          "beyond the end of the file")
        return c

    def writable(self, host: int, vc: int, e: int) -> int:
        """Validate the host cluster of L2 entry ``e`` (of virtual cluster ``vc``) before
        writing into it in place; return its index."""
        c = self._host_cluster(host, vc << self._cb)
        if self._refs.is_meta(c):
            raise corrupt(f"L2 entry for virtual offset {vc << self._cb:#x} points at "
                          f"metadata cluster {host:#x}")
        if not e & OFLAG_COPIED and self._refs.get(c) != 1:
            raise corrupt(f"data cluster {host:#x} has refcount {self._refs.get(c)}, "
                          "expected 1")
        return c

    # ---------------------------------------------------------------- update
    def slot(self, vc: int) -> tuple[int, np.ndarray, int]:
        """(L2 table offset, L2 table, index) of the entry of virtual cluster ``vc``,
        for writing: allocates the L2 table if there is none."""
        l1i = vc >> self._l2_bits
        e = int(self._l1[l1i])
        off = e & OFFSET_MASK
        if off == 0:
            c = self._refs.alloc()
            off = c << self._cb
            try:
                # the zeroed table is on disk before the L1 entry points at it
                fileio.pwrite_all(self._fd, bytes(self._cs), off)
                self._set_l1(l1i, off | OFLAG_COPIED)
            except OSError:
                self._refs.abandon(c)  # no L1 entry points at it
                raise
            self._refs.mark_meta(c)
            t = np.zeros(self._cs // 8, dtype=">u8")
            self._tables.put(off, t)
            return off, t, vc & self._l2_mask
        if not e & OFLAG_COPIED:
            if self._refs.get(off >> self._cb) != 1:
                raise corrupt(f"L2 table at {off:#x} is shared (refcount != 1)")
            self._set_l1(l1i, off | OFLAG_COPIED)
        return off, self._tables.get(off), vc & self._l2_mask

    def grow_l1(self, entries: int) -> None:
        """Give the L1 table at least ``entries`` entries: a larger table (it must be
        contiguous) appended at the end of the file, holding the current entries."""
        if entries <= len(self._l1):
            return
        cb, cs = self._cb, self._cs
        n = -(-entries * 8 // cs)
        first = self._refs.alloc_run(n)
        for c in range(first, first + n):
            self._refs.mark_meta(c)
        table = np.zeros(n * cs // 8, dtype=">u8")
        table[:len(self._l1)] = self._l1
        fileio.pwrite_all(self._fd, table.tobytes(), first << cb)
        # The new table is durable before the header switches to it, and the old one is
        # freed only after: a crash or a power loss leaves one whole table in force.
        os.fsync(self._fd)
        old = range(self._l1_off >> cb, (self._l1_off + len(self._l1) * 8 + cs - 1) >> cb)
        fileio.pwrite_all(self._fd, struct.pack(">IQ", entries, first << cb), HEADER_L1_FIELDS)
        self._l1, self._l1_off = table[:entries], first << cb
        for c in old:
            # not reused in this session: the clusters it had at open stay metadata here
            self._refs.set(c, 0)

    def set_entry(self, off: int, t: np.ndarray, i: int, value: int) -> None:
        """Set entry ``i`` of the L2 table ``t`` at file offset ``off``."""
        fileio.store_entry(self._fd, t, i, value, off)

    def _set_l1(self, i: int, value: int) -> None:
        fileio.store_entry(self._fd, self._l1, i, value, self._l1_off)
