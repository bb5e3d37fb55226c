# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Queue runner: one ring and one thread per ublk queue.

FETCH every tag, then loop: wait, reap a batch nogil, decode tags, hand each
request to the backend (native: C calls, no GIL; Python: one GIL round per
batch), commit results with COMMIT_AND_FETCH. Which transport (kernel char
device or simulated driver) is fixed at setup; the loop is the same.
"""
import errno as _errno
import logging

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.errno cimport ENODEV, EIO, EINVAL
from posix.unistd cimport pread, pwrite, close

from .liburing cimport *
from .ring cimport Ring, reap_cq
from .uapi cimport *
from .simwire cimport SimCmd, sim_msg, SIM_MSG_SERVER
from .codec cimport ud_encode, ud_tag, ud_op, ud_tgt_data, ud_is_target, uc_pos, sp_pos
from .simwire cimport sim_copy_fn, sim_splice_fn, sim_regbuf_fn

cnp.import_array()
log = logging.getLogger("pyublk_fast.queue")

cdef enum:
    TAG_WAIT = 0          # a FETCH / COMMIT_AND_FETCH is outstanding
    TAG_BUSY = 1          # the request is being served
    TAG_GONE = 2          # the driver aborted this tag's command
    OP_SIM_MSG = 0xfe     # user_data op of the MSG_RING carrying a command to the simulator
    OP_WAKE = 0xfd        # user_data op of a wake-up posted to this ring (stop / die)
    REAP_BATCH = 512

RESUBMITTED = -0x7fffffff
#: The C constants this module was compiled with (uapi.pxd), for tests against pyublk_fast.uapi.
COMPILED_UAPI = dict(
    UBLK_IO_OP_READ=UBLK_IO_OP_READ, UBLK_IO_OP_WRITE=UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH=UBLK_IO_OP_FLUSH,
    UBLK_IO_OP_DISCARD=UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_SAME=UBLK_IO_OP_WRITE_SAME,
    UBLK_IO_OP_WRITE_ZEROES=UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA=UBLK_IO_F_FUA,
    UBLK_IO_F_NOUNMAP=UBLK_IO_F_NOUNMAP, UBLK_IO_RES_OK=UBLK_IO_RES_OK,
    UBLK_IO_RES_NEED_GET_DATA=UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_FETCH_REQ=UBLK_IO_FETCH_REQ,
    UBLK_IO_COMMIT_AND_FETCH_REQ=UBLK_IO_COMMIT_AND_FETCH_REQ, UBLK_IO_NEED_GET_DATA=UBLK_IO_NEED_GET_DATA,
    UBLK_MAX_QUEUE_DEPTH=UBLK_MAX_QUEUE_DEPTH,
    UBLK_U_IO_FETCH_REQ=io_cmd_op(UBLK_IO_FETCH_REQ),
    UBLK_U_IO_COMMIT_AND_FETCH_REQ=io_cmd_op(UBLK_IO_COMMIT_AND_FETCH_REQ),
    UBLK_U_IO_NEED_GET_DATA=io_cmd_op(UBLK_IO_NEED_GET_DATA),
    UBLK_U_IO_REGISTER_IO_BUF=io_cmd_op(UBLK_IO_REGISTER_IO_BUF),
    UBLK_U_IO_UNREGISTER_IO_BUF=io_cmd_op(UBLK_IO_UNREGISTER_IO_BUF),
    sizeof_ublksrv_io_desc=sizeof(ublksrv_io_desc), sizeof_ublksrv_io_cmd=sizeof(ublksrv_io_cmd),
)
DATA_PATHS = {"copy": DP_COPY, "need_get_data": DP_COPY, "user_copy": DP_USER_COPY,
              "zero_copy": DP_ZERO_COPY, "splice_zc": DP_SPLICE}

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_SETPIPE_SZ
        O_CLOEXEC
    int fcntl(int fd, int cmd, ...)
cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)
cdef unsigned SPLICE_F_DIRECT = 0x10
cdef unsigned SPLICE_F_READ_TO_READ = 0x20

cdef int32_t C_RESUBMITTED = -0x7fffffff



cdef class NativeTarget:
    cdef int setup(self, Queue q) except -1:
        return 0

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        q.commit(tag, -EINVAL)
        return 0

    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        return res


cdef class Queue:
    """Serve one queue of a device. Construct in the thread that will run it."""

    def __cinit__(self):
        self.cmd_fd = -1

    def __init__(self, int q_id, int depth, uint32_t buf_size, *, bint sim, int cmd_fd,
                 iods, sim_cmds=None, int sim_qi=0, NativeTarget native=None, py_handler=None,
                 str data_path="copy", sim_ops=None, unsigned ring_flags=0,
                 double poll_us=0.0, bint auto_buf_reg=False, unsigned submit_chunk=4):
        if native is None and py_handler is None:
            raise ValueError("Queue needs a native target or a Python handler")
        if not 1 <= depth <= UBLK_MAX_QUEUE_DEPTH:
            raise ValueError(f"depth={depth} out of range 1..{UBLK_MAX_QUEUE_DEPTH}")
        self.q_id = q_id
        self.depth = depth
        self.buf_size = buf_size
        self.sim = sim
        self.cmd_fd = cmd_fd
        self.sim_qi = sim_qi
        self.spin_ns = <int64_t>(poll_us * 1000)    # poll the CQ this long before sleeping
        if submit_chunk < 1:
            raise ValueError(f"submit_chunk={submit_chunk} must be >= 1")
        self.submit_chunk = submit_chunk
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path={data_path!r}: one of {sorted(DATA_PATHS)}")
        self.data_path = DATA_PATHS[data_path]
        if self.data_path in (DP_ZERO_COPY, DP_SPLICE) and native is None:
            raise ValueError(f"data path {data_path} needs a native (C) backend: a Python backend "
                             "cannot reach request pages it never sees; use copy or user_copy")
        if sim and self.data_path != DP_COPY:
            if sim_ops is None:
                raise ValueError("the simulated driver's data-path entry points are missing")
            ctx, uc, rb, sp = sim_ops
            self.sim_ctx = <void *><uintptr_t>ctx
            self.uc_fn = <sim_copy_fn><uintptr_t>uc
            self.regbuf_fn = <sim_regbuf_fn><uintptr_t>rb
            self.splice_fn = <sim_splice_fn><uintptr_t>sp
        elif self.data_path == DP_SPLICE:
            raise ValueError("splice zero copy (the seed RFC) exists only on the simulated driver; "
                             "on a kernel use zero_copy (6.15+) or user_copy")
        # kernel zero copy: the request's pages are installed at buffer index `tag` of this
        # ring, either by the driver (AUTO_BUF_REG, 6.16+: the index rides in the FETCH/COMMIT
        # SQE's addr) or by a REGISTER_IO_BUF command linked before the backend's first SQE
        # (6.15), removed at COMMIT (UNREGISTER_IO_BUF); backend SQEs use READ/WRITE_FIXED at
        # offset 0 of that buffer
        self.auto_buf_reg = auto_buf_reg and not sim and self.data_path == DP_ZERO_COPY
        self.zc_register = not auto_buf_reg and not sim and self.data_path == DP_ZERO_COPY
        self.native = native
        self.py_handler = py_handler
        iod_arr = np.asarray(iods)
        if iod_arr.nbytes < depth * sizeof(ublksrv_io_desc):
            raise ValueError("descriptor array smaller than depth * 24 bytes")
        self.iods = <const ublksrv_io_desc *><uintptr_t>iod_arr.__array_interface__["data"][0]
        if sim:
            cmd_arr = np.asarray(sim_cmds)
            if cmd_arr.nbytes < depth * sizeof(SimCmd):
                raise ValueError("simulator command slots smaller than depth")
            self.sim_cmds = <SimCmd *><uintptr_t>cmd_arr.__array_interface__["data"][0]
        else:
            cmd_arr = None
        # per-tag buffers, page aligned, untouched pages cost nothing
        raw = np.zeros(<size_t>depth * buf_size + 4096, np.uint8)
        start = (-raw.__array_interface__["data"][0]) % 4096
        bufs = raw[start:start + <size_t>depth * buf_size]
        self.bufs = <uint8_t *><uintptr_t>bufs.__array_interface__["data"][0]
        self.tags = <TagIO *>calloc(depth, sizeof(TagIO))
        self.py_tags = <uint16_t *>calloc(depth, sizeof(uint16_t))
        if self.tags == NULL or self.py_tags == NULL:
            raise MemoryError("Queue: cannot allocate tag state")
        self.py_tag_array = np.zeros(depth, np.uint16)
        self._keep = (iod_arr, cmd_arr, raw, bufs)
        entries = 1
        while entries < 2 * depth:
            entries <<= 1
        self.ring = Ring(max(entries, 64), ring_flags, cq_entries=max(entries, 64) * 2)
        self.r = &self.ring.ring
        if self.data_path == DP_ZERO_COPY:
            self.zc_addr = <uint64_t *>calloc(depth, sizeof(uint64_t))
            self.ring.register_buffers_sparse(depth)
        if self.data_path == DP_SPLICE:
            self._open_pipes()
        if native is not None:
            native.setup(self)

    def _open_pipes(self):
        cdef int i
        self.pipes = <int *>calloc(2 * self.depth, sizeof(int))
        for i in range(2 * self.depth):
            self.pipes[i] = -1
        for i in range(self.depth):
            if pipe2(&self.pipes[2 * i], O_CLOEXEC) < 0:
                raise OSError(_errno.EMFILE, f"splice_zc: cannot create {self.depth} pipes "
                              "(raise RLIMIT_NOFILE: ulimit -n)")
            if fcntl(self.pipes[2 * i + 1], F_SETPIPE_SZ, <int>self.buf_size) < 0:
                raise OSError(_errno.EPERM, f"splice_zc: cannot size a pipe to {self.buf_size} bytes "
                              "(raise /proc/sys/fs/pipe-max-size or lower max_io_bytes)")

    def __dealloc__(self):
        cdef int i
        free(self.tags)
        free(self.py_tags)
        free(self.zc_addr)
        if self.pipes != NULL:
            for i in range(2 * self.depth):
                if self.pipes[i] >= 0:
                    close(self.pipes[i])
            free(self.pipes)

    @property
    def ring_fd(self) -> int:
        return self.ring.fd

    @property
    def closed(self) -> bool:
        return self.ring.closed

    def buffers(self):
        """The per-tag buffers as a (depth, buf_size) uint8 array (views, no copy)."""
        return self._keep[3].reshape(self.depth, self.buf_size)

    def descriptors(self):
        return self._keep[0]

    def close(self):
        """Close the ring and drop the descriptor array and buffers (after run() returned): a
        kernel transport can then unmap /dev/ublkcN's descriptors and the server is gone."""
        if not self.ring.closed:
            with nogil:
                self.drain_backend_io(1000000000)
        self.ring.close()
        self._keep = None
        self.iods = NULL
        self.bufs = NULL

    cdef void drain_backend_io(self, int64_t timeout_ns) noexcept nogil:
        """Wait, at most timeout_ns, for backend SQEs still in flight (only after a forced
        exit: die(), a kill): close() frees the buffers they read into or write from.
        Their results are dropped; the requests are the driver's to fail."""
        cdef uint64_t ud[REAP_BATCH]
        cdef int32_t res[REAP_BATCH]
        cdef uint32_t fl[REAP_BATCH]
        cdef unsigned n, i
        cdef int tag
        cdef int left = 0
        cdef __kernel_timespec ts
        cdef io_uring_cqe *cqe
        cdef int64_t deadline = pyu_now_ns() + timeout_ns
        for tag in range(self.depth):
            left += self.tags[tag].pending
        ts.tv_sec = 0
        ts.tv_nsec = 10000000
        while left > 0 and pyu_now_ns() < deadline:
            io_uring_submit_and_wait_timeout(self.r, &cqe, 1, &ts, NULL)
            n = reap_cq(self.r, ud, res, fl, REAP_BATCH)
            for i in range(n):
                tag = ud_tag(ud[i])
                if ud_is_target(ud[i]) and tag < self.depth and self.tags[tag].pending:
                    self.tags[tag].pending -= 1
                    left -= 1

    # -- commands to the driver -------------------------------------------------------

    cdef io_uring_sqe *get_sqe(self) noexcept nogil:
        cdef io_uring_sqe *sqe = io_uring_get_sqe(self.r)
        while sqe == NULL:
            io_uring_submit(self.r)
            sqe = io_uring_get_sqe(self.r)
        return sqe

    cdef uint8_t *tag_buf(self, int tag) noexcept nogil:
        return self.bufs + <size_t>tag * self.buf_size

    cdef void submit_cmd(self, uint32_t nr, int tag, int32_t result) noexcept nogil:
        """FETCH_REQ / COMMIT_AND_FETCH_REQ / NEED_GET_DATA for tag."""
        cdef io_uring_sqe *sqe = self.get_sqe()
        cdef uint64_t ud = ud_encode(tag, nr, 0, 0)
        cdef uint64_t addr = <uintptr_t>self.tag_buf(tag) if self.data_path == DP_COPY else 0
        cdef ublksrv_io_cmd *c
        cdef SimCmd *s
        if self.sim:
            s = &self.sim_cmds[tag]
            s.cmd_op = io_cmd_op(nr)
            s.result = result
            s.addr = addr
            s.user_data = ud
            s.ring_fd = self.r.ring_fd
            io_uring_prep_msg_ring(sqe, self.cmd_fd, 0, sim_msg(SIM_MSG_SERVER, (<uint64_t>self.sim_qi << 16) | tag), 0)
            sqe.flags = IOSQE_CQE_SKIP_SUCCESS
            sqe.user_data = ud_encode(tag, OP_SIM_MSG, 0, 0)
        else:
            pyu_prep_uring_cmd(sqe, 64, self.cmd_fd, io_cmd_op(nr), NULL, 0, ud)
            c = <ublksrv_io_cmd *>pyu_sqe_cmd(sqe)
            c.q_id = self.q_id
            c.tag = tag
            c.result = result
            c.addr = addr
            if self.auto_buf_reg:
                sqe.addr = tag        # struct ublk_auto_buf_reg: index = tag, flags 0
        self.tags[tag].state = TAG_WAIT

    cdef void zc_buf_cmd(self, uint32_t nr, int tag, unsigned sqe_flags) noexcept nogil:
        """REGISTER_IO_BUF / UNREGISTER_IO_BUF of tag's request at buffer index tag."""
        cdef io_uring_sqe *sqe = self.get_sqe()
        cdef ublksrv_io_cmd *c
        pyu_prep_uring_cmd(sqe, 64, self.cmd_fd, io_cmd_op(nr), NULL, 0, ud_encode(tag, nr, 0, 0))
        c = <ublksrv_io_cmd *>pyu_sqe_cmd(sqe)
        c.q_id = self.q_id
        c.tag = tag
        c.addr = tag
        sqe.flags = sqe_flags | IOSQE_CQE_SKIP_SUCCESS

    cdef void zc_register_buf(self, int tag) noexcept nogil:
        """For targets, before their first SQE on the request's pages (kernel zero copy without
        AUTO_BUF_REG): a REGISTER_IO_BUF linked to the next SQE. No-op otherwise."""
        if self.zc_register and not self.tags[tag].registered:
            self.zc_buf_cmd(UBLK_IO_REGISTER_IO_BUF, tag, IOSQE_IO_LINK)
            self.tags[tag].registered = 1

    cdef void commit(self, int tag, int32_t res) noexcept nogil:
        """Complete the request of tag with res (bytes or -errno) and fetch the next."""
        cdef unsigned op = self.iods[tag].op_flags & 0xff
        cdef iovec empty
        cdef int64_t n
        if self.tags[tag].registered:
            # the request completes once its buffer is unregistered and the commit is done
            self.zc_buf_cmd(UBLK_IO_UNREGISTER_IO_BUF, tag, 0)
            self.tags[tag].registered = 0
        if self.data_path == DP_USER_COPY and op == UBLK_IO_OP_READ and res > 0:
            n = self.user_copy(tag, 1, res)
            if n != res:
                res = <int32_t>n if n < 0 else -EIO
        elif self.data_path == DP_ZERO_COPY and self.sim and (op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE):
            empty.iov_base = NULL
            empty.iov_len = 0
            io_uring_register_buffers_update_tag(self.r, tag, &empty, NULL, 1)
        self.submit_cmd(UBLK_IO_COMMIT_AND_FETCH_REQ, tag, res)

    cdef int64_t user_copy(self, int tag, int to_request, uint32_t nbytes) noexcept nogil:
        """USER_COPY: move nbytes between the tag buffer and the request (pread/pwrite on ublkc)."""
        cdef uint64_t pos = uc_pos(self.q_id, tag, 0)
        cdef int64_t n
        if self.sim:
            return self.uc_fn(self.sim_ctx, pos, self.tag_buf(tag), nbytes, to_request)
        if to_request:
            n = pwrite(self.cmd_fd, self.tag_buf(tag), nbytes, pos)
        else:
            n = pread(self.cmd_fd, self.tag_buf(tag), nbytes, pos)
        return n if n >= 0 else -EIO

    cdef int64_t splice(self, int tag, uint32_t offset, int write_end, uint32_t nbytes) noexcept nogil:
        """Seed splice ZC: request pages -> this tag's pipe (WRITE) or pipe -> request (READ)."""
        cdef unsigned flags = SPLICE_F_DIRECT if write_end else SPLICE_F_DIRECT | SPLICE_F_READ_TO_READ
        return self.splice_fn(self.sim_ctx, sp_pos(self.q_id, tag, offset),
                              self.pipes[2 * tag + (1 if write_end else 0)], nbytes, flags)

    cdef uint64_t target_ud(self, int tag, uint32_t tgt_data) noexcept nogil:
        return ud_encode(tag, 0, tgt_data, 1)

    # -- the loop --------------------------------------------------------------------

    def fetch_all(self):
        """Post FETCH_REQ for every tag and submit."""
        cdef int tag
        for tag in range(self.depth):
            self.submit_cmd(UBLK_IO_FETCH_REQ, tag, 0)
        self.nr_live = self.depth
        ret = io_uring_submit(self.r)
        if ret < 0:
            raise OSError(-ret, f"queue {self.q_id}: submitting FETCH_REQ failed")

    def run(self):
        """Serve until every tag is aborted (device stopped) or die() is posted."""
        with nogil:
            self.loop()
        return self.cmd_errors

    def wake_ud(self):
        """user_data that, posted to this ring (MSG_RING), makes run() return at once."""
        return ud_encode(0, OP_WAKE, 0, 0)

    cdef void loop(self) noexcept nogil:
        cdef uint64_t ud[REAP_BATCH]
        cdef int32_t res[REAP_BATCH]
        cdef uint32_t fl[REAP_BATCH]
        cdef unsigned n, i
        cdef int tag
        cdef uint32_t op
        cdef int64_t budget = self.spin_ns       # adaptive poll budget (ns)
        while self.nr_live > 0:
            pyu_submit_and_wait_adaptive(self.r, self.spin_ns, &budget)
            n = reap_cq(self.r, ud, res, fl, REAP_BATCH)
            for i in range(n):
                # hand work on in small chunks while going through a batch: the disk
                # (or the driver) starts on the first requests instead of idling until
                # the whole batch is prepared (io_uring plugs a multi-SQE submit)
                if io_uring_sq_ready(self.r) >= self.submit_chunk:
                    io_uring_submit(self.r)
                tag = ud_tag(ud[i])
                if ud_is_target(ud[i]):
                    self.on_target(tag, ud_tgt_data(ud[i]), res[i])
                    continue
                op = ud_op(ud[i])
                if op == OP_WAKE:
                    self.nr_live = 0
                    break
                if tag >= self.depth:
                    self.cmd_errors += 1
                    continue
                if op == UBLK_IO_REGISTER_IO_BUF or op == UBLK_IO_UNREGISTER_IO_BUF:
                    self.cmd_errors += 1      # only failures post a CQE; the linked SQE sees -ECANCELED
                    continue
                if op == OP_SIM_MSG or res[i] < 0:
                    # the command could not be delivered, or the driver refused / aborted it
                    if res[i] != -ENODEV:
                        self.cmd_errors += 1
                    if self.tags[tag].state != TAG_GONE:
                        self.tags[tag].state = TAG_GONE
                        self.nr_live -= 1
                elif res[i] == UBLK_IO_RES_NEED_GET_DATA:
                    self.submit_cmd(UBLK_IO_NEED_GET_DATA, tag, 0)
                else:
                    self.on_request(tag)
            if self.n_py:
                self.run_python()
        io_uring_submit(self.r)

    cdef void on_request(self, int tag) noexcept nogil:
        cdef const ublksrv_io_desc *iod = &self.iods[tag]
        cdef int n
        cdef int64_t c
        cdef unsigned op = iod.op_flags & 0xff
        cdef iovec iov
        self.requests += 1
        self.tags[tag].state = TAG_BUSY
        if self.data_path == DP_USER_COPY and op == UBLK_IO_OP_WRITE:
            c = self.user_copy(tag, 0, iod.nr_sectors << SECTOR_SHIFT)
            if c != <int64_t>(iod.nr_sectors << SECTOR_SHIFT):
                self.commit(tag, <int32_t>c if c < 0 else -EIO)
                return
        elif self.data_path == DP_ZERO_COPY and self.sim and (op == UBLK_IO_OP_READ or op == UBLK_IO_OP_WRITE):
            n = self.regbuf_fn(self.sim_ctx, self.q_id, tag, &iov)
            if n == 0:
                n = io_uring_register_buffers_update_tag(self.r, tag, &iov, NULL, 1)
            if n < 0:
                self.commit(tag, n)
                return
            self.zc_addr[tag] = <uintptr_t>iov.iov_base
        if self.native is not None:
            self.tags[tag].result = 0
            n = self.native.queue_io(self, tag, iod)
            self.tags[tag].pending = n if n > 0 else 0
        else:
            self.py_tags[self.n_py] = tag
            self.n_py += 1

    cdef void on_target(self, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        cdef TagIO *t = &self.tags[tag]
        cdef int32_t r = self.native.io_done(self, tag, tgt_data, res)
        if r == C_RESUBMITTED:
            return
        if r < 0:
            if t.result >= 0:
                t.result = r
        elif t.result >= 0:
            t.result += r
        t.pending -= 1
        if t.pending == 0:
            self.commit(tag, t.result)

    cdef void run_python(self) noexcept nogil:
        cdef int i, n = self.n_py
        cdef uint16_t[::1] arr
        with gil:
            arr = self.py_tag_array
            for i in range(n):
                arr[i] = self.py_tags[i]
            try:
                results = self.py_handler(n)
                if len(results) != n:
                    raise ValueError(f"handler returned {len(results)} results for {n} requests")
            except BaseException:
                log.exception("queue %d: Python dispatch failed; failing %d requests with EIO", self.q_id, n)
                results = [-EIO] * n
            for i in range(n):
                try:
                    res = int(results[i])
                    if not -4095 <= res <= <int64_t>self.iods[self.py_tags[i]].nr_sectors << SECTOR_SHIFT:
                        raise ValueError(f"result {res} is neither bytes done (at most the request's) nor -errno")
                except Exception:
                    log.exception("queue %d: bad result for tag %d; failing it with EIO", self.q_id, self.py_tags[i])
                    res = -EIO
                self.commit(self.py_tags[i], res)
        self.n_py = 0
