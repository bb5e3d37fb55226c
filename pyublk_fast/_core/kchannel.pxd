from libc.stdint cimport uint64_t
from .queue cimport Channel


cdef class KernelChannel(Channel):
    cdef int cmd_fd                    # /dev/ublkcN
    cdef bint auto_buf_reg             # the device has UBLK_F_AUTO_BUF_REG
    cdef uint64_t auto_mask            # 0xffff with AUTO_BUF_REG, else 0
