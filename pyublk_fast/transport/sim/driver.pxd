from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from pyublk_fast._core.ring cimport Ring
from pyublk_fast._core.liburing cimport io_uring_buf_ring
from pyublk_fast._core.uapi cimport ublksrv_io_desc
from .wire cimport SimCmd

cdef enum:
    TAG_IDLE = 0
    TAG_READY = 1
    TAG_SERVER = 2
    TAG_GETDATA = 3
    ORIGIN_FRONT = 0              # Req.origin of a front's request; origins 1.. are in the table
    MAX_ORIGINS = 4               # the fronts' 0 and three registered origins

cdef struct Req:                  # one block request (the front's bio)
    uint8_t op
    uint8_t origin                # who issued it: ORIGIN_FRONT or an index in the origin table
    uint16_t dev
    uint32_t flags
    uint64_t offset               # bytes
    uint32_t len
    uint32_t done                 # bytes completed by earlier partial commits
    uint8_t *buf
    int32_t reply_fd              # front ring to post the completion to
    int32_t queue                 # global queue index while queued, -1 otherwise
    int64_t t_start               # when its origin issued it (for the origin's latency figures)

cdef struct SimTag:
    uint8_t state                 # TAG_IDLE / TAG_READY / TAG_SERVER / TAG_GETDATA
    int32_t req
    uint32_t spliced              # running total of spliced bytes (seed RFC check)
    int32_t ring_fd               # captured from the FETCH / COMMIT_AND_FETCH that armed the tag:
    uint64_t ud                   # a later bogus command on the same slot must not change
    uint64_t addr                 # where this request is delivered
    uint8_t shmem                 # the request's data lies in a registered shared buffer

cdef struct SimQueue:
    int dev
    int q_id
    int depth
    ublksrv_io_desc *iods
    SimCmd *cmds
    SimTag *tags
    uint16_t *free_tags
    int nfree
    int32_t *pending              # FIFO of request indices waiting for a tag
    int pend_head
    int pend_count
    int nr_ready                  # tags with a FETCH outstanding or a request at the server
    int32_t daemon_fd             # without PER_IO_DAEMON: the one server ring of the queue
    # BATCH_IO: tags are PREPared once; a request's tag goes to a FIFO, delivered into the
    # buffer ring of the queue's multishot FETCH_IO_CMDS (the simulator keeps one per queue)
    int batch
    uint16_t *evts                # FIFO of dispatched tags not yet delivered
    int evt_head
    int evt_count
    int fetch_armed
    int32_t fetch_fd              # the FETCH's ring and user_data
    uint64_t fetch_ud
    io_uring_buf_ring *br         # its buffer ring (the server's memory)
    uint16_t br_mask
    uint16_t br_head              # the next buffer to take, as the kernel keeps it per group
    int dirty                     # on the driver's list of queues with tags to deliver

cdef struct SimShm:               # one address range of a registered shared buffer (REG_BUF):
    uint64_t start                # the registered range itself, or another mapping of the
    uint64_t end                  # same file pages in this process (what a kernel matches
    uint64_t buf_off              # by physical page); buf_off: where start is in the buffer
    uint16_t index
    uint8_t read_only             # READ_ONLY: the driver never hands a READ over in it

cdef struct SimDev:
    int present
    int state                     # UBLK_S_DEV_*
    int started                   # /dev/ublkbN exists
    int stopped                   # STOP_DEV done: fetches are aborted
    int server_alive
    int nr_queues
    int depth
    int first_q
    uint64_t flags
    uint64_t sectors              # capacity from SET_PARAMS / UPDATE_SIZE (GET_PARAMS' dev_sectors)
    uint64_t size                 # the same in bytes, saturated: requests are checked against it
    uint32_t lbs_shift
    uint32_t max_io_bytes
    uint32_t attrs
    int discard                   # the discard part of the params was set
    uint32_t dma_mask             # the block queue's limits (queue_limits), from the params
    uint32_t max_seg_size
    uint32_t max_segments
    uint32_t max_rq_bytes         # the most one READ/WRITE carries: see _apply_limits
    int inflight
    int openers                   # opens of /dev/ublkbN (fronts) not closed yet
    uint32_t disk_gen             # tells its fronts from those of an earlier device of its id
    SimQueue *qbase               # this device's queues (for the user-copy / splice entry points)
    SimShm *shm                   # registered shared buffers' ranges (UBLK_F_SHMEM_ZC)
    int nshm
    Req *reqs


# Request origins issue block requests from inside the driver thread, as fio does from
# blk-mq's context (the load generator is one; fronts send theirs by MSG_RING instead).
# An origin registers a ctx and two functions with add_origin:
# - tick(drv, ctx), called while the origin is awake, before, during and after each
#   batch of messages: it fills request slots of its own (Req.origin = its index) and
#   passes them to drv.queue_rq; returning False puts it to sleep until wake_origin.
# - done(drv, ctx, ri, res), once for each of its requests, with the result (bytes or -errno).
cdef class SimDriver
ctypedef bint (*origin_tick_fn)(SimDriver drv, void *ctx) noexcept nogil
ctypedef void (*origin_done_fn)(SimDriver drv, void *ctx, int ri, int32_t res) noexcept nogil

cdef struct Origin:
    void *ctx
    origin_tick_fn tick
    origin_done_fn done
    bint awake


cdef inline uint64_t xorshift64s(uint64_t *s) noexcept nogil:
    """xorshift64*: the next pseudo-random number of state s (never 0)."""
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * 0x2545F4914F6CDD1DULL


cdef class SimDriver:
    cdef Ring ring
    cdef int ring_fd
    cdef int *dirty_q              # queues with tags to deliver (BATCH_IO), ndirty of them
    cdef int ndirty
    cdef bint stopping
    cdef int max_devs
    cdef int max_queues
    cdef int nreq
    cdef SimDev *devs
    cdef SimQueue *queues
    cdef Req *reqs
    cdef Origin origins[MAX_ORIGINS]
    cdef int norigins              # table entries in use, from 1 (0 stands for the fronts)
    cdef int nawake                # origins being ticked
    cdef object _origin_owners     # the objects behind the origins' ctx (kept alive)
    cdef object _iod_arrays        # numpy arrays backing descriptor arrays (kept alive)
    cdef object _cmd_arrays
    cdef object _shm_regs          # dev -> {index: (its ranges, read_only)} (REG_BUF)
    cdef object _ctl               # deque of control callables
    cdef object _nudge             # Ring for MSG_RING wake-ups from Python threads
    cdef object _nudge_lock
    cdef object _thread
    cdef object _ready
    cdef uint64_t msg_failures
    cdef uint64_t rng_state
    cdef uint32_t disk_gens        # devices added so far (SimDev.disk_gen)
    cdef bint random_tags
    cdef readonly uint64_t features   # GET_FEATURES: what ADD_DEV can grant
    cdef int64_t spin_ns

    cdef void loop(self) noexcept nogil
    cdef void post(self, int fd, int32_t res, uint64_t user_data) noexcept nogil
    cdef void post_flags(self, int fd, int32_t res, uint64_t user_data, uint32_t cqe_flags) noexcept nogil
    cdef void on_batch(self, SimQueue *q, SimCmd *cmd) noexcept nogil
    cdef int32_t batch_prep(self, SimQueue *q, SimCmd *cmd) noexcept nogil
    cdef int32_t batch_commit(self, SimQueue *q, SimCmd *cmd) noexcept nogil
    cdef void batch_fetch(self, SimQueue *q, SimCmd *cmd) noexcept nogil
    cdef void mark_dirty(self, SimQueue *q) noexcept nogil
    cdef void deliver(self, SimQueue *q) noexcept nogil
    cdef void flush_batches(self) noexcept nogil
    cdef void batch_reset(self, SimQueue *q) noexcept nogil
    cdef bint commit_req(self, SimQueue *q, int tag, int32_t result, uint64_t addr) noexcept nogil
    cdef void arm_tag(self, SimQueue *q, int tag, int32_t ring_fd, uint64_t ud, uint64_t addr) noexcept nogil
    cdef void on_server(self, int qi, int tag) noexcept nogil
    cdef void on_front(self, int ri, int reply_fd) noexcept nogil
    cdef void queue_rq(self, int ri) noexcept nogil
    cdef void dispatch(self, SimQueue *q, int tag, int ri) noexcept nogil
    cdef void complete(self, int ri, int32_t res) noexcept nogil
    cdef void complete_unqueued(self, int ri, int32_t res) noexcept nogil
    cdef void requeue(self, int ri) noexcept nogil
    cdef void server_gone(self, int dev) noexcept nogil
    cdef _run_control(self)
    cdef server_gone_hard(self, int d)
    cdef _init_queue(self, int qi, int d, int q_id, int depth)
    cdef void _set_capacity(self, SimDev *dev, uint64_t sectors) noexcept
    cdef str _params_refused(self, SimDev *dev, uint64_t size, uint32_t lbs_shift, uint32_t max_sectors,
                             limits)
    cdef _apply_limits(self, SimDev *dev, limits)
    cdef SimDev *_dev(self, int d, str what) except NULL
    cdef void fail_inflight(self, SimQueue *q, int32_t res) noexcept nogil
    cdef bint all_fetched(self, SimDev *d) noexcept nogil
    cdef void release_tag(self, SimQueue *q, int tag) noexcept nogil
    cdef void kick_pending(self, SimQueue *q) noexcept nogil
    cdef int take_tag(self, SimQueue *q) noexcept nogil
    cdef void abort_ready(self, SimQueue *q) noexcept nogil
    cdef void fail_pending(self, SimQueue *q, int32_t res) noexcept nogil
    cdef int add_origin(self, object owner, void *ctx, origin_tick_fn tick, origin_done_fn done) except -1
    cdef void wake_origin(self, int origin) noexcept nogil
