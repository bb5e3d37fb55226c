from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from .liburing cimport io_uring, io_uring_sqe, io_uring_buf_ring
from .ring cimport Ring
from .uapi cimport ublksrv_io_desc

cdef enum:
    REAP_BATCH = 512     # CQEs reaped at once: a target sees at most this many per batch_end()

cdef enum:
    # The data path's kind, fixed when a queue is set up (a native target picks its
    # per-request functions from it once, in setup()).
    DP_COPY = 0          # copy and need_get_data: the driver copies to/from the tag buffer
    DP_USER_COPY = 1
    DP_ZERO_COPY = 2
    DP_SPLICE = 3

cdef enum:
    # A queue's counters: one uint64 array (Queue.stats), laid out as below and read by
    # pyublk_fast/stats.py through STATS_LAYOUT. Op slots: READ WRITE FLUSH DISCARD
    # WRITE_ZEROES other.
    ST_OPS = 6
    ST_REQS = 0                  # [ST_OPS] requests committed, by op
    ST_BYTES = 6                 # [ST_OPS] bytes moved, by op
    ST_STARTED = 12              # requests fetched (ST_STARTED - ST_DONE are in flight)
    ST_DONE = 13                 # requests committed
    ST_FAILED = 14               # of those, with -errno
    ST_ERRNO = 16                # [ST_NERRNO] failed requests by errno (the last: any above)
    ST_NERRNO = 136
    ST_HIST = 152                # [ST_NHIST] fetch-to-commit latency, bucket floor(log2(ns))
    ST_NHIST = 48
    ST_TURNS = 200               # turns of the loop (one wait each: what a request costs in wake-ups)
    ST_CQES = 201                # completions reaped (driver commands and backend I/O)
    ST_FIELDS = 202

cdef enum:
    # BATCH_IO: each of a queue's batch commands has a slot of its own (a driver that keeps
    # per-command state, the simulator, tells them apart by it)
    NCOMMIT_BUFS = 8             # PREP/COMMIT_IO_CMDS element buffers in flight at once
    FETCH_SLOT = 8               # the multishot FETCH_IO_CMDS (slot after the commit buffers)
    BATCH_SLOTS = 9
    FETCH_BGID = 1               # the provided buffer group its tags arrive in
    FETCH_MAX_TAGS = 128         # the kernel puts at most this many tags in one completion

cdef class Queue


cdef class Channel:
    """How one queue's commands and data reach its driver; made by the transport.

    The queue runner never asks which driver it talks to: the kernel's channel
    (`kchannel.pyx`) prepares uring_cmd SQEs on /dev/ublkcN, the simulator's (under
    transport/sim/) does its own messaging. Both are per queue (q_id fixed).
    """
    cdef readonly int q_id
    cdef int ring_fd                   # the serving queue's ring, set by bind()

    cdef int bind(self, Queue q) except -1
    cdef DataPath make_path(self, Queue q, int kind)
    cdef void prep_cmd(self, io_uring_sqe *sqe, uint32_t nr, int tag, int32_t result,
                       uint64_t addr, uint64_t ud) noexcept nogil
    cdef int64_t user_copy(self, int tag, uint8_t *buf, uint32_t nbytes, bint to_request) noexcept nogil
    cdef void prep_batch_cmd(self, io_uring_sqe *sqe, int slot, uint32_t nr, uint16_t nr_elem,
                             uint8_t elem_bytes, uint16_t flags, uint64_t addr, uint64_t ud) noexcept nogil
    cdef void prep_commit_one(self, io_uring_sqe *sqe, int tag, uint8_t elem_bytes, uint16_t flags,
                              uint64_t addr, uint64_t ud) noexcept nogil
    cdef void prep_fetch_cmds(self, io_uring_sqe *sqe, Queue q, uint64_t ud) noexcept nogil
    cdef int leave(self, Queue q) except -1


cdef class DataPath:
    """How request data moves between driver and server, chosen once per queue.

    This base class is the copy path (and NEED_GET_DATA's): the driver copies into the
    tag buffer whose address every command carries, so nothing happens per request.
    """
    cdef Channel ch

    cdef int setup(self, Queue q) except -1
    cdef uint64_t cmd_addr(self, Queue q, int tag) noexcept nogil
    cdef int32_t begin(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil
    cdef int32_t end(self, Queue q, int tag, const ublksrv_io_desc *iod, int32_t res) noexcept nogil
    cdef void register_buf(self, Queue q, int tag) noexcept nogil
    cdef int64_t splice(self, Queue q, int tag, uint32_t offset, bint write_end, uint32_t nbytes) noexcept nogil
    cdef int pipe_fd(self, int tag, bint write_end) noexcept nogil


cdef class NoBufferPath(DataPath):
    """Base of the paths whose commands carry no buffer address."""


cdef struct TagIO:
    int64_t start_ns             # when the queue took the request (its loop turn's time)
    int32_t result               # first error, else bytes so far
    uint16_t pending             # backend operations outstanding
    uint8_t state                # TAG_WAIT / TAG_BUSY / TAG_GONE
    uint8_t registered           # kernel zero copy: REGISTER_IO_BUF sent for this request


cdef class NativeTarget:
    """A backend's per-request work, run by the queue thread.

    setup() runs once per queue (pick data-path functions from q.data_path there).
    queue_io() either completes the request now (q.commit(tag, res), return 0),
    prepares N backend SQEs tagged with q.target_ud(tag, tgt_data) and returns N, or
    returns 0 and keeps the request to commit later itself (then it keeps
    q.tags[tag].pending equal to its SQEs in flight, which close() waits for).
    io_done() gets each backend CQE; it returns the bytes/-errno of that operation,
    or RESUBMITTED when it prepared a follow-up SQE (short I/O, EAGAIN) or accounts
    for the CQE itself. batch_end() runs after each reaped batch; shutdown() once
    the queue stops serving, before close() waits for the SQEs still in flight.
    Native (C) targets run all of it without the GIL; the Python backends' target
    (pytask.pyx) takes it once per batch_end().
    """
    cdef int setup(self, Queue q) except -1
    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil
    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil
    cdef void batch_end(self, Queue q) noexcept nogil
    cdef int shutdown(self, Queue q) except -1


cdef class Queue:
    cdef Ring ring
    cdef io_uring *r
    cdef readonly int q_id
    cdef readonly int depth
    cdef readonly int threads          # threads serving this queue (PER_IO_DAEMON); this one
    cdef readonly int thread           # serves tags thread, thread + threads, ...
    cdef readonly Channel ch
    cdef readonly DataPath dp
    cdef readonly int data_path        # DP_*
    cdef const ublksrv_io_desc *iods
    cdef uint8_t *bufs
    cdef readonly uint32_t buf_size
    cdef TagIO *tags
    cdef readonly NativeTarget native
    cdef int nr_live               # tags not yet aborted
    cdef uint64_t *zc_addr         # DP_ZERO_COPY: address of the request's buffer at fixed index tag
    cdef const uint64_t *shm       # UBLK_F_SHMEM_ZC: base, length of each registered buffer by index
    cdef object _shm               # (that table, {index: memoryview of the buffer})
    cdef readonly uint64_t shm_requests   # requests that arrived in a shared buffer
    cdef uint64_t *st              # counters (ST_*), in _stats
    cdef object _stats
    cdef int64_t now_ns            # time of the current loop turn (after its wait)
    cdef int64_t spin_ns
    cdef unsigned submit_chunk
    cdef readonly uint64_t cmd_errors
    cdef uint64_t unlogged         # of those, not yet in a log line
    cdef int64_t last_log_ns
    cdef int32_t first_err         # the first unlogged failure: errno, op, offset, length
    cdef uint32_t first_op
    cdef uint64_t first_off
    cdef uint32_t first_len
    cdef object _keep
    # BATCH_IO (batch_io=True): tags are PREPared once, arrive by one multishot FETCH_IO_CMDS
    # into a provided buffer ring, and the commits of a loop turn go out as one COMMIT_IO_CMDS
    cdef readonly bint batch_io
    cdef uint16_t bt_flags         # UBLK_BATCH_F_* of PREP/COMMIT (buffer addresses on the copy path)
    cdef uint8_t elem_bytes
    cdef uint8_t *staged           # this turn's commits, depth elements at most
    cdef uint32_t nstaged
    cdef uint8_t *cbufs            # NCOMMIT_BUFS buffers of depth elements, one per command in flight
    cdef uint32_t cb_n[NCOMMIT_BUFS]   # elements of the command using each (0: free)
    cdef uint8_t *solo             # a one-element commit's element, at its tag's place (depth elements)
    cdef io_uring_buf_ring *br     # the FETCH's buffer ring (fetch buffer bid at fbufs + bid * fbuf_size)
    cdef readonly uint32_t br_entries
    cdef uint8_t *fbufs
    cdef uint32_t fbuf_size
    cdef int nr_busy               # tags whose request the server holds
    cdef uint8_t fetch_state       # FETCH_ARMED / FETCH_GONE
    cdef object _bt_keep

    cdef io_uring_sqe *get_sqe(self) noexcept nogil
    cdef int drain_backend_io(self, int64_t timeout_ns) noexcept nogil
    cdef void submit_cmd(self, uint32_t nr, int tag, int32_t result) noexcept nogil
    cdef void commit(self, int tag, int32_t res) noexcept nogil
    cdef void note_failure(self, int tag, int32_t res) noexcept nogil
    cdef void log_failures(self) noexcept nogil
    cdef void register_buf(self, int tag) noexcept nogil
    cdef int32_t prep_request_rw(self, int tag, int fd, bint read, uint32_t at, uint32_t n,
                                 uint64_t off, uint32_t rw_flags, bint fill, uint64_t ud) noexcept nogil
    cdef int32_t request_rw_done(self, int tag, bint read, uint32_t at, int32_t res) noexcept nogil
    cdef uint64_t target_ud(self, int tag, uint32_t tgt_data) noexcept nogil
    cdef uint8_t *tag_buf(self, int tag) noexcept nogil
    cdef bint shm_valid(self, const ublksrv_io_desc *iod) noexcept nogil
    cdef object shared_view(self, int tag, uint32_t nbytes)
    cdef void on_request(self, int tag) noexcept nogil
    cdef void on_target(self, int tag, uint32_t tgt_data, int32_t res) noexcept nogil
    cdef void loop(self) noexcept nogil
    cdef void put_elem(self, uint8_t *e, int tag, int32_t res) noexcept nogil
    cdef void stage_commit(self, int tag, int32_t res) noexcept nogil
    cdef void flush_commits(self) noexcept nogil
    cdef void hand_on(self) noexcept nogil
    cdef void arm_fetch(self) noexcept nogil
    cdef void on_fetch(self, int32_t res, uint32_t flags) noexcept nogil
    cdef void on_batch_done(self, int slot, bint solo, int32_t res) noexcept nogil
    cdef bint batch_idle(self) noexcept nogil
