from libc.stdint cimport uint16_t, uint32_t, int32_t, uint64_t

cdef extern from "extmap.h" nogil:
    enum:
        PYU_EM_WAYS
        PYU_EM_WRITE
    ctypedef struct pyu_em_entry:
        uint64_t seq
        uint64_t key
        uint64_t off
        int32_t fd
        uint32_t flags
    ctypedef struct pyu_em_row:
        uint64_t served
        uint16_t count[1]
    ctypedef struct pyu_em:
        pyu_em_entry *e
        uint32_t *drain
        uint64_t set_mask
        uint32_t no_writes
    int pyu_em_enter(pyu_em *m, pyu_em_row *row, uint64_t idx, int write, int32_t *fd, uint64_t *off)
    int pyu_em_leave(pyu_em *m, pyu_em_row *row, uint64_t idx)
    void pyu_em_put(pyu_em_entry *e, uint64_t key, int32_t fd, uint64_t off, uint32_t flags)
    void pyu_em_drain(pyu_em *m, uint64_t idx, int delta)
    uint16_t pyu_em_count(const pyu_em *m, const pyu_em_row *row, uint64_t idx)

cdef enum:
    EM_MAX_ROWS = 1024           # queue threads one map serves at once


cdef class MapReader


cdef class ExtentMap:
    cdef pyu_em m
    cdef readonly int extent_bits
    cdef readonly uint64_t capacity
    cdef uint64_t nsets
    cdef pyu_em_row *rows[EM_MAX_ROWS]
    cdef bint used[EM_MAX_ROWS]
    cdef int nrows                 # rows[0:nrows] allocated (used or free for reuse)
    cdef uint32_t clock            # the way an insertion into a full set replaces
    cdef object on_drained

    cdef pyu_em_row *attach(self) except NULL
    cdef void detach(self, pyu_em_row *row)
    cdef pyu_em_entry *find(self, uint64_t index)
    cdef int check(self, uint64_t index) except -1
    cdef void drained(self)


cdef class MapReader:
    cdef ExtentMap map
    cdef pyu_em_row *row
