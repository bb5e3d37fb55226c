# Data-path entry points, called by a server thread on a request it owns (the kernel's
# read_iter/write_iter, REGISTER_IO_BUF and the seed's splice_read on /dev/ublkcN).
# They return bytes (or 0) or -errno like the syscalls.
from libc.stdint cimport int64_t, uint64_t
from pyublk_fast._core.liburing cimport iovec
from .driver cimport SimDev

cdef int64_t sim_user_copy(SimDev *d, uint64_t pos, void *buf, uint64_t length, int to_request) noexcept nogil
cdef int sim_reg_buf(SimDev *d, int q_id, int tag, iovec *iov) noexcept nogil
cdef int64_t sim_splice(SimDev *d, uint64_t pos, int pipe_fd, uint64_t length, unsigned flags) noexcept nogil
