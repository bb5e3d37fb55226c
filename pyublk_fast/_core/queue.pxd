from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from .liburing cimport io_uring, io_uring_sqe
from .ring cimport Ring
from .uapi cimport ublksrv_io_desc
from libc.stdint cimport int64_t
from .simwire cimport SimCmd, sim_copy_fn, sim_splice_fn, sim_regbuf_fn

cdef enum:
    DP_COPY = 0
    DP_USER_COPY = 1
    DP_ZERO_COPY = 2
    DP_SPLICE = 3

cdef class Queue

cdef struct TagIO:
    int32_t result               # first error, else bytes so far
    uint16_t pending             # backend operations outstanding
    uint8_t state                # TAG_WAIT / TAG_BUSY / TAG_GONE
    uint8_t registered           # kernel zero copy: REGISTER_IO_BUF sent for this request


cdef class NativeTarget:
    """A backend whose per-request work runs in C, in the queue thread, without the GIL.

    queue_io() either completes the request now (q.commit(tag, res), return 0) or
    prepares N backend SQEs tagged with q.target_ud(tag, tgt_data) and returns N.
    io_done() gets each backend CQE; it returns the bytes/-errno of that operation,
    or RESUBMITTED when it prepared a follow-up SQE (short I/O, EAGAIN).
    """
    cdef int setup(self, Queue q) except -1
    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil
    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil


cdef class Queue:
    cdef Ring ring
    cdef io_uring *r
    cdef readonly int q_id
    cdef readonly int depth
    cdef bint sim
    cdef int cmd_fd                # kernel: /dev/ublkcN; sim: the driver's ring fd
    cdef int sim_qi
    cdef SimCmd *sim_cmds
    cdef const ublksrv_io_desc *iods
    cdef uint8_t *bufs
    cdef readonly uint32_t buf_size
    cdef TagIO *tags
    cdef NativeTarget native
    cdef object py_handler         # handle_batch(n) for Python backends
    cdef uint16_t *py_tags
    cdef int n_py
    cdef int nr_live               # tags not yet aborted
    cdef bint auto_buf_reg         # kernel zero copy: request buffer auto-registered at index tag
    cdef readonly bint zc_register # kernel zero copy without AUTO_BUF_REG: REGISTER/UNREGISTER_IO_BUF
    cdef readonly int data_path
    cdef void *sim_ctx
    cdef sim_copy_fn uc_fn
    cdef sim_regbuf_fn regbuf_fn
    cdef sim_splice_fn splice_fn
    cdef int *pipes                # DP_SPLICE: read end 2*tag, write end 2*tag+1
    cdef uint64_t *zc_addr         # DP_ZERO_COPY: address of the request's registered buffer
    cdef readonly uint64_t requests
    cdef int64_t spin_ns
    cdef unsigned submit_chunk
    cdef readonly uint64_t cmd_errors
    cdef readonly object py_tag_array
    cdef object _keep

    cdef io_uring_sqe *get_sqe(self) noexcept nogil
    cdef void drain_backend_io(self, int64_t timeout_ns) noexcept nogil
    cdef void submit_cmd(self, uint32_t nr, int tag, int32_t result) noexcept nogil
    cdef void commit(self, int tag, int32_t res) noexcept nogil
    cdef void zc_buf_cmd(self, uint32_t nr, int tag, unsigned sqe_flags) noexcept nogil
    cdef void zc_register_buf(self, int tag) noexcept nogil
    cdef uint64_t target_ud(self, int tag, uint32_t tgt_data) noexcept nogil
    cdef uint8_t *tag_buf(self, int tag) noexcept nogil
    cdef int64_t user_copy(self, int tag, int to_request, uint32_t nbytes) noexcept nogil
    cdef int64_t splice(self, int tag, uint32_t offset, int write_end, uint32_t nbytes) noexcept nogil
    cdef void on_request(self, int tag) noexcept nogil
    cdef void on_target(self, int tag, uint32_t tgt_data, int32_t res) noexcept nogil
    cdef void loop(self) noexcept nogil
    cdef void run_python(self) noexcept nogil
