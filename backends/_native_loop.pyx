# cython: language_level=3, cdivision=True
"""The loop target in C: each request becomes one io_uring read/write/fsync/fallocate
on the backing file, prepared in the queue thread without the GIL. Short reads and
writes are continued, EAGAIN retried, reads past the file's end return zeros."""
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.string cimport memset
from libc.errno cimport EAGAIN, EIO, EOPNOTSUPP

from pyublk_fast._core.liburing cimport *
from pyublk_fast._core.queue cimport NativeTarget, Queue, DP_COPY, DP_USER_COPY, DP_ZERO_COPY, DP_SPLICE
from libc.stdint cimport int64_t, uintptr_t
from pyublk_fast._core.uapi cimport *

cdef extern from "<fcntl.h>" nogil:
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE

cdef extern from "<linux/fs.h>" nogil:
    enum:
        RWF_DSYNC

cdef int32_t C_RESUBMITTED = -0x7fffffff
cdef uint32_t NO_OP_TGT = 0xffffffffU  # tgt_data of the NOP standing in for an unsupported op
cdef uint32_t FUA_SYNC_TGT = 0xfffffffeU  # tgt_data of the fdatasync after a FUA write by splice


cdef class LoopTarget
ctypedef void (*prep_fn)(LoopTarget t, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done) noexcept nogil


cdef inline bint is_read(const ublksrv_io_desc *iod) noexcept nogil:
    return (iod.op_flags & 0xff) == UBLK_IO_OP_READ


cdef inline void fua(io_uring_sqe *sqe, const ublksrv_io_desc *iod) noexcept nogil:
    if iod.op_flags & UBLK_IO_F_FUA and not is_read(iod):
        sqe.rw_flags = RWF_DSYNC


# One way per data path to read/write the rest of a request (from byte `done`); the
# target picks one in setup().

cdef void prep_buffered(LoopTarget t, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done) noexcept nogil:
    """The tag buffer (copy, need_get_data, user_copy)."""
    cdef io_uring_sqe *sqe = q.get_sqe()
    cdef uint32_t n = (iod.nr_sectors << SECTOR_SHIFT) - done
    cdef uint64_t off = (iod.start_sector << SECTOR_SHIFT) + done
    if is_read(iod):
        io_uring_prep_read(sqe, t.fd, q.tag_buf(tag) + done, n, off)
    else:
        io_uring_prep_write(sqe, t.fd, q.tag_buf(tag) + done, n, off)
    fua(sqe, iod)
    sqe.user_data = q.target_ud(tag, done)


cdef void prep_fixed(LoopTarget t, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done) noexcept nogil:
    """Zero copy: the request's own pages, installed in the ring's buffer table at index tag."""
    cdef io_uring_sqe *sqe
    cdef uint32_t n = (iod.nr_sectors << SECTOR_SHIFT) - done
    cdef uint64_t off = (iod.start_sector << SECTOR_SHIFT) + done
    cdef uint8_t *buf = <uint8_t *><uintptr_t>q.zc_addr[tag] + done
    q.register_buf(tag)              # 6.15: a REGISTER_IO_BUF linked before the first SQE
    sqe = q.get_sqe()
    if is_read(iod):
        io_uring_prep_read_fixed(sqe, t.fd, buf, n, off, tag)
    else:
        io_uring_prep_write_fixed(sqe, t.fd, buf, n, off, tag)
    fua(sqe, iod)
    sqe.user_data = q.target_ud(tag, done)


cdef void prep_splice(LoopTarget t, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done) noexcept nogil:
    """Splice zero copy: file -> the tag's pipe (READ; drained into the request in io_done)
    or pipe -> file (WRITE; queue_io filled the pipe). A splice SQE has no RWF_DSYNC:
    FUA is a datasync issued after the data (io_done)."""
    cdef io_uring_sqe *sqe = q.get_sqe()
    cdef uint32_t n = (iod.nr_sectors << SECTOR_SHIFT) - done
    cdef uint64_t off = (iod.start_sector << SECTOR_SHIFT) + done
    if is_read(iod):
        io_uring_prep_splice(sqe, t.fd, off, q.dp.pipe_fd(tag, 1), -1, n, 0)
    else:
        io_uring_prep_splice(sqe, q.dp.pipe_fd(tag, 0), -1, t.fd, off, n, 0)
    sqe.user_data = q.target_ud(tag, done)


cdef class LoopTarget(NativeTarget):
    cdef int fd
    cdef prep_fn prep
    cdef bint splice                   # splice_zc: data crosses a pipe before/after the SQE
    cdef bint zero_fill_eof            # reads past the file's end can fill the tag buffer

    def __init__(self, int fd):
        if fd < 0:
            raise ValueError(f"invalid backing fd {fd}")
        self.fd = fd

    cdef int setup(self, Queue q) except -1:
        self.splice = q.data_path == DP_SPLICE
        self.zero_fill_eof = q.data_path == DP_COPY or q.data_path == DP_USER_COPY
        if q.data_path == DP_ZERO_COPY:
            self.prep = prep_fixed
        elif self.splice:
            self.prep = prep_splice
        else:
            self.prep = prep_buffered
        return 0

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef unsigned op = iod.op_flags & 0xff
        cdef io_uring_sqe *sqe
        cdef uint64_t off = iod.start_sector << SECTOR_SHIFT
        cdef uint64_t n = <uint64_t>iod.nr_sectors << SECTOR_SHIFT
        cdef int64_t moved
        if op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE:
            if self.splice and op == UBLK_IO_OP_WRITE:
                moved = q.dp.splice(q, tag, 0, 1, <uint32_t>n)      # request pages -> pipe, no copy
                if moved != <int64_t>n:
                    q.commit(tag, <int32_t>moved if moved < 0 else -EIO)
                    return 0
            self.prep(self, q, tag, iod, 0)
            return 1
        sqe = q.get_sqe()
        if op == UBLK_IO_OP_FLUSH:
            io_uring_prep_fsync(sqe, self.fd, IORING_FSYNC_DATASYNC)
        elif op == UBLK_IO_OP_DISCARD:
            io_uring_prep_fallocate(sqe, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
        elif op == UBLK_IO_OP_WRITE_ZEROES:
            io_uring_prep_fallocate(sqe, self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, n)
        else:
            io_uring_prep_nop(sqe)
            sqe.user_data = q.target_ud(tag, NO_OP_TGT)
            return 1
        sqe.user_data = q.target_ud(tag, 0)
        return 1

    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        cdef const ublksrv_io_desc *iod = q.iods + tag
        cdef unsigned op = iod.op_flags & 0xff
        cdef uint32_t total = iod.nr_sectors << SECTOR_SHIFT
        cdef uint32_t done
        cdef int64_t moved
        cdef io_uring_sqe *sqe
        if tgt_data == NO_OP_TGT:
            return -EOPNOTSUPP
        if tgt_data == FUA_SYNC_TGT:
            return res if res < 0 else total
        if op == UBLK_IO_OP_WRITE_ZEROES and res == -EOPNOTSUPP and tgt_data == 0:
            # no ZERO_RANGE here (tmpfs): punching a hole reads back as zeros too
            sqe = q.get_sqe()
            io_uring_prep_fallocate(sqe, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                    iod.start_sector << SECTOR_SHIFT,
                                    <uint64_t>iod.nr_sectors << SECTOR_SHIFT)
            sqe.user_data = q.target_ud(tag, 1)
            return C_RESUBMITTED
        if res == -EAGAIN:
            if op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE:
                self.prep(self, q, tag, iod, tgt_data)
                return C_RESUBMITTED
            return -EAGAIN
        if res < 0:
            return res
        if op != UBLK_IO_OP_READ and op != UBLK_IO_OP_WRITE:
            return 0
        if self.splice and op == UBLK_IO_OP_READ and res > 0:
            moved = q.dp.splice(q, tag, tgt_data, 0, <uint32_t>res)  # pipe -> request pages
            if moved != res:
                return <int32_t>moved if moved < 0 else -EIO
        done = tgt_data + <uint32_t>res
        if done >= total:
            if self.splice and op == UBLK_IO_OP_WRITE and iod.op_flags & UBLK_IO_F_FUA:
                sqe = q.get_sqe()
                io_uring_prep_fsync(sqe, self.fd, IORING_FSYNC_DATASYNC)
                sqe.user_data = q.target_ud(tag, FUA_SYNC_TGT)
                return C_RESUBMITTED
            return total
        if res == 0:
            if op == UBLK_IO_OP_READ and self.zero_fill_eof:
                memset(q.tag_buf(tag) + done, 0, total - done)   # past the backing file's end: zeros
                return total
            return -EIO
        self.prep(self, q, tag, iod, done)        # short read/write: continue
        return C_RESUBMITTED
