# nogil externs of the liburing 2.3 calls and structures pyublk_fast uses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from posix.types cimport off_t

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<linux/time_types.h>" nogil:
    cdef struct __kernel_timespec:
        int64_t tv_sec
        long long tv_nsec

cdef extern from "<liburing.h>" nogil:
    cdef struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t rw_flags
        uint32_t cmd_op
        uint64_t user_data
        uint16_t buf_index
        int32_t splice_fd_in
        uint32_t file_index
        uint64_t addr3

    cdef struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    cdef struct io_uring_sq:
        unsigned *khead
        unsigned *ktail
        unsigned *kflags
        unsigned ring_mask
        unsigned ring_entries

    cdef struct io_uring_cq:
        unsigned *khead
        unsigned *ktail
        unsigned *koverflow
        io_uring_cqe *cqes
        unsigned ring_mask
        unsigned ring_entries

    cdef struct io_uring:
        io_uring_sq sq
        io_uring_cq cq
        unsigned flags
        int ring_fd
        unsigned features

    cdef struct io_sqring_offsets:
        pass
    cdef struct io_uring_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t sq_thread_cpu
        uint32_t sq_thread_idle
        uint32_t features
        uint32_t wq_fd

    enum:
        IORING_SETUP_IOPOLL
        IORING_SETUP_SQPOLL
        IORING_SETUP_CQSIZE
        IORING_SETUP_CLAMP
        IORING_SETUP_SUBMIT_ALL
        IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_TASKRUN_FLAG
        IORING_SETUP_SQE128
        IORING_SETUP_CQE32
        IORING_SETUP_SINGLE_ISSUER
        IORING_SETUP_DEFER_TASKRUN
        IOSQE_FIXED_FILE
        IOSQE_IO_LINK
        IOSQE_IO_HARDLINK
        IOSQE_ASYNC
        IOSQE_CQE_SKIP_SUCCESS
        IORING_FSYNC_DATASYNC
        IORING_FEAT_NODROP
        IORING_OP_URING_CMD
        IORING_OP_MSG_RING

    int io_uring_queue_init_params(unsigned entries, io_uring *ring, io_uring_params *p)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    int io_uring_submit_and_wait(io_uring *ring, unsigned wait_nr)
    int io_uring_get_events(io_uring *ring)
    int io_uring_wait_cqe_timeout(io_uring *ring, io_uring_cqe **cqe_ptr, __kernel_timespec *ts)
    int io_uring_submit_and_wait_timeout(io_uring *ring, io_uring_cqe **cqe_ptr, unsigned wait_nr,
                                         __kernel_timespec *ts, void *sigmask)
    unsigned io_uring_sq_space_left(const io_uring *ring)
    unsigned io_uring_sq_ready(const io_uring *ring)
    unsigned io_uring_cq_ready(const io_uring *ring)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)

    int io_uring_register_files(io_uring *ring, const int *files, unsigned nr_files)
    int io_uring_unregister_files(io_uring *ring)
    int io_uring_register_files_sparse(io_uring *ring, unsigned nr)
    int io_uring_register_files_update(io_uring *ring, unsigned off, const int *files, unsigned nr_files)
    int io_uring_register_buffers(io_uring *ring, const iovec *iovecs, unsigned nr_iovecs)
    int io_uring_register_buffers_sparse(io_uring *ring, unsigned nr)
    int io_uring_register_buffers_update_tag(io_uring *ring, unsigned off, const iovec *iovecs,
                                             const uint64_t *tags, unsigned nr)
    int io_uring_unregister_buffers(io_uring *ring)

    void io_uring_sqe_set_flags(io_uring_sqe *sqe, unsigned flags)
    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    void io_uring_prep_nop(io_uring_sqe *sqe)
    void io_uring_prep_read(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, uint64_t offset)
    void io_uring_prep_write(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, uint64_t offset)
    void io_uring_prep_read_fixed(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                                  uint64_t offset, int buf_index)
    void io_uring_prep_write_fixed(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                                   uint64_t offset, int buf_index)
    void io_uring_prep_readv(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                             uint64_t offset)
    void io_uring_prep_writev(io_uring_sqe *sqe, int fd, const iovec *iovecs, unsigned nr_vecs,
                              uint64_t offset)
    void io_uring_prep_fsync(io_uring_sqe *sqe, int fd, unsigned fsync_flags)
    void io_uring_prep_timeout(io_uring_sqe *sqe, __kernel_timespec *ts, unsigned count, unsigned flags)
    void io_uring_prep_cancel64(io_uring_sqe *sqe, uint64_t user_data, int flags)
    void io_uring_prep_fallocate(io_uring_sqe *sqe, int fd, int mode, off_t offset, off_t len)
    void io_uring_prep_splice(io_uring_sqe *sqe, int fd_in, int64_t off_in, int fd_out,
                              int64_t off_out, unsigned nbytes, unsigned splice_flags)
    void io_uring_prep_msg_ring(io_uring_sqe *sqe, int fd, unsigned len, uint64_t data, unsigned flags)

cdef extern from "compat.h" nogil:
    unsigned pyu_cq_tail(const io_uring *ring)
    io_uring_cqe *pyu_cqe_at(const io_uring *ring, unsigned pos)
    unsigned pyu_sqe_size(const io_uring *ring)
    int pyu_cq_overflowed(const io_uring *ring)
    void pyu_prep_uring_cmd(io_uring_sqe *sqe, unsigned sqe_size, int fd, uint32_t cmd_op,
                            const void *cmd, unsigned cmd_len, uint64_t user_data)
    void *pyu_sqe_cmd(io_uring_sqe *sqe)
    int64_t pyu_now_ns()
    int pyu_log2(uint64_t v)
    void pyu_submit_and_wait_adaptive(io_uring *ring, int64_t max_ns, int64_t *budget)

# Provided buffer rings (BATCH_IO's multishot FETCH_IO_CMDS delivers tags into them) and
# the CQE flags of multishot commands.
cdef extern from "<liburing.h>" nogil:
    cdef struct io_uring_buf:
        uint64_t addr
        uint32_t len
        uint16_t bid
        uint16_t resv

    cdef struct io_uring_buf_ring:
        uint16_t tail
        io_uring_buf bufs[1]

    cdef struct io_uring_buf_reg:
        uint64_t ring_addr
        uint32_t ring_entries
        uint16_t bgid
        uint16_t pad
        uint64_t resv[3]

    enum:
        IOSQE_BUFFER_SELECT
        IORING_CQE_F_BUFFER
        IORING_CQE_F_MORE
        IORING_CQE_BUFFER_SHIFT

    int io_uring_register_buf_ring(io_uring *ring, io_uring_buf_reg *reg, unsigned flags)
    int io_uring_unregister_buf_ring(io_uring *ring, int bgid)
    void io_uring_buf_ring_init(io_uring_buf_ring *br)
    void io_uring_buf_ring_add(io_uring_buf_ring *br, void *addr, unsigned len, unsigned short bid,
                               int mask, int buf_offset)
    void io_uring_buf_ring_advance(io_uring_buf_ring *br, int count)

cdef extern from "compat.h" nogil:
    enum:
        PYU_URING_CMD_MULTISHOT
        PYU_MSG_RING_FLAGS_PASS
    uint16_t pyu_buf_ring_tail(const io_uring_buf_ring *br)
