# cython: language_level=3
"""The null target in C: every request completes at once, like kublk's null."""
from pyublk_fast._core.queue cimport NativeTarget, Queue
from pyublk_fast._core.uapi cimport ublksrv_io_desc, UBLK_IO_OP_WRITE, SECTOR_SHIFT


cdef class NullTarget(NativeTarget):
    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef unsigned op = iod.op_flags & 0xff
        q.commit(tag, <int>(iod.nr_sectors << SECTOR_SHIFT) if op <= UBLK_IO_OP_WRITE else 0)
        return 0
