# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Queue runner: one ring and one thread per ublk queue (or per share of its tags).

FETCH every tag, then loop: wait, reap a batch nogil, decode tags, hand each
request to the backend (native: C calls, no GIL; Python: one GIL round per
batch of requests and completions, in Python's case), commit results with
COMMIT_AND_FETCH. With BATCH_IO (batch_io=True) the same loop PREPares every
tag once, takes requests from one multishot FETCH_IO_CMDS (tags in a provided
buffer ring) and sends a turn's commits as one COMMIT_IO_CMDS; targets see no
difference (they call commit()). The driver is reached through a
Channel and request data moves by a DataPath, both fixed at setup: the loop
itself never tests which driver or data path it serves. A queue served by
several threads (threads=N, the driver's PER_IO_DAEMON) has one Queue per thread,
each fetching and serving tags thread, thread + N, ...: the driver answers each
tag on the ring that fetched it.
"""
import errno as _errno
import logging

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from libc.errno cimport ENODEV, EIO, EINVAL, EOPNOTSUPP, ENOBUFS

from .liburing cimport *
from .ring cimport Ring, reap_cq
from .uapi cimport *
from .codec cimport ud_encode, ud_tag, ud_op, ud_tgt_data, ud_is_target

cnp.import_array()
log = logging.getLogger("pyublk_fast.queue")

cdef enum:
    TAG_WAIT = 0          # a FETCH / COMMIT_AND_FETCH is outstanding
    TAG_BUSY = 1          # the request is being served
    TAG_GONE = 2          # the driver aborted this tag's command
    FETCH_ARMED = 1       # BATCH_IO: the multishot FETCH_IO_CMDS is outstanding
    FETCH_GONE = 2        # ... ended for good (aborted: the device stops or is quiesced)
    OP_WAKE = 0xfd        # user_data op of a wake-up posted to this ring (stop / die)

RESUBMITTED = -0x7fffffff
cdef int64_t FAIL_LOG_INTERVAL_NS = 1000000000
OP_NAMES = {UBLK_IO_OP_READ: "READ", UBLK_IO_OP_WRITE: "WRITE", UBLK_IO_OP_FLUSH: "FLUSH",
            UBLK_IO_OP_DISCARD: "DISCARD", UBLK_IO_OP_WRITE_ZEROES: "WRITE_ZEROES"}
#: The C constants this module was compiled with (uapi.pxd), for tests against pyublk_fast.uapi.
COMPILED_UAPI = dict(
    UBLK_IO_OP_READ=UBLK_IO_OP_READ, UBLK_IO_OP_WRITE=UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH=UBLK_IO_OP_FLUSH,
    UBLK_IO_OP_DISCARD=UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_SAME=UBLK_IO_OP_WRITE_SAME,
    UBLK_IO_OP_WRITE_ZEROES=UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA=UBLK_IO_F_FUA,
    UBLK_IO_F_NOUNMAP=UBLK_IO_F_NOUNMAP, UBLK_IO_RES_OK=UBLK_IO_RES_OK,
    UBLK_IO_RES_NEED_GET_DATA=UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_FETCH_REQ=UBLK_IO_FETCH_REQ,
    UBLK_IO_COMMIT_AND_FETCH_REQ=UBLK_IO_COMMIT_AND_FETCH_REQ, UBLK_IO_NEED_GET_DATA=UBLK_IO_NEED_GET_DATA,
    UBLK_MAX_QUEUE_DEPTH=UBLK_MAX_QUEUE_DEPTH,
    UBLK_U_IO_FETCH_REQ=io_cmd_op(UBLK_IO_FETCH_REQ),
    UBLK_U_IO_COMMIT_AND_FETCH_REQ=io_cmd_op(UBLK_IO_COMMIT_AND_FETCH_REQ),
    UBLK_U_IO_NEED_GET_DATA=io_cmd_op(UBLK_IO_NEED_GET_DATA),
    UBLK_U_IO_REGISTER_IO_BUF=io_cmd_op(UBLK_IO_REGISTER_IO_BUF),
    UBLK_U_IO_UNREGISTER_IO_BUF=io_cmd_op(UBLK_IO_UNREGISTER_IO_BUF),
    UBLK_U_IO_PREP_IO_CMDS=io_cmd_op(UBLK_IO_PREP_IO_CMDS),
    UBLK_U_IO_COMMIT_IO_CMDS=io_cmd_op(UBLK_IO_COMMIT_IO_CMDS),
    UBLK_U_IO_FETCH_IO_CMDS=io_cmd_op(UBLK_IO_FETCH_IO_CMDS),
    UBLK_BATCH_F_HAS_ZONE_LBA=UBLK_BATCH_F_HAS_ZONE_LBA, UBLK_BATCH_F_HAS_BUF_ADDR=UBLK_BATCH_F_HAS_BUF_ADDR,
    UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK=UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK,
    sizeof_ublksrv_io_desc=sizeof(ublksrv_io_desc), sizeof_ublksrv_io_cmd=sizeof(ublksrv_io_cmd),
    sizeof_ublk_batch_io=sizeof(ublk_batch_io), sizeof_ublk_elem_header=sizeof(ublk_elem_header),
)
#: The data paths a BATCH_IO queue serves (zero copy and NEED_GET_DATA are not done in batches).
BATCH_DATA_PATHS = ("copy", "user_copy")
DATA_PATHS = {"copy": DP_COPY, "need_get_data": DP_COPY, "user_copy": DP_USER_COPY,
              "zero_copy": DP_ZERO_COPY, "splice_zc": DP_SPLICE}
#: Where each counter lives in Queue.stats (queue.pxd's ST_*), for pyublk_fast.stats.
STATS_LAYOUT = dict(ops=ST_OPS, reqs=ST_REQS, bytes=ST_BYTES, started=ST_STARTED, done=ST_DONE,
                    failed=ST_FAILED, errno=ST_ERRNO, nerrno=ST_NERRNO, hist=ST_HIST,
                    nhist=ST_NHIST, turns=ST_TURNS, cqes=ST_CQES, fields=ST_FIELDS)
DP_NAMES = {DP_COPY: "copy", DP_USER_COPY: "user_copy", DP_ZERO_COPY: "zero_copy", DP_SPLICE: "splice_zc"}

cdef int32_t C_RESUBMITTED = -0x7fffffff
#: What queues closed with I/O still in flight left behind (see Queue.close).
_ABANDONED = []



cdef class Channel:
    def __init__(self, *args, **kwargs):
        raise TypeError("Channel is abstract: a transport makes its own (kernel or simulated)")

    cdef int bind(self, Queue q) except -1:
        self.ring_fd = q.ring.fd
        return 0

    cdef DataPath make_path(self, Queue q, int kind):
        """The DataPath object for kind on this driver; channels extend this for the
        paths whose per-request work depends on the driver (zero copy, splice)."""
        cdef DataPath dp
        if kind == DP_COPY:
            dp = DataPath.__new__(DataPath)
        elif kind == DP_USER_COPY:
            dp = UserCopyPath.__new__(UserCopyPath)
        else:
            raise ValueError(f"data path {DP_NAMES[kind]} is not available on this driver")
        dp.ch = self
        return dp

    cdef void prep_cmd(self, io_uring_sqe *sqe, uint32_t nr, int tag, int32_t result,
                       uint64_t addr, uint64_t ud) noexcept nogil:
        pass

    cdef int64_t user_copy(self, int tag, uint8_t *buf, uint32_t nbytes, bint to_request) noexcept nogil:
        return -EOPNOTSUPP

    cdef void prep_batch_cmd(self, io_uring_sqe *sqe, int slot, uint32_t nr, uint16_t nr_elem,
                             uint8_t elem_bytes, uint16_t flags, uint64_t addr, uint64_t ud) noexcept nogil:
        """Fill sqe with PREP_IO_CMDS / COMMIT_IO_CMDS (nr) of nr_elem elements at addr.
        slot (0..BATCH_SLOTS-1) is the queue's number for this command."""
        pass

    cdef void prep_commit_one(self, io_uring_sqe *sqe, int tag, uint8_t elem_bytes, uint16_t flags,
                              uint64_t addr, uint64_t ud) noexcept nogil:
        """Fill sqe with a COMMIT_IO_CMDS of tag's one element at addr that completes only
        when the driver refuses it (the driver takes one element whole or not at all)."""
        pass

    cdef void prep_fetch_cmds(self, io_uring_sqe *sqe, Queue q, uint64_t ud) noexcept nogil:
        """Fill sqe with the multishot FETCH_IO_CMDS delivering tags into q's buffer ring
        (group FETCH_BGID; slot FETCH_SLOT)."""
        pass

    cdef int leave(self, Queue q) except -1:
        """q is closing, its commands perhaps still armed (a forced exit). The kernel
        cancels a closing ring's commands itself; a driver that copies requests into the
        server's memory itself (the simulator) must stop before q's buffers go."""
        return 0


cdef class DataPath:
    def __init__(self, *args, **kwargs):
        raise TypeError("a DataPath is made by its queue's Channel")

    cdef int setup(self, Queue q) except -1:
        return 0

    cdef uint64_t cmd_addr(self, Queue q, int tag) noexcept nogil:
        return <uintptr_t>(q.bufs + <size_t>tag * q.buf_size)

    cdef int32_t begin(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        return 0

    cdef int32_t end(self, Queue q, int tag, const ublksrv_io_desc *iod, int32_t res) noexcept nogil:
        return res

    cdef void register_buf(self, Queue q, int tag) noexcept nogil:
        pass

    cdef int64_t splice(self, Queue q, int tag, uint32_t offset, bint write_end, uint32_t nbytes) noexcept nogil:
        return -EOPNOTSUPP

    cdef int pipe_fd(self, int tag, bint write_end) noexcept nogil:
        return -1


cdef class NoBufferPath(DataPath):
    cdef uint64_t cmd_addr(self, Queue q, int tag) noexcept nogil:
        return 0


cdef class UserCopyPath(NoBufferPath):
    """USER_COPY: the server moves data itself through the driver's char device
    (WRITE data in before the backend runs, READ data out before the commit)."""

    cdef int32_t begin(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef uint32_t n
        cdef int64_t c
        if iod.op_flags & 0xff != UBLK_IO_OP_WRITE or iod.op_flags & UBLK_IO_F_SHMEM_ZC:
            return 0
        n = iod.nr_sectors << SECTOR_SHIFT
        c = self.ch.user_copy(tag, q.tag_buf(tag), n, 0)
        return 0 if c == n else (<int32_t>c if c < 0 else -EIO)

    cdef int32_t end(self, Queue q, int tag, const ublksrv_io_desc *iod, int32_t res) noexcept nogil:
        cdef int64_t c
        if iod.op_flags & 0xff != UBLK_IO_OP_READ or res <= 0 or iod.op_flags & UBLK_IO_F_SHMEM_ZC:
            return res
        c = self.ch.user_copy(tag, q.tag_buf(tag), <uint32_t>res, 1)
        return res if c == res else (<int32_t>c if c < 0 else -EIO)


cdef class NativeTarget:
    cdef int setup(self, Queue q) except -1:
        return 0

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        q.commit(tag, -EINVAL)
        return 0

    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        return res

    cdef void batch_end(self, Queue q) noexcept nogil:
        pass

    cdef int shutdown(self, Queue q) except -1:
        return 0


cdef class Queue:
    """Serve one queue of a device. Construct in the thread that will run it.

    channel: the transport's Channel for this queue (one per Queue); iods: its descriptor
    array; native: the backend's target (a C one, or pytask.PyTarget for a Python backend).
    threads, thread: this Queue serves tags thread, thread + threads, ... of the queue
    (interleaved, so that the few tags of a shallow load spread over the threads too).
    """

    def __init__(self, int depth, uint32_t buf_size, Channel channel not None, iods, *,
                 NativeTarget native not None, str data_path="copy",
                 unsigned ring_flags=0, double poll_us=0.0, unsigned submit_chunk=4,
                 bint batch_io=False, int threads=1, int thread=0):
        # depth, submit_chunk and the rest were validated by Device and the driver
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path={data_path!r}: one of {sorted(DATA_PATHS)}")
        if batch_io and data_path not in BATCH_DATA_PATHS:
            raise ValueError(f"data_path={data_path!r} is not served with batch I/O: "
                             f"use one of {', '.join(BATCH_DATA_PATHS)}, or turn batch I/O off")
        if not 1 <= threads <= depth or not 0 <= thread < threads:
            raise ValueError(f"thread {thread} of {threads}: need 1 <= threads <= depth ({depth}) "
                             "and 0 <= thread < threads")
        if batch_io and threads > 1:
            raise ValueError("batch I/O serves a queue from one thread")
        self.q_id = channel.q_id
        self.depth = depth
        self.threads = threads
        self.thread = thread
        self.buf_size = buf_size
        self.spin_ns = <int64_t>(poll_us * 1000)    # poll the CQ this long before sleeping
        self.submit_chunk = submit_chunk
        self.data_path = DATA_PATHS[data_path]
        self.native = native
        iod_arr = np.asarray(iods)
        if iod_arr.nbytes < depth * sizeof(ublksrv_io_desc):
            raise ValueError("descriptor array smaller than depth * 24 bytes")
        self.iods = <const ublksrv_io_desc *><uintptr_t>iod_arr.__array_interface__["data"][0]
        # per-tag buffers, page aligned, untouched pages cost nothing
        raw = np.zeros(<size_t>depth * buf_size + 4096, np.uint8)
        start = (-raw.__array_interface__["data"][0]) % 4096
        bufs = raw[start:start + <size_t>depth * buf_size]
        self.bufs = <uint8_t *><uintptr_t>bufs.__array_interface__["data"][0]
        self.tags = <TagIO *>calloc(depth, sizeof(TagIO))
        self._stats = np.zeros(ST_FIELDS, np.uint64)
        self.st = <uint64_t *><uintptr_t>self._stats.__array_interface__["data"][0]
        if self.tags == NULL:
            raise MemoryError("Queue: cannot allocate tag state")
        self._keep = (iod_arr, raw, bufs)
        entries = 1
        while entries < 2 * depth:
            entries <<= 1
        self.ring = Ring(max(entries, 64), ring_flags, cq_entries=max(entries, 64) * 2)
        self.r = &self.ring.ring
        if self.data_path == DP_ZERO_COPY:
            # request pages are installed at buffer index `tag` of this ring
            self.zc_addr = <uint64_t *>calloc(depth, sizeof(uint64_t))
            self.ring.register_buffers_sparse(depth)
        if batch_io:
            self._setup_batch()
        self.ch = channel
        channel.bind(self)
        self.dp = channel.make_path(self, self.data_path)
        self.dp.setup(self)
        native.setup(self)

    def _setup_batch(self):
        """BATCH_IO's buffers: the commit elements (a turn's, and those of each command in
        flight) and the FETCH's provided buffer ring, registered on this ring."""
        cdef io_uring_buf_reg reg
        cdef uint32_t i, entries = 8
        cdef int ret
        cdef size_t ring_bytes, elems
        cdef uintptr_t base
        self.batch_io = 1
        self.bt_flags = UBLK_BATCH_F_HAS_BUF_ADDR if self.data_path == DP_COPY else 0
        self.elem_bytes = sizeof(ublk_elem_header) + (8 if self.bt_flags else 0)
        # a FETCH completion consumes one whole buffer, however few tags it carries: one
        # buffer per tag in flight keeps the FETCH from running out
        while entries < <uint32_t>self.depth:
            entries <<= 1
        self.br_entries = entries
        self.fbuf_size = 2 * min(self.depth, FETCH_MAX_TAGS)
        ring_bytes = entries * sizeof(io_uring_buf)
        elems = <size_t>self.depth * self.elem_bytes
        raw = np.zeros(4096 + ring_bytes + entries * self.fbuf_size + (2 + NCOMMIT_BUFS) * elems, np.uint8)
        base = raw.__array_interface__["data"][0]
        base += (-base) % 4096                 # the buffer ring must be page aligned
        self.br = <io_uring_buf_ring *>base
        self.fbufs = <uint8_t *>(base + ring_bytes)
        self.staged = self.fbufs + entries * self.fbuf_size
        self.solo = self.staged + elems
        self.cbufs = self.solo + elems
        self._bt_keep = raw
        io_uring_buf_ring_init(self.br)
        for i in range(entries):
            io_uring_buf_ring_add(self.br, self.fbufs + i * self.fbuf_size, self.fbuf_size, i, entries - 1, i)
        io_uring_buf_ring_advance(self.br, entries)
        reg.ring_addr = <uintptr_t>self.br
        reg.ring_entries = entries
        reg.bgid = FETCH_BGID
        reg.pad = 0
        reg.resv[0] = reg.resv[1] = reg.resv[2] = 0
        ret = io_uring_register_buf_ring(self.r, &reg, 0)
        if ret < 0:
            raise OSError(-ret, f"queue {self.q_id}: cannot register the FETCH_IO_CMDS buffer ring "
                                "(provided buffer rings need Linux 5.19+)")

    def __dealloc__(self):
        free(self.tags)
        free(self.zc_addr)

    @property
    def stats(self):
        """This queue's counters (a uint64 array laid out as STATS_LAYOUT says), live: read
        them from any thread; pyublk_fast.stats makes sense of them."""
        return self._stats

    @property
    def requests(self) -> int:
        """Requests this queue has taken."""
        return self.st[ST_STARTED]

    @property
    def failed(self) -> int:
        """Requests it committed with -errno."""
        return self.st[ST_FAILED]

    @property
    def ring_fd(self) -> int:
        return self.ring.fd

    @property
    def closed(self) -> bool:
        return self.ring.closed

    def buffers(self):
        """The per-tag buffers as a (depth, buf_size) uint8 array (views, no copy)."""
        return self._keep[2].reshape(self.depth, self.buf_size)

    def descriptors(self):
        return self._keep[0]

    def close(self):
        """Close the ring and drop the descriptor array and buffers (after run() returned): a
        kernel transport can then unmap /dev/ublkcN's descriptors and the server is gone."""
        cdef int left = 0
        if not self.ring.closed:
            self.ch.leave(self)
            self.native.shutdown(self)
            with nogil:
                left = self.drain_backend_io(1000000000)
        if left:
            # the kernel may still write into these buffers: keep them (and the target's
            # own) for the life of the process rather than hand their memory back
            log.warning("queue %d: %d backend operations still in flight 1 s after the queue "
                        "stopped; keeping their buffers", self.q_id, left)
            _ABANDONED.append((self._keep, self.native))
        self.ring.close()
        self._keep = None
        if self.fetch_state == FETCH_ARMED:
            # a forced exit: a driver that writes tags itself (the simulator) may still
            # deliver some into the FETCH's buffers until it learns the server is gone
            _ABANDONED.append(self._bt_keep)
        self._bt_keep = None
        self.br = NULL
        self.iods = NULL
        self.bufs = NULL
        self.dp = None
        self.native = None          # a Python backend's target refers back to this queue

    cdef int drain_backend_io(self, int64_t timeout_ns) noexcept nogil:
        """Wait, at most timeout_ns, for backend SQEs still in flight (only after a forced
        exit: die(), a kill): close() frees the buffers they read into or write from.
        Their results are dropped; the requests are the driver's to fail. Returns how
        many are still in flight."""
        cdef uint64_t ud[REAP_BATCH]
        cdef int32_t res[REAP_BATCH]
        cdef uint32_t fl[REAP_BATCH]
        cdef unsigned n, i
        cdef int tag
        cdef int left = 0
        cdef __kernel_timespec ts
        cdef io_uring_cqe *cqe
        cdef int64_t deadline = pyu_now_ns() + timeout_ns
        for tag in range(self.depth):
            left += self.tags[tag].pending
        ts.tv_sec = 0
        ts.tv_nsec = 10000000
        while left > 0 and pyu_now_ns() < deadline:
            io_uring_submit_and_wait_timeout(self.r, &cqe, 1, &ts, NULL)
            n = reap_cq(self.r, ud, res, fl, REAP_BATCH)
            for i in range(n):
                tag = ud_tag(ud[i])
                if ud_is_target(ud[i]) and tag < self.depth and self.tags[tag].pending:
                    self.tags[tag].pending -= 1
                    left -= 1
        return left

    # -- commands to the driver -------------------------------------------------------

    cdef io_uring_sqe *get_sqe(self) noexcept nogil:
        cdef io_uring_sqe *sqe = io_uring_get_sqe(self.r)
        while sqe == NULL:
            io_uring_submit(self.r)
            sqe = io_uring_get_sqe(self.r)
        return sqe

    cdef uint8_t *tag_buf(self, int tag) noexcept nogil:
        """Where tag's request data is: its tag buffer, or, for a request that arrived in a
        registered shared buffer (UBLK_IO_F_SHMEM_ZC), right there (checked by on_request)."""
        cdef const ublksrv_io_desc *iod = &self.iods[tag]
        if iod.op_flags & UBLK_IO_F_SHMEM_ZC:
            return <uint8_t *><uintptr_t>self.shm[2 * ((iod.addr >> 32) & 0xffff)] + (iod.addr & 0xffffffffULL)
        return self.bufs + <size_t>tag * self.buf_size

    cdef bint shm_valid(self, const ublksrv_io_desc *iod) noexcept nogil:
        """A registered buffer holds the request, and a READ's is writable (a read-only one
        has bit 63 set in its length: the server mapped it read-only)."""
        cdef uint64_t i = (iod.addr >> 32) & 0xffff
        cdef uint64_t end = (iod.addr & 0xffffffffULL) + (<uint64_t>iod.nr_sectors << SECTOR_SHIFT)
        if self.shm == NULL or self.shm[2 * i] == 0:
            return False
        if self.shm[2 * i + 1] >> 63 and iod.op_flags & 0xff == UBLK_IO_OP_READ:
            return False
        return end <= (self.shm[2 * i + 1] & ~(1ULL << 63))

    cdef object shared_view(self, int tag, uint32_t nbytes):
        """A Python backend's view of tag's request in its shared buffer."""
        cdef uint64_t addr = self.iods[tag].addr
        cdef uint64_t off = addr & 0xffffffffULL
        return self._shm[1][(addr >> 32) & 0xffff][off:off + nbytes]

    def share_buffers(self, table, views):
        """Serve requests in registered shared buffers (UBLK_F_SHMEM_ZC): ``table`` is a
        uint64 array of 2 * 65536 (base address, length | bit 63 if read-only) by index that the device
        fills before registering a buffer with the driver and clears after unregistering
        it; ``views`` maps each index to a memoryview of it. Call before fetch_all()."""
        arr = np.asarray(table)
        if arr.dtype != np.uint64 or arr.size < 2 * 65536:
            raise ValueError("share_buffers: table must be 2 * 65536 uint64")
        self._shm = (arr, views)
        self.shm = <const uint64_t *><uintptr_t>arr.__array_interface__["data"][0]

    cdef void submit_cmd(self, uint32_t nr, int tag, int32_t result) noexcept nogil:
        """FETCH_REQ / COMMIT_AND_FETCH_REQ / NEED_GET_DATA for tag."""
        self.ch.prep_cmd(self.get_sqe(), nr, tag, result, self.dp.cmd_addr(self, tag),
                         ud_encode(tag, nr, 0, 0))
        self.tags[tag].state = TAG_WAIT

    cdef void register_buf(self, int tag) noexcept nogil:
        """For targets, before their first SQE on the request's pages: whatever the data
        path needs to make them a fixed buffer (a linked REGISTER_IO_BUF on 6.15)."""
        self.dp.register_buf(self, tag)

    cdef int32_t prep_request_rw(self, int tag, int fd, bint read, uint32_t at, uint32_t n,
                                 uint64_t off, uint32_t rw_flags, bint fill, uint64_t ud) noexcept nogil:
        """One SQE moving bytes [at, at+n) of tag's request between the request and fd at
        off (read: fd -> request), by whatever data path the queue has: the tag buffer,
        the request's pages as fixed buffer `tag` (zero copy), or a splice through the
        tag's pipe. For a splice write, fill=1 first moves those request bytes into the
        pipe (a continuation after a short write finds the rest still there); a splice
        read needs request_rw_done() to move what arrived on into the request. A splice
        has no rw_flags (RWF_DSYNC): the caller syncs after it. 0, or -errno when no
        SQE was prepared."""
        cdef io_uring_sqe *sqe
        cdef int64_t moved
        cdef uint8_t *buf
        if self.data_path == DP_SPLICE:
            if not read and fill:
                moved = self.dp.splice(self, tag, at, 1, n)
                if moved != <int64_t>n:
                    return <int32_t>moved if moved < 0 else -EIO
            sqe = self.get_sqe()
            if read:
                io_uring_prep_splice(sqe, fd, off, self.dp.pipe_fd(tag, 1), -1, n, 0)
            else:
                io_uring_prep_splice(sqe, self.dp.pipe_fd(tag, 0), -1, fd, off, n, 0)
        elif self.data_path == DP_ZERO_COPY:
            buf = <uint8_t *><uintptr_t>self.zc_addr[tag] + at
            self.register_buf(tag)       # 6.15: a REGISTER_IO_BUF linked before the first SQE
            sqe = self.get_sqe()
            if read:
                io_uring_prep_read_fixed(sqe, fd, buf, n, off, tag)
            else:
                io_uring_prep_write_fixed(sqe, fd, buf, n, off, tag)
            sqe.rw_flags = rw_flags
        else:
            sqe = self.get_sqe()
            if read:
                io_uring_prep_read(sqe, fd, self.tag_buf(tag) + at, n, off)
            else:
                io_uring_prep_write(sqe, fd, self.tag_buf(tag) + at, n, off)
            sqe.rw_flags = rw_flags
        sqe.user_data = ud
        return 0

    cdef int32_t request_rw_done(self, int tag, bint read, uint32_t at, int32_t res) noexcept nogil:
        """After a prep_request_rw() SQE completed with res: a splice read's bytes go from
        the pipe into the request at `at`. res, or -errno."""
        cdef int64_t moved
        if self.data_path == DP_SPLICE and read and res > 0:
            moved = self.dp.splice(self, tag, at, 0, <uint32_t>res)
            if moved != res:
                return <int32_t>moved if moved < 0 else -EIO
        return res

    cdef void commit(self, int tag, int32_t res) noexcept nogil:
        """Complete the request of tag with res (bytes or -errno) and fetch the next."""
        cdef uint32_t op = self.iods[tag].op_flags & 0xff
        cdef int i = op if op < 4 else (4 if op == UBLK_IO_OP_WRITE_ZEROES else 5)
        cdef uint64_t *st = self.st
        res = self.dp.end(self, tag, &self.iods[tag], res)
        st[ST_REQS + i] += 1
        if res > 0:
            st[ST_BYTES + i] += res
        elif res < 0:
            self.note_failure(tag, res)
            st[ST_ERRNO + (-res if -res < ST_NERRNO else ST_NERRNO - 1)] += 1
        i = pyu_log2(<uint64_t>(self.now_ns - self.tags[tag].start_ns))
        st[ST_HIST + (i if i < ST_NHIST else ST_NHIST - 1)] += 1
        st[ST_DONE] += 1
        if self.batch_io:
            self.stage_commit(tag, res)
        else:
            self.submit_cmd(UBLK_IO_COMMIT_AND_FETCH_REQ, tag, res)

    # -- BATCH_IO ----------------------------------------------------------------------

    cdef void put_elem(self, uint8_t *e, int tag, int32_t res) noexcept nogil:
        """Write tag's PREP/COMMIT element at e (with its buffer on the copy path)."""
        cdef ublk_elem_header *h = <ublk_elem_header *>e
        h.tag = tag
        h.buf_index = 0
        h.result = res
        if self.bt_flags & UBLK_BATCH_F_HAS_BUF_ADDR:
            (<uint64_t *>(e + sizeof(ublk_elem_header)))[0] = self.dp.cmd_addr(self, tag)

    cdef void stage_commit(self, int tag, int32_t res) noexcept nogil:
        """Add tag's result to this turn's COMMIT_IO_CMDS (sent before the queue waits)."""
        self.put_elem(self.staged + self.nstaged * self.elem_bytes, tag, res)
        self.nstaged += 1
        self.nr_busy -= 1
        self.tags[tag].state = TAG_WAIT

    cdef void flush_commits(self) noexcept nogil:
        """Send the staged commits as one COMMIT_IO_CMDS. A tag is staged at most once
        until sent (the driver cannot hand it out again before), so depth elements always
        fit; with every buffer in flight the commits wait for the next turn (a commit's
        completion frees one and wakes the queue).

        A single commit (every one at queue depth 1) goes out without a completion unless
        the driver refuses it: the driver answers a command at once, so its completion
        would cost the queue a loop turn (a wake-up, an io_uring_enter) per request for
        nothing. Its element waits at its tag's place, which nothing else writes before
        the driver has taken it: the tag cannot come back before."""
        cdef int b
        cdef int tag
        if self.nstaged == 1:
            tag = (<ublk_elem_header *>self.staged).tag
            memcpy(self.solo + tag * self.elem_bytes, self.staged, self.elem_bytes)
            self.ch.prep_commit_one(self.get_sqe(), tag, self.elem_bytes, self.bt_flags,
                                    <uintptr_t>(self.solo + tag * self.elem_bytes),
                                    ud_encode(tag, UBLK_IO_COMMIT_IO_CMDS, 1, 0))
            self.nstaged = 0
            return
        for b in range(NCOMMIT_BUFS):
            if self.cb_n[b] == 0:
                break
        else:
            return
        cdef uint8_t *buf = self.cbufs + <size_t>b * self.depth * self.elem_bytes
        memcpy(buf, self.staged, self.nstaged * self.elem_bytes)
        self.cb_n[b] = self.nstaged
        self.ch.prep_batch_cmd(self.get_sqe(), b, UBLK_IO_COMMIT_IO_CMDS, <uint16_t>self.nstaged,
                               self.elem_bytes, self.bt_flags, <uintptr_t>buf,
                               ud_encode(b, UBLK_IO_COMMIT_IO_CMDS, 0, 0))
        self.nstaged = 0

    cdef void on_batch_done(self, int slot, bint solo, int32_t res) noexcept nogil:
        """PREP/COMMIT_IO_CMDS of buffer slot completed with res: the bytes of elements it
        took, or -errno when it took none. The driver stops at the first element it
        refuses: that tag is lost (counted), the ones after it are committed again.
        solo: a one-element commit of tag slot (flush_commits), which completes when refused."""
        cdef uint32_t n, done
        cdef uint8_t *buf
        if solo:
            if res != self.elem_bytes:
                self.cmd_errors += 1
                if slot < self.depth:
                    self.tags[slot].state = TAG_GONE
            return
        if slot >= NCOMMIT_BUFS or self.cb_n[slot] == 0:
            self.cmd_errors += 1
            return
        n = self.cb_n[slot]
        self.cb_n[slot] = 0
        if res == <int32_t>(n * self.elem_bytes):
            return
        self.cmd_errors += 1
        done = <uint32_t>res / self.elem_bytes if res > 0 else 0
        if done >= n:
            return
        buf = self.cbufs + <size_t>slot * self.depth * self.elem_bytes
        self.tags[(<ublk_elem_header *>(buf + done * self.elem_bytes)).tag].state = TAG_GONE
        memcpy(self.staged + self.nstaged * self.elem_bytes, buf + (done + 1) * self.elem_bytes,
               (n - done - 1) * self.elem_bytes)
        self.nstaged += n - done - 1

    cdef void hand_on(self) noexcept nogil:
        """Submit what this turn has prepared once it makes a chunk (submit_chunk SQEs), so
        that the disk (or the driver) starts on the first requests instead of idling until
        the whole reaped batch is prepared (io_uring plugs a multi-SQE submit). With batch
        I/O the commits staged so far go in the same submit: a finished request then waits
        for its commit no longer than a COMMIT_AND_FETCH would, rather than for the rest of
        the turn (other requests' backing I/O, a vCPU the host preempts meanwhile)."""
        if io_uring_sq_ready(self.r) >= self.submit_chunk:
            if self.nstaged:
                self.flush_commits()
            io_uring_submit(self.r)

    cdef void arm_fetch(self) noexcept nogil:
        self.ch.prep_fetch_cmds(self.get_sqe(), self, ud_encode(0, UBLK_IO_FETCH_IO_CMDS, 0, 0))
        self.fetch_state = FETCH_ARMED

    cdef void on_fetch(self, int32_t res, uint32_t flags) noexcept nogil:
        """A FETCH_IO_CMDS completion: res bytes of u16 tags in buffer flags >> 16. Without
        IORING_CQE_F_MORE the FETCH has ended: it is posted again unless the driver
        aborted it (the device stops or is quiesced) or refused it."""
        cdef uint16_t *tags
        cdef uint32_t bid, k, n
        cdef int tag
        if flags & IORING_CQE_F_BUFFER:
            bid = flags >> IORING_CQE_BUFFER_SHIFT
            if bid < self.br_entries:
                tags = <uint16_t *>(self.fbufs + bid * self.fbuf_size)
                n = <uint32_t>res / 2 if res > 0 else 0
                for k in range(n):
                    self.hand_on()
                    tag = tags[k]
                    if tag >= self.depth or self.tags[tag].state != TAG_WAIT:
                        self.cmd_errors += 1
                        continue
                    self.nr_busy += 1
                    self.on_request(tag)
                # the buffer goes back to the ring once its tags are read
                io_uring_buf_ring_add(self.br, tags, self.fbuf_size, bid, self.br_entries - 1, 0)
                io_uring_buf_ring_advance(self.br, 1)
            else:
                self.cmd_errors += 1
        if flags & IORING_CQE_F_MORE:
            return
        if res >= 0 or res == -ENOBUFS:
            self.arm_fetch()
        else:
            if res != -ENODEV:
                self.cmd_errors += 1
            self.fetch_state = FETCH_GONE

    cdef bint batch_idle(self) noexcept nogil:
        """BATCH_IO: the FETCH is gone, every request is done and every commit answered,
        but for at most one staged: that one goes out without an answer to wait for."""
        cdef int b
        if self.fetch_state != FETCH_GONE or self.nr_busy > 0 or self.nstaged > 1:
            return 0
        for b in range(NCOMMIT_BUFS):
            if self.cb_n[b]:
                return 0
        return 1

    cdef void note_failure(self, int tag, int32_t res) noexcept nogil:
        """Count a failed request; the first of each log interval is kept for the log line
        (an application that sees EIO can then find why in the server's log)."""
        cdef const ublksrv_io_desc *iod = &self.iods[tag]
        self.st[ST_FAILED] += 1
        if self.unlogged == 0:
            self.first_err = -res
            self.first_op = iod.op_flags & 0xff
            self.first_off = iod.start_sector << SECTOR_SHIFT
            self.first_len = iod.nr_sectors << SECTOR_SHIFT
        self.unlogged += 1

    cdef void log_failures(self) noexcept nogil:
        """One log line for the failures since the last one: at most one a second, so a
        failing disk cannot flood the log, and the first failure shows at once."""
        cdef int64_t now = pyu_now_ns()
        if self.unlogged == 0 or now - self.last_log_ns < FAIL_LOG_INTERVAL_NS:
            return
        with gil:
            more = (f" (and {self.unlogged - 1} more failed requests in the last "
                    f"{(now - self.last_log_ns) / 1e9:.1f} s)") if self.unlogged > 1 else ""
            log.warning("queue %d: %s of %d bytes at offset %d failed: %s%s", self.q_id,
                        OP_NAMES.get(self.first_op, f"op {self.first_op}"), self.first_len,
                        self.first_off, _errno.errorcode.get(self.first_err, self.first_err), more)
        self.unlogged = 0
        self.last_log_ns = now

    cdef uint64_t target_ud(self, int tag, uint32_t tgt_data) noexcept nogil:
        return ud_encode(tag, 0, tgt_data, 1)

    # -- the loop --------------------------------------------------------------------

    def fetch_all(self):
        """Post FETCH_REQ for every tag this thread serves and submit (BATCH_IO: PREP_IO_CMDS
        for every tag, waiting for its answer, then the multishot FETCH_IO_CMDS)."""
        cdef int tag
        if self.batch_io:
            self._prep_all()
            self.arm_fetch()
            self.nr_live = 1
        else:
            self.nr_live = 0
            for tag in range(self.thread, self.depth, self.threads):
                self.submit_cmd(UBLK_IO_FETCH_REQ, tag, 0)
                self.nr_live += 1
        ret = io_uring_submit(self.r)
        if ret < 0:
            raise OSError(-ret, f"queue {self.q_id}: submitting the first commands failed")

    def _prep_all(self):
        cdef int tag
        cdef uint64_t ud = ud_encode(0, UBLK_IO_PREP_IO_CMDS, 0, 0)
        for tag in range(self.depth):
            self.put_elem(self.cbufs + tag * self.elem_bytes, tag, 0)
            self.tags[tag].state = TAG_WAIT
        self.ch.prep_batch_cmd(self.get_sqe(), 0, UBLK_IO_PREP_IO_CMDS, <uint16_t>self.depth,
                               self.elem_bytes, self.bt_flags, <uintptr_t>self.cbufs, ud)
        res = self._answer(UBLK_IO_PREP_IO_CMDS, ud, 10.0)
        if res < 0:
            raise OSError(-res, f"queue {self.q_id}: the driver refused PREP_IO_CMDS "
                                f"({_errno.errorcode.get(-res, -res)})")

    def _answer(self, uint32_t nr, uint64_t ud, double timeout):
        """Submit and wait for the completion of the one command in flight (ud): its res."""
        cdef io_uring_cqe *cqe = NULL
        cdef __kernel_timespec ts
        cdef int ret
        ts.tv_sec = <long>timeout
        ts.tv_nsec = <long>((timeout - <long>timeout) * 1e9)
        with nogil:
            ret = io_uring_submit_and_wait_timeout(self.r, &cqe, 1, &ts, NULL)
        if ret < 0 or cqe == NULL:
            raise TimeoutError(f"queue {self.q_id}: no answer to command {nr:#x} in {timeout} s")
        if cqe.user_data != ud:
            raise RuntimeError(f"queue {self.q_id}: unexpected completion {cqe.user_data:#x}")
        ret = cqe.res
        io_uring_cq_advance(self.r, 1)
        return ret

    def probe_cmd(self, uint32_t nr, *, int tag=0, int32_t result=0, uint64_t addr=0, elements=None,
                  int nr_elem=-1, int elem_bytes=8, int flags=0, bint solo=False, double timeout=5.0):
        """Send one I/O command straight to the driver and return its answer (res): a
        per-tag one (nr = UBLK_IO_FETCH_REQ...) with tag, result, addr, or with elements
        (bytes) a batch one (nr = UBLK_IO_PREP_IO_CMDS / COMMIT_IO_CMDS; nr_elem defaults to
        len(elements) // elem_bytes); solo: a COMMIT_IO_CMDS of one element, sent as a
        serving queue sends it (answered only when refused). For conformance checks of
        the driver, on a queue that is not serving (no fetch_all() / run())."""
        cdef uint64_t ud
        cdef uintptr_t at = 0
        cdef io_uring_sqe *sqe
        if elements is not None:
            buf = np.frombuffer(bytes(elements), np.uint8)
            if nr_elem < 0:
                nr_elem = len(buf) // elem_bytes
            if len(buf):
                at = buf.__array_interface__["data"][0]
            if solo and (nr != UBLK_IO_COMMIT_IO_CMDS or len(buf) < <Py_ssize_t>sizeof(ublk_elem_header)):
                raise ValueError("solo: a COMMIT_IO_CMDS of one element")
        sqe = self.get_sqe()
        if elements is None:
            ud = ud_encode(tag, nr, 0, 0)
            self.ch.prep_cmd(sqe, nr, tag, result, addr, ud)
        else:
            ud = ud_encode(NCOMMIT_BUFS - 1, nr, 0, 0)
            if solo:
                self.ch.prep_commit_one(sqe, (<ublk_elem_header *>at).tag, <uint8_t>elem_bytes,
                                        <uint16_t>flags, at, ud)
            else:
                self.ch.prep_batch_cmd(sqe, NCOMMIT_BUFS - 1, nr, <uint16_t>nr_elem, <uint8_t>elem_bytes,
                                       <uint16_t>flags, at, ud)
        return self._answer(nr, ud, timeout)

    def run(self):
        """Serve until every tag is aborted (device stopped) or die() is posted."""
        with nogil:
            self.loop()
        return self.cmd_errors

    def wake_ud(self):
        """user_data that, posted to this ring (MSG_RING), makes run() return at once."""
        return ud_encode(0, OP_WAKE, 0, 0)

    cdef void loop(self) noexcept nogil:
        cdef uint64_t ud[REAP_BATCH]
        cdef int32_t res[REAP_BATCH]
        cdef uint32_t fl[REAP_BATCH]
        cdef unsigned n, i
        cdef int tag
        cdef uint32_t op
        cdef int64_t budget = self.spin_ns       # adaptive poll budget (ns)
        while self.nr_live > 0:
            if self.nstaged:
                self.flush_commits()
            pyu_submit_and_wait_adaptive(self.r, self.spin_ns, &budget)
            self.now_ns = pyu_now_ns()
            n = reap_cq(self.r, ud, res, fl, REAP_BATCH)
            self.st[ST_TURNS] += 1
            self.st[ST_CQES] += n
            for i in range(n):
                self.hand_on()
                tag = ud_tag(ud[i])
                if ud_is_target(ud[i]):
                    self.on_target(tag, ud_tgt_data(ud[i]), res[i])
                    continue
                op = ud_op(ud[i])
                if op == OP_WAKE:
                    self.nr_live = 0
                    break
                if op == UBLK_IO_FETCH_IO_CMDS:
                    self.on_fetch(res[i], fl[i])
                    continue
                if op == UBLK_IO_COMMIT_IO_CMDS or op == UBLK_IO_PREP_IO_CMDS:
                    self.on_batch_done(tag, ud_tgt_data(ud[i]), res[i])
                    continue
                if tag >= self.depth:
                    self.cmd_errors += 1
                    continue
                if op == UBLK_IO_REGISTER_IO_BUF or op == UBLK_IO_UNREGISTER_IO_BUF:
                    self.cmd_errors += 1      # only failures post a CQE; the linked SQE sees -ECANCELED
                    continue
                if res[i] < 0:
                    # the driver refused or aborted the command (or it never got there)
                    if res[i] != -ENODEV:
                        self.cmd_errors += 1
                    if self.tags[tag].state != TAG_GONE:
                        self.tags[tag].state = TAG_GONE
                        self.nr_live -= 1
                elif res[i] == UBLK_IO_RES_NEED_GET_DATA:
                    self.submit_cmd(UBLK_IO_NEED_GET_DATA, tag, 0)
                else:
                    self.on_request(tag)
            self.native.batch_end(self)
            if self.unlogged:
                self.log_failures()
            if self.batch_io and self.nr_live and self.batch_idle():
                if self.nstaged:
                    self.flush_commits()         # submitted below
                self.nr_live = 0
        io_uring_submit(self.r)
        self.last_log_ns = 0
        self.log_failures()

    cdef void on_request(self, int tag) noexcept nogil:
        cdef const ublksrv_io_desc *iod = &self.iods[tag]
        cdef int32_t err
        cdef int n
        self.st[ST_STARTED] += 1
        self.tags[tag].start_ns = self.now_ns
        self.tags[tag].state = TAG_BUSY
        if iod.op_flags & UBLK_IO_F_SHMEM_ZC:
            self.shm_requests += 1
            if not self.shm_valid(iod):     # a buffer this server never registered
                self.commit(tag, -EIO)
                return
        err = self.dp.begin(self, tag, iod)
        if err < 0:
            self.commit(tag, err)
            return
        self.tags[tag].result = 0
        n = self.native.queue_io(self, tag, iod)
        self.tags[tag].pending = n if n > 0 else 0

    cdef void on_target(self, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        cdef TagIO *t = &self.tags[tag]
        cdef int32_t r = self.native.io_done(self, tag, tgt_data, res)
        if r == C_RESUBMITTED:
            return
        if r < 0:
            if t.result >= 0:
                t.result = r
        elif t.result >= 0:
            t.result += r
        t.pending -= 1
        if t.pending == 0:
            self.commit(tag, t.result)
