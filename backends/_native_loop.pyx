# cython: language_level=3, cdivision=True
"""The loop target in C: each request becomes one io_uring read/write/fsync/fallocate
on the backing file, prepared in the queue thread without the GIL. Short reads and
writes are continued, EAGAIN retried, reads past the file's end return zeros."""
from libc.stdint cimport uint32_t, int32_t, uint64_t
from libc.string cimport memset
from libc.errno cimport EAGAIN, EIO, EOPNOTSUPP

from pyublk_fast._core.liburing cimport *
from pyublk_fast._core.queue cimport NativeTarget, Queue, DP_COPY, DP_USER_COPY, DP_SPLICE
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


cdef inline bint is_read(const ublksrv_io_desc *iod) noexcept nogil:
    return (iod.op_flags & 0xff) == UBLK_IO_OP_READ


cdef class LoopTarget(NativeTarget):
    cdef int fd
    cdef bint splice                   # splice_zc: data crosses a pipe before/after the SQE
    cdef bint zero_fill_eof            # reads past the file's end can fill the tag buffer

    def __init__(self, int fd):
        if fd < 0:
            raise ValueError(f"invalid backing fd {fd}")
        self.fd = fd

    cdef int setup(self, Queue q) except -1:
        self.splice = q.data_path == DP_SPLICE
        self.zero_fill_eof = q.data_path == DP_COPY or q.data_path == DP_USER_COPY
        return 0

    cdef int32_t prep(self, Queue q, int tag, const ublksrv_io_desc *iod, uint32_t done,
                      bint first) noexcept nogil:
        """Read/write the rest of the request, from byte `done`, by the queue's data path
        (a splice write moves the request into the pipe first, once: the first time; a
        retry finds the rest still there). A write with FUA is RWF_DSYNC; a splice has
        none (io_done syncs after it)."""
        cdef uint32_t total = iod.nr_sectors << SECTOR_SHIFT
        return q.prep_request_rw(tag, self.fd, is_read(iod), done, total - done,
                                 (iod.start_sector << SECTOR_SHIFT) + done,
                                 RWF_DSYNC if iod.op_flags & UBLK_IO_F_FUA else 0, first,
                                 q.target_ud(tag, done))

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef unsigned op = iod.op_flags & 0xff
        cdef io_uring_sqe *sqe
        cdef uint64_t off = iod.start_sector << SECTOR_SHIFT
        cdef uint64_t n = <uint64_t>iod.nr_sectors << SECTOR_SHIFT
        cdef int32_t err
        if op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE:
            err = self.prep(q, tag, iod, 0, True)
            if err < 0:
                q.commit(tag, err)
                return 0
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
        if res == -EAGAIN and (op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE):
            res = self.prep(q, tag, iod, tgt_data, False)
            return C_RESUBMITTED if res == 0 else res
        if res < 0:
            return res
        if op != UBLK_IO_OP_READ and op != UBLK_IO_OP_WRITE:
            return 0
        res = q.request_rw_done(tag, op == UBLK_IO_OP_READ, tgt_data, res)
        if res < 0:
            return res
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
        res = self.prep(q, tag, iod, done, False)  # short read/write: continue
        return C_RESUBMITTED if res == 0 else res
