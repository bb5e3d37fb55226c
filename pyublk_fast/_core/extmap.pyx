# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ExtentMap: where a Python backend's requests go, published for the queue runner.

A backend whose device is, over most of its range, plain runs of a file (an image
format's allocated clusters) publishes them: extent `index` (bytes
[index << extent_bits, (index + 1) << extent_bits) of the device) is at `offset` of
`fd`. A read, or a write without FUA, that lies within one published extent is then
served by its queue thread in C, without the GIL, by the device's data path, like a
native target's request; its handler never runs. Everything else (a miss, a request
crossing extents, flush, discard, write zeroes) reaches the handlers as before.

The table is bounded: `capacity` entries in sets of PYU_EM_WAYS, an insertion into a
full set replacing one of its entries (the backend publishes again on a later miss).

Before a backend changes where an extent is (frees its cluster, moves it), it takes
the entry out with withdraw() and waits until in_flight() is false: requests served
from the map before the withdrawal may still be moving data. Meanwhile the extent's
set is draining: its requests go to the handlers, and each queue that ends a mapped
request on it calls on_drained() (with the GIL, from that queue's thread) so that a
waiter looks again. settle() ends the drain once the change is made.
"""
import logging

from libc.stdint cimport uint16_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

log = logging.getLogger("pyublk_fast.aio")

cdef uint64_t MAX_CAPACITY = 1 << 24


cdef class ExtentMap:
    """A bounded table of (extent index -> fd, file offset) that a Python backend
    publishes and its queues serve in C (see the module's doc). Set it as the backend's
    `extent_map` attribute before the device starts."""

    def __init__(self, int extent_bits, uint64_t capacity=65536, on_drained=None):
        """Extents of 2**extent_bits bytes (9..40); capacity: entries, a power of two
        from 4 to 2**24. on_drained(): called when a mapped request on a draining set
        ended (wake whatever waits for in_flight() to become false)."""
        cdef void *p = NULL
        if self.m.e != NULL:
            raise RuntimeError("ExtentMap.__init__ called twice")
        if not 9 <= extent_bits <= 40:
            raise ValueError(f"extent_bits={extent_bits}: extents of 512 bytes to 1 TiB (9..40)")
        if capacity < PYU_EM_WAYS or capacity > MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity={capacity}: a power of two from {PYU_EM_WAYS} "
                             f"to {MAX_CAPACITY}")
        if on_drained is not None and not callable(on_drained):
            raise TypeError(f"on_drained must be callable, not {type(on_drained).__name__}")
        self.extent_bits = extent_bits
        self.capacity = capacity
        self.nsets = capacity // PYU_EM_WAYS
        self.m.set_mask = self.nsets - 1
        if posix_memalign(&p, 64, capacity * sizeof(pyu_em_entry)) != 0:
            raise MemoryError()
        memset(p, 0, capacity * sizeof(pyu_em_entry))
        self.m.e = <pyu_em_entry *>p
        self.m.drain = <uint32_t *>calloc(self.nsets, sizeof(uint32_t))
        if self.m.drain == NULL:
            raise MemoryError()
        self.on_drained = on_drained

    def __dealloc__(self):
        cdef int i
        for i in range(self.nrows):
            free(self.rows[i])
        free(self.m.e)
        free(self.m.drain)

    cdef pyu_em_entry *find(self, uint64_t index):
        cdef pyu_em_entry *e = self.m.e + (index & self.m.set_mask) * PYU_EM_WAYS
        cdef int w
        for w in range(PYU_EM_WAYS):
            if e[w].key == index + 1:
                return &e[w]
        return NULL

    cdef int check(self, uint64_t index) except -1:
        if self.m.e == NULL:
            raise RuntimeError("ExtentMap used before __init__")
        if index >> (64 - self.extent_bits):
            raise ValueError(f"extent {index} lies past 2**64 bytes")
        return 0

    def publish(self, uint64_t index, int fd, uint64_t offset, bint writable=True):
        """Serve extent `index` from `fd` at `offset` (the extent's first byte), reads
        only unless `writable`. Replaces what the set held last if it is full."""
        self.check(index)
        if fd < 0:
            raise ValueError(f"publish: fd {fd} is not a file descriptor")
        cdef pyu_em_entry *e = self.find(index)
        cdef pyu_em_entry *ways
        cdef int w
        if e == NULL:
            ways = self.m.e + (index & self.m.set_mask) * PYU_EM_WAYS
            for w in range(PYU_EM_WAYS):
                if ways[w].key == 0:
                    e = &ways[w]
                    break
            else:
                self.clock += 1
                e = &ways[self.clock % PYU_EM_WAYS]
        pyu_em_put(e, index + 1, fd, offset, PYU_EM_WRITE if writable else 0)

    def lookup(self, uint64_t index):
        """(fd, offset, writable) of a published extent, else None."""
        self.check(index)
        cdef pyu_em_entry *e = self.find(index)
        if e == NULL:
            return None
        return e.fd, e.off, bool(e.flags & PYU_EM_WRITE)

    def withdraw(self, uint64_t index):
        """Take extent `index` out and mark its set draining, before its place changes;
        returns in_flight(index). Pair every withdraw() with a settle()."""
        self.check(index)
        cdef pyu_em_entry *e = self.find(index)
        if e != NULL:
            pyu_em_put(e, 0, -1, 0, 0)
        pyu_em_drain(&self.m, index, 1)
        return self.in_flight(index)

    def in_flight(self, uint64_t index):
        """Whether a request served from the map may still be moving data of extent
        `index` (of any extent of its set: the counts are per set)."""
        self.check(index)
        cdef int i
        for i in range(self.nrows):
            if pyu_em_count(&self.m, self.rows[i], index):
                return True
        return False

    def settle(self, uint64_t index):
        """End the drain withdraw(index) began: its set is served from the map again."""
        self.check(index)
        if self.m.drain[index & self.m.set_mask] == 0:
            raise RuntimeError(f"settle({index}) without a withdraw()")
        pyu_em_drain(&self.m, index, -1)

    def clear(self):
        """Take every entry out (no wait: for a device whose queues are stopped, or a
        change that leaves every extent where it is)."""
        cdef uint64_t i
        for i in range(self.capacity):
            if self.m.e[i].key:
                pyu_em_put(&self.m.e[i], 0, -1, 0, 0)

    def forbid_writes(self):
        """From now on every write misses the map (the backend refuses writes)."""
        self.m.no_writes = 1

    @property
    def served(self) -> int:
        """Requests served from the map, by all queues (an approximate live count)."""
        cdef int i
        cdef uint64_t n = 0
        for i in range(self.nrows):
            n += self.rows[i].served
        return n

    @property
    def entries(self) -> int:
        """Extents published now."""
        cdef uint64_t i, n = 0
        for i in range(self.capacity):
            n += self.m.e[i].key != 0
        return n

    # -- the queues' side (pytask.pyx) ---------------------------------------------

    cdef pyu_em_row *attach(self) except NULL:
        """A row of in-flight counts for one queue thread (its own cache lines)."""
        cdef void *p = NULL
        cdef int i
        cdef size_t size = sizeof(pyu_em_row) + self.nsets * sizeof(uint16_t)
        if self.m.e == NULL:
            raise RuntimeError("ExtentMap used before __init__")
        for i in range(self.nrows):
            if not self.used[i]:
                self.used[i] = 1
                return self.rows[i]
        if self.nrows == EM_MAX_ROWS:
            raise ValueError(f"an ExtentMap serves at most {EM_MAX_ROWS} queue threads at once")
        if posix_memalign(&p, 64, size) != 0:
            raise MemoryError()
        memset(p, 0, size)
        self.rows[self.nrows] = <pyu_em_row *>p
        self.used[self.nrows] = 1
        self.nrows += 1          # after the row is zeroed: in_flight() may read it now
        return <pyu_em_row *>p

    cdef void detach(self, pyu_em_row *row):
        """The queue thread is gone and so is its I/O (its queue drained it): its counts
        no longer hold anyone up."""
        cdef int i
        cdef uint64_t s
        cdef bint held = 0
        for i in range(self.nrows):
            if self.rows[i] == row:
                self.used[i] = 0
        for s in range(self.nsets):
            if row.count[s]:
                held = 1
                row.count[s] = 0
        if held:
            self.drained()

    cdef void drained(self):
        if self.on_drained is None:
            return
        try:
            self.on_drained()
        except BaseException:                 # noqa: BLE001 - a queue thread calls this
            log.exception("ExtentMap's on_drained callback failed")

    def reader(self):
        """A MapReader: this map read from Python as a queue thread reads it."""
        cdef MapReader r = MapReader.__new__(MapReader)
        r.row = self.attach()
        r.map = self
        return r


cdef class MapReader:
    """Reads an ExtentMap from Python the way a queue thread does, with a row of counts
    of its own (for tests and tools that stand in for a queue): enter() counts an I/O
    on an extent and looks it up, leave() ends it. Made by ExtentMap.reader()."""

    def __init__(self, *args, **kwargs):
        raise TypeError("a MapReader is made by ExtentMap.reader()")

    def enter(self, uint64_t index, bint write=False):
        """(fd, offset of the extent) with the I/O counted until leave(index), or None
        (a miss: nothing stays counted)."""
        cdef int32_t fd
        cdef uint64_t off
        self.map.check(index)
        if self.row == NULL:
            raise ValueError("MapReader is closed")
        if pyu_em_enter(&self.map.m, self.row, index, write, &fd, &off):
            return fd, off
        self.leave(index)
        return None

    def leave(self, uint64_t index):
        """The I/O counted by a successful enter(index) ended."""
        self.map.check(index)
        if self.row == NULL:
            raise ValueError("MapReader is closed")
        if pyu_em_count(&self.map.m, self.row, index) == 0:
            raise ValueError(f"leave({index}) without an enter()")
        if pyu_em_leave(&self.map.m, self.row, index):
            self.map.drained()

    def close(self):
        if self.row != NULL:
            self.map.detach(self.row)
            self.row = NULL
