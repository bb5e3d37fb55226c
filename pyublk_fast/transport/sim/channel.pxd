from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from pyublk_fast._core.liburing cimport io_uring_sqe
from pyublk_fast._core.queue cimport Channel
from .driver cimport SimDriver, SimDev
from .wire cimport SimCmd


cdef class SimChannel(Channel):
    cdef SimDriver driver              # kept alive: dev points into it
    cdef SimDev *dev
    cdef SimCmd *cmds                  # this queue's command slots, one per tag
    cdef int driver_fd                 # the driver thread's ring
    cdef uint64_t qi                   # the driver's global index of this queue
    cdef readonly object cmd_slots     # numpy array behind cmds

    cdef void post_batch(self, io_uring_sqe *sqe, int k, uint32_t nr, uint16_t nr_elem, uint8_t elem_bytes,
                         uint16_t flags, uint64_t addr, uint64_t ud, bint skip_success) noexcept nogil
    cdef void post_slot(self, io_uring_sqe *sqe, int slot, uint64_t ud) noexcept nogil
