# cython: language_level=3, boundscheck=False, wraparound=False
"""The kernel's channel: a queue's commands are uring_cmd SQEs on /dev/ublkcN.

USER_COPY data moves by pread/pwrite on the same char device at the queue's and
tag's position. Zero copy installs the request's pages at buffer index `tag` of
the queue's ring, either by the driver itself (AUTO_BUF_REG, 6.16+: the index
rides in the FETCH/COMMIT SQE's addr) or by a REGISTER_IO_BUF command linked
before the target's first SQE (6.15), removed again at COMMIT.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.errno cimport EIO
from posix.unistd cimport pread, pwrite

from .liburing cimport (io_uring_sqe, IOSQE_IO_LINK, IOSQE_CQE_SKIP_SUCCESS, IOSQE_BUFFER_SELECT,
                        PYU_URING_CMD_MULTISHOT, pyu_prep_uring_cmd, pyu_sqe_cmd)
from .queue cimport Channel, DataPath, NoBufferPath, Queue, DP_ZERO_COPY, FETCH_BGID
from .uapi cimport *
from .codec cimport uc_pos, ud_encode


cdef class KernelChannel(Channel):
    """Queue q_id of the device whose char device is open as cmd_fd."""

    def __init__(self, int q_id, int cmd_fd, *, bint auto_buf_reg=False):
        if cmd_fd < 0:
            raise ValueError(f"invalid char device fd {cmd_fd}")
        self.q_id = q_id
        self.cmd_fd = cmd_fd
        self.auto_buf_reg = auto_buf_reg
        # struct ublk_auto_buf_reg in the SQE's addr: index = tag, flags 0; without the
        # feature the field stays 0, as for any uring_cmd
        self.auto_mask = 0xffff if auto_buf_reg else 0

    cdef DataPath make_path(self, Queue q, int kind):
        cdef DataPath dp
        if kind != DP_ZERO_COPY:
            return Channel.make_path(self, q, kind)
        if self.auto_buf_reg:
            dp = NoBufferPath.__new__(NoBufferPath)
        else:
            dp = RegisterPath.__new__(RegisterPath)
        dp.ch = self
        return dp

    cdef void prep_cmd(self, io_uring_sqe *sqe, uint32_t nr, int tag, int32_t result,
                       uint64_t addr, uint64_t ud) noexcept nogil:
        cdef ublksrv_io_cmd *c
        pyu_prep_uring_cmd(sqe, 64, self.cmd_fd, io_cmd_op(nr), NULL, 0, ud)
        c = <ublksrv_io_cmd *>pyu_sqe_cmd(sqe)
        c.q_id = self.q_id
        c.tag = tag
        c.result = result
        c.addr = addr
        sqe.addr = tag & self.auto_mask

    cdef void prep_batch_cmd(self, io_uring_sqe *sqe, int slot, uint32_t nr, uint16_t nr_elem,
                             uint8_t elem_bytes, uint16_t flags, uint64_t addr, uint64_t ud) noexcept nogil:
        cdef ublk_batch_io *c
        pyu_prep_uring_cmd(sqe, 64, self.cmd_fd, io_cmd_op(nr), NULL, 0, ud)
        c = <ublk_batch_io *>pyu_sqe_cmd(sqe)
        c.q_id = self.q_id
        c.flags = flags
        c.nr_elem = nr_elem
        c.elem_bytes = elem_bytes
        sqe.addr = addr                  # the elements
        sqe.len = <uint32_t>nr_elem * elem_bytes

    cdef void prep_commit_one(self, io_uring_sqe *sqe, int tag, uint8_t elem_bytes, uint16_t flags,
                              uint64_t addr, uint64_t ud) noexcept nogil:
        # the driver answers the bytes of the elements it took: one element's, or -errno
        # (which io_uring still posts)
        self.prep_batch_cmd(sqe, 0, UBLK_IO_COMMIT_IO_CMDS, 1, elem_bytes, flags, addr, ud)
        sqe.flags = IOSQE_CQE_SKIP_SUCCESS

    cdef void prep_fetch_cmds(self, io_uring_sqe *sqe, Queue q, uint64_t ud) noexcept nogil:
        # multishot, each completion taking a buffer of the queue's group FETCH_BGID
        self.prep_batch_cmd(sqe, 0, UBLK_IO_FETCH_IO_CMDS, <uint16_t>(q.fbuf_size // 2), 2, 0, 0, ud)
        sqe.len = 0
        sqe.rw_flags = PYU_URING_CMD_MULTISHOT
        sqe.buf_index = FETCH_BGID
        sqe.flags = IOSQE_BUFFER_SELECT

    cdef int64_t user_copy(self, int tag, uint8_t *buf, uint32_t nbytes, bint to_request) noexcept nogil:
        cdef uint64_t pos = uc_pos(self.q_id, tag, 0)
        cdef int64_t n
        if to_request:
            n = pwrite(self.cmd_fd, buf, nbytes, pos)
        else:
            n = pread(self.cmd_fd, buf, nbytes, pos)
        return n if n >= 0 else -EIO


cdef class RegisterPath(NoBufferPath):
    """Zero copy on 6.15 (no AUTO_BUF_REG): the request's pages are registered by a
    REGISTER_IO_BUF linked before the target's first SQE, and unregistered before the
    COMMIT (the request completes once both are done)."""

    cdef void buf_cmd(self, Queue q, uint32_t nr, int tag, unsigned sqe_flags) noexcept nogil:
        cdef io_uring_sqe *sqe = q.get_sqe()
        self.ch.prep_cmd(sqe, nr, tag, 0, tag, ud_encode(tag, nr, 0, 0))    # addr: buffer index
        sqe.flags = sqe_flags | IOSQE_CQE_SKIP_SUCCESS

    cdef void register_buf(self, Queue q, int tag) noexcept nogil:
        if not q.tags[tag].registered:
            self.buf_cmd(q, UBLK_IO_REGISTER_IO_BUF, tag, IOSQE_IO_LINK)
            q.tags[tag].registered = 1

    cdef int32_t end(self, Queue q, int tag, const ublksrv_io_desc *iod, int32_t res) noexcept nogil:
        if q.tags[tag].registered:
            self.buf_cmd(q, UBLK_IO_UNREGISTER_IO_BUF, tag, 0)
            q.tags[tag].registered = 0
        return res
