# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The simulated driver's load generator: our in-process fio.

It issues block requests from inside the driver thread, as fio submits in blk-mq's
context on a kernel, so no front ring sits between the load and the device. It is a
request origin of the driver's (see driver.pxd): the driver ticks it to issue more
and hands it each of its requests back on completion; it keeps the counters, a
latency histogram and, with verify, checks every block read against the pattern
its writes left.
"""
import threading

import numpy as np
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memset
from libc.stdlib cimport calloc, free, malloc
from pyublk_fast._core.liburing cimport pyu_now_ns
cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)
cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil

from pyublk_fast._core.uapi cimport UBLK_IO_OP_READ, UBLK_IO_OP_WRITE
from .driver cimport SimDriver, SimDev, Req, xorshift64s



cdef inline int hist_bucket(int64_t ns) noexcept nogil:
    if ns < 8:
        return <int>(ns if ns > 0 else 0)
    cdef int msb = 63 - __builtin_clzll(<unsigned long long>ns)
    cdef int b = msb * 8 + <int>((ns >> (msb - 3)) & 7)
    return b if b < HIST_BUCKETS else HIST_BUCKETS - 1


def hist_bucket_lower_ns():
    """Lower bound (ns) of each latency histogram bucket."""
    out = np.zeros(HIST_BUCKETS, np.float64)
    for b in range(HIST_BUCKETS):
        if b < 8:
            out[b] = b
        else:
            msb, step = divmod(b, 8)
            out[b] = (1 << msb) + step * (1 << msb) / 8 if msb >= 3 else b
    return out


def summarize(out: dict, bs: int) -> dict:
    """A run's counters (LoadGen.wait) with IOPS, MB/s and latency percentiles (us) added."""
    hist = out.pop("hist")
    secs = out["seconds"] or 1e-9
    lower = hist_bucket_lower_ns()
    total = hist.sum()
    pct = {}
    if total:
        cum = np.cumsum(hist)
        for p in (50, 99, 99.9):
            idx = int(np.searchsorted(cum, total * p / 100.0))
            pct[p] = lower[min(idx, len(lower) - 1)] / 1000.0
    out.update(iops=out["completed"] / secs, mbps=out["bytes"] / secs / 1e6,
               lat_p50_us=pct.get(50, 0.0), lat_p99_us=pct.get(99, 0.0), lat_p999_us=pct.get(99.9, 0.0),
               bs=bs, hist=hist)
    return out


cdef inline void pattern_fill(uint8_t *buf, uint64_t off, uint32_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t *w = <uint64_t *>buf
    cdef uint32_t i
    for i in range(n >> 3):
        w[i] = (off + (i << 3)) ^ seed


cdef inline int pattern_check(const uint8_t *buf, uint64_t off, uint32_t n, uint64_t seed) noexcept nogil:
    cdef const uint64_t *w = <const uint64_t *>buf
    cdef uint32_t i
    for i in range(n >> 3):
        if w[i] != ((off + (i << 3)) ^ seed):
            return 0
    return 1


# -- the driver's hooks (in the driver thread) --------------------------------------------

cdef bint lg_tick(SimDriver drv, void *ctx) noexcept nogil:
    """Issue requests until qd are in flight; False once the run is over and all are back."""
    cdef LoadGenState *lg = <LoadGenState *>ctx
    cdef int slot, ri
    cdef Req *r
    cdef uint64_t x
    cdef int64_t t
    while lg.nfree_slots and not lg.stop:
        if lg.count and lg.issued >= lg.count:
            break
        t = pyu_now_ns()
        if lg.deadline_ns and t >= lg.deadline_ns:
            lg.stop = 1
            break
        lg.nfree_slots -= 1
        slot = lg.free_slots[lg.nfree_slots]
        ri = lg.first_req + slot
        r = &drv.reqs[ri]
        r.origin = <uint8_t>lg.origin
        r.dev = lg.dev
        r.flags = 0
        r.len = lg.bs
        r.buf = lg.bufs + <size_t>slot * lg.bs
        x = xorshift64s(&lg.rng)
        r.op = UBLK_IO_OP_READ if <int>(x % 100) < lg.read_pct else UBLK_IO_OP_WRITE
        if lg.random:
            r.offset = ((x >> 8) % (lg.region / lg.bs)) * lg.bs
        else:
            r.offset = lg.seq_off
            lg.seq_off += lg.bs
            if lg.seq_off >= lg.region:
                lg.seq_off = 0
        if lg.verify and r.op == UBLK_IO_OP_WRITE:
            pattern_fill(r.buf, r.offset, lg.bs, lg.seed)
        r.t_start = t
        lg.issued += 1
        lg.inflight += 1
        drv.queue_rq(ri)
    if lg.inflight == 0 and (lg.stop or (lg.count and lg.issued >= lg.count)):
        lg.active = 0
        lg.t_end = pyu_now_ns()
        with gil:
            (<object>lg.finished).set()
        return False
    return True


cdef void lg_done(SimDriver drv, void *ctx, int ri, int32_t res) noexcept nogil:
    cdef LoadGenState *lg = <LoadGenState *>ctx
    cdef Req *r = &drv.reqs[ri]
    lg.hist[hist_bucket(pyu_now_ns() - r.t_start)] += 1
    lg.inflight -= 1
    lg.completed += 1
    if res < 0:
        lg.errors += 1
        lg.stop = 1
    else:
        lg.bytes += r.len
        if lg.verify and r.op == UBLK_IO_OP_READ and not pattern_check(r.buf, r.offset, r.len, lg.seed):
            lg.verify_errors += 1
    lg.free_slots[lg.nfree_slots] = ri - lg.first_req
    lg.nfree_slots += 1


cdef class LoadGen:
    """One load generator of a running SimDriver, using request slots first_req.. (one
    per request in flight). One run at a time: start it, then wait for its figures."""

    def __init__(self, SimDriver driver not None, int first_req):
        self.drv = driver
        self._finished = threading.Event()
        self.st.finished = <void *>self._finished
        self.st.first_req = first_req
        self.st.hist = <uint64_t *>calloc(HIST_BUCKETS, sizeof(uint64_t))
        if self.st.hist == NULL:
            raise MemoryError("loadgen histogram")
        driver.call(self._register)

    def _register(self):
        self.st.origin = self.drv.add_origin(self, &self.st, lg_tick, lg_done)

    def __dealloc__(self):
        if self._buffer is None:
            free(self.st.bufs)
        free(self.st.free_slots)
        free(self.st.hist)

    def start(self, int d, int qd, uint32_t bs, int read_pct, bint random, bint verify,
              uint64_t region, uint64_t count, double duration, uint64_t seed, buffer=None):
        """Start a run on device d (in the driver thread: via SimDriver.call); wait() ends it.
        buffer: writable, page-aligned memory of at least qd * bs bytes the requests use
        (kept referenced until the next run), instead of buffers of the load generator's
        own: an application's buffer it shares with the server (SHMEM_ZC)."""
        cdef LoadGenState *lg = &self.st
        cdef uint8_t[::1] user
        cdef SimDev *dev = self.drv._dev(d, "loadgen")
        if lg.active:
            raise RuntimeError("a load generator run is already active")
        if bs == 0 or bs & ((1 << dev.lbs_shift) - 1) or bs > dev.max_rq_bytes:
            raise ValueError(f"bs={bs} must be a multiple of the logical block size "
                             f"({1 << dev.lbs_shift}) and <= the largest request ({dev.max_rq_bytes}: "
                             "max_io_buf_bytes, or max_segments pages)")
        if region == 0 or region > dev.size:
            region = dev.size
        region -= region % bs
        if region < bs:
            raise ValueError(f"device of {dev.size} bytes is smaller than one block of {bs}")
        if not 1 <= qd <= 4096 or lg.first_req + qd > self.drv.nreq:
            raise ValueError(f"qd={qd} out of range 1..4096")
        cdef void *bufs = NULL
        if buffer is not None:
            user = buffer
            if <size_t>user.shape[0] < <size_t>qd * bs or <uintptr_t>&user[0] % 4096:
                raise ValueError(f"buffer: need {qd * bs} bytes (qd * bs) at a page-aligned "
                                 f"address, got {user.shape[0]} bytes at {<uintptr_t>&user[0]:#x}")
            bufs = &user[0]
        if self._buffer is None:
            free(lg.bufs)
        self._buffer = buffer
        lg.bufs = NULL
        free(lg.free_slots)
        memset(lg.hist, 0, HIST_BUCKETS * sizeof(uint64_t))
        if buffer is None and posix_memalign(&bufs, 4096, <size_t>qd * bs) == 0:   # page aligned, like page-cache pages
            memset(bufs, 0, <size_t>qd * bs)
        lg.bufs = <uint8_t *>bufs
        lg.free_slots = <int *>malloc(qd * sizeof(int))
        if lg.bufs == NULL or lg.free_slots == NULL:
            raise MemoryError("loadgen buffers")
        for i in range(qd):
            lg.free_slots[i] = qd - 1 - i
        lg.nfree_slots = qd
        lg.dev = d
        lg.bs = bs
        lg.read_pct = read_pct
        lg.random = random
        lg.verify = verify
        lg.region = region
        lg.count = count
        lg.issued = lg.completed = lg.errors = lg.verify_errors = lg.bytes = 0
        lg.seq_off = 0
        lg.rng = seed | 1
        lg.seed = seed
        lg.inflight = 0
        lg.stop = 0
        lg.t0 = pyu_now_ns()
        lg.deadline_ns = lg.t0 + <int64_t>(duration * 1e9) if duration > 0 else 0
        self._finished.clear()
        lg.active = 1
        self.drv.wake_origin(lg.origin)

    def wait(self, timeout=None):
        """Wait for the run to finish; returns its counters and histogram."""
        if not self._finished.wait(timeout):
            raise TimeoutError("load generator did not finish in time")
        hist = np.empty(HIST_BUCKETS, np.uint64)
        for i in range(HIST_BUCKETS):
            hist[i] = self.st.hist[i]
        return dict(issued=self.st.issued, completed=self.st.completed, errors=self.st.errors,
                    verify_errors=self.st.verify_errors, bytes=self.st.bytes,
                    seconds=(self.st.t_end - self.st.t0) / 1e9, hist=hist)

    def stop(self):
        """End the run early: no more requests are issued; wait() returns once all are back."""
        self.st.stop = 1
