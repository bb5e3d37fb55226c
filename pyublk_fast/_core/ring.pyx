# cython: language_level=3, boundscheck=False, wraparound=False
"""Ring: an io_uring instance with SQE preparation and a nogil batch reaper.

The Python methods validate and pin buffers; other Cython modules cimport Ring
and use ``ring.ring`` with the inline helpers in ring.pxd / liburing.pxd.
"""
import errno as _errno

import numpy as np
cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint64_t, int32_t, uint32_t, int64_t
from libc.string cimport memset
from libc.errno cimport EINTR, ETIME
from libc.stdlib cimport malloc, free

from .liburing cimport *

from pyublk_fast.errors import os_error

cnp.import_array()

SETUP_SQE128 = IORING_SETUP_SQE128
SETUP_CQE32 = IORING_SETUP_CQE32
SETUP_SINGLE_ISSUER = IORING_SETUP_SINGLE_ISSUER
SETUP_DEFER_TASKRUN = IORING_SETUP_DEFER_TASKRUN
SETUP_COOP_TASKRUN = IORING_SETUP_COOP_TASKRUN
SETUP_SUBMIT_ALL = IORING_SETUP_SUBMIT_ALL
SETUP_CQSIZE = IORING_SETUP_CQSIZE
SQE_IO_LINK = IOSQE_IO_LINK
SQE_IO_HARDLINK = IOSQE_IO_HARDLINK
SQE_FIXED_FILE = IOSQE_FIXED_FILE
SQE_CQE_SKIP_SUCCESS = IOSQE_CQE_SKIP_SUCCESS
SQE_ASYNC = IOSQE_ASYNC
FSYNC_DATASYNC = IORING_FSYNC_DATASYNC

_SETUP_HINTS = {
    _errno.ENOMEM: "the kernel could not allocate the rings: lower `entries`, or raise "
                   "RLIMIT_MEMLOCK (ulimit -l) on kernels older than 5.12",
    _errno.EINVAL: "a setup flag is not supported by this kernel (SQE128/CQE32 need 5.19, "
                   "SINGLE_ISSUER 6.0, DEFER_TASKRUN 6.1 and SINGLE_ISSUER), or entries is out of range",
    _errno.EPERM: "io_uring is disabled for this process: check sysctl kernel.io_uring_disabled",
    _errno.ENOSYS: "this kernel has no io_uring (needs Linux 5.1+, 6.0+ for ublk)",
    _errno.EMFILE: "too many open files: close some or raise RLIMIT_NOFILE",
}

_ENTER_HINTS = {
    _errno.EEXIST: "this ring was set up with SETUP_SINGLE_ISSUER and belongs to another thread: "
                   "submit and wait only from the owning thread (use MSG_RING to hand work over)",
    _errno.EBADR: "the kernel dropped completions (CQ overflow without IORING_FEAT_NODROP)",
}


class RingFullError(RuntimeError):
    """The submission queue has no free entry: submit() or wait() first."""


cdef class Ring:
    """One io_uring instance. Not thread-safe: one thread owns a ring."""

    def __cinit__(self):
        self.live = False
        self._pins = {}
        self._registered = []

    def __init__(self, unsigned entries, unsigned flags=0, unsigned cq_entries=0):
        if entries == 0 or entries > 32768:
            raise ValueError(f"entries={entries} out of range: must be 1..32768")
        if flags & IORING_SETUP_DEFER_TASKRUN and not flags & IORING_SETUP_SINGLE_ISSUER:
            raise ValueError("SETUP_DEFER_TASKRUN needs SETUP_SINGLE_ISSUER")
        cdef io_uring_params p
        memset(&p, 0, sizeof(p))
        p.flags = flags
        if flags & (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN):
            # let a thread polling the CQ see pending task work (IORING_SQ_TASKRUN):
            # with COOP_TASKRUN a finished disk read waits there until we enter
            p.flags |= IORING_SETUP_TASKRUN_FLAG
        if cq_entries:
            if cq_entries < entries:
                raise ValueError(f"cq_entries={cq_entries} must be >= entries={entries}")
            p.flags |= IORING_SETUP_CQSIZE
            p.cq_entries = cq_entries
        cdef int ret = io_uring_queue_init_params(entries, &self.ring, &p)
        if ret < 0:
            raise os_error(-ret, f"io_uring setup (entries={entries}, flags={flags:#x})",
                           _SETUP_HINTS.get(-ret, ""))
        self.live = True
        self.setup_flags = p.flags
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries
        self.sqe_size = pyu_sqe_size(&self.ring)
        self.capacity = p.cq_entries
        self.cqe_user_data = np.zeros(self.capacity, np.uint64)
        self.cqe_res = np.zeros(self.capacity, np.int32)
        self.cqe_flags = np.zeros(self.capacity, np.uint32)
        self.ud_buf = <uint64_t *>cnp.PyArray_DATA(self.cqe_user_data)
        self.res_buf = <int32_t *>cnp.PyArray_DATA(self.cqe_res)
        self.flags_buf = <uint32_t *>cnp.PyArray_DATA(self.cqe_flags)

    def __dealloc__(self):
        if self.live:
            io_uring_queue_exit(&self.ring)
            self.live = False

    def close(self) -> None:
        """Tear the ring down (idempotent). In-flight operations are cancelled by the kernel.

        A ring is one thread's, but a device handle that owns one may be closed from
        another thread while the owner waits on it: the ring is then closed at once for
        every later call, and the waiting thread tears it down as its wait returns (the
        kernel's ring stays mapped under it until then)."""
        self.closing = True
        if not self.waiters:
            self.teardown()

    cdef void teardown(self):
        if self.live:
            io_uring_queue_exit(&self.ring)
            self.live = False
        self._pins.clear()
        self._registered = []

    cdef void leave(self):
        """A thread is back from a wait without the GIL (see close)."""
        self.waiters -= 1
        if self.closing and not self.waiters:
            self.teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self.closing or not self.live

    @property
    def fd(self) -> int:
        self.check_open()
        return self.ring.ring_fd

    @property
    def features(self) -> int:
        self.check_open()
        return self.ring.features

    def sq_space_left(self) -> int:
        self.check_open()
        return io_uring_sq_space_left(&self.ring)

    def cq_ready(self) -> int:
        self.check_open()
        return io_uring_cq_ready(&self.ring)

    cdef int check_open(self) except -1:
        if self.closing or not self.live:
            raise ValueError("operation on a closed Ring")
        return 0

    cdef io_uring_sqe *sqe(self) except NULL:
        self.check_open()
        cdef io_uring_sqe *s = io_uring_get_sqe(&self.ring)
        if s == NULL:
            raise RingFullError(f"submission queue full ({self.sq_entries} entries): "
                                "call submit() or wait() before preparing more")
        return s

    cdef unsigned drain(self) noexcept nogil:
        """Reap every available CQE (flushing a kernel-side overflow) into the arrays."""
        cdef unsigned n = reap_cq(&self.ring, self.ud_buf, self.res_buf, self.flags_buf, self.capacity)
        while n < self.capacity and pyu_cq_overflowed(&self.ring):
            io_uring_get_events(&self.ring)
            n += reap_cq(&self.ring, self.ud_buf + n, self.res_buf + n, self.flags_buf + n,
                         self.capacity - n)
        return n

    # -- registration --------------------------------------------------------------

    def register_files(self, fds) -> None:
        """Register a fixed-file table (index i = fds[i])."""
        self.check_open()
        fd_list = [int(f) for f in fds]
        if not fd_list:
            raise ValueError("register_files needs at least one fd")
        cdef int *arr = <int *>malloc(len(fd_list) * sizeof(int))
        for i, f in enumerate(fd_list):
            arr[i] = f
        cdef int ret = io_uring_register_files(&self.ring, arr, len(fd_list))
        free(arr)
        if ret < 0:
            raise os_error(-ret, "io_uring register_files", "is every fd open?")

    def register_buffers(self, buffers) -> None:
        """Register writable buffers as fixed buffers 0..n-1 (kept alive by the ring)."""
        self.check_open()
        bufs = [memoryview(b).cast("B") for b in buffers]
        if not bufs:
            raise ValueError("register_buffers needs at least one buffer")
        cdef iovec *iov = <iovec *>malloc(len(bufs) * sizeof(iovec))
        cdef Py_buffer view
        try:
            for i, mv in enumerate(bufs):
                if mv.readonly:
                    raise ValueError(f"buffer {i} is read-only; fixed buffers must be writable")
                PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
                iov[i].iov_base = view.buf
                iov[i].iov_len = view.len
                PyBuffer_Release(&view)
            ret = io_uring_register_buffers(&self.ring, iov, len(bufs))
        finally:
            free(iov)
        if ret < 0:
            raise os_error(-ret, "io_uring register_buffers",
                           "RLIMIT_MEMLOCK may be too small for non-root users" if -ret == _errno.ENOMEM else "")
        self._registered = bufs

    def register_buffers_sparse(self, unsigned nr) -> None:
        """Register an empty fixed-buffer table of nr slots (for zero copy)."""
        self.check_open()
        cdef int ret = io_uring_register_buffers_sparse(&self.ring, nr)
        if ret < 0:
            raise os_error(-ret, f"io_uring register_buffers_sparse({nr})", "needs Linux 5.19+")

    def unregister_buffers(self) -> None:
        self.check_open()
        cdef int ret = io_uring_unregister_buffers(&self.ring)
        if ret < 0:
            raise os_error(-ret, "io_uring unregister_buffers")
        self._registered = []

    # -- preparation (Python-facing; buffers are pinned until their CQE is reaped) -----

    cdef _pin(self, uint64_t user_data, obj):
        self._pins.setdefault(user_data, []).append(obj)

    def prep_nop(self, uint64_t user_data, unsigned sqe_flags=0) -> None:
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_nop(s)
        s.user_data = user_data
        s.flags = sqe_flags

    def prep_timeout(self, uint64_t user_data, double seconds) -> None:
        """IORING_OP_TIMEOUT: completes with -ETIME `seconds` after it is submitted."""
        cdef __kernel_timespec ts
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        ts.tv_sec = <long>seconds
        ts.tv_nsec = <long>((seconds - <long>seconds) * 1e9)
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_timeout(s, &ts, 0, 0)
        s.user_data = user_data
        self.submit()                     # the kernel reads ts now

    def prep_uring_cmd(self, int fd, uint32_t cmd_op, cmd, uint64_t user_data,
                       unsigned sqe_flags=0) -> None:
        """IORING_OP_URING_CMD with `cmd` copied into the SQE (<= 16 B, or <= 80 B on SQE128)."""
        if fd < 0:
            raise ValueError(f"invalid fd {fd}")
        cdef const unsigned char[::1] payload = memoryview(cmd).cast("B") if cmd is not None else b""
        cdef unsigned limit = 80 if self.setup_flags & IORING_SETUP_SQE128 else 16
        if <unsigned>payload.shape[0] > limit:
            raise ValueError(f"uring_cmd payload of {payload.shape[0]} bytes does not fit: at most {limit} "
                             + ("bytes" if limit == 80 else "bytes without SETUP_SQE128"))
        cdef io_uring_sqe *s = self.sqe()
        pyu_prep_uring_cmd(s, self.sqe_size, fd, cmd_op,
                           &payload[0] if payload.shape[0] else NULL, payload.shape[0], user_data)
        s.flags = sqe_flags

    def prep_read(self, int fd, buf, uint64_t offset, uint64_t user_data, unsigned sqe_flags=0) -> None:
        cdef unsigned char[::1] b = memoryview(buf).cast("B")
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_read(s, fd, &b[0] if b.shape[0] else NULL, b.shape[0], offset)
        s.user_data = user_data
        s.flags = sqe_flags
        self._pin(user_data, buf)

    def prep_write(self, int fd, buf, uint64_t offset, uint64_t user_data, unsigned sqe_flags=0) -> None:
        cdef const unsigned char[::1] b = memoryview(buf).cast("B")
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_write(s, fd, &b[0] if b.shape[0] else NULL, b.shape[0], offset)
        s.user_data = user_data
        s.flags = sqe_flags
        self._pin(user_data, buf)

    def prep_read_fixed(self, int fd, buf, uint64_t offset, int buf_index, uint64_t user_data,
                        unsigned sqe_flags=0) -> None:
        """READ_FIXED into `buf`, which must lie inside registered buffer `buf_index`."""
        cdef unsigned char[::1] b = memoryview(buf).cast("B")
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_read_fixed(s, fd, &b[0], b.shape[0], offset, buf_index)
        s.user_data = user_data
        s.flags = sqe_flags
        self._pin(user_data, buf)

    def prep_write_fixed(self, int fd, buf, uint64_t offset, int buf_index, uint64_t user_data,
                         unsigned sqe_flags=0) -> None:
        cdef const unsigned char[::1] b = memoryview(buf).cast("B")
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_write_fixed(s, fd, &b[0], b.shape[0], offset, buf_index)
        s.user_data = user_data
        s.flags = sqe_flags
        self._pin(user_data, buf)

    def prep_fsync(self, int fd, uint64_t user_data, bint datasync=False, unsigned sqe_flags=0) -> None:
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_fsync(s, fd, IORING_FSYNC_DATASYNC if datasync else 0)
        s.user_data = user_data
        s.flags = sqe_flags

    def prep_fallocate(self, int fd, int mode, int64_t offset, int64_t length, uint64_t user_data,
                       unsigned sqe_flags=0) -> None:
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_fallocate(s, fd, mode, offset, length)
        s.user_data = user_data
        s.flags = sqe_flags

    def prep_splice(self, int fd_in, int64_t off_in, int fd_out, int64_t off_out, unsigned nbytes,
                    unsigned splice_flags, uint64_t user_data, unsigned sqe_flags=0) -> None:
        """IORING_OP_SPLICE; an offset of -1 means "no offset" (pipes, current position)."""
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_splice(s, fd_in, off_in, fd_out, off_out, nbytes, splice_flags)
        s.user_data = user_data
        s.flags = sqe_flags

    def prep_msg_ring(self, target, unsigned res, uint64_t user_data, unsigned sqe_flags=0) -> None:
        """Post a CQE (user_data, res) on `target` (a Ring or a ring fd) via IORING_OP_MSG_RING."""
        cdef int fd = target.fd if isinstance(target, Ring) else int(target)
        if fd < 0:
            raise ValueError(f"invalid ring fd {fd}")
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_msg_ring(s, fd, res, user_data, 0)
        s.user_data = user_data
        s.flags = sqe_flags

    # -- submission and completion -------------------------------------------------------

    def submit(self) -> int:
        """Submit prepared SQEs; returns how many the kernel took."""
        self.check_open()
        cdef int ret
        self.waiters += 1
        with nogil:
            ret = io_uring_submit(&self.ring)
        self.leave()
        if ret < 0:
            raise os_error(-ret, "io_uring submit", _ENTER_HINTS.get(-ret, ""))
        return ret

    def wait(self, unsigned min_complete=1, timeout=None) -> int:
        """Submit pending SQEs, wait for >= min_complete CQEs, reap all available ones.

        Returns N; the first N entries of cqe_user_data / cqe_res / cqe_flags are valid.
        With a `timeout` (seconds), N may be below min_complete when it expires; if
        nothing completed, TimeoutError is raised.
        """
        self.check_open()
        if min_complete > self.capacity:
            raise ValueError(f"min_complete={min_complete} exceeds the CQ size {self.capacity}")
        cdef int ret = 0
        cdef __kernel_timespec ts
        cdef io_uring_cqe *cqe
        cdef bint timed = timeout is not None
        cdef unsigned n
        if timed:
            if timeout < 0:
                raise ValueError("timeout must be >= 0")
            ts.tv_sec = int(timeout)
            ts.tv_nsec = int((timeout - int(timeout)) * 1e9)
        self.waiters += 1
        with nogil:
            while True:
                if timed:
                    ret = io_uring_submit_and_wait_timeout(&self.ring, &cqe, min_complete, &ts, NULL)
                else:
                    ret = io_uring_submit_and_wait(&self.ring, min_complete)
                if ret != -EINTR:
                    break
            n = self.drain()
        self.leave()
        # Completions already copied into the arrays are never dropped: an error is only
        # raised when nothing was reaped (a persistent one recurs on the next call).
        if ret < 0 and n == 0:
            if ret == -_errno.ETIME:
                raise TimeoutError(f"io_uring wait: no completion within {timeout} s "
                                   f"(wanted {min_complete})")
            raise os_error(-ret, "io_uring submit_and_wait", _ENTER_HINTS.get(-ret, ""))
        self._unpin(n)
        return n

    def wait_adaptive(self, double poll_us, int64_t budget_ns) -> tuple:
        """One wait of a queue's loop (submit, poll for up to budget_ns, else sleep: see
        poll_us in docs/architecture.md), then reap as wait() does: (N, the next budget)."""
        self.check_open()
        cdef int64_t budget = budget_ns
        cdef int64_t max_ns = <int64_t>(poll_us * 1000)
        cdef unsigned n
        self.waiters += 1
        with nogil:
            pyu_submit_and_wait_adaptive(&self.ring, max_ns, &budget)
            n = self.drain()
        self.leave()
        self._unpin(n)
        return n, budget

    def reap(self) -> int:
        """Reap the available CQEs without waiting; returns N as wait() does."""
        self.check_open()
        cdef unsigned n
        self.waiters += 1
        with nogil:
            n = self.drain()
        self.leave()
        self._unpin(n)
        return n

    cdef _unpin(self, unsigned n):
        if self._pins:
            uds = self.cqe_user_data
            for i in range(n):
                self._pins.pop(int(uds[i]), None)

    def completions(self, unsigned min_complete=1, timeout=None) -> list:
        """wait(), returned as a list of (user_data, res, flags) tuples."""
        n = self.wait(min_complete, timeout)
        return list(zip(self.cqe_user_data[:n].tolist(), self.cqe_res[:n].tolist(),
                        self.cqe_flags[:n].tolist()))
