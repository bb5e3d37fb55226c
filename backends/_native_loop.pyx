# cython: language_level=3, cdivision=True
"""The loop target in C: each request becomes one io_uring read/write/fsync/fallocate
on the backing file, prepared in the queue thread without the GIL. Short reads and
writes are continued, EAGAIN retried, reads past the file's end return zeros."""
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.string cimport memset
from libc.errno cimport EAGAIN, EIO, EOPNOTSUPP

from pyublk_fast._core.liburing cimport *
from pyublk_fast._core.queue cimport NativeTarget, Queue, DP_ZERO_COPY, DP_SPLICE
from libc.stdint cimport int64_t, uintptr_t
from pyublk_fast._core.queue import RESUBMITTED
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


cdef class LoopTarget(NativeTarget):
    cdef int fd

    def __init__(self, int fd):
        if fd < 0:
            raise ValueError(f"invalid backing fd {fd}")
        self.fd = fd

    cdef inline int prep_rw(self, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done) noexcept nogil:
        """Read/write the rest of the request (from byte `done`) by the queue's data path."""
        cdef io_uring_sqe *sqe = q.get_sqe()
        cdef uint32_t total = iod.nr_sectors << SECTOR_SHIFT
        cdef uint64_t off = (iod.start_sector << SECTOR_SHIFT) + done
        cdef uint8_t *buf
        cdef bint is_read = (iod.op_flags & 0xff) == UBLK_IO_OP_READ
        if q.data_path == DP_SPLICE:
            # file -> pipe (READ; the pipe is drained into the request in io_done) or pipe -> file
            if is_read:
                io_uring_prep_splice(sqe, self.fd, off, q.pipes[2 * tag + 1], -1, total - done, 0)
            else:
                io_uring_prep_splice(sqe, q.pipes[2 * tag], -1, self.fd, off, total - done, 0)
        elif q.data_path == DP_ZERO_COPY:
            # the request's own pages, installed in this ring's buffer table at index tag
            buf = <uint8_t *><uintptr_t>q.zc_addr[tag] + done
            if is_read:
                io_uring_prep_read_fixed(sqe, self.fd, buf, total - done, off, tag)
            else:
                io_uring_prep_write_fixed(sqe, self.fd, buf, total - done, off, tag)
        else:
            buf = q.tag_buf(tag) + done
            if is_read:
                io_uring_prep_read(sqe, self.fd, buf, total - done, off)
            else:
                io_uring_prep_write(sqe, self.fd, buf, total - done, off)
        if not is_read and iod.op_flags & UBLK_IO_F_FUA and q.data_path != DP_SPLICE:
            sqe.rw_flags = RWF_DSYNC     # (a splice SQE has splice_flags there: it syncs in io_done)
        sqe.user_data = q.target_ud(tag, done)
        return 1

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef unsigned op = iod.op_flags & 0xff
        cdef io_uring_sqe *sqe
        cdef uint64_t off = iod.start_sector << SECTOR_SHIFT
        cdef uint64_t n = <uint64_t>iod.nr_sectors << SECTOR_SHIFT
        cdef int64_t moved
        if op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE:
            q.zc_register_buf(tag)      # kernel zero copy on 6.15: REGISTER_IO_BUF linked before
            if q.data_path == DP_SPLICE and op == UBLK_IO_OP_WRITE:
                moved = q.splice(tag, 0, 1, <uint32_t>n)      # request pages -> pipe, no copy
                if moved != <int64_t>n:
                    q.commit(tag, <int32_t>moved if moved < 0 else -EIO)
                    return 0
            return self.prep_rw(q, tag, iod, 0)
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
                return C_RESUBMITTED if self.prep_rw(q, tag, iod, tgt_data) else -EIO
            return -EAGAIN
        if res < 0:
            return res
        if op != UBLK_IO_OP_READ and op != UBLK_IO_OP_WRITE:
            return 0
        cdef int64_t moved
        if q.data_path == DP_SPLICE and op == UBLK_IO_OP_READ and res > 0:
            moved = q.splice(tag, tgt_data, 0, <uint32_t>res)  # pipe -> request pages
            if moved != res:
                return <int32_t>moved if moved < 0 else -EIO
        done = tgt_data + <uint32_t>res
        if done >= total:
            if op == UBLK_IO_OP_WRITE and iod.op_flags & UBLK_IO_F_FUA and q.data_path == DP_SPLICE:
                sqe = q.get_sqe()
                io_uring_prep_fsync(sqe, self.fd, IORING_FSYNC_DATASYNC)
                sqe.user_data = q.target_ud(tag, FUA_SYNC_TGT)
                return C_RESUBMITTED
            return total
        if res == 0:
            if op == UBLK_IO_OP_READ and q.data_path != DP_SPLICE and q.data_path != DP_ZERO_COPY:
                memset(q.tag_buf(tag) + done, 0, total - done)   # past the backing file's end: zeros
                return total
            return -EIO
        self.prep_rw(q, tag, iod, done)        # short read/write: continue
        return C_RESUBMITTED
