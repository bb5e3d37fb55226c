# cython: language_level=3, cdivision=True
"""The NBD client's data path in C, on each queue's own ring and connection.

Requests become NBD request headers (plus WRITE data) queued on the connection; after
each reaped batch one sendmsg carries everything queued, made by the queue thread itself
while the socket has room; what the socket does not take goes by a sendmsg on the ring
(one send in flight at a time: two sends racing on one stream socket could interleave
their bytes), and a short send is continued from where it stopped. One receive is
always armed: into the connection's staging buffer, taking whatever the server has
sent (many replies in one completion: a WRITE's reply is only its 16-byte header), or,
for the part of a READ's data that did not come with its header, straight into the
request's buffer. A reply's cookie names the tag (and a per-tag generation, so a late
reply for an older request is caught). A request completes when its reply is in and
its bytes are sent.

With structured replies negotiated, a reply is one or more chunks: a READ's data chunks
land at their offset in the request's buffer (in any order), holes are zero-filled,
error chunks fail the request with their errno, and the chunk flagged DONE completes
it (a READ must be covered by then, each byte once: the chunks' byte ranges are kept).

A protocol violation (bad reply magic, a reply for an unknown cookie, a chunk the
protocol forbids), EOF, a socket error, no progress from the server for the backend's
timeout while requests wait, or one request unanswered that long, kills the
connection: one log line, every in-flight request fails with EIO, and so does every
later one. With reconnect (and for all but protocol violations), the queue
instead waits for its connection's SQEs to end, opens a new connection (blocking the
queue thread until it succeeds or the timeout passes) and sends every request still in
flight again.
"""
import logging
import os
import struct
import time

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memmove, memset
from libc.errno cimport errno, EIO, EINTR, EAGAIN, EOPNOTSUPP, EPERM, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ESHUTDOWN

from pyublk_fast._core.liburing cimport *
from pyublk_fast._core.queue cimport NativeTarget, Queue, DP_COPY, DP_USER_COPY
from pyublk_fast._core.uapi cimport *

cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)

cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void *msg_name
        unsigned msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    enum:
        MSG_NOSIGNAL
        MSG_WAITALL
        MSG_DONTWAIT
        SHUT_RDWR
        SOL_SOCKET
        SO_SNDBUF
        SO_SNDBUFFORCE
    int c_shutdown "shutdown"(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *value, unsigned len)
    ssize_t c_sendmsg "sendmsg"(int fd, const msghdr *msg, int flags)

cdef extern from "<liburing.h>" nogil:
    void io_uring_prep_sendmsg(io_uring_sqe *sqe, int fd, const msghdr *msg, unsigned flags)
    void io_uring_prep_recv(io_uring_sqe *sqe, int sockfd, void *buf, size_t len, int flags)

log = logging.getLogger("pyublk_fast.nbd")

cdef int32_t C_RESUBMITTED = -0x7fffffff

cdef enum:
    REQ_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668e33ef
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_FLUSH = 3
    CMD_TRIM = 4
    CMD_WRITE_ZEROES = 6
    CMD_FLAG_FUA = 1
    CMD_FLAG_NO_HOLE = 2
    HDR = 28                   # request header bytes
    REPLY = 16                 # simple reply header bytes
    CHUNK = 20                 # structured reply chunk header bytes
    FLAG_DONE = 1              # the chunk ends its reply
    RT_NONE = 0                # chunk types
    RT_OFFSET_DATA = 1
    RT_OFFSET_HOLE = 2
    RT_ERROR = 0x8001
    RT_ERROR_OFFSET = 0x8002
    RT_ERROR_BIT = 0x8000      # every error chunk type has it (unknown ones too)
    # disjoint byte ranges a READ's content chunks may cover before a chunk joins two of
    # them: in-order (or reverse-order) chunks always make one; only a reply cut into
    # more pieces sent in a scattered order needs more
    NIV = 8
    MAX_IOV = 1024             # iovecs in one sendmsg (the kernel's UIO_MAXIOV)
    # staging for replies: a receive takes all the replies waiting (and small READs' data,
    # copied out) in one completion, where a receive per header and per data would cost
    # a ring round trip each; a larger READ's data beyond it is received in place
    RBUF = 32768
    # tgt_data of the connection's own SQEs (posted under tag 0; they never count as
    # a request's pending operations: queue_io keeps its requests and commits them)
    TD_SEND = 1
    TD_RECV = 2
    TD_TIMER = 3
    TD_CANCEL = 4              # shutdown()'s cancels (their CQEs come after the loop)
    MAX_QUEUES = 4096          # ublk's limit on a device's queues


#: The disconnect request (NBD_CMD_DISC), framed here beside the data path's requests so
#: the request format lives in one place; the backend sends it as it closes.
DISCONNECT = struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 0, 0, 0)

# what the connection died of (the log line's words); from WHY_MAGIC on, protocol
# violations, which a new connection would most likely repeat (no reconnect)
cdef enum:
    WHY_EOF = 1
    WHY_RECV_ERR
    WHY_SEND_ERR
    WHY_TIMEOUT
    WHY_STUCK
    WHY_MAGIC
    WHY_STRUCTURED
    WHY_COOKIE
    WHY_SIMPLE_READ
    WHY_SIMPLE_AFTER
    WHY_TYPE
    WHY_LENGTH
    WHY_CONTENT
    WHY_OUTSIDE
    WHY_OVERLAP
    WHY_PIECES
    WHY_SHORT
    WHY_NONE
    WHY_ERROR_CHUNK

# the log line of each death but EOF and socket errors: a is a cookie, b and x numbers
WHY_TEXT = {
    WHY_TIMEOUT: "no progress from the server for {b:.1f} s",
    WHY_STUCK: "no reply to cookie {a:#x} for {b:.1f} s, while the server answered others",
    WHY_MAGIC: "bad reply magic {a:#x} from the server",
    WHY_STRUCTURED: "the server sent a structured reply, which was not negotiated",
    WHY_COOKIE: "the server replied to unknown cookie {a:#x}",
    WHY_SIMPLE_READ: "the server sent a simple reply to READ cookie {a:#x}, where structured "
                     "replies were negotiated",
    WHY_SIMPLE_AFTER: "the server sent a simple reply to cookie {a:#x} after structured chunks "
                      "for it",
    WHY_TYPE: "the server sent a reply chunk of unexpected type {b} for cookie {a:#x}",
    WHY_LENGTH: "the server sent a reply chunk of type {b} with a bad length {x} for cookie {a:#x}",
    WHY_CONTENT: "the server sent a data or hole chunk (type {b}) in the reply to cookie {a:#x}, "
                 "which is no READ",
    WHY_OUTSIDE: "the server sent a chunk for bytes {b}..{x} (or an error offset there), outside "
                 "the request of cookie {a:#x}",
    WHY_OVERLAP: "the server sent a chunk for bytes {b}..{x} of cookie {a:#x}, overlapping an "
                 "earlier chunk",
    WHY_PIECES: f"the server sent the reply to cookie {{a:#x}} in more than {NIV} separate "
                "pieces out of order (a limit of this client)",
    WHY_SHORT: "the server ended the reply to READ cookie {a:#x} with {b} of its {x} bytes sent",
    WHY_NONE: "the server sent a NONE chunk without the DONE flag or with a payload for cookie "
              "{a:#x}",
    WHY_ERROR_CHUNK: "the server sent a malformed error chunk (type {b}, length {x}) for cookie "
                     "{a:#x}",
}
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
             CMD_WRITE_ZEROES: "WRITE_ZEROES"}


cdef struct Req:
    uint8_t hdr[HDR]           # the request header, big endian, as sent
    uint64_t off               # the request's offset and length, as in hdr
    uint32_t len
    uint32_t dlen              # data bytes sent after the header (WRITE)
    uint32_t rlen              # data bytes the reply carries (READ)
    uint32_t gen               # bumped per request: the cookie's high half
    int32_t result
    int64_t t_sent             # when it was queued (or queued again on a new connection)
    uint32_t covered           # bytes of a READ its content chunks covered so far
    uint32_t ivs[NIV]          # ... as disjoint ranges [ivs, ive), sorted
    uint32_t ive[NIV]
    uint8_t niv
    uint8_t cmd
    uint8_t chunked            # a structured chunk for it came (no simple reply may follow)
    uint8_t active             # taken by queue_io, not yet committed
    uint8_t in_send            # part of the sendmsg in flight (its bytes may be read)
    uint8_t sent
    uint8_t replied


cdef struct Conn:
    int fd
    int depth
    bint dead
    bint reconnecting          # dead, but its requests wait for a new connection
    Req *reqs
    uint16_t *sendq            # tags whose bytes are (partly) unsent, oldest first (a ring)
    int sq_head
    int sq_len
    uint32_t head_off          # bytes of the oldest one already sent
    int nsend                  # tags the sendmsg in flight covers (0: none in flight)
    int max_iov
    iovec *iov
    msghdr msg
    bint structured            # structured replies negotiated
    uint8_t *rbuf              # RBUF bytes of staging: [rhead, rtail) received, not parsed
    uint32_t rhead
    uint32_t rtail
    int rtag                   # -1: a reply header comes next; else the READ whose data comes,
    uint32_t rpos              # rleft bytes to its buffer at rpos,
    uint32_t rleft
    bint rdone                 # ending its reply
    bint recv_armed
    bint timer_armed
    __kernel_timespec ts
    int64_t last_progress      # last time the server took or gave bytes (or the first wait)
    int inflight


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)

cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)

cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)

cdef inline uint16_t get16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)

cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)

cdef inline uint64_t get64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef int32_t nbd_errno(uint32_t err) noexcept nogil:
    """The protocol's error values are Linux's errnos for the ones it defines; anything
    else is EINVAL, as the protocol asks of a client."""
    if err in (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, EOPNOTSUPP, ESHUTDOWN):
        return -<int32_t>err
    return -EINVAL


cdef inline void reset_reply(Req *r, int64_t now) noexcept nogil:
    """No byte of the request sent, nothing of its reply in (it is sent, or sent again)."""
    r.result = r.dlen + r.rlen        # what a READ or WRITE returns; 0 for the rest
    r.t_sent = now
    r.covered = 0
    r.niv = 0
    r.chunked = 0
    r.sent = 0
    r.replied = 0


cdef int cover(Req *r, uint64_t off, uint32_t size) noexcept nogil:
    """A content chunk for size bytes at export offset off: 0, or the WHY of why it cannot
    be (outside the request, overlapping an earlier chunk, too scattered to keep)."""
    cdef uint32_t a, b
    cdef int i, left = -1, right = -1
    if off < r.off or off - r.off > r.rlen or size > r.rlen - (off - r.off):
        return WHY_OUTSIDE
    a = <uint32_t>(off - r.off)
    b = a + size
    for i in range(r.niv):
        if r.ivs[i] < b and r.ive[i] > a:
            return WHY_OVERLAP
        if r.ive[i] == a:
            left = i
        elif r.ivs[i] == b:
            right = i
    if left >= 0 and right >= 0:          # it fills the gap between two ranges
        r.ive[left] = r.ive[right]
        memmove(&r.ivs[right], &r.ivs[right + 1], (r.niv - right - 1) * sizeof(uint32_t))
        memmove(&r.ive[right], &r.ive[right + 1], (r.niv - right - 1) * sizeof(uint32_t))
        r.niv -= 1
    elif left >= 0:
        r.ive[left] = b
    elif right >= 0:
        r.ivs[right] = a
    else:
        if r.niv == NIV:
            return WHY_PIECES
        i = r.niv
        while i > 0 and r.ivs[i - 1] > a:
            r.ivs[i] = r.ivs[i - 1]
            r.ive[i] = r.ive[i - 1]
            i -= 1
        r.ivs[i] = a
        r.ive[i] = b
        r.niv += 1
    r.covered += size
    return 0


cdef void free_conn(Conn *c) noexcept nogil:
    if c != NULL:
        free(c.reqs)
        free(c.sendq)
        free(c.iov)
        free(c.rbuf)
        free(c)


cdef void size_sndbuf(int fd, int depth, uint32_t buf_size, int most) noexcept nogil:
    """Give the socket room for every request's bytes the queue may have in flight (up
    to most): the queue thread's own sendmsg then takes a whole batch of WRITEs. With
    the default (about 200 KiB) a batch of large WRITEs overflowed it, and the rest went
    by a ring send that crept along as the server made room, a completion and a wake-up
    of the queue thread each time, while the server waited for the next batch. Root may
    go past the system's cap (SNDBUFFORCE); others get what the cap allows."""
    cdef int64_t want = <int64_t>depth * (HDR + buf_size)
    cdef int n = <int>(want if want < most else most)
    if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &n, sizeof(n)) != 0:
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof(n))


cdef int ERR_LINES_PER_S = 10    # server error lines logged a second, at most


cdef class NbdTarget(NativeTarget):
    cdef object backend
    cdef Conn **conns            # by queue id; each queue thread touches only its own
    cdef bint fua
    cdef bint reconnect
    cdef bint structured
    cdef uint32_t max_block
    cdef int send_buffer
    cdef int64_t timeout_ns
    cdef int64_t tick_ns
    cdef double err_window       # server errors logged: this second's start (monotonic),
    cdef int err_lines           # lines in it, and errors left out since the last line
    cdef int err_quiet

    def __cinit__(self):
        self.conns = <Conn **>calloc(MAX_QUEUES, sizeof(Conn *))
        if self.conns == NULL:
            raise MemoryError()

    def __init__(self, backend):
        self.backend = backend
        self.fua = backend.can_fua
        self.reconnect = backend.reconnect
        self.structured = backend.structured
        self.max_block = backend.max_block
        self.send_buffer = backend.send_buffer
        self.timeout_ns = <int64_t>(backend.timeout * 1e9)
        # check for a stalled server a few times per timeout (at most once a second)
        self.tick_ns = min(max(self.timeout_ns // 4, 10000000), 1000000000)

    def __dealloc__(self):
        cdef int i
        if self.conns != NULL:
            for i in range(MAX_QUEUES):
                free_conn(self.conns[i])
            free(self.conns)

    cdef int setup(self, Queue q) except -1:
        cdef Conn *c
        if q.data_path != DP_COPY and q.data_path != DP_USER_COPY:
            raise ValueError("the nbd target serves the buffered data paths only "
                             "(copy, need_get_data, user_copy)")
        if q.buf_size > self.max_block:
            raise ValueError(f"requests of up to {q.buf_size} bytes, but the NBD server takes "
                             f"at most {self.max_block}: lower max_io_bytes")
        if q.q_id >= MAX_QUEUES:
            raise ValueError(f"queue {q.q_id}: at most {MAX_QUEUES} queues")
        if q.threads > 1:       # its connection state is the queue's, not a thread's
            raise ValueError("the nbd target serves each queue from one thread: use more "
                             "queues rather than threads_per_queue")
        fd = self.backend.queue_socket(q.q_id)
        free_conn(self.conns[q.q_id])   # a queue set up again (recovery): its old ring is gone
        self.conns[q.q_id] = NULL
        c = <Conn *>calloc(1, sizeof(Conn))
        if c == NULL:
            raise MemoryError()
        c.depth = q.depth
        c.max_iov = min(2 * q.depth, MAX_IOV)
        c.reqs = <Req *>calloc(q.depth, sizeof(Req))
        c.sendq = <uint16_t *>calloc(q.depth, sizeof(uint16_t))
        c.iov = <iovec *>calloc(c.max_iov, sizeof(iovec))
        c.rbuf = <uint8_t *>calloc(RBUF, 1)
        if c.reqs == NULL or c.sendq == NULL or c.iov == NULL or c.rbuf == NULL:
            free_conn(c)
            raise MemoryError()
        c.fd = fd
        size_sndbuf(fd, q.depth, q.buf_size, self.send_buffer)
        c.structured = self.structured
        c.rtag = -1
        c.ts.tv_sec = self.tick_ns // 1000000000
        c.ts.tv_nsec = self.tick_ns % 1000000000
        self.conns[q.q_id] = c
        self.arm_recv(q, c)
        return 0

    # -- requests -----------------------------------------------------------------------

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef Conn *c = self.conns[q.q_id]
        cdef Req *r = &c.reqs[tag]
        cdef unsigned op = iod.op_flags & 0xff
        cdef uint32_t n = iod.nr_sectors << SECTOR_SHIFT
        cdef uint16_t cmd, flags = 0
        if c.dead and not c.reconnecting:
            q.commit(tag, -EIO)
            return 0
        if op == UBLK_IO_OP_READ:
            cmd = CMD_READ
        elif op == UBLK_IO_OP_WRITE:
            cmd = CMD_WRITE
        elif op == UBLK_IO_OP_FLUSH:
            cmd = CMD_FLUSH
        elif op == UBLK_IO_OP_DISCARD:
            cmd = CMD_TRIM
        elif op == UBLK_IO_OP_WRITE_ZEROES:
            cmd = CMD_WRITE_ZEROES
            if iod.op_flags & UBLK_IO_F_NOUNMAP:
                flags |= CMD_FLAG_NO_HOLE
        else:
            q.commit(tag, -EOPNOTSUPP)
            return 0
        if self.fua and iod.op_flags & UBLK_IO_F_FUA and cmd != CMD_READ and cmd != CMD_FLUSH:
            flags |= CMD_FLAG_FUA
        r.gen += 1
        r.cmd = cmd
        r.off = 0 if cmd == CMD_FLUSH else iod.start_sector << SECTOR_SHIFT
        r.len = 0 if cmd == CMD_FLUSH else n
        put32(r.hdr, REQ_MAGIC)
        put16(r.hdr + 4, flags)
        put16(r.hdr + 6, cmd)
        put64(r.hdr + 8, self.cookie(r, tag))
        put64(r.hdr + 16, r.off)
        put32(r.hdr + 24, r.len)
        r.dlen = n if cmd == CMD_WRITE else 0
        r.rlen = n if cmd == CMD_READ else 0
        r.active = 1
        r.in_send = 0
        reset_reply(r, q.now_ns)
        c.sendq[(c.sq_head + c.sq_len) % c.depth] = <uint16_t>tag
        c.sq_len += 1
        c.inflight += 1
        if c.inflight == 1:
            c.last_progress = q.now_ns    # the wait for the server starts now
        return 0

    cdef void finish(self, Queue q, Conn *c, int tag, int32_t res) noexcept nogil:
        c.reqs[tag].active = 0
        c.inflight -= 1
        q.commit(tag, res)

    cdef void batch_end(self, Queue q) noexcept nogil:
        cdef Conn *c = self.conns[q.q_id]
        cdef io_uring_sqe *sqe
        if c == NULL or c.dead:
            return
        self.flush_send(q, c)
        if c.inflight and self.timeout_ns and not c.timer_armed:
            sqe = q.get_sqe()
            io_uring_prep_timeout(sqe, &c.ts, 0, 0)
            sqe.user_data = q.target_ud(0, TD_TIMER)
            c.timer_armed = True

    # -- sending ------------------------------------------------------------------------

    cdef void flush_send(self, Queue q, Conn *c) noexcept nogil:
        """Send what is queued unless a send is in flight: straight from this thread
        while the socket takes it all (no SQE, no completion, no extra turn of the
        queue's loop), and what it does not take by one sendmsg on the ring."""
        cdef ssize_t res
        cdef size_t total
        cdef io_uring_sqe *sqe
        while c.nsend == 0 and c.sq_len and not c.dead:
            total = self.build_msg(q, c)
            res = c_sendmsg(c.fd, &c.msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            if res < 0:
                res = -errno
                if res == -EINTR or res == -EAGAIN:
                    res = 0
            self.end_send(c)
            if res < 0:
                self.conn_fail(q, c, WHY_SEND_ERR, -res)
                return
            self.sent_bytes(q, c, <uint32_t>res)
            if <size_t>res < total:     # the socket's buffer is full: the rest waits on the ring
                self.build_msg(q, c)
                # MSG_WAITALL: io_uring itself continues a send the socket's buffer cut
                # short, where a short completion would cost a ring round trip per buffer-full
                sqe = q.get_sqe()
                io_uring_prep_sendmsg(sqe, c.fd, &c.msg, MSG_NOSIGNAL | MSG_WAITALL)
                sqe.user_data = q.target_ud(0, TD_SEND)
                return

    cdef size_t build_msg(self, Queue q, Conn *c) noexcept nogil:
        """c.msg for the queued bytes (as many requests as the iovecs take): their count."""
        cdef int i = 0, tag, k = 0
        cdef uint32_t off = c.head_off
        cdef size_t total = 0
        cdef Req *r
        while i < c.sq_len and k + 2 <= c.max_iov:
            tag = c.sendq[(c.sq_head + i) % c.depth]
            r = &c.reqs[tag]
            if off < HDR:
                c.iov[k].iov_base = r.hdr + off
                c.iov[k].iov_len = HDR - off
                total += HDR - off
                k += 1
                off = 0
            else:
                off -= HDR
            if r.dlen:
                c.iov[k].iov_base = q.tag_buf(tag) + off
                c.iov[k].iov_len = r.dlen - off
                total += r.dlen - off
                k += 1
            off = 0
            r.in_send = 1
            i += 1
        c.nsend = i
        c.msg.msg_iov = c.iov
        c.msg.msg_iovlen = k
        return total

    cdef void end_send(self, Conn *c) noexcept nogil:
        """No send uses the requests' bytes any more."""
        cdef int i
        for i in range(c.nsend):
            c.reqs[c.sendq[(c.sq_head + i) % c.depth]].in_send = 0
        c.nsend = 0

    cdef void sent_bytes(self, Queue q, Conn *c, uint32_t res) noexcept nogil:
        """res more bytes of the queue went out: the requests they end are sent (and
        complete if their reply is in)."""
        cdef int tag
        cdef uint32_t left
        cdef Req *r
        if res > 0 and q.now_ns > c.last_progress:     # a reconnect set it later than the turn
            c.last_progress = q.now_ns
        while res > 0 and c.sq_len:
            tag = c.sendq[c.sq_head]
            r = &c.reqs[tag]
            left = HDR + r.dlen - c.head_off
            if res < left:
                c.head_off += res
                break
            res -= left
            c.head_off = 0
            c.sq_head = (c.sq_head + 1) % c.depth
            c.sq_len -= 1
            r.sent = 1
            if r.replied:
                self.finish(q, c, tag, r.result)

    cdef void send_done(self, Queue q, Conn *c, int32_t res) noexcept nogil:
        self.end_send(c)
        if c.dead:
            self.after_death(q, c)
        elif res < 0 and res != -EINTR and res != -EAGAIN:
            self.conn_fail(q, c, WHY_SEND_ERR, -res)
        else:
            self.sent_bytes(q, c, <uint32_t>res if res > 0 else 0)
            self.flush_send(q, c)

    # -- receiving ----------------------------------------------------------------------

    cdef void arm_recv(self, Queue q, Conn *c) noexcept nogil:
        cdef io_uring_sqe *sqe
        if c.dead or c.recv_armed:
            return
        sqe = q.get_sqe()
        if c.rtag >= 0:        # the staging buffer is empty: the rest of the data in place
            io_uring_prep_recv(sqe, c.fd, q.tag_buf(c.rtag) + c.rpos, c.rleft, MSG_WAITALL)
        else:
            if c.rhead:        # a partial header moves to the front
                memmove(c.rbuf, c.rbuf + c.rhead, c.rtail - c.rhead)
                c.rtail -= c.rhead
                c.rhead = 0
            io_uring_prep_recv(sqe, c.fd, c.rbuf + c.rtail, RBUF - c.rtail, 0)
        sqe.user_data = q.target_ud(0, TD_RECV)
        c.recv_armed = True

    cdef void replied(self, Queue q, Conn *c, int tag) noexcept nogil:
        cdef Req *r = &c.reqs[tag]
        r.replied = 1
        if r.sent:
            self.finish(q, c, tag, r.result)

    cdef bint reply_done(self, Queue q, Conn *c, int tag) noexcept nogil:
        """The last chunk of tag's structured reply is in: False if its READ was left
        short (the connection died of it)."""
        cdef Req *r = &c.reqs[tag]
        if r.result >= 0 and r.covered != r.rlen:
            self.conn_fail(q, c, WHY_SHORT, self.cookie(r, tag), r.covered, r.rlen)
            return False
        self.replied(q, c, tag)
        return True

    cdef void expect_data(self, Conn *c, int tag, uint32_t pos, uint32_t n, bint done) noexcept nogil:
        c.rtag = tag
        c.rpos = pos
        c.rleft = n
        c.rdone = done

    cdef bint data_in(self, Queue q, Conn *c, uint32_t n) noexcept nogil:
        """n more bytes of the data rtag awaits are in its buffer; False if the
        connection died of the reply they end."""
        cdef int tag = c.rtag
        c.rpos += n
        c.rleft -= n
        if c.rleft:
            return True
        c.rtag = -1
        if not c.rdone:
            return True
        if c.structured:
            return self.reply_done(q, c, tag)
        self.replied(q, c, tag)
        return True

    cdef void recv_done(self, Queue q, Conn *c, int32_t res) noexcept nogil:
        c.recv_armed = False
        if c.dead:
            c.rtag = -1       # its buffer is free again
            self.after_death(q, c)
            return
        if res == -EINTR or res == -EAGAIN:
            self.arm_recv(q, c)
            return
        if res < 0:
            self.conn_fail(q, c, WHY_RECV_ERR, -res)
            return
        if res == 0:
            self.conn_fail(q, c, WHY_EOF, 1 if c.rtag >= 0 else c.rtail - c.rhead)
            return
        c.last_progress = q.now_ns
        if c.rtag >= 0:                       # data, received in place
            if not self.data_in(q, c, res):
                return
        else:
            c.rtail += res
        if self.parse_replies(q, c):
            self.arm_recv(q, c)

    cdef inline uint64_t cookie(self, Req *r, int tag) noexcept nogil:
        return (<uint64_t>r.gen << 32) | <uint32_t>tag

    cdef int lookup(self, Queue q, Conn *c, uint64_t cookie) noexcept nogil:
        """The tag a reply's cookie names, or -1 (the connection died of it)."""
        cdef uint32_t tag = <uint32_t>cookie
        if (tag >= <uint32_t>c.depth or not c.reqs[tag].active or c.reqs[tag].replied
                or c.reqs[tag].gen != <uint32_t>(cookie >> 32)):
            self.conn_fail(q, c, WHY_COOKIE, <int64_t>cookie)
            return -1
        return tag

    cdef void failed(self, Queue q, Conn *c, int tag, uint32_t err, const uint8_t *msg,
                     uint16_t mlen) noexcept nogil:
        """The server failed tag's request with NBD error err (and a message): the first
        error is its result, and is logged."""
        cdef Req *r = &c.reqs[tag]
        if r.result < 0:
            return
        r.result = nbd_errno(err)
        with gil:
            # a server failing everything must not flood the log
            now = time.monotonic()
            if now - self.err_window >= 1.0:
                self.err_window, self.err_lines = now, 0
            if self.err_lines >= ERR_LINES_PER_S:
                self.err_quiet += 1
                return
            self.err_lines += 1
            text = msg[:mlen].decode(errors="replace") if mlen else ""
            more = f" ({self.err_quiet} more server errors not logged)" if self.err_quiet else ""
            self.err_quiet = 0
            odd = f" (error value {err}, which NBD does not define)" if r.result != -<int32_t>err else ""
            log.error("nbd %s, queue %d: the server failed %s of %d bytes at %d: %s%s%s%s",
                      self.backend.uri, q.q_id, CMD_NAMES.get(r.cmd, r.cmd), r.len, r.off,
                      os.strerror(-r.result), odd, f" ({text})" if text else "", more)

    cdef bint parse_replies(self, Queue q, Conn *c) noexcept nogil:
        """Take every whole reply (or chunk) header staged, and the data it brings; False
        if the connection died of what it found."""
        cdef uint32_t magic, n
        cdef int64_t need
        cdef const uint8_t *p
        while True:
            n = c.rtail - c.rhead
            if c.rtag >= 0:                   # data: what is staged is copied
                if n > c.rleft:
                    n = c.rleft
                if n == 0:
                    return True               # the rest is received in place
                memcpy(q.tag_buf(c.rtag) + c.rpos, c.rbuf + c.rhead, n)
                c.rhead += n
                if not self.data_in(q, c, n):
                    return False
                continue
            if n < 4:
                return True
            p = c.rbuf + c.rhead
            magic = get32(p)
            if magic == SIMPLE_REPLY_MAGIC:
                if n < REPLY:
                    return True
                if not self.simple_reply(q, c, p):
                    return False
            elif magic == STRUCTURED_REPLY_MAGIC and c.structured:
                if n < CHUNK:
                    return True
                need = self.chunk_size(q, c, p)
                if need < 0:
                    return False
                if n < need:
                    return True
                if not self.chunk(q, c, p):
                    return False
            else:
                self.conn_fail(q, c, WHY_STRUCTURED if magic == STRUCTURED_REPLY_MAGIC else WHY_MAGIC,
                               magic)
                return False

    cdef bint simple_reply(self, Queue q, Conn *c, const uint8_t *p) noexcept nogil:
        cdef uint32_t err = get32(p + 4)
        cdef uint64_t cookie = get64(p + 8)
        cdef int tag = self.lookup(q, c, cookie)
        cdef Req *r
        if tag < 0:
            return False
        r = &c.reqs[tag]
        if c.structured and (r.cmd == CMD_READ or r.chunked):
            # only a reply without payload may be simple, and only as the whole reply
            self.conn_fail(q, c, WHY_SIMPLE_READ if r.cmd == CMD_READ else WHY_SIMPLE_AFTER, cookie)
            return False
        c.rhead += REPLY
        if err:
            self.failed(q, c, tag, err, NULL, 0)
        elif r.rlen:
            self.expect_data(c, tag, 0, r.rlen, True)
            return True
        self.replied(q, c, tag)
        return True

    cdef int64_t chunk_size(self, Queue q, Conn *c, const uint8_t *p) noexcept nogil:
        """The staged bytes a chunk needs (its header, and its payload but a data chunk's
        data), or -1 if its header alone is a protocol violation (the connection died)."""
        cdef uint16_t rtype = get16(p + 6)
        cdef uint32_t length = get32(p + 16)
        cdef int why = 0
        if rtype == RT_OFFSET_DATA:
            if length < 9:
                why = WHY_LENGTH
            else:
                return CHUNK + 8
        elif rtype == RT_OFFSET_HOLE:
            why = WHY_LENGTH if length != 12 else 0
        elif rtype == RT_NONE:
            why = WHY_NONE if length != 0 or not get16(p + 4) & FLAG_DONE else 0
        elif rtype & RT_ERROR_BIT:
            # an error message is at most 4 KiB: a payload the staging buffer cannot take is
            # no error chunk a server sends
            why = WHY_ERROR_CHUNK if length < 6 or length > RBUF - CHUNK else 0
        else:
            why = WHY_TYPE
        if why:
            self.conn_fail(q, c, why, get64(p + 8), rtype, length)
            return -1
        return CHUNK + length

    cdef bint chunk(self, Queue q, Conn *c, const uint8_t *p) noexcept nogil:
        """A structured reply chunk whose fixed part is staged at p (chunk_size passed)."""
        cdef bint done = get16(p + 4) & FLAG_DONE
        cdef uint16_t rtype = get16(p + 6)
        cdef uint64_t cookie = get64(p + 8), off
        cdef uint32_t length = get32(p + 16), size, err
        cdef uint16_t mlen, fixed
        cdef const uint8_t *pl = p + CHUNK
        cdef int why, tag = self.lookup(q, c, cookie)
        cdef Req *r
        if tag < 0:
            return False
        r = &c.reqs[tag]
        r.chunked = 1
        if rtype == RT_OFFSET_DATA or rtype == RT_OFFSET_HOLE:
            off = get64(pl)
            size = length - 8 if rtype == RT_OFFSET_DATA else get32(pl + 8)
            why = WHY_CONTENT if r.cmd != CMD_READ else (WHY_LENGTH if size == 0 else cover(r, off, size))
            if why:
                self.conn_fail(q, c, why, cookie, off if why != WHY_CONTENT else rtype,
                               off + size if why != WHY_CONTENT else length)
                return False
            if rtype == RT_OFFSET_DATA:
                c.rhead += CHUNK + 8
                self.expect_data(c, tag, <uint32_t>(off - r.off), size, done)
                return True
            memset(q.tag_buf(tag) + (off - r.off), 0, size)
        elif rtype & RT_ERROR_BIT:
            err = get32(pl)
            mlen = get16(pl + 4)
            fixed = 14 if rtype == RT_ERROR_OFFSET else 6
            if length < fixed or mlen > length - fixed or (err == 0 and (rtype == RT_ERROR or
                                                                         rtype == RT_ERROR_OFFSET)):
                self.conn_fail(q, c, WHY_ERROR_CHUNK, cookie, rtype, length)
                return False
            if rtype == RT_ERROR_OFFSET and r.cmd != CMD_FLUSH:   # a FLUSH has no bytes to point at
                off = get64(pl + 6 + mlen)
                if off < r.off or off - r.off >= r.len:
                    self.conn_fail(q, c, WHY_OUTSIDE, cookie, off, off)
                    return False
            self.failed(q, c, tag, err, pl + 6, mlen)
        c.rhead += CHUNK + length
        return self.reply_done(q, c, tag) if done else True

    # -- the connection's end -----------------------------------------------------------

    cdef void conn_fail(self, Queue q, Conn *c, int why, int64_t a, int64_t b=0,
                        int64_t x=0) noexcept nogil:
        """The connection is unusable: say why once (WHY_TEXT with a, b, x), stop it, fail
        what waits on it (or, with reconnect, keep it for the next connection)."""
        c.dead = True
        c.reconnecting = self.reconnect and why < WHY_MAGIC
        c_shutdown(c.fd, SHUT_RDWR)         # the armed receive (and a send) complete at once
        with gil:
            if why == WHY_EOF:
                what = ("the server closed the connection" +
                        (" in the middle of a reply's data" if c.rtag >= 0 else
                         f" in the middle of a reply ({a} bytes in)" if a else ""))
            elif why == WHY_RECV_ERR or why == WHY_SEND_ERR:
                what = (f"{'receiving from' if why == WHY_RECV_ERR else 'sending to'} the server "
                        f"failed: {os.strerror(a)}")
            elif why == WHY_TIMEOUT or why == WHY_STUCK:
                what = WHY_TEXT[why].format(a=<uint64_t>a, b=b / 1e9)
            else:
                what = WHY_TEXT[why].format(a=<uint64_t>a, b=b, x=x)
            if c.reconnecting:
                log.warning("nbd %s, queue %d: %s; reconnecting (%d requests in flight wait "
                            "for it)", self.backend.uri, q.q_id, what, c.inflight)
            else:
                log.error("nbd %s, queue %d: %s; failing %d in-flight requests and all later "
                          "ones with EIO", self.backend.uri, q.q_id, what, c.inflight)
        self.after_death(q, c)

    cdef void after_death(self, Queue q, Conn *c) noexcept nogil:
        """Once no SQE uses the dead connection's buffers any more: reconnect, or fail
        what waits (as far as no SQE still uses it)."""
        if not c.reconnecting:
            self.fail_idle(q, c)
        elif c.nsend == 0 and not c.recv_armed:
            self.reopen(q, c)

    cdef void reopen(self, Queue q, Conn *c) noexcept nogil:
        """A new connection for the requests in flight, which are all sent again."""
        cdef int fd = -1, tag, n = 0
        cdef Req *r
        with gil:
            try:
                fd = self.backend.reconnect_socket(q.q_id)
            except Exception as exc:
                log.error("nbd %s, queue %d: reconnecting failed: %s; failing %d in-flight "
                          "requests and all later ones with EIO", self.backend.uri, q.q_id,
                          exc, c.inflight)
        c.reconnecting = False
        if fd < 0:
            self.fail_idle(q, c)
            return
        c.fd = fd
        size_sndbuf(fd, q.depth, q.buf_size, self.send_buffer)
        c.dead = False
        c.rtag = -1
        c.rhead = 0
        c.rtail = 0
        c.head_off = 0
        c.sq_head = 0
        c.last_progress = pyu_now_ns()   # the reconnect took a while
        for tag in range(c.depth):
            r = &c.reqs[tag]
            if r.active:
                reset_reply(r, c.last_progress)
                c.sendq[n] = <uint16_t>tag
                n += 1
        c.sq_len = n
        with gil:
            log.warning("nbd %s, queue %d: reconnected; sending %d requests again",
                        self.backend.uri, q.q_id, n)
        self.arm_recv(q, c)
        self.flush_send(q, c)

    cdef void fail_idle(self, Queue q, Conn *c) noexcept nogil:
        """Fail the requests of a dead connection whose buffers no SQE uses any more."""
        cdef int tag
        cdef Req *r
        for tag in range(c.depth):
            r = &c.reqs[tag]
            if r.active and not r.in_send and not (c.recv_armed and c.rtag == tag):
                self.finish(q, c, tag, -EIO)
        c.sq_len = c.nsend
        if c.nsend == 0:
            c.head_off = 0

    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        cdef Conn *c = self.conns[q.q_id]
        if tgt_data == TD_SEND:
            self.send_done(q, c, res)
        elif tgt_data == TD_RECV:
            self.recv_done(q, c, res)
        elif tgt_data == TD_TIMER:
            c.timer_armed = False
            if not c.dead and c.inflight and self.timeout_ns:
                self.check_stall(q, c)
        return C_RESUBMITTED

    cdef void check_stall(self, Queue q, Conn *c) noexcept nogil:
        """Requests wait: kill the connection if the server made no progress for the
        timeout, or left one request unanswered that long (a reply it lost, or whose
        DONE chunk never came) while answering others."""
        cdef int tag, oldest = -1
        cdef Req *r
        if q.now_ns - c.last_progress >= self.timeout_ns:
            self.conn_fail(q, c, WHY_TIMEOUT, 0, q.now_ns - c.last_progress)
            return
        for tag in range(c.depth):
            r = &c.reqs[tag]
            if r.active and not r.replied and (oldest < 0 or r.t_sent < c.reqs[oldest].t_sent):
                oldest = tag
        if oldest >= 0 and q.now_ns - c.reqs[oldest].t_sent >= self.timeout_ns:
            r = &c.reqs[oldest]
            self.conn_fail(q, c, WHY_STUCK, self.cookie(r, oldest), q.now_ns - r.t_sent)

    cdef int shutdown(self, Queue q) except -1:
        """Cancel the armed receive and timer; the socket stays up, so that the backend
        can end the session properly (NBD_CMD_DISC) as it closes."""
        cdef Conn *c = self.conns[q.q_id] if q.q_id < MAX_QUEUES else NULL
        cdef io_uring_sqe *sqe
        if c == NULL:
            return 0
        c.dead = True
        for armed, td in ((c.recv_armed, TD_RECV), (c.timer_armed, TD_TIMER)):
            if armed:
                sqe = q.get_sqe()
                io_uring_prep_cancel64(sqe, q.target_ud(0, td), 0)
                sqe.user_data = q.target_ud(0, TD_CANCEL)
        io_uring_submit(q.r)
        return 0
