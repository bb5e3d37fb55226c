from libc.stdint cimport uint64_t, int32_t, uint32_t
from .liburing cimport io_uring, io_uring_sqe, io_uring_cqe, io_uring_cq_advance, pyu_cq_tail, pyu_cqe_at


cdef class Ring:
    cdef io_uring ring
    cdef bint live
    cdef readonly unsigned setup_flags
    cdef readonly unsigned sq_entries
    cdef readonly unsigned cq_entries
    cdef unsigned sqe_size
    cdef unsigned capacity            # length of the reap arrays (= cq_entries)
    cdef readonly object cqe_user_data   # numpy uint64[capacity]
    cdef readonly object cqe_res         # numpy int32[capacity]
    cdef readonly object cqe_flags       # numpy uint32[capacity]
    cdef uint64_t *ud_buf
    cdef int32_t *res_buf
    cdef uint32_t *flags_buf
    cdef dict _pins                   # user_data -> objects kept alive until reaped
    cdef list _registered             # buffers registered with the kernel
    cdef readonly int waiters         # threads inside submit()/wait() without the GIL
    cdef bint closing                 # close() came while some were: the last one tears down

    cdef int check_open(self) except -1
    cdef void teardown(self)
    cdef void leave(self)
    cdef io_uring_sqe *sqe(self) except NULL
    cdef unsigned drain(self) noexcept nogil
    cdef _pin(self, uint64_t user_data, obj)
    cdef _unpin(self, unsigned n)


cdef inline unsigned reap_cq(io_uring *r, uint64_t *ud, int32_t *res, uint32_t *fl,
                             unsigned maxn) noexcept nogil:
    """Copy up to maxn CQEs into the arrays and advance the CQ head once."""
    cdef unsigned head = r.cq.khead[0]
    cdef unsigned n = pyu_cq_tail(r) - head
    cdef unsigned i
    cdef io_uring_cqe *cqe
    if n > maxn:
        n = maxn
    for i in range(n):
        cqe = pyu_cqe_at(r, head + i)
        ud[i] = cqe.user_data
        res[i] = cqe.res
        fl[i] = cqe.flags
    if n:
        io_uring_cq_advance(r, n)
    return n
