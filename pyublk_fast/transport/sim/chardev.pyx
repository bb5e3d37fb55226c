# cython: language_level=3, boundscheck=False, wraparound=False
"""The simulated /dev/ublkcN's data path: what a server does on a request it owns.

USER_COPY's pread/pwrite at the request's position, REGISTER_IO_BUF's hand-over of
the request pages, and the seed RFC's splice_read. They run in the server's thread,
as the syscalls do on a kernel, on the request a tag holds while the server owns it
(from the FETCH's completion to the COMMIT).
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from libc.errno cimport EINVAL, EIO, EPERM, EACCES
from posix.unistd cimport read as c_read
from posix.ioctl cimport ioctl

from pyublk_fast._core.liburing cimport iovec
from pyublk_fast._core.uapi cimport UBLK_IO_OP_READ, UBLK_IO_OP_WRITE
from pyublk_fast._core.codec cimport UC_BASE, uc_qid, uc_tag, uc_off, sp_qid, sp_tag, sp_off
from pyublk_fast import uapi
from .driver cimport SimDriver, SimDev, SimTag, Req, TAG_SERVER

cdef extern from "<sys/uio.h>" nogil:
    ssize_t vmsplice(int fd, const iovec *iov, size_t nr_segs, unsigned int flags)

cdef extern from "<sys/ioctl.h>" nogil:
    enum:
        FIONREAD

cdef uint64_t F_USER_COPY = uapi.UBLK_F_USER_COPY
cdef uint64_t F_ZERO_COPY = uapi.UBLK_F_SUPPORT_ZERO_COPY
cdef uint64_t F_SPLICE_ZC = uapi.SIM_F_SPLICE_ZC
cdef unsigned SPLICE_F_DIRECT = uapi.SPLICE_F_DIRECT
cdef unsigned SPLICE_F_READ_TO_READ = uapi.SPLICE_F_READ_TO_READ


cdef SimTag *_owned_tag(SimDev *d, uint32_t q_id, uint32_t tag) noexcept nogil:
    if not d.present or q_id >= <uint32_t>d.nr_queues or tag >= <uint32_t>d.qbase[q_id].depth:
        return NULL
    cdef SimTag *t = &d.qbase[q_id].tags[tag]
    return t if t.state == TAG_SERVER else NULL


cdef int64_t sim_user_copy(SimDev *d, uint64_t pos, void *buf, uint64_t length, int to_request) noexcept nogil:
    """pread (to_request=0) / pwrite (to_request=1) on /dev/ublkcN at a USER_COPY pos."""
    if not d.flags & F_USER_COPY:
        return -EACCES
    if pos < UC_BASE:
        return -EINVAL
    cdef SimTag *t = _owned_tag(d, uc_qid(pos), uc_tag(pos))
    if t == NULL:
        return -EINVAL
    cdef Req *r = &d.reqs[t.req]
    cdef uint64_t off = uc_off(pos)
    cdef uint64_t remaining = r.len - r.done
    if r.op == UBLK_IO_OP_READ:
        if not to_request:
            return -EACCES
    elif r.op == UBLK_IO_OP_WRITE:
        if to_request:
            return -EACCES
    else:
        return -EINVAL
    if off > remaining:
        return -EINVAL
    if length > remaining - off:
        length = remaining - off
    if to_request:
        memcpy(r.buf + r.done + off, buf, length)
    else:
        memcpy(buf, r.buf + r.done + off, length)
    return <int64_t>length


cdef int sim_reg_buf(SimDev *d, int q_id, int tag, iovec *iov) noexcept nogil:
    """REGISTER_IO_BUF: the request's pages, for the server to install in its buffer table."""
    if not d.flags & F_ZERO_COPY:
        return -EINVAL
    cdef SimTag *t = _owned_tag(d, q_id, tag)
    if t == NULL:
        return -EINVAL
    cdef Req *r = &d.reqs[t.req]
    if r.op != UBLK_IO_OP_READ and r.op != UBLK_IO_OP_WRITE:
        return -EINVAL
    iov.iov_base = r.buf + r.done
    iov.iov_len = r.len - r.done
    return 0


cdef int64_t sim_splice(SimDev *d, uint64_t pos, int pipe_fd, uint64_t length, unsigned flags) noexcept nogil:
    """The seed RFC's ublk_splice_read: move request pages into (WRITE) or out of (READ) a pipe.

    Checks in the RFC's order: SPLICE_F_DIRECT (EPERM); a READ_TO_READ on a drained pipe
    (EINVAL); q_id/tag/feature/started (EINVAL); running total or len 0 (EACCES, counted
    even when a later check fails); no data (EINVAL); past the request (EINVAL);
    READ_TO_READ iff READ (EINVAL).
    """
    cdef int avail = 0
    if not flags & SPLICE_F_DIRECT:
        return -EPERM
    if flags & SPLICE_F_READ_TO_READ:
        if ioctl(pipe_fd, FIONREAD, &avail) < 0 or <uint64_t>avail < length:
            return -EINVAL
    if not d.flags & F_SPLICE_ZC:
        return -EINVAL
    cdef SimTag *t = _owned_tag(d, sp_qid(pos), sp_tag(pos))
    if t == NULL:
        return -EINVAL
    cdef Req *r = &d.reqs[t.req]
    cdef uint64_t remaining = r.len - r.done
    cdef uint64_t off = sp_off(pos)
    t.spliced += <uint32_t>length
    if length == 0 or t.spliced > remaining:
        return -EACCES
    if r.op != UBLK_IO_OP_READ and r.op != UBLK_IO_OP_WRITE:
        return -EINVAL
    if off + length > remaining:
        return -EINVAL
    if (r.op == UBLK_IO_OP_READ) != ((flags & SPLICE_F_READ_TO_READ) != 0):
        return -EINVAL
    cdef iovec iov
    cdef ssize_t n
    cdef uint64_t done = 0
    cdef uint8_t *p = r.buf + r.done + off
    while done < length:
        if r.op == UBLK_IO_OP_WRITE:
            iov.iov_base = p + done
            iov.iov_len = length - done
            n = vmsplice(pipe_fd, &iov, 1, 0)
        else:
            n = c_read(pipe_fd, p + done, length - done)
        if n <= 0:
            return -EIO if done == 0 else <int64_t>done
        done += n
    return <int64_t>done


def splice_probe(SimDriver drv, int d, uint64_t pos, int pipe_fd, uint64_t length, unsigned flags) -> int:
    """Call the simulated splice entry point from Python (protocol tests): bytes or -errno."""
    drv._dev(d, "splice")
    return sim_splice(&drv.devs[d], pos, pipe_fd, length, flags)


def user_copy_probe(SimDriver drv, int d, uint64_t pos, buf, bint to_request) -> int:
    """Call the simulated USER_COPY entry point from Python (protocol tests): bytes or -errno."""
    drv._dev(d, "user copy")
    cdef unsigned char[::1] b = buf
    return sim_user_copy(&drv.devs[d], pos, &b[0], b.shape[0], to_request)
