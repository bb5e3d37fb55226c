# cython: language_level=3, boundscheck=False, wraparound=False
"""The simulated driver's channel: what a kernel's uring_cmd carries goes into a
shared SimCmd slot, and one MSG_RING to the driver thread's ring says "slot ready".

The data paths whose work depends on the driver live here too: zero copy installs
the request's pages (handed over by the driver) at buffer index `tag` of the
queue's ring; splice zero copy (the seed RFC, which only this driver has) moves
them through a pipe per tag.
"""
import errno as _errno

import numpy as np
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t, uintptr_t
from libc.errno cimport EIO
from libc.stdlib cimport calloc, free
from posix.unistd cimport close

from pyublk_fast._core.liburing cimport (iovec, io_uring_sqe, io_uring_prep_msg_ring,
                                         io_uring_register_buffers_update_tag, IOSQE_CQE_SKIP_SUCCESS)
from pyublk_fast._core.queue cimport (Channel, DataPath, NoBufferPath, Queue, DP_ZERO_COPY, DP_SPLICE,
                                      BATCH_SLOTS, FETCH_SLOT)
from pyublk_fast._core.uapi cimport *
from pyublk_fast._core.codec cimport uc_pos, sp_pos
from pyublk_fast import uapi
from .driver cimport SimDriver, SimDev
from .chardev cimport sim_user_copy, sim_reg_buf, sim_splice
from .wire cimport SimCmd, sim_msg, SIM_MSG_SERVER

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_SETPIPE_SZ
        O_CLOEXEC
    int fcntl(int fd, int cmd, ...)
cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)

cdef unsigned SPLICE_F_DIRECT = uapi.SPLICE_F_DIRECT
cdef unsigned SPLICE_F_READ_TO_READ = uapi.SPLICE_F_READ_TO_READ


cdef class SimChannel(Channel):
    """Queue q_id of device dev_id on driver (made by SimTransport.queue_endpoint)."""

    def __init__(self, SimDriver driver not None, int dev_id, int q_id, int qi, cmd_slots):
        if not 0 <= dev_id < driver.max_devs or not driver.devs[dev_id].present:
            raise OSError(_errno.ENODEV, f"simulated driver: no device {dev_id}")
        arr = np.asarray(cmd_slots)
        if arr.nbytes < (driver.devs[dev_id].depth + BATCH_SLOTS) * sizeof(SimCmd):
            raise ValueError("simulator command slots smaller than the device's depth")
        self.driver = driver
        self.dev = &driver.devs[dev_id]
        self.q_id = q_id
        self.qi = qi
        self.driver_fd = driver.ring_fd
        self.cmd_slots = arr
        self.cmds = <SimCmd *><uintptr_t>arr.__array_interface__["data"][0]

    @property
    def driver_ring_fd(self) -> int:
        return self.driver_fd

    @property
    def queue_index(self) -> int:
        return self.qi

    def server_message(self, int tag) -> int:
        """The MSG_RING word that tells the driver tag's command slot is filled."""
        return sim_msg(SIM_MSG_SERVER, (self.qi << 16) | tag)

    cdef int leave(self, Queue q) except -1:
        try:
            self.driver.call(self.driver.ring_leaves, self.qi, q.ring_fd)
        except RuntimeError:
            pass                        # the driver stopped: it delivers nothing more
        return 0

    cdef DataPath make_path(self, Queue q, int kind):
        cdef DataPath dp
        if kind == DP_ZERO_COPY:
            dp = SimZeroCopy.__new__(SimZeroCopy)
        elif kind == DP_SPLICE:
            dp = SimSplice.__new__(SimSplice)
        else:
            return Channel.make_path(self, q, kind)
        dp.ch = self
        return dp

    cdef void prep_cmd(self, io_uring_sqe *sqe, uint32_t nr, int tag, int32_t result,
                       uint64_t addr, uint64_t ud) noexcept nogil:
        cdef SimCmd *s = &self.cmds[tag]
        s.cmd_op = io_cmd_op(nr)
        s.result = result
        s.addr = addr
        s.user_data = ud
        s.ring_fd = self.ring_fd
        self.post_slot(sqe, tag, ud)

    cdef void prep_batch_cmd(self, io_uring_sqe *sqe, int slot, uint32_t nr, uint16_t nr_elem,
                             uint8_t elem_bytes, uint16_t flags, uint64_t addr, uint64_t ud) noexcept nogil:
        self.post_batch(sqe, self.dev.depth + slot, nr, nr_elem, elem_bytes, flags, addr, ud, 0)

    cdef void prep_commit_one(self, io_uring_sqe *sqe, int tag, uint8_t elem_bytes, uint16_t flags,
                              uint64_t addr, uint64_t ud) noexcept nogil:
        # in tag's own slot, idle on a batch device: the queue gets no completion telling it
        # when a batch slot would be free again
        self.post_batch(sqe, tag, UBLK_IO_COMMIT_IO_CMDS, 1, elem_bytes, flags, addr, ud, 1)

    cdef void post_batch(self, io_uring_sqe *sqe, int k, uint32_t nr, uint16_t nr_elem, uint8_t elem_bytes,
                         uint16_t flags, uint64_t addr, uint64_t ud, bint skip_success) noexcept nogil:
        cdef SimCmd *s = &self.cmds[k]
        s.cmd_op = io_cmd_op(nr)
        s.result = 0
        s.addr = addr
        s.user_data = ud
        s.ring_fd = self.ring_fd
        s.nr_elem = nr_elem
        s.flags = flags
        s.elem_bytes = elem_bytes
        s.multishot = 0
        s.br_entries = 0
        s.skip_success = skip_success
        self.post_slot(sqe, k, ud)

    cdef void prep_fetch_cmds(self, io_uring_sqe *sqe, Queue q, uint64_t ud) noexcept nogil:
        cdef SimCmd *s = &self.cmds[self.dev.depth + FETCH_SLOT]
        self.prep_batch_cmd(sqe, FETCH_SLOT, UBLK_IO_FETCH_IO_CMDS, <uint16_t>(q.fbuf_size // 2), 2, 0,
                            <uintptr_t>q.br, ud)
        s.multishot = 1
        s.br_entries = <uint16_t>q.br_entries

    cdef void post_slot(self, io_uring_sqe *sqe, int slot, uint64_t ud) noexcept nogil:
        io_uring_prep_msg_ring(sqe, self.driver_fd, 0, sim_msg(SIM_MSG_SERVER, (self.qi << 16) | slot), 0)
        # only a failed hand-off posts a CQE, under the command's own user_data: the
        # queue sees it as a command the driver never accepted
        sqe.flags = IOSQE_CQE_SKIP_SUCCESS
        sqe.user_data = ud

    cdef int64_t user_copy(self, int tag, uint8_t *buf, uint32_t nbytes, bint to_request) noexcept nogil:
        return sim_user_copy(self.dev, uc_pos(self.q_id, tag, 0), buf, nbytes, to_request)


cdef inline bint has_data(const ublksrv_io_desc *iod) noexcept nogil:
    cdef unsigned op = iod.op_flags & 0xff
    return op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE


cdef class SimZeroCopy(NoBufferPath):
    """Zero copy: the driver hands the request's pages over (its REGISTER_IO_BUF) and
    the queue installs them at buffer index tag, removed again before the commit."""

    cdef int32_t begin(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef iovec iov
        cdef int n
        if not has_data(iod):
            return 0
        n = sim_reg_buf((<SimChannel>self.ch).dev, q.q_id, tag, &iov)
        if n == 0:
            n = io_uring_register_buffers_update_tag(q.r, tag, &iov, NULL, 1)
        if n < 0:
            return n
        q.zc_addr[tag] = <uintptr_t>iov.iov_base
        return 0

    cdef int32_t end(self, Queue q, int tag, const ublksrv_io_desc *iod, int32_t res) noexcept nogil:
        cdef iovec empty
        if has_data(iod):
            empty.iov_base = NULL
            empty.iov_len = 0
            io_uring_register_buffers_update_tag(q.r, tag, &empty, NULL, 1)
        return res


cdef class SimSplice(NoBufferPath):
    """The seed RFC's splice zero copy: one pipe per tag between request and file."""
    cdef int *pipes                    # read end 2*tag, write end 2*tag+1
    cdef int npipes

    cdef int setup(self, Queue q) except -1:
        cdef int i
        self.pipes = <int *>calloc(2 * q.depth, sizeof(int))
        if self.pipes == NULL:
            raise MemoryError()
        for i in range(2 * q.depth):
            self.pipes[i] = -1
        self.npipes = 2 * q.depth
        for i in range(q.thread, q.depth, q.threads):      # the tags this thread serves
            if pipe2(&self.pipes[2 * i], O_CLOEXEC) < 0:
                raise OSError(_errno.EMFILE, f"splice_zc: cannot create {q.depth} pipes "
                              "(raise RLIMIT_NOFILE: ulimit -n)")
            if fcntl(self.pipes[2 * i + 1], F_SETPIPE_SZ, <int>q.buf_size) < 0:
                raise OSError(_errno.EPERM, f"splice_zc: cannot size a pipe to {q.buf_size} bytes "
                              "(raise /proc/sys/fs/pipe-max-size or lower max_io_bytes)")
        return 0

    def __dealloc__(self):
        cdef int i
        if self.pipes != NULL:
            for i in range(self.npipes):
                if self.pipes[i] >= 0:
                    close(self.pipes[i])
            free(self.pipes)

    cdef int pipe_fd(self, int tag, bint write_end) noexcept nogil:
        return self.pipes[2 * tag + (1 if write_end else 0)]

    cdef int64_t splice(self, Queue q, int tag, uint32_t offset, bint write_end, uint32_t nbytes) noexcept nogil:
        """Request pages -> this tag's pipe (WRITE, write_end) or pipe -> request (READ)."""
        cdef unsigned flags = SPLICE_F_DIRECT if write_end else SPLICE_F_DIRECT | SPLICE_F_READ_TO_READ
        return sim_splice((<SimChannel>self.ch).dev, sp_pos(q.q_id, tag, offset),
                          self.pipe_fd(tag, write_end), nbytes, flags)
