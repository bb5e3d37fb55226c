# cython: language_level=3, boundscheck=False, wraparound=False
"""Benchmark kernel: the C reference's NOP submit+reap loop, nogil, on a Ring via reap_cq.

Used by benchmarks/reaper/run.py only; not part of the public API.
"""
from libc.stdint cimport int64_t, uint64_t

from .liburing cimport (io_uring, io_uring_sqe, io_uring_get_sqe, io_uring_prep_nop,
                        io_uring_submit_and_wait, pyu_now_ns)
from .ring cimport Ring, reap_cq


cdef uint64_t _loop(Ring ring, unsigned batch, uint64_t ops) noexcept nogil:
    cdef io_uring *r = &ring.ring
    cdef uint64_t total = 0, nxt = 0
    cdef unsigned b, got, n, i
    cdef io_uring_sqe *sqe
    while nxt < ops:
        b = batch
        got = 0
        if ops - nxt < b:
            b = <unsigned>(ops - nxt)
        for i in range(b):
            sqe = io_uring_get_sqe(r)
            io_uring_prep_nop(sqe)
            sqe.user_data = nxt + i
        nxt += b
        if io_uring_submit_and_wait(r, b) < 0:
            return <uint64_t>-1
        while got < b:
            n = reap_cq(r, ring.ud_buf, ring.res_buf, ring.flags_buf, ring.capacity)
            if n == 0 and io_uring_submit_and_wait(r, 1) < 0:
                return <uint64_t>-1
            for i in range(n):
                total += ring.ud_buf[i] + <uint64_t>ring.res_buf[i]
            got += n
    return total


def nop_reap(Ring ring not None, unsigned batch, uint64_t ops) -> tuple:
    """Run `ops` NOPs in batches of `batch` on `ring`; returns (ns_per_op, checksum)."""
    if ring.closed:
        raise ValueError("operation on a closed Ring")
    if batch == 0 or batch > ring.sq_entries:
        raise ValueError(f"batch={batch} must be 1..{ring.sq_entries} (the SQ size)")
    if ops == 0:
        raise ValueError("ops must be > 0")
    if ring.sq_space_left() != ring.sq_entries or ring.cq_ready():
        raise ValueError("the ring must be idle (no prepared SQEs, no unreaped CQEs)")
    cdef int64_t t0, t1
    cdef uint64_t total
    with nogil:
        _loop(ring, batch, ops // 10 + batch)  # warm up
        t0 = pyu_now_ns()
        total = _loop(ring, batch, ops)
        t1 = pyu_now_ns()
    if total == <uint64_t>-1:
        raise OSError("io_uring_submit_and_wait failed in the benchmark loop")
    return (t1 - t0) / <double>ops, total
