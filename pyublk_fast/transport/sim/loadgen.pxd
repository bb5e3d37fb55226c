from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from .driver cimport SimDriver

cdef enum:
    HIST_BUCKETS = 512            # log-linear: 64 powers of two x 8 steps

cdef struct LoadGenState:         # what the driver thread reads and writes during a run
    int origin                    # the driver's Req.origin for our requests
    int active
    int dev
    uint32_t bs
    int read_pct
    int random
    int verify
    uint64_t region
    uint64_t count                # stop after this many (0: duration only)
    int64_t deadline_ns
    uint64_t issued
    uint64_t completed
    uint64_t errors
    uint64_t verify_errors
    uint64_t bytes
    uint64_t seq_off
    uint64_t rng
    uint64_t seed
    int inflight
    int first_req
    int stop
    int *free_slots
    int nfree_slots
    uint8_t *bufs
    uint64_t *hist                # latency histogram, log-linear buckets
    int64_t t0
    int64_t t_end
    void *finished                # the LoadGen's threading.Event, set when a run ends


cdef class LoadGen:
    cdef SimDriver drv
    cdef LoadGenState st
    cdef object _finished
    cdef object _buffer            # the caller's buffer the requests use, or None (bufs is ours)
