# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Python backends on the queue's ring: a task per request, I/O awaited on the ring.

PyTarget is a Python backend's NativeTarget. queue_io() only notes a new request.
After each reaped batch (batch_end) it takes the GIL once and
- resumes every task whose ring operation completed in that batch, then
- calls the handler of every new request: a plain function's request commits at
  once; a coroutine runs until its first await and becomes a task.
A task commits its request the moment its coroutine returns; the other tasks and
the queue's reaping go on meanwhile. The ring is the event loop: a coroutine may
await the operations of RingIO (the queue's own ring: file I/O, request-directed
I/O, sleep, run_in_thread), a bare yield (`asyncio.sleep(0)`) and other
coroutines. Awaiting anything else (an asyncio future) fails the request with a
logged reason: no asyncio loop runs here.

Short transfers of the plain read/write calls are returned to the caller; the
request-directed calls (pread_request, pwrite_request) finish the whole span
themselves, in C, without waking Python for each piece.

A backend with an `extent_map` (extmap.pyx) has the reads and writes (without FUA)
that fall in one published extent served here, in queue_io(), without the GIL: the
map gives the file and offset, the I/O goes out like a request-directed one, and the
request commits when it completes. Only the others reach Python.
"""
import errno as _errno
import logging
from operator import index as _index
import os
import threading
from asyncio import CancelledError
from collections import deque

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
cimport cython
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset
from libc.errno cimport EAGAIN, EIO, ETIME, EOPNOTSUPP

from .liburing cimport *
from .queue cimport NativeTarget, Queue, REAP_BATCH, DP_COPY, DP_USER_COPY, DP_ZERO_COPY, DP_SPLICE
from .extmap cimport ExtentMap, pyu_em_row, pyu_em_enter, pyu_em_leave
from .uapi cimport *

from ..errors import BackendError

log = logging.getLogger("pyublk_fast.aio")

cdef extern from "Python.h":
    ctypedef enum PySendResult:
        PYGEN_RETURN           # the value is in *presult
        PYGEN_ERROR            # raised
        PYGEN_NEXT             # yielded
    # PyIter_Send: a coroutine's return value comes back without raising StopIteration
    int PyIter_Send(object iter, object arg, PyObject **presult) except -1
    ctypedef PySendResult (*sendfunc)(PyObject *, PyObject *, PyObject **) noexcept
    ctypedef struct PyAsyncMethods:
        sendfunc am_send
    ctypedef struct PyTypeObject_ "PyTypeObject":
        PyAsyncMethods *tp_as_async
    void PyErr_SetObject(object type, object value)

cdef extern from "<linux/fs.h>" nogil:
    enum:
        RWF_DSYNC

cdef int32_t C_RESUBMITTED = -0x7fffffff
cdef uint32_t MAPPED_TGT = 0xffffffffU   # tgt_data of a request served from the extent map

cdef enum:
    K_SQE = 0            # one SQE, its result as it comes
    K_REQUEST = 1        # request-directed read/write: continued in C until done
    K_THREAD = 2         # run_in_thread: no SQE, a worker posts the completion
    K_TIMEOUT = 3        # sleep: -ETIME is its success
    K_VOID = 4           # one SQE whose success is None (fsync, fallocate, nop)
    FIXED_FILES = 64     # the registered-file table's size (register_file)

#: Whether the calling thread serves a queue of a Python backend, and which.
_local = threading.local()


cdef struct OpState:
    # what io_done needs without the GIL, per slot
    uint8_t kind
    uint8_t read
    uint8_t zero_fill            # a request read past the file's end: zeros (buffered paths)
    int fd
    uint32_t at                  # request-directed: where in the request, bytes done, total
    uint32_t done
    uint32_t total
    uint64_t off
    uint32_t rw_flags


@cython.freelist(64)
cdef class Op:
    """One operation on the queue's ring; await it for its result (raises OSError)."""
    cdef int slot
    cdef int tag
    cdef readonly bint done
    cdef int32_t res
    cdef object value              # run_in_thread: the function's result
    cdef object exc                # run_in_thread: what it raised
    cdef Task waiter
    cdef bint cancelled            # run_in_thread: the queue stopped; post nothing
    cdef bint posted               # run_in_thread: its completion is on the queue's ring
    cdef int nviews
    cdef Py_buffer *views          # buffers the kernel reads/writes until the CQE
    cdef iovec *iov
    cdef __kernel_timespec ts
    cdef uint8_t kind

    def __dealloc__(self):
        self.release()

    cdef void release(self):
        cdef int i
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        self.nviews = 0
        free(self.views)
        self.views = NULL
        free(self.iov)
        self.iov = NULL

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if not self.done:
            return self                # up to the task's step(): wait for the CQE
        exc = self.failure()
        if exc is not None:
            raise exc
        raise StopIteration(self.result())

    cdef object failure(self):
        """What awaiting the completed op raises, else None."""
        if self.kind == K_THREAD:
            exc, self.exc = self.exc, None
            return exc
        if self.res < 0:
            return OSError(-self.res, os.strerror(-self.res))
        return None

    cdef object result(self):
        """What awaiting the completed op returns, when it does not raise."""
        if self.kind == K_THREAD:
            return self.value
        return self.res if self.kind == K_SQE or self.kind == K_REQUEST else None


cdef PySendResult _op_send(PyObject *obj, PyObject *arg, PyObject **presult) noexcept:
    """Op's am_send slot, what `await op` (and PyTarget.step) calls: the same as
    __next__, but a result comes back as a value, not as a StopIteration raised (its
    object and traceback made, then caught) for every operation awaited."""
    cdef Op op = <Op>obj
    if not op.done:
        Py_INCREF(op)
        presult[0] = obj
        return PYGEN_NEXT
    try:
        exc = op.failure()
        if exc is None:
            value = op.result()
            Py_INCREF(value)
            presult[0] = <PyObject *>value
            return PYGEN_RETURN
    except BaseException as e:                    # noqa: BLE001 - no memory for an OSError
        exc = e
    PyErr_SetObject(type(exc), exc)
    presult[0] = NULL
    return PYGEN_ERROR


# Cython has no syntax for am_send: set it on the type it made
(<PyTypeObject_ *><void *>Op).tp_as_async.am_send = _op_send


@cython.freelist(64)
cdef class Task:
    cdef object coro                   # what step() resumes: a coroutine or an iterator
    cdef int tag
    cdef int32_t nbytes                # the request's result when the coroutine returns


class Unmapped:
    """What read()/write() get as buf on a data path without a server buffer (zero copy,
    splice): len() is the request's length; its bytes stay out of reach (move them with
    pread_request/pwrite_request)."""

    __slots__ = ("length",)

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def _refuse(self, *args):
        raise TypeError(f"this request's {self.length} bytes are not mapped into the server on "
                        "this data path: move them with aio.current().pread_request / "
                        "pwrite_request, or use a buffered data path (copy, user_copy)")

    __getitem__ = __setitem__ = __buffer__ = __iter__ = _refuse

    def __repr__(self):
        return f"<Unmapped request data: {self.length} bytes>"


cdef class FixedFile:
    """A file registered with the queue's ring (RingIO.register_file): pass it where an
    fd goes to save the kernel a file lookup per operation."""
    cdef readonly int index
    cdef readonly int fd

    def __repr__(self):
        return f"FixedFile(index={self.index}, fd={self.fd})"


cdef class RingIO:
    """The I/O of one queue's ring, for the handlers of a Python backend (from
    `pyublk_fast.aio.current()` inside a handler). Every call posts its operation at
    once and returns an Op to await: start several, then await them, and they run
    together. Results: bytes moved (read/write), None (the rest); errors raise OSError
    with the errno. Arguments are checked before anything is posted: a call that raises
    leaves nothing in flight."""
    cdef PyTarget t
    cdef Queue q
    cdef int nfixed

    # -- plumbing ------------------------------------------------------------------

    cdef Op new_op(self, uint8_t kind, int nviews):
        cdef PyTarget t = self.t
        if t is None:
            raise RuntimeError("ring I/O after its queue stopped")
        cdef int tag = t.cur_tag
        if tag < 0:
            raise RuntimeError("ring I/O outside a request: call it from the handler (or "
                               "the coroutine) serving the request, in its queue's thread")
        cdef Op op = Op.__new__(Op)
        op.kind = kind
        op.tag = tag
        op.slot = -1
        if nviews:
            op.views = <Py_buffer *>calloc(nviews, sizeof(Py_buffer))
            if op.views == NULL:
                raise MemoryError()
        return op

    cdef int track(self, Op op) except -1:
        """Give op its slot, once nothing can fail before it is posted: its completion
        finds it there."""
        op.slot = self.t.take_slot(op)
        memset(&self.t.state[op.slot], 0, sizeof(OpState))
        self.t.state[op.slot].kind = op.kind
        return 0

    cdef void hold(self, Op op, obj, bint writable) except *:
        """Keep obj's buffer (and so its memory) until op's CQE."""
        PyObject_GetBuffer(obj, &op.views[op.nviews], PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        op.nviews += 1

    cdef io_uring_sqe *sqe_for(self, Op op) except NULL:
        """An SQE for op, its user_data set and counted as in flight for its request.
        The caller prepares it at once: an SQE taken is submitted as it is."""
        self.track(op)
        cdef io_uring_sqe *sqe = self.q.get_sqe()
        sqe.user_data = self.q.target_ud(op.tag, op.slot)
        self.q.tags[op.tag].pending += 1
        return sqe

    cdef int fd_of(self, fd) except? -1:
        if type(fd) is FixedFile:
            return (<FixedFile>fd).index
        return fd

    cdef void fixed(self, io_uring_sqe *sqe, fd) noexcept:
        if type(fd) is FixedFile:
            sqe.flags |= IOSQE_FIXED_FILE

    # -- file I/O ------------------------------------------------------------------

    def read(self, fd, buf, uint64_t offset):
        """Read into buf (any writable buffer) from fd at offset: bytes read (short at EOF)."""
        cdef int f = self.fd_of(fd)
        cdef Op op = self.new_op(K_SQE, 1)
        self.hold(op, buf, True)
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        io_uring_prep_read(sqe, f, op.views[0].buf, <unsigned>op.views[0].len, offset)
        self.fixed(sqe, fd)
        return op

    def write(self, fd, data, uint64_t offset, *, bint dsync=False):
        """Write data (any buffer) to fd at offset: bytes written. dsync: durable when done."""
        cdef int f = self.fd_of(fd)
        cdef Op op = self.new_op(K_SQE, 1)
        self.hold(op, data, False)
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        io_uring_prep_write(sqe, f, op.views[0].buf, <unsigned>op.views[0].len, offset)
        if dsync:
            sqe.rw_flags = RWF_DSYNC
        self.fixed(sqe, fd)
        return op

    cdef Op vector(self, fd, bufs, uint64_t offset, bint read, bint dsync):
        cdef int f = self.fd_of(fd)
        bufs = list(bufs)
        cdef int i, n = len(bufs)
        if n == 0:
            raise ValueError("readv/writev need at least one buffer")
        cdef Op op = self.new_op(K_SQE, n)
        op.iov = <iovec *>malloc(n * sizeof(iovec))
        if op.iov == NULL:
            raise MemoryError()
        for i in range(n):
            self.hold(op, bufs[i], read)
            op.iov[i].iov_base = op.views[i].buf
            op.iov[i].iov_len = op.views[i].len
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        if read:
            io_uring_prep_readv(sqe, f, op.iov, n, offset)
        else:
            io_uring_prep_writev(sqe, f, op.iov, n, offset)
            if dsync:
                sqe.rw_flags = RWF_DSYNC
        self.fixed(sqe, fd)
        return op

    def readv(self, fd, bufs, uint64_t offset):
        """Read into the buffers in turn (a scatter read): bytes read in all."""
        return self.vector(fd, bufs, offset, True, False)

    def writev(self, fd, bufs, uint64_t offset, *, bint dsync=False):
        """Write the buffers in turn (a gather write): bytes written in all."""
        return self.vector(fd, bufs, offset, False, dsync)

    def fsync(self, fd):
        """fsync(fd) on the ring."""
        cdef int f = self.fd_of(fd)
        cdef Op op = self.new_op(K_VOID, 0)
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        io_uring_prep_fsync(sqe, f, 0)
        self.fixed(sqe, fd)
        return op

    def fdatasync(self, fd):
        """fdatasync(fd) on the ring."""
        cdef int f = self.fd_of(fd)
        cdef Op op = self.new_op(K_VOID, 0)
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        io_uring_prep_fsync(sqe, f, IORING_FSYNC_DATASYNC)
        self.fixed(sqe, fd)
        return op

    def fallocate(self, fd, int mode, uint64_t offset, uint64_t length):
        """fallocate(2): mode 0 allocates; aio.PUNCH_HOLE / aio.ZERO_RANGE (each with
        aio.KEEP_SIZE) free or zero the range."""
        cdef int f = self.fd_of(fd)
        cdef Op op = self.new_op(K_VOID, 0)
        cdef io_uring_sqe *sqe = self.sqe_for(op)
        io_uring_prep_fallocate(sqe, f, mode, offset, length)
        self.fixed(sqe, fd)
        return op

    def nop(self):
        """An operation that completes at once: one trip through the ring."""
        cdef Op op = self.new_op(K_VOID, 0)
        io_uring_prep_nop(self.sqe_for(op))
        return op

    def sleep(self, double seconds):
        """Complete after `seconds` (a ring timeout: the queue serves meanwhile)."""
        if not seconds >= 0:
            raise ValueError(f"sleep({seconds}): seconds must be >= 0")
        cdef Op op = self.new_op(K_TIMEOUT, 0)
        op.ts.tv_sec = <int64_t>seconds
        op.ts.tv_nsec = <long long>((seconds - op.ts.tv_sec) * 1e9)
        io_uring_prep_timeout(self.sqe_for(op), &op.ts, 0, 0)
        return op

    def register_file(self, int fd):
        """Register fd with this queue's ring; returns a FixedFile for read/write/fsync...
        (one table of 64 per queue; register a file once per queue, e.g. on first use)."""
        cdef int ret
        if self.q is None:
            raise RuntimeError("register_file after its queue stopped")
        if self.nfixed == 0:
            ret = io_uring_register_files_sparse(self.q.r, FIXED_FILES)
            if ret < 0:
                raise OSError(-ret, f"registering a file table: {os.strerror(-ret)}")
        if self.nfixed >= FIXED_FILES:
            raise OSError(_errno.ENFILE, f"register_file: this queue's {FIXED_FILES} fixed "
                          "files are taken")
        ret = io_uring_register_files_update(self.q.r, self.nfixed, &fd, 1)
        if ret < 0:
            raise OSError(-ret, f"register_file({fd}): {os.strerror(-ret)}")
        cdef FixedFile f = FixedFile.__new__(FixedFile)
        f.index = self.nfixed
        f.fd = fd
        self.nfixed += 1
        return f

    # -- the request's own data ----------------------------------------------------

    cdef Op request_rw(self, fd, uint64_t offset, at, length, bint read, bint dsync):
        cdef Op op = self.new_op(K_REQUEST, 0)
        cdef int tag = op.tag
        cdef const ublksrv_io_desc *iod = &self.q.iods[tag]
        size = iod.nr_sectors << SECTOR_SHIFT
        at = _index(at)
        length = size - at if length is None else _index(length)
        if not (0 <= at and 0 < length and at + length <= size):
            raise ValueError(f"request bytes [{at}, {at}+{length}) are not within its {size} bytes")
        cdef uint32_t n = length
        # a splice takes the plain fd
        cdef int f = (<FixedFile>fd).fd if type(fd) is FixedFile else fd
        self.track(op)
        cdef OpState *st = &self.t.state[op.slot]
        st.read = read
        st.fd = f
        st.at = at
        st.total = n
        st.off = offset
        st.rw_flags = RWF_DSYNC if dsync else 0
        st.zero_fill = not self.t.no_buffers    # the buffered paths read zeros past EOF
        cdef object waits = None
        if self.q.data_path == DP_SPLICE:
            # all of a request's spliced bytes cross its one pipe: a second transfer
            # started while one is in flight waits its turn (it would interleave bytes)
            waits = self.t.splicing.get(tag)
            if waits is not None:
                waits.append(op)
                self.q.tags[tag].pending += 1
                return op
            self.t.splicing[tag] = deque()
        cdef int32_t err = self.q.prep_request_rw(tag, f, read, at, n, offset, st.rw_flags, 1,
                                                  self.q.target_ud(tag, op.slot))
        if err < 0:
            if self.q.data_path == DP_SPLICE:
                del self.t.splicing[tag]
            self.t.drop_slot(op)
            raise OSError(-err, f"moving request data: {os.strerror(-err)}")
        self.q.tags[tag].pending += 1
        return op

    def pread_request(self, fd, uint64_t offset, at=0, length=None):
        """Read length bytes (default: the rest of the request) from fd at offset into this
        request's data at byte `at`, by the device's data path (its buffer, its pages as a
        fixed buffer for zero copy, a splice): the request needs no `buf`. Finishes the
        whole span (short reads are continued; past the file's end reads zeros on the
        buffered paths, EIO on the others); returns the bytes moved. On splice_zc all of a
        request's data crosses its one pipe: its request I/Os started together run one
        after the other, in the order they were started."""
        return self.request_rw(fd, offset, at, length, True, False)

    def pwrite_request(self, fd, uint64_t offset, at=0, length=None, *, bint dsync=False):
        """Write length bytes (default: the rest) of this request's data from byte `at`
        to fd at offset, by the device's data path; dsync: durable when done (on the
        splice path, the caller syncs: no RWF_DSYNC there). Finishes the whole span."""
        return self.request_rw(fd, offset, at, length, False, dsync)

    # -- blocking code ---------------------------------------------------------------

    def run_in_thread(self, fn, *args):
        """Run `fn(*args)` on the device's small thread pool; await it for its return value
        (or its exception). The queue keeps serving meanwhile."""
        cdef Op op = self.new_op(K_THREAD, 0)
        self.track(op)
        try:
            self.t.pool().submit(_thread_job, op, self.t.post_lock, self.q.ring_fd,
                                 self.q.target_ud(op.tag, op.slot), fn, args)
        except BaseException:
            self.t.drop_slot(op)
            raise
        self.q.tags[op.tag].pending += 1          # its request waits for it like for an SQE
        return op


_sender = threading.local()


def _thread_job(Op op, lock, int ring_fd, uint64_t ud, fn, args):
    """A worker's side of run_in_thread: call fn, keep the outcome in op, and post a CQE
    to the queue's ring (MSG_RING from this worker's own small ring) to resume it. A
    stopped queue marks its ops cancelled under the same lock: then nothing is posted to
    its ring fd, which may be another file's by now."""
    try:
        op.value = fn(*args)
    except BaseException as exc:                 # noqa: BLE001 - handed to the awaiting task
        op.exc = exc
    from .ring import Ring
    ring = getattr(_sender, "ring", None)
    if ring is None:
        ring = _sender.ring = Ring(8)
    with lock:
        if op.cancelled:
            return
        ring.prep_msg_ring(ring_fd, 0, ud, IOSQE_CQE_SKIP_SUCCESS)
        ring.submit()
        op.posted = True
    ring.reap()                                  # a failed post's CQE (the queue is gone)


# no_gc_clear: __dealloc__ hands the queue's row back to the extent map, so emap must
# still be there when a garbage collection pass frees this target
@cython.no_gc_clear
cdef class PyTarget(NativeTarget):
    """Serves a Python Backend's requests on one queue (see the module docstring)."""
    cdef object backend
    cdef object pool_factory
    cdef object _pool
    cdef Queue q
    cdef readonly RingIO io
    cdef int cur_tag                       # the request whose handler runs now, else -1
    cdef list slots                        # slot -> its Op while in flight
    cdef OpState *state
    cdef int *free_slots
    cdef int nfree
    cdef int cap
    cdef uint16_t *new_tags
    cdef int n_new
    cdef uint8_t *late                     # per tag: returned, its commit waits for its ops
    cdef int32_t *late_res
    cdef uint32_t done_slot[REAP_BATCH]
    cdef int32_t done_res[REAP_BATCH]
    cdef int n_done
    cdef bint batched
    cdef object f_read, f_write, f_flush, f_discard, f_zeroes
    cdef list bufs
    cdef bint no_buffers                   # zero copy / splice: requests come without buf
                                           # (and a read past the file's end is EIO)
    cdef dict splicing                     # splice_zc: tag -> its request I/Os waiting for the
                                           # pipe, for as long as one is in flight
    cdef readonly uint64_t tasks           # requests that awaited (became tasks)
    cdef object post_lock                  # run_in_thread posts vs. shutdown
    cdef ExtentMap emap                    # the backend's extent_map, or None
    cdef pyu_em_row *row                   # this queue's in-flight counts in it
    cdef OpState *mapped                   # per tag: its request served from the map
    cdef uint64_t *mapped_extent           # ... and the extent it counted
    cdef bint drain_woken                  # a mapped request ended on a draining set

    def __init__(self, backend, pool_factory):
        """pool_factory() gives the device's thread pool for run_in_thread (made on first use)."""
        from ..backend import Backend
        self.backend = backend
        self.pool_factory = pool_factory
        self.batched = type(backend).handle_batch is not Backend.handle_batch
        self.f_read, self.f_write, self.f_flush = backend.read, backend.write, backend.flush
        self.f_discard, self.f_zeroes = backend.discard, backend.write_zeroes
        self.cur_tag = -1
        self.slots = []
        self.splicing = {}
        self.post_lock = threading.Lock()
        emap = getattr(backend, "extent_map", None)
        if emap is not None and not isinstance(emap, ExtentMap):
            raise TypeError(f"{type(backend).__name__}.extent_map must be a "
                            f"pyublk_fast.aio.ExtentMap or None, not {type(emap).__name__}")
        self.emap = emap

    def __dealloc__(self):
        if self.row != NULL:
            # the queue drained its I/O before letting go of this target
            self.emap.detach(self.row)
        free(self.mapped)
        free(self.mapped_extent)
        free(self.state)
        free(self.free_slots)
        free(self.new_tags)
        free(self.late)
        free(self.late_res)

    cdef int setup(self, Queue q) except -1:
        self.q = q
        self.new_tags = <uint16_t *>calloc(q.depth, sizeof(uint16_t))
        self.late = <uint8_t *>calloc(q.depth, sizeof(uint8_t))
        self.late_res = <int32_t *>calloc(q.depth, sizeof(int32_t))
        if self.new_tags == NULL or self.late == NULL or self.late_res == NULL:
            raise MemoryError()
        if self.emap is not None:
            self.mapped = <OpState *>calloc(q.depth, sizeof(OpState))
            self.mapped_extent = <uint64_t *>calloc(q.depth, sizeof(uint64_t))
            if self.mapped == NULL or self.mapped_extent == NULL:
                raise MemoryError()
            self.row = self.emap.attach()
        self.grow(q.depth * 2)
        self.no_buffers = q.data_path not in (DP_COPY, DP_USER_COPY)
        self.bufs = [] if self.no_buffers else [memoryview(b) for b in q.buffers()]
        self.io = RingIO.__new__(RingIO)
        self.io.t = self
        self.io.q = q
        _local.io = self.io
        return 0

    cdef object pool(self):
        if self._pool is None:
            self._pool = self.pool_factory()
        return self._pool

    # -- op slots ------------------------------------------------------------------

    cdef int grow(self, int cap) except -1:
        cdef OpState *st = <OpState *>realloc(self.state, cap * sizeof(OpState))
        if st == NULL:
            raise MemoryError()
        self.state = st
        cdef int *fr = <int *>realloc(self.free_slots, cap * sizeof(int))
        if fr == NULL:
            raise MemoryError()
        self.free_slots = fr
        cdef int i
        for i in range(cap - 1, self.cap - 1, -1):
            self.free_slots[self.nfree] = i
            self.nfree += 1
            self.slots.append(None)
        self.cap = cap
        return 0

    cdef int take_slot(self, Op op) except -1:
        if self.nfree == 0:
            self.grow(self.cap * 2)
        self.nfree -= 1
        cdef int slot = self.free_slots[self.nfree]
        self.slots[slot] = op
        return slot

    cdef void drop_slot(self, Op op):
        self.slots[op.slot] = None
        self.free_slots[self.nfree] = op.slot
        self.nfree += 1

    # -- the queue runner's side (no GIL) ------------------------------------------

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef int n
        if self.row != NULL:
            n = self.serve_mapped(q, tag, iod)
            if n >= 0:
                return n
        self.new_tags[self.n_new] = tag
        self.n_new += 1
        return 0

    cdef int serve_mapped(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        """A read or write (no FUA: its flush is the backend's) within one extent the
        map has: its SQE prepared (1) or, if that failed, committed (0). -1: Python's."""
        cdef uint32_t op = iod.op_flags & 0xff
        cdef int bits = self.emap.extent_bits
        cdef uint64_t off = iod.start_sector << SECTOR_SHIFT
        cdef uint32_t n = iod.nr_sectors << SECTOR_SHIFT
        cdef uint64_t idx = off >> bits
        cdef int32_t fd, err
        cdef uint64_t where
        cdef OpState *st
        if (op != UBLK_IO_OP_READ and op != UBLK_IO_OP_WRITE) or iod.op_flags & UBLK_IO_F_FUA:
            return -1
        if n == 0 or (off + n - 1) >> bits != idx:
            return -1
        if not pyu_em_enter(&self.emap.m, self.row, idx, op == UBLK_IO_OP_WRITE, &fd, &where):
            self.leave_mapped(idx)
            return -1
        st = &self.mapped[tag]
        memset(st, 0, sizeof(OpState))
        st.kind = K_REQUEST
        st.read = op == UBLK_IO_OP_READ
        st.zero_fill = not self.no_buffers
        st.fd = fd
        st.total = n
        st.off = where + (off & ((1ULL << bits) - 1))
        self.mapped_extent[tag] = idx
        err = q.prep_request_rw(tag, fd, st.read, 0, n, st.off, 0, 1, q.target_ud(tag, MAPPED_TGT))
        if err < 0:
            self.leave_mapped(idx)
            q.commit(tag, err)
            return 0
        return 1

    cdef void leave_mapped(self, uint64_t idx) noexcept nogil:
        if pyu_em_leave(&self.emap.m, self.row, idx):
            self.drain_woken = 1

    cdef int32_t io_done(self, Queue q, int tag, uint32_t slot, int32_t res) noexcept nogil:
        cdef OpState *st
        if slot == MAPPED_TGT:
            res = self.request_progress(q, tag, slot, &self.mapped[tag], res)
            if res != C_RESUBMITTED:
                self.leave_mapped(self.mapped_extent[tag])
            return res                             # the queue commits it
        st = &self.state[slot]
        if st.kind == K_REQUEST:
            res = self.request_progress(q, tag, slot, st, res)
            if res == C_RESUBMITTED:
                return res
        elif st.kind == K_TIMEOUT and res == -ETIME:
            res = 0
        q.tags[tag].pending -= 1
        self.done_slot[self.n_done] = slot
        self.done_res[self.n_done] = res
        self.n_done += 1
        return C_RESUBMITTED

    cdef int32_t request_progress(self, Queue q, int tag, uint32_t slot, OpState *st,
                                  int32_t res) noexcept nogil:
        """A request-directed SQE completed: continue a short or EAGAIN transfer
        (RESUBMITTED), else the op's result: all its bytes, or -errno."""
        if res > 0:
            res = q.request_rw_done(tag, st.read, st.at + st.done, res)
            if res < 0:
                return res
            st.done += res
        elif res == 0:                                # no progress: the file's end
            if not st.read:
                return -EIO
            if not st.zero_fill:
                return -EIO
            memset(q.tag_buf(tag) + st.at + st.done, 0, st.total - st.done)
            st.done = st.total
        elif res != -EAGAIN:
            return res
        if st.done >= st.total:
            return st.total
        res = q.prep_request_rw(tag, st.fd, st.read, st.at + st.done, st.total - st.done,
                                st.off + st.done, st.rw_flags, 0, q.target_ud(tag, slot))
        return C_RESUBMITTED if res == 0 else res

    cdef void batch_end(self, Queue q) noexcept nogil:
        if self.n_new or self.n_done or self.drain_woken:
            with gil:
                try:
                    self.run_batch()
                except BaseException:             # a bug here must not kill the queue thread
                    log.exception("queue %d: Python dispatch failed", q.q_id)

    # -- with the GIL ----------------------------------------------------------------

    cdef run_batch(self):
        cdef int i, n
        cdef Op op
        if self.drain_woken:
            self.drain_woken = 0
            self.emap.drained()
        n = self.n_done
        self.n_done = 0
        for i in range(n):
            op = <Op>self.slots[self.done_slot[i]]
            self.complete(op, self.done_res[i])
            if op.kind == K_REQUEST and self.q.data_path == DP_SPLICE:
                self.next_splice(op.tag)
        n = self.n_new
        self.n_new = 0
        if self.batched:
            self.run_handle_batch(n)
        else:
            for i in range(n):
                self.start(self.new_tags[i])
        self.cur_tag = -1

    cdef complete(self, Op op, int32_t res):
        """op ended with res: resume its waiter, or commit a request that only waited for it."""
        cdef Task task
        self.drop_slot(op)
        op.res = res
        op.done = True
        op.release()
        task = op.waiter
        if task is not None:
            op.waiter = None
            self.step(task)
        elif self.late[op.tag] and not self.q.tags[op.tag].pending:
            self.late[op.tag] = 0
            self.q.commit(op.tag, self.late_res[op.tag])

    cdef next_splice(self, int tag):
        """A splice of tag's request ended: start the next one waiting for its pipe."""
        cdef Op op
        cdef OpState *st
        cdef int32_t err
        waits = self.splicing.get(tag)
        while waits:
            op = waits.popleft()
            st = &self.state[op.slot]
            err = self.q.prep_request_rw(tag, st.fd, st.read, st.at, st.total, st.off,
                                         st.rw_flags, 1, self.q.target_ud(tag, op.slot))
            if err == 0:
                return
            self.q.tags[tag].pending -= 1
            self.complete(op, err)
        self.splicing.pop(tag, None)

    cdef start(self, int tag):
        cdef const ublksrv_io_desc *iod = &self.q.iods[tag]
        cdef uint32_t op_flags = iod.op_flags
        cdef uint32_t op = op_flags & 0xff
        cdef int32_t nbytes = iod.nr_sectors << SECTOR_SHIFT
        cdef uint64_t offset = iod.start_sector << SECTOR_SHIFT
        self.cur_tag = tag
        try:
            if op == UBLK_IO_OP_READ:
                r = self.f_read(offset, self.buf(tag, nbytes))
            elif op == UBLK_IO_OP_WRITE:
                if op_flags & UBLK_IO_F_FUA:
                    r = _write_fua(self.backend, offset, self.buf(tag, nbytes))
                else:
                    r = self.f_write(offset, self.buf(tag, nbytes))
            elif op == UBLK_IO_OP_FLUSH:
                r = self.f_flush()
                nbytes = 0
            elif op == UBLK_IO_OP_DISCARD:
                r = self.f_discard(offset, nbytes)
                nbytes = 0
            elif op == UBLK_IO_OP_WRITE_ZEROES:
                r = self.f_zeroes(offset, nbytes)
                nbytes = 0
            else:
                raise BackendError(EOPNOTSUPP)
        except BaseException as exc:              # noqa: BLE001 - fails only this request
            self.finish(tag, failure(tag, exc))
            return
        if r is None:
            self.finish(tag, nbytes)
            return
        if type(r) is not Op and not hasattr(type(r), "send"):
            if not hasattr(r, "__await__"):
                self.finish(tag, nbytes)          # a plain function's return value
                return
            r = r.__await__()                     # any other awaitable: its iterator
        # a coroutine, or an Op a plain function returned (awaited for it: no coroutine)
        cdef Task t = Task.__new__(Task)
        t.coro = r
        t.tag = tag
        t.nbytes = nbytes
        self.tasks += 1
        self.step(t)

    cdef object buf(self, int tag, int32_t nbytes):
        if self.q.iods[tag].op_flags & UBLK_IO_F_SHMEM_ZC:
            return self.q.shared_view(tag, nbytes)
        if self.no_buffers:
            return Unmapped(nbytes)
        return (<object>self.bufs[tag])[:nbytes]

    cdef step(self, Task t):
        """Run t's coroutine to its next await; commit its request when it returns."""
        cdef PyObject *out = NULL
        cdef int how
        cdef Op op
        self.cur_tag = t.tag
        try:
            how = PyIter_Send(t.coro, None, &out)
        except BaseException as exc:              # noqa: BLE001 - fails only this request
            self.finish(t.tag, failure(t.tag, exc))
            return
        y = <object>out
        Py_XDECREF(out)
        if how == PYGEN_RETURN:
            self.finish(t.tag, t.nbytes)
        elif type(y) is Op:
            op = <Op>y
            if op.done:                            # awaited again after it completed
                self.step(t)
            else:
                op.waiter = t
        elif y is None:                            # a bare yield: one trip around the ring
            (<Op>self.io.nop()).waiter = t
        else:
            self.stray(t, y)

    cdef finish(self, int tag, int32_t res):
        """Commit tag's request, or, while operations it started are still in flight
        (started and not awaited), once they completed: the next request of this tag
        uses the same buffer."""
        if self.q.tags[tag].pending:
            self.late[tag] = 1
            self.late_res[tag] = res
        else:
            self.q.commit(tag, res)

    cdef stray(self, Task t, y):
        """The coroutine awaited something this loop cannot wait for."""
        close = getattr(t.coro, "close", None)
        if close is not None:
            close()
        log.error("queue %d: the handler of tag %d awaited %r; only pyublk_fast.aio "
                  "operations, coroutines and asyncio.sleep(0) can be awaited here "
                  "(run other asyncio code with run_in_thread); the request gets EIO",
                  self.q.q_id, t.tag, y)
        self.finish(t.tag, -EIO)

    cdef run_handle_batch(self, int n):
        from ..backend import Request
        cdef int i, tag
        cdef const ublksrv_io_desc *iod
        tags = [self.new_tags[i] for i in range(n)]
        reqs = []
        for tag in tags:
            iod = &self.q.iods[tag]
            op = iod.op_flags & 0xff
            nbytes = iod.nr_sectors << SECTOR_SHIFT
            reqs.append(Request(op, iod.start_sector << SECTOR_SHIFT, nbytes,
                                self.buf(tag, nbytes) if op in (UBLK_IO_OP_READ, UBLK_IO_OP_WRITE) else None,
                                bool(iod.op_flags & UBLK_IO_F_FUA), tag))
        try:
            outs = self.backend.handle_batch(reqs)
            if len(outs) != len(reqs):
                raise ValueError(f"handle_batch returned {len(outs)} results for {len(reqs)} requests")
        except BaseException as exc:              # noqa: BLE001
            err = failure(tags[0], exc)
            for tag in tags:
                self.q.commit(tag, err)
            return
        for tag, req, out in zip(tags, reqs, outs):
            try:
                res = req.length if out is None else int(out)
                if not -4095 <= res <= req.length:
                    raise ValueError(f"result {res} is neither bytes done (at most the request's) nor -errno")
            except Exception:
                log.exception("queue %d: bad result for tag %d; failing it with EIO", self.q.q_id, tag)
                res = -EIO
            self.q.commit(tag, res)

    cdef int shutdown(self, Queue q) except -1:
        """The queue stopped serving: cancel what is in flight. Tasks get CancelledError
        (their requests are not committed: the driver fails or, with recovery, requeues
        them); ring operations are cancelled; run_in_thread results are dropped."""
        cdef Op op
        cdef io_uring_sqe *sqe
        cdef int tag
        with self.post_lock:
            for op in self.slots:
                if op is not None and op.kind == K_THREAD and not op.posted:
                    op.cancelled = True
                    q.tags[op.tag].pending -= 1   # it will not complete on this ring
        waiting = set()
        for waits in self.splicing.values():
            for op in waits:
                waiting.add(op.slot)
                q.tags[op.tag].pending -= 1       # never submitted: nothing to cancel
        self.splicing.clear()
        for op in [o for o in self.slots if o is not None]:
            if op.kind != K_THREAD and op.slot not in waiting:
                sqe = q.get_sqe()
                io_uring_prep_cancel64(sqe, q.target_ud(op.tag, op.slot), 0)
                sqe.user_data = 0
                sqe.flags |= IOSQE_CQE_SKIP_SUCCESS
            if op.waiter is not None:
                task, op.waiter = op.waiter, None
                self.cancel(task)
        io_uring_submit(q.r)
        self._pool = None                          # the device shuts the pool down
        if getattr(_local, "io", None) is self.io:
            _local.io = None
        # let go of the queue (and its buffers) at once, not when a GC pass finds the
        # cycles: a stopped device's memory is returned as soon as it is closed
        self.bufs = None
        self.io.t = None
        self.io.q = None
        return 0

    cdef cancel(self, Task t):
        self.cur_tag = t.tag
        if not hasattr(t.coro, "throw"):          # an Op awaited for a plain function
            return
        try:
            t.coro.throw(CancelledError())
        except (CancelledError, StopIteration):
            pass
        except BaseException:                      # noqa: BLE001 - its request is gone anyway
            log.debug("tag %d: handler raised on cancellation", t.tag, exc_info=True)
        else:
            t.coro.close()
        self.cur_tag = -1


async def _write_fua(backend, offset, data):
    """write() then flush(), each sync or async: a FUA write made durable."""
    r = backend.write(offset, data)
    if r is not None and hasattr(r, "__await__"):
        await r
    r = backend.flush()
    if r is not None and hasattr(r, "__await__"):
        await r


cdef int32_t failure(int tag, exc):
    """The -errno a handler's exception fails its request with: BackendError's or an
    OSError's errno; anything else is a bug, logged, EIO."""
    if isinstance(exc, BackendError):
        return -exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return -exc.errno
    log.error("backend failed on tag %d; the request gets EIO", tag, exc_info=exc)
    return -EIO


def current() -> RingIO:
    """The ring I/O of the queue whose request handler calls this."""
    io = getattr(_local, "io", None)
    if io is None:
        raise RuntimeError("pyublk_fast.aio.current(): this thread serves no queue of a "
                           "Python backend (call it from a request handler)")
    return io
