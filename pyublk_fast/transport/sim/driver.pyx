# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The simulated ublk driver: blk-mq + ublk_drv's request path in one nogil thread.

The driver thread owns an io_uring. Servers "submit" I/O commands by writing the
command (the SQE's cmd area on a kernel) to a shared SimCmd slot and posting a
MSG_RING to this ring; the driver completes a server's FETCH by posting a
MSG_RING CQE carrying the server's own user_data, as the kernel completes the
uring_cmd. Block requests arrive the same way from front rings, or are issued in
this thread by a request origin such as the load generator (like fio submitting in
blk-mq's context), which plugs in through the origin table (see driver.pxd).

Control commands are run in this thread too (with the GIL, rarely), so all
driver state has one owner and needs no locks.
"""
import collections
import os
import threading

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free
from libc.errno cimport (EINVAL, EIO, ENODEV, ENOENT, EBUSY, EAGAIN, EACCES, EOPNOTSUPP, ENOSPC,
                         EEXIST, ETIMEDOUT, ENOLINK, ENODATA, EILSEQ, ENOMEM, EROFS, EREMOTEIO, EBADE,
                         EFAULT, E2BIG, ENOBUFS)
from libc.stdlib cimport malloc

from pyublk_fast._core.liburing cimport (io_uring, io_uring_get_sqe, io_uring_sqe, io_uring_submit,
                                         io_uring_sq_ready, io_uring_prep_msg_ring,
                                         IOSQE_CQE_SKIP_SUCCESS, pyu_submit_and_wait_adaptive,
                                         io_uring_buf, io_uring_buf_ring, pyu_buf_ring_tail,
                                         IORING_CQE_F_BUFFER, IORING_CQE_F_MORE, IORING_CQE_BUFFER_SHIFT,
                                         PYU_MSG_RING_FLAGS_PASS)
from pyublk_fast._core.queue cimport BATCH_SLOTS, FETCH_MAX_TAGS
from pyublk_fast._core.ring cimport Ring, reap_cq
from pyublk_fast._core.uapi cimport *
from .wire cimport *

from pyublk_fast import uapi
from pyublk_fast.transport.base import DMA_ALIGNMENT_DEFAULT, SEGMENT_DEFAULTS
from pyublk_fast.util import PAGE_SIZE

cnp.import_array()

cdef enum:
    REAP_BATCH = 256
    SUBMIT_CHUNK = 4                # submit after this many queued SQEs while handling a batch
    S_DEAD = 0
    S_LIVE = 1
    S_QUIESCED = 2
    S_FAIL_IO = 3

cdef uint64_t F_NEED_GET_DATA = uapi.UBLK_F_NEED_GET_DATA
cdef uint64_t F_USER_COPY = uapi.UBLK_F_USER_COPY
cdef uint64_t F_ZERO_COPY = uapi.UBLK_F_SUPPORT_ZERO_COPY
cdef uint64_t F_AUTO_BUF_REG = uapi.UBLK_F_AUTO_BUF_REG
cdef uint64_t F_SPLICE_ZC = uapi.SIM_F_SPLICE_ZC
cdef uint64_t F_RECOVERY = uapi.UBLK_F_USER_RECOVERY
cdef uint64_t F_REISSUE = uapi.UBLK_F_USER_RECOVERY_REISSUE
cdef uint64_t F_RECOVERY_FAIL_IO = uapi.UBLK_F_USER_RECOVERY_FAIL_IO
cdef uint64_t F_ANY_RECOVERY = F_RECOVERY | F_REISSUE | F_RECOVERY_FAIL_IO
cdef uint64_t F_QUIESCE = uapi.UBLK_F_QUIESCE
cdef uint64_t F_SHMEM_ZC = uapi.UBLK_F_SHMEM_ZC
cdef uint32_t IO_F_SHMEM_ZC = uapi.UBLK_IO_F_SHMEM_ZC
cdef uint64_t F_BATCH_IO = uapi.UBLK_F_BATCH_IO
cdef uint64_t F_PER_IO_DAEMON = uapi.UBLK_F_PER_IO_DAEMON

# What the simulated driver supports (GET_FEATURES). Zero copy and AUTO_BUF_REG are
# modelled by the server registering request pages itself (see DataPath).
SIM_FEATURES = (uapi.UBLK_F_URING_CMD_COMP_IN_TASK | uapi.UBLK_F_NEED_GET_DATA
                | uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
                | uapi.UBLK_F_CMD_IOCTL_ENCODE | uapi.UBLK_F_USER_COPY
                | uapi.UBLK_F_USER_RECOVERY_FAIL_IO | uapi.UBLK_F_UPDATE_SIZE
                | uapi.UBLK_F_SUPPORT_ZERO_COPY | uapi.UBLK_F_QUIESCE | uapi.UBLK_F_SAFE_STOP_DEV
                | uapi.UBLK_F_SHMEM_ZC | uapi.UBLK_F_BATCH_IO | uapi.UBLK_F_PER_IO_DAEMON
                | uapi.SIM_F_SPLICE_ZC)
# Flags a 7.x kernel's ADD_DEV grants even when not asked for (on 7.2: 0x26042, i.e. COMP_IN_TASK,
# CMD_IOCTL_ENCODE, PER_IO_DAEMON, BUF_REG_OFF_DAEMON, SAFE_STOP_DEV), limited to what we model.
SIM_ALWAYS_SET = (uapi.UBLK_F_URING_CMD_COMP_IN_TASK | uapi.UBLK_F_CMD_IOCTL_ENCODE
                  | uapi.UBLK_F_PER_IO_DAEMON | uapi.UBLK_F_SAFE_STOP_DEV)
cdef uint64_t PAGE = PAGE_SIZE
#: The largest capacity in sectors whose size in bytes fits the request checks' u64.
cdef uint64_t MAX_SECTORS = (<uint64_t>1 << 55) - 1


cdef inline bint is_copy_path(const SimDev *d) noexcept nogil:
    """The driver copies data to/from the server's buffer (no user copy / zero copy flag)."""
    return not (d.flags & (F_USER_COPY | F_ZERO_COPY | F_AUTO_BUF_REG | F_SPLICE_ZC))


cdef inline bint shm_lookup(const SimDev *d, uint64_t p, uint64_t n, bint read,
                            uint64_t *addr) noexcept nogil:
    """Whether [p, p+n) lies wholly in one range of a registered shared buffer (for a READ,
    not a READ_ONLY one: 7.2 serves those by the normal path); addr gets the descriptor's
    index << 32 | offset."""
    cdef int k
    for k in range(d.nshm):
        if d.shm[k].start <= p and p + n <= d.shm[k].end and not (read and d.shm[k].read_only):
            addr[0] = (<uint64_t>d.shm[k].index << 32) | (d.shm[k].buf_off + p - d.shm[k].start)
            return True
    return False


cdef inline int32_t blk_status_errno(int32_t res) noexcept nogil:
    """errno_to_blk_status(): the errnos a block device passes through; the rest are EIO."""
    cdef int32_t e = -res
    if (e == EOPNOTSUPP or e == ENOSPC or e == ETIMEDOUT or e == ENOLINK or e == ENODATA
            or e == EILSEQ or e == EAGAIN or e == ENOMEM or e == EBUSY or e == EREMOTEIO
            or e == EBADE):
        return res
    return -EIO


cdef inline const ublk_elem_header *batch_elem(const SimCmd *cmd, int i, uint64_t *addr) noexcept nogil:
    """Element i of a PREP/COMMIT_IO_CMDS (in the server's memory) and its buffer address
    (0 without UBLK_BATCH_F_HAS_BUF_ADDR)."""
    cdef const uint8_t *e = <const uint8_t *><uintptr_t>(cmd.addr + <uint64_t>i * cmd.elem_bytes)
    addr[0] = (<const uint64_t *>(e + sizeof(ublk_elem_header)))[0] \
        if cmd.flags & UBLK_BATCH_F_HAS_BUF_ADDR else 0
    return <const ublk_elem_header *>e


cdef inline void tick_origins(SimDriver drv) noexcept nogil:
    """Let every awake origin issue requests; one that has finished goes to sleep."""
    cdef Origin *o
    cdef int k
    for k in range(1, drv.norigins):
        o = &drv.origins[k]
        if o.awake and not o.tick(drv, o.ctx):
            o.awake = 0
            drv.nawake -= 1


cdef class SimDriver:
    """One simulated ublk_drv instance (one "kernel"), serving up to max_devs devices."""

    def __cinit__(self, int max_devs=64, int max_queues=256, int nreq=16384, bint random_tags=True,
                  uint64_t seed=0x9E3779B97F4A7C15, double spin_us=50.0, features=None):
        self.max_devs = max_devs
        self.max_queues = max_queues
        self.nreq = nreq
        self.devs = <SimDev *>calloc(max_devs, sizeof(SimDev))
        self.queues = <SimQueue *>calloc(max_queues, sizeof(SimQueue))
        self.reqs = <Req *>calloc(nreq, sizeof(Req))
        self.dirty_q = <int *>calloc(max_queues, sizeof(int))
        if self.devs == NULL or self.queues == NULL or self.reqs == NULL or self.dirty_q == NULL:
            raise MemoryError("SimDriver: cannot allocate driver tables")
        for i in range(max_queues):
            self.queues[i].dev = -1
        self.random_tags = random_tags
        # a subset models an older driver (GET_FEATURES and ADD_DEV then lack the rest)
        self.features = SIM_FEATURES if features is None else features & SIM_FEATURES
        self.spin_ns = <int64_t>(spin_us * 1000)   # the kernel reacts at once; a sleeping thread does not
        self.rng_state = seed | 1
        self._iod_arrays = {}
        self._cmd_arrays = {}
        self._shm_regs = {}
        self._ctl = collections.deque()
        self._nudge_lock = threading.Lock()
        self._ready = threading.Event()
        self._origin_owners = []
        self.norigins = 1
        self.ring_fd = -1

    def __dealloc__(self):
        cdef int i
        if self.devs != NULL:
            for i in range(self.max_devs):
                free(self.devs[i].shm)
        if self.queues != NULL:
            for i in range(self.max_queues):
                free(self.queues[i].tags)
                free(self.queues[i].free_tags)
                free(self.queues[i].pending)
                free(self.queues[i].evts)
        free(self.dirty_q)
        free(self.devs)
        free(self.queues)
        free(self.reqs)

    # -- thread lifecycle -------------------------------------------------------------

    def start(self):
        """Start the driver thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="ublk-sim-driver", daemon=True)
        self._thread.start()
        self._ready.wait()
        self._nudge = Ring(64)

    def _main(self):
        self.ring = Ring(4096, cq_entries=32768)
        self.ring_fd = self.ring.fd
        self._ready.set()
        with nogil:
            self.loop()
        self._fail_everything()
        self.ring.close()

    def shutdown(self):
        """Stop the driver thread; requests still queued fail with ENODEV."""
        if self._thread is None:
            return
        self.call(self._set_stopping)
        self._thread.join()
        self._thread = None
        if self._nudge is not None:
            self._nudge.close()
        # no origin runs any more: let go of their owners, which hold this driver (the
        # load generator), so a closed transport is freed at once, not by the cycle collector
        self.norigins = 1
        self._origin_owners = []

    def _set_stopping(self):
        self.stopping = True

    @property
    def native_thread_id(self):
        """The driver thread's kernel tid (for CPU accounting), or None when not running."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def fd(self) -> int:
        """The driver ring's fd: target of the servers' and fronts' MSG_RINGs."""
        return self.ring_fd

    # -- control plane: run callables in the driver thread ----------------------------

    def call(self, fn, *args):
        """Run fn(*args) in the driver thread (with the GIL) and return its result."""
        if self._thread is None:
            raise RuntimeError("simulated driver is not running")
        done = threading.Event()
        box = []
        self._ctl.append((fn, args, done, box))
        with self._nudge_lock:
            self._nudge.prep_msg_ring(self.ring_fd, 0, sim_msg(SIM_MSG_CONTROL, 0))
            self._nudge.submit()
            self._nudge.reap()
        done.wait()
        if box[0]:
            raise box[1]
        return box[1]

    cdef _run_control(self):
        while self._ctl:
            fn, args, done, box = self._ctl.popleft()
            try:
                box[:] = [False, fn(*args)]
            except BaseException as e:
                box[:] = [True, e]
            done.set()

    def _fail_everything(self):
        """At driver shutdown: fail queued and in-flight requests, abort fetches."""
        cdef int d
        for d in range(self.max_devs):
            if self.devs[d].present:
                self.server_gone_hard(d)
        io_uring_submit(&self.ring.ring)

    cdef server_gone_hard(self, int d):
        cdef SimDev *dev = &self.devs[d]
        cdef int qi
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            self.abort_ready(&self.queues[qi])
            self.fail_inflight(&self.queues[qi], -ENODEV)
            self.fail_pending(&self.queues[qi], -ENODEV)

    # -- the loop ------------------------------------------------------------------

    cdef void loop(self) noexcept nogil:
        cdef uint64_t ud[REAP_BATCH]
        cdef int32_t res[REAP_BATCH]
        cdef uint32_t fl[REAP_BATCH]
        cdef unsigned n, i
        cdef uint64_t kind, low
        cdef io_uring *ring = &self.ring.ring
        cdef int64_t budget = self.spin_ns       # adaptive poll budget (ns)
        while not self.stopping:
            if self.nawake:
                tick_origins(self)
            if self.ndirty:
                self.flush_batches()
            pyu_submit_and_wait_adaptive(ring, self.spin_ns, &budget)
            while True:
                n = reap_cq(ring, ud, res, fl, REAP_BATCH)
                if n == 0:
                    break
                for i in range(n):
                    # pipeline with the servers: pass on completions and new requests
                    # every SUBMIT_CHUNK messages rather than after the whole batch
                    if io_uring_sq_ready(ring) >= SUBMIT_CHUNK:
                        io_uring_submit(ring)
                    if self.nawake and i % SUBMIT_CHUNK == SUBMIT_CHUNK - 1:
                        tick_origins(self)
                    kind = ud[i] >> SIM_MSG_SHIFT
                    low = ud[i] & ((1ULL << SIM_MSG_SHIFT) - 1)
                    if kind == SIM_MSG_SERVER:
                        self.on_server(<int>(low >> 16), <int>(low & 0xffff))
                    elif kind == SIM_MSG_FRONT:
                        self.on_front(<int>low, res[i])
                    elif kind == SIM_MSG_CONTROL:
                        with gil:
                            self._run_control()
                    else:
                        self.msg_failures += 1
                if self.nawake:
                    tick_origins(self)
                if self.ndirty:
                    self.flush_batches()

    cdef void post(self, int fd, int32_t res, uint64_t user_data) noexcept nogil:
        """Post CQE (user_data, res) on ring fd: how the driver completes a uring_cmd."""
        self.post_flags(fd, res, user_data, 0)

    cdef void post_flags(self, int fd, int32_t res, uint64_t user_data, uint32_t cqe_flags) noexcept nogil:
        """post() of a CQE with flags (a multishot command's F_MORE, a buffer's F_BUFFER):
        MSG_RING passes them on (Linux 6.3+)."""
        cdef io_uring_sqe *sqe = io_uring_get_sqe(&self.ring.ring)
        while sqe == NULL:
            io_uring_submit(&self.ring.ring)
            sqe = io_uring_get_sqe(&self.ring.ring)
        io_uring_prep_msg_ring(sqe, fd, <unsigned>res, user_data, PYU_MSG_RING_FLAGS_PASS if cqe_flags else 0)
        sqe.file_index = cqe_flags
        sqe.flags = IOSQE_CQE_SKIP_SUCCESS
        sqe.user_data = sim_msg(SIM_MSG_OWN, 0)

    # -- server commands ---------------------------------------------------------------

    cdef void on_server(self, int qi, int tag) noexcept nogil:
        if qi < 0 or qi >= self.max_queues or self.queues[qi].dev < 0:
            self.msg_failures += 1
            return
        cdef SimQueue *q = &self.queues[qi]
        if tag >= q.depth + BATCH_SLOTS:
            self.msg_failures += 1
            return
        cdef SimCmd *cmd = &q.cmds[tag]
        cdef uint32_t op = cmd.cmd_op & 0xff
        # a batch device's queue sends a one-element COMMIT_IO_CMDS in its tag's slot too
        if tag >= q.depth or (q.batch and UBLK_IO_PREP_IO_CMDS <= op <= UBLK_IO_FETCH_IO_CMDS):
            self.on_batch(q, cmd)
            return
        cdef SimDev *d = &self.devs[q.dev]
        cdef SimTag *t = &q.tags[tag]
        cdef Req *r
        cdef int32_t res
        cdef uint32_t remaining
        cdef bint copy_path = is_copy_path(d)
        if q.batch:
            # a BATCH_IO device takes only the batch commands (and buffer registration)
            self.post(cmd.ring_fd, -EOPNOTSUPP, cmd.user_data)
            return
        if (cmd.cmd_op >> 8) != ((UBLK_IO_CMD_IOCTL_BASE >> 8) & 0xffffff) and (cmd.cmd_op >> 8) != 0:
            self.post(cmd.ring_fd, -EOPNOTSUPP, cmd.user_data)
            return
        # the task that may send a command: the sim's "task" is the server ring that sent it
        # (one ring per server thread). With PER_IO_DAEMON (6.16) a FETCH may come from any,
        # which then owns the tag; before it, the queue's first FETCH made its ring the one
        # daemon of the queue. Either way another ring's command on an owned tag is EINVAL.
        if op == UBLK_IO_FETCH_REQ and not d.flags & F_PER_IO_DAEMON:
            if q.nr_ready == 0:
                q.daemon_fd = cmd.ring_fd
            elif cmd.ring_fd != q.daemon_fd:
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
        elif op != UBLK_IO_FETCH_REQ and (t.state == TAG_IDLE or cmd.ring_fd != t.ring_fd):
            self.post(cmd.ring_fd, -EINVAL, cmd.user_data)      # a tag never fetched has no owner
            return
        # A command the tag's state does not allow: once every tag was fetched the driver
        # answers EBUSY (a FETCH comes too late; a COMMIT or NEED_GET_DATA for a tag still
        # waiting for a request finds nothing at the server); a tag fetched twice while the
        # device is still being set up is EINVAL.
        if op == UBLK_IO_FETCH_REQ:
            if self.all_fetched(d):
                self.post(cmd.ring_fd, -EBUSY, cmd.user_data)
                return
            if t.state != TAG_IDLE:
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
            if copy_path and cmd.addr == 0 and not (d.flags & F_NEED_GET_DATA):
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
            if not d.present or d.stopped:
                self.post(cmd.ring_fd, -ENODEV, cmd.user_data)
                return
            self.release_tag(q, tag)
            q.nr_ready += 1
            self.kick_pending(q)
        elif op == UBLK_IO_COMMIT_AND_FETCH_REQ:
            if t.state == TAG_READY:
                self.post(cmd.ring_fd, -EBUSY, cmd.user_data)
                return
            if t.state != TAG_SERVER:
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
            r = &self.reqs[t.req]
            if copy_path and cmd.addr == 0 and (r.op == UBLK_IO_OP_READ or not (d.flags & F_NEED_GET_DATA)):
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
            # the same command fetches the next request (not while quiesced: the server is leaving)
            if self.commit_req(q, tag, cmd.result, cmd.addr):
                self.release_tag(q, tag)
                self.kick_pending(q)
            else:
                self.post(cmd.ring_fd, -ENODEV, cmd.user_data)
        elif op == UBLK_IO_NEED_GET_DATA:
            if t.state == TAG_READY:
                self.post(cmd.ring_fd, -EBUSY, cmd.user_data)
                return
            if t.state != TAG_GETDATA or cmd.addr == 0:
                self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
                return
            r = &self.reqs[t.req]
            memcpy(<void *><uintptr_t>cmd.addr, r.buf + r.done, r.len - r.done)
            q.iods[tag].addr = cmd.addr
            t.state = TAG_SERVER
            self.post(cmd.ring_fd, UBLK_IO_RES_OK, cmd.user_data)
        else:
            self.post(cmd.ring_fd, -EOPNOTSUPP, cmd.user_data)

    # -- BATCH_IO ----------------------------------------------------------------------

    cdef void on_batch(self, SimQueue *q, SimCmd *cmd) noexcept nogil:
        """One of a queue's batch commands, checked in the kernel's order: PREP/COMMIT_IO_CMDS
        answer 0 / the bytes of the elements taken (or -errno when none was; a command sent
        with CQE_SKIP_SUCCESS only then), FETCH_IO_CMDS stays armed (multishot)."""
        cdef SimDev *d = &self.devs[q.dev]
        cdef uint32_t op = cmd.cmd_op & 0xff
        cdef uint32_t need = sizeof(ublk_elem_header)
        cdef int32_t res
        if not q.batch:
            # the per-tag driver reads the header as a ublksrv_io_cmd: nothing valid in it
            self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
            return
        if cmd.cmd_op == io_cmd_op(UBLK_IO_FETCH_IO_CMDS):
            self.batch_fetch(q, cmd)
            return
        if cmd.cmd_op != io_cmd_op(UBLK_IO_PREP_IO_CMDS) and cmd.cmd_op != io_cmd_op(UBLK_IO_COMMIT_IO_CMDS):
            self.post(cmd.ring_fd, -EOPNOTSUPP, cmd.user_data)
            return
        if cmd.nr_elem > q.depth:
            res = -E2BIG
        elif cmd.flags & UBLK_BATCH_F_HAS_ZONE_LBA:               # no zoned devices here
            res = -EINVAL
        elif cmd.flags & UBLK_BATCH_F_HAS_BUF_ADDR and not is_copy_path(d):
            res = -EINVAL
        elif cmd.flags & UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK and not d.flags & F_AUTO_BUF_REG:
            res = -EINVAL
        elif cmd.flags & ~(UBLK_BATCH_F_HAS_ZONE_LBA | UBLK_BATCH_F_HAS_BUF_ADDR
                           | UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK):
            res = -EINVAL
        elif cmd.flags & UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK and cmd.flags & UBLK_BATCH_F_HAS_BUF_ADDR:
            res = -EINVAL
        else:
            if cmd.flags & UBLK_BATCH_F_HAS_ZONE_LBA:
                need += 8
            if cmd.flags & UBLK_BATCH_F_HAS_BUF_ADDR:
                need += 8
            if cmd.elem_bytes != need:
                res = -EINVAL
            elif op == UBLK_IO_PREP_IO_CMDS:
                res = self.batch_prep(q, cmd)
            else:
                res = self.batch_commit(q, cmd)
        if res < 0 or not cmd.skip_success:
            self.post(cmd.ring_fd, res, cmd.user_data)

    cdef int32_t batch_prep(self, SimQueue *q, SimCmd *cmd) noexcept nogil:
        """PREP_IO_CMDS: each element's tag waits for requests (the copy path's buffer
        address in it). All or nothing: the first bad element undoes the ones before."""
        cdef SimDev *d = &self.devs[q.dev]
        cdef const ublk_elem_header *h
        cdef uint64_t addr
        cdef int32_t err = 0
        cdef int i, done = 0
        cdef bint ready = self.all_fetched(d)    # PREP is over
        for i in range(cmd.nr_elem):
            h = batch_elem(cmd, i, &addr)
            if h.tag >= q.depth:
                err = -EINVAL
            elif is_copy_path(d) and addr == 0:
                err = -EINVAL
            elif ready:
                err = -EBUSY
            elif q.tags[h.tag].state != TAG_IDLE:
                err = -EINVAL
            if err:
                break
            self.arm_tag(q, h.tag, -1, 0, addr)
            q.nr_ready += 1
            done += 1
        if err:
            for i in range(done):             # the tags just armed are on top of the free stack
                q.nfree -= 1
                q.tags[q.free_tags[q.nfree]].state = TAG_IDLE
            q.nr_ready -= done
            return err
        self.kick_pending(q)
        return 0

    cdef int32_t batch_commit(self, SimQueue *q, SimCmd *cmd) noexcept nogil:
        """COMMIT_IO_CMDS: complete each element's request in order, up to the first the
        driver refuses (a tag the server does not hold: EBUSY; no buffer on the copy path:
        EINVAL); the bytes of the elements taken, or that -errno when none was."""
        cdef SimDev *d = &self.devs[q.dev]
        cdef const ublk_elem_header *h
        cdef uint64_t addr
        cdef int32_t err = 0
        cdef int i, done = 0
        for i in range(cmd.nr_elem):
            h = batch_elem(cmd, i, &addr)
            if h.tag >= q.depth:
                err = -EINVAL
            elif q.tags[h.tag].state != TAG_SERVER:
                err = -EBUSY
            elif is_copy_path(d) and addr == 0:
                err = -EINVAL
            if err:
                break
            if self.commit_req(q, h.tag, h.result, addr):
                self.arm_tag(q, h.tag, -1, 0, addr)
            done += 1
        if done:
            self.kick_pending(q)
            return done * cmd.elem_bytes
        return err

    cdef void batch_fetch(self, SimQueue *q, SimCmd *cmd) noexcept nogil:
        """FETCH_IO_CMDS: multishot (required), u16 elements, no flags; refused (ENODEV) once
        the queue is stopped or quiesced, until a new server has PREPared every tag."""
        cdef SimDev *d = &self.devs[q.dev]
        if not cmd.multishot or cmd.elem_bytes != 2 or cmd.flags != 0:
            self.post(cmd.ring_fd, -EINVAL, cmd.user_data)
        elif not d.present or d.stopped or (d.started and d.state != S_LIVE and q.nr_ready < q.depth):
            self.post(cmd.ring_fd, -ENODEV, cmd.user_data)
        elif q.fetch_armed:
            # the kernel queues further FETCHes behind the first; the simulator keeps one
            self.post(cmd.ring_fd, -EBUSY, cmd.user_data)
        else:
            if q.br != <io_uring_buf_ring *><uintptr_t>cmd.addr:
                q.br = <io_uring_buf_ring *><uintptr_t>cmd.addr
                q.br_head = 0
            q.br_mask = cmd.br_entries - 1
            q.fetch_fd = cmd.ring_fd
            q.fetch_ud = cmd.user_data
            q.fetch_armed = 1
            self.mark_dirty(q)

    cdef void mark_dirty(self, SimQueue *q) noexcept nogil:
        if not q.dirty:
            q.dirty = 1
            self.dirty_q[self.ndirty] = <int>(q - self.queues)
            self.ndirty += 1

    cdef void flush_batches(self) noexcept nogil:
        """Deliver the tags dispatched since the last call (as blk-mq's commit_rqs ends a
        batch): fewer, fuller FETCH completions."""
        cdef int i
        for i in range(self.ndirty):
            self.deliver(&self.queues[self.dirty_q[i]])
        self.ndirty = 0

    cdef void deliver(self, SimQueue *q) noexcept nogil:
        """Hand q's undelivered tags to its FETCH: each completion fills the next buffer of
        the server's ring (at most FETCH_MAX_TAGS tags); no buffer left ends the FETCH with
        ENOBUFS (the tags wait for the next FETCH)."""
        cdef io_uring_buf *b
        cdef uint16_t *dst
        cdef uint32_t n, k
        q.dirty = 0
        while q.evt_count and q.fetch_armed:
            if q.br_head == pyu_buf_ring_tail(q.br):
                q.fetch_armed = 0
                self.post(q.fetch_fd, -ENOBUFS, q.fetch_ud)
                return
            b = &q.br.bufs[q.br_head & q.br_mask]
            n = min(b.len // 2, <uint32_t>q.evt_count, <uint32_t>FETCH_MAX_TAGS)
            dst = <uint16_t *><uintptr_t>b.addr
            for k in range(n):
                dst[k] = q.evts[q.evt_head]
                q.evt_head = (q.evt_head + 1) % q.depth
            q.evt_count -= n
            q.br_head += 1
            self.post_flags(q.fetch_fd, n * 2, q.fetch_ud,
                            IORING_CQE_F_BUFFER | (<uint32_t>b.bid << IORING_CQE_BUFFER_SHIFT) | IORING_CQE_F_MORE)

    cdef void batch_reset(self, SimQueue *q) noexcept nogil:
        """The server is gone: its FETCH and undelivered tags with it."""
        q.evt_head = 0
        q.evt_count = 0
        q.fetch_armed = 0
        q.br = NULL

    cdef bint commit_req(self, SimQueue *q, int tag, int32_t result, uint64_t addr) noexcept nogil:
        """Complete the request tag's server committed with result (READ data from addr on
        the copy path); whether the tag may take a new request (counted in nr_ready again)."""
        cdef SimDev *d = &self.devs[q.dev]
        cdef SimTag *t = &q.tags[tag]
        cdef Req *r = &self.reqs[t.req]
        cdef int32_t res = result
        cdef uint32_t remaining = r.len - r.done
        if r.op == UBLK_IO_OP_READ or r.op == UBLK_IO_OP_WRITE:
            if res > <int32_t>remaining:
                res = remaining           # the kernel clamps to the request's bytes
            if res == 0:
                res = -EIO                # no progress: fail instead of requeueing forever
            if res > 0 and r.op == UBLK_IO_OP_READ and is_copy_path(d) and not t.shmem:
                memcpy(r.buf + r.done, <void *><uintptr_t>addr, res)
        elif res > 0:
            res = 0
        t.state = TAG_IDLE
        q.nr_ready -= 1
        if res > 0 and <uint32_t>res < remaining:
            r.done += res                 # partial completion: requeue the rest
            self.requeue(t.req)
        elif res < 0:
            self.complete(t.req, blk_status_errno(res))
        else:
            self.complete(t.req, r.len if (r.op == UBLK_IO_OP_READ or r.op == UBLK_IO_OP_WRITE) else 0)
        if not d.present or d.stopped or (d.state == S_QUIESCED and d.server_alive):
            return 0
        q.nr_ready += 1
        return 1

    cdef bint all_fetched(self, SimDev *d) noexcept nogil:
        """Every tag of every queue of d was fetched (PREPared): the device is ready, as
        START_DEV and END_USER_RECOVERY wait for, and no more FETCH or PREP is taken."""
        cdef int qi
        for qi in range(d.first_q, d.first_q + d.nr_queues):
            if self.queues[qi].nr_ready < d.depth:
                return 0
        return 1

    cdef void release_tag(self, SimQueue *q, int tag) noexcept nogil:
        """Arm tag with the command just accepted in its slot: it waits for a request."""
        self.arm_tag(q, tag, q.cmds[tag].ring_fd, q.cmds[tag].user_data, q.cmds[tag].addr)

    cdef void arm_tag(self, SimQueue *q, int tag, int32_t ring_fd, uint64_t ud, uint64_t addr) noexcept nogil:
        cdef SimTag *t = &q.tags[tag]
        t.ring_fd = ring_fd
        t.ud = ud
        t.addr = addr
        t.state = TAG_READY
        q.free_tags[q.nfree] = <uint16_t>tag
        q.nfree += 1

    cdef int take_tag(self, SimQueue *q) noexcept nogil:
        cdef int j
        cdef uint16_t t
        if self.random_tags and q.nfree > 1:
            j = <int>(xorshift64s(&self.rng_state) % <uint64_t>q.nfree)
            t = q.free_tags[j]
            q.free_tags[j] = q.free_tags[q.nfree - 1]
            q.free_tags[q.nfree - 1] = t
        q.nfree -= 1
        return q.free_tags[q.nfree]

    cdef void kick_pending(self, SimQueue *q) noexcept nogil:
        cdef SimDev *d = &self.devs[q.dev]
        cdef int ri
        while q.pend_count and q.nfree and d.state == S_LIVE:
            ri = q.pending[q.pend_head]
            q.pend_head = (q.pend_head + 1) % self.nreq
            q.pend_count -= 1
            self.dispatch(q, self.take_tag(q), ri)

    cdef void dispatch(self, SimQueue *q, int tag, int ri) noexcept nogil:
        """Hand request ri to the server through tag: fill the descriptor, complete the FETCH."""
        cdef Req *r = &self.reqs[ri]
        cdef SimDev *d = &self.devs[q.dev]
        cdef SimTag *t = &q.tags[tag]
        cdef ublksrv_io_desc *iod = &q.iods[tag]
        cdef uint32_t remaining = r.len - r.done
        cdef bint copy_path = is_copy_path(d)
        iod.op_flags = r.op | r.flags
        iod.nr_sectors = remaining >> SECTOR_SHIFT
        iod.start_sector = (r.offset + r.done) >> SECTOR_SHIFT
        iod.addr = t.addr if copy_path else 0
        t.state = TAG_SERVER
        t.req = ri
        t.spliced = 0
        t.shmem = 0
        if d.nshm and (r.op == UBLK_IO_OP_READ or r.op == UBLK_IO_OP_WRITE) and \
                shm_lookup(d, <uintptr_t>(r.buf + r.done), remaining, r.op == UBLK_IO_OP_READ,
                           &iod.addr):
            # the data is already where the server reads and writes it: nothing to copy
            iod.op_flags |= IO_F_SHMEM_ZC
            t.shmem = 1
            self.post(t.ring_fd, UBLK_IO_RES_OK, t.ud)
            return
        if r.op == UBLK_IO_OP_WRITE and copy_path:
            if d.flags & F_NEED_GET_DATA:
                t.state = TAG_GETDATA
                self.post(t.ring_fd, UBLK_IO_RES_NEED_GET_DATA, t.ud)
                return
            memcpy(<void *><uintptr_t>t.addr, r.buf + r.done, remaining)
        if q.batch:
            q.evts[(q.evt_head + q.evt_count) % q.depth] = <uint16_t>tag
            q.evt_count += 1
            self.mark_dirty(q)
        else:
            self.post(t.ring_fd, UBLK_IO_RES_OK, t.ud)

    # -- block requests ------------------------------------------------------------------

    cdef void on_front(self, int ri, int reply_fd) noexcept nogil:
        if ri < 0 or ri >= self.nreq:
            self.msg_failures += 1
            return
        self.reqs[ri].reply_fd = reply_fd
        self.reqs[ri].origin = ORIGIN_FRONT
        self.queue_rq(ri)

    cdef void queue_rq(self, int ri) noexcept nogil:
        """blk-mq's submission: check the request, then give it a tag or let it wait for one."""
        cdef Req *r = &self.reqs[ri]
        cdef SimDev *d
        cdef uint32_t mask
        if r.dev >= self.max_devs or not self.devs[r.dev].present or not self.devs[r.dev].started:
            self.complete_unqueued(ri, -ENODEV)
            return
        d = &self.devs[r.dev]
        mask = (1u << d.lbs_shift) - 1
        r.done = 0
        if r.op == UBLK_IO_OP_READ or r.op == UBLK_IO_OP_WRITE or r.op == UBLK_IO_OP_DISCARD \
                or r.op == UBLK_IO_OP_WRITE_ZEROES:
            if r.len == 0 or (r.offset & mask) or (r.len & mask) or r.offset + r.len > d.size:
                self.complete_unqueued(ri, -EINVAL)
                return
            if (r.op == UBLK_IO_OP_READ or r.op == UBLK_IO_OP_WRITE) and r.len > d.max_rq_bytes:
                self.complete_unqueued(ri, -EINVAL)
                return
            if r.op != UBLK_IO_OP_READ and d.attrs & 1:      # UBLK_ATTR_READ_ONLY
                self.complete_unqueued(ri, -EROFS)
                return
            if (r.op == UBLK_IO_OP_DISCARD or r.op == UBLK_IO_OP_WRITE_ZEROES) and not d.discard:
                self.complete_unqueued(ri, -EOPNOTSUPP)     # the queue has no discard limits
                return
        elif r.op == UBLK_IO_OP_FLUSH:
            r.len = 0
        else:
            self.complete_unqueued(ri, -EOPNOTSUPP)
            return
        if d.state == S_FAIL_IO:
            self.complete_unqueued(ri, -EREMOTEIO)     # BLK_STS_TARGET, as ublk_queue_rq does
            return
        if d.state == S_DEAD:
            self.complete_unqueued(ri, -EIO)
            return
        d.inflight += 1
        self.requeue(ri)

    cdef void requeue(self, int ri) noexcept nogil:
        """Map the request to its hardware queue; dispatch it or let it wait for a tag."""
        cdef Req *r = &self.reqs[ri]
        cdef SimDev *d = &self.devs[r.dev]
        cdef int qi = d.first_q + ri % d.nr_queues
        cdef SimQueue *q = &self.queues[qi]
        r.queue = qi
        if q.nfree and d.state == S_LIVE:
            self.dispatch(q, self.take_tag(q), ri)
        else:
            q.pending[(q.pend_head + q.pend_count) % self.nreq] = ri
            q.pend_count += 1

    cdef void complete_unqueued(self, int ri, int32_t res) noexcept nogil:
        cdef Req *r = &self.reqs[ri]
        cdef Origin *o
        r.queue = -1
        if r.origin == ORIGIN_FRONT:
            self.post(r.reply_fd, res, ri)
        else:
            o = &self.origins[r.origin]
            o.done(self, o.ctx, ri, res)

    cdef void complete(self, int ri, int32_t res) noexcept nogil:
        self.devs[self.reqs[ri].dev].inflight -= 1
        self.complete_unqueued(ri, res)

    cdef void fail_pending(self, SimQueue *q, int32_t res) noexcept nogil:
        """Complete every request still waiting for a tag of q with res."""
        while q.pend_count:
            self.complete(q.pending[q.pend_head], res)
            q.pend_head = (q.pend_head + 1) % self.nreq
            q.pend_count -= 1

    cdef void abort_ready(self, SimQueue *q) noexcept nogil:
        """Complete every outstanding FETCH of the queue with UBLK_IO_RES_ABORT (BATCH_IO:
        the FETCH_IO_CMDS, once the tags dispatched so far are delivered)."""
        cdef int tag
        if q.batch:
            self.deliver(q)
            if q.fetch_armed:
                q.fetch_armed = 0
                self.post(q.fetch_fd, -ENODEV, q.fetch_ud)
        for tag in range(q.depth):
            if q.tags[tag].state == TAG_READY:
                q.tags[tag].state = TAG_IDLE
                q.nr_ready -= 1
                if not q.batch:
                    self.post(q.tags[tag].ring_fd, -ENODEV, q.tags[tag].ud)
        q.nfree = 0

    # -- request origins ---------------------------------------------------------------

    cdef int add_origin(self, object owner, void *ctx, origin_tick_fn tick, origin_done_fn done) except -1:
        """Register an origin (in the driver thread: via call()); returns its Req.origin value.

        ctx is handed back to its functions; owner, the object behind ctx, is kept alive
        as long as the driver.
        """
        if self.norigins == MAX_ORIGINS:
            raise RuntimeError(f"the simulated driver takes at most {MAX_ORIGINS - 1} request origins")
        cdef Origin *o = &self.origins[self.norigins]
        o.ctx = ctx
        o.tick = tick
        o.done = done
        o.awake = 0
        self._origin_owners.append(owner)
        self.norigins += 1
        return self.norigins - 1

    cdef void wake_origin(self, int origin) noexcept nogil:
        """Tick the origin from now on, until its tick returns False (in the driver thread)."""
        if not self.origins[origin].awake:
            self.origins[origin].awake = 1
            self.nawake += 1

    # -- control commands (run in the driver thread via call()) -------------------------

    def add_dev(self, int dev_id, int nr_queues, int depth, uint32_t max_io_bytes, uint64_t flags):
        """ADD_DEV: returns (dev_id, granted_flags). Raises OSError like the kernel."""
        cdef int d, qi, run, first, i
        if not 1 <= depth <= UBLK_MAX_QUEUE_DEPTH:
            raise OSError(EINVAL, f"ADD_DEV: queue_depth={depth} out of range 1..{UBLK_MAX_QUEUE_DEPTH}")
        if not 1 <= nr_queues <= 64:
            raise OSError(EINVAL, f"ADD_DEV: nr_hw_queues={nr_queues} out of range 1..64")
        if max_io_bytes < 4096 or max_io_bytes > (1 << 25) or max_io_bytes & 4095:
            raise OSError(EINVAL, f"ADD_DEV: max_io_buf_bytes={max_io_bytes} must be a multiple of "
                                  "4096 in 4096..32 MiB")
        # like the kernel: more queues than CPUs are cut to the CPU count, not refused
        nr_queues = min(nr_queues, os.cpu_count() or 1)
        if flags & F_QUIESCE and not flags & F_RECOVERY:
            raise OSError(EINVAL, "ADD_DEV: UBLK_F_QUIESCE needs UBLK_F_USER_RECOVERY")
        if flags & (F_USER_COPY | F_ZERO_COPY) and flags & uapi.UBLK_F_UNPRIVILEGED_DEV:
            raise OSError(EINVAL, "ADD_DEV: USER_COPY / zero copy are not allowed for unprivileged devices")
        if dev_id >= 0:
            if dev_id >= self.max_devs:
                raise OSError(EINVAL, f"ADD_DEV: dev_id={dev_id} beyond the simulator's {self.max_devs}")
            if self.devs[dev_id].present:
                raise OSError(EEXIST, f"ADD_DEV: device {dev_id} already exists")
            d = dev_id
        else:
            d = -1
            for i in range(self.max_devs):
                if not self.devs[i].present:
                    d = i
                    break
            if d < 0:
                raise OSError(ENOSPC, f"ADD_DEV: device limit reached ({self.max_devs} devices)")
        first = -1
        run = 0
        for qi in range(self.max_queues):
            if self.queues[qi].dev < 0:
                run += 1
                if run == nr_queues:
                    first = qi - nr_queues + 1
                    break
            else:
                run = 0
        if first < 0:
            raise OSError(ENOSPC, "ADD_DEV: the simulator has no room for more queues")
        granted = (flags | SIM_ALWAYS_SET) & self.features
        if granted & F_BATCH_IO:
            granted &= ~F_NEED_GET_DATA           # as the kernel: batches have no NEED_GET_DATA
        dev = &self.devs[d]
        free(dev.shm)
        memset(dev, 0, sizeof(SimDev))
        dev.present = 1
        dev.state = S_DEAD
        dev.nr_queues = nr_queues
        dev.depth = depth
        dev.first_q = first
        dev.flags = granted
        dev.max_io_bytes = max_io_bytes
        dev.lbs_shift = 9
        self._apply_limits(dev, None)
        self.disk_gens += 1
        dev.disk_gen = self.disk_gens
        dev.qbase = &self.queues[first]
        dev.reqs = self.reqs
        for qi in range(first, first + nr_queues):
            self._init_queue(qi, d, qi - first, depth)
            self.queues[qi].batch = (granted & F_BATCH_IO) != 0
        return d, granted

    cdef _init_queue(self, int qi, int d, int q_id, int depth):
        cdef SimQueue *q = &self.queues[qi]
        iods = np.zeros(depth, uapi.IO_DESC_DTYPE)
        cmds = np.zeros((depth + BATCH_SLOTS) * sizeof(SimCmd), np.uint8)
        self._iod_arrays[qi] = iods
        self._cmd_arrays[qi] = cmds
        free(q.tags)
        free(q.free_tags)
        free(q.pending)
        free(q.evts)
        q.dev = d
        q.q_id = q_id
        q.depth = depth
        q.iods = <ublksrv_io_desc *>cnp.PyArray_DATA(iods)
        q.cmds = <SimCmd *>cnp.PyArray_DATA(cmds)
        q.tags = <SimTag *>calloc(depth, sizeof(SimTag))
        q.free_tags = <uint16_t *>calloc(depth, sizeof(uint16_t))
        q.pending = <int32_t *>calloc(self.nreq, sizeof(int32_t))
        q.evts = <uint16_t *>calloc(depth, sizeof(uint16_t))
        q.batch = 0
        self.batch_reset(q)
        q.nfree = 0
        q.pend_head = 0
        q.pend_count = 0
        q.nr_ready = 0
        if q.tags == NULL or q.free_tags == NULL or q.pending == NULL or q.evts == NULL:
            raise MemoryError("ADD_DEV: cannot allocate queue state")

    cdef SimDev *_dev(self, int d, str what) except NULL:
        if not 0 <= d < self.max_devs or not self.devs[d].present:
            raise OSError(ENODEV, f"{what}: no device {d}")
        return &self.devs[d]

    def queue_endpoint(self, int d, int q_id):
        """(descriptor array, command slots address, global queue index) of one queue."""
        dev = self._dev(d, "queue_endpoint")
        if not 0 <= q_id < dev.nr_queues:
            raise OSError(EINVAL, f"device {d} has no queue {q_id} (it has {dev.nr_queues})")
        qi = dev.first_q + q_id
        return self._iod_arrays[qi], self._cmd_arrays[qi], qi

    def set_params(self, int d, uint64_t size, uint32_t lbs_shift, uint32_t attrs, uint32_t max_sectors,
                   bint discard=True, limits=None):
        """SET_PARAMS. limits: a RequestLimits (transport.base) or None. As the kernel, a
        refused one leaves the device without parameters: START_DEV then fails."""
        dev = self._dev(d, "SET_PARAMS")
        if dev.started:
            raise OSError(EACCES, "SET_PARAMS: device already started")
        why = self._params_refused(dev, size, lbs_shift, max_sectors, limits)
        if why:
            self._set_capacity(dev, 0)
            dev.discard = 0
            self._apply_limits(dev, None)
            raise OSError(EINVAL, f"SET_PARAMS: {why}")
        self._set_capacity(dev, size >> 9)
        dev.lbs_shift = lbs_shift
        dev.attrs = attrs
        dev.discard = discard
        if max_sectors:
            dev.max_io_bytes = max_sectors << 9
        self._apply_limits(dev, limits)

    cdef str _params_refused(self, SimDev *dev, uint64_t size, uint32_t lbs_shift, uint32_t max_sectors,
                             limits):
        """Why the kernel's parameter check refuses these (EINVAL), in its order, or ''."""
        if not 9 <= lbs_shift <= 12:
            return f"logical_bs_shift={lbs_shift} must be 9..12"
        if size & ((1 << lbs_shift) - 1):
            return f"size {size} is not a multiple of the block size"
        if max_sectors and (<uint64_t>max_sectors << 9) > dev.max_io_bytes:
            return "max_sectors exceeds max_io_buf_bytes"
        if limits is None:
            return ""
        if limits.dma_alignment is not None:
            mask = limits.dma_alignment & 0xFFFFFFFF          # a __u32 in the params
            if mask >= PAGE_SIZE or ((mask + 1) & mask):
                return f"DMA alignment mask {mask:#x} must be 2^n - 1 below the page size"
        seg = limits.segment()
        if seg is not None:
            boundary = ((seg[0] & 0xFFFFFFFFFFFFFFFF) + 1) & 0xFFFFFFFFFFFFFFFF   # a __u64 sum
            if boundary == 0 or boundary & (boundary - 1):
                return f"seg_boundary_mask {seg[0]:#x} + 1 must be a power of two"
            if boundary < uapi.UBLK_MIN_SEGMENT_SIZE:
                return f"seg_boundary_mask {seg[0]:#x} + 1 must be at least {uapi.UBLK_MIN_SEGMENT_SIZE}"
            if (seg[1] & 0xFFFFFFFF) < uapi.UBLK_MIN_SEGMENT_SIZE:
                return f"max_segment_size {seg[1]} must be at least {uapi.UBLK_MIN_SEGMENT_SIZE}"
        return ""

    cdef _apply_limits(self, SimDev *dev, limits):
        """The block queue's limits as START_DEV gives them (the kernel's defaults where a part
        is missing, the block layer's for a 0) and what they bound. The simulator's pages are
        never physically contiguous, so every page of a request's buffer is a segment of its
        own (a segment is at least a page and a boundary at least a page apart: neither the
        size nor the boundary splits a page): a request carries at most max_segments pages,
        and the fronts split larger I/O at that. Its fronts' buffers are page aligned, so
        they meet any DMA alignment."""
        seg = None if limits is None else limits.segment()
        dma = None if limits is None else limits.dma_alignment
        dev.dma_mask = DMA_ALIGNMENT_DEFAULT if dma is None else (dma & 0xFFFFFFFF or 511)
        if seg is None:
            seg = SEGMENT_DEFAULTS
        dev.max_seg_size = seg[1] & 0xFFFFFFFF
        dev.max_segments = seg[2] & 0xFFFF or 128
        dev.max_rq_bytes = min(dev.max_io_bytes, <uint64_t>dev.max_segments * PAGE_SIZE)

    def queue_limits(self, int d):
        """The block queue's limits (Transport.queue_limits), and max_rq_bytes."""
        dev = self._dev(d, "queue limits")
        if not dev.started:
            raise OSError(ENODEV, f"queue limits of device {d}: it has no disk (not started, or stopped)")
        return dict(dma_alignment=dev.dma_mask, max_segments=dev.max_segments,
                    max_segment_size=dev.max_seg_size, max_rq_bytes=dev.max_rq_bytes)

    def start_dev(self, int d):
        """START_DEV: EAGAIN until every tag of every queue has a FETCH outstanding."""
        dev = self._dev(d, "START_DEV")
        if dev.started or dev.stopped:
            raise OSError(EEXIST if dev.started else EINVAL, "START_DEV: device already started"
                          if dev.started else "START_DEV: device was stopped; delete and add it again")
        if dev.size == 0:
            raise OSError(EINVAL, "START_DEV: SET_PARAMS (basic, with dev_sectors) must come first")
        if not self.all_fetched(dev):
            raise BlockingIOError(EAGAIN, "START_DEV: waiting for every tag's FETCH_REQ")
        dev.started = 1
        dev.state = S_LIVE
        dev.server_alive = 1

    def stop_dev(self, int d):
        """STOP_DEV: the disk goes away; outstanding FETCHes complete with UBLK_IO_RES_ABORT."""
        dev = self._dev(d, "STOP_DEV")
        dev.started = 0
        dev.stopped = 1
        dev.state = S_DEAD
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            q = &self.queues[qi]
            self.abort_ready(q)
            self.fail_pending(q, -ENODEV)
        return dev.inflight

    def del_dev(self, int d):
        dev = self._dev(d, "DEL_DEV")
        if dev.started:
            self.stop_dev(d)
        if dev.inflight:
            raise OSError(EBUSY, f"DEL_DEV: device {d} still has {dev.inflight} requests at its server")
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            self.abort_ready(&self.queues[qi])
            self.queues[qi].dev = -1
            self._iod_arrays.pop(qi, None)
            self._cmd_arrays.pop(qi, None)
        self._shm_regs.pop(d, None)
        free(dev.shm)
        dev.shm = NULL
        dev.nshm = 0
        dev.present = 0

    def ring_leaves(self, int qi, int ring_fd):
        """A server ring of queue qi closes, perhaps with tags still armed (a forced
        exit): as the kernel cancels a closing ring's commands, its tags (BATCH_IO: the
        queue's, and its FETCH) are taken back, so that no request is copied into memory
        the server is about to free. Requests wait for a tag until the release that
        follows decides their fate."""
        cdef SimQueue *q = &self.queues[qi]
        cdef int i, tag, n = 0
        for i in range(q.nfree):
            tag = q.free_tags[i]
            if q.batch or q.tags[tag].ring_fd == ring_fd:
                q.tags[tag].state = TAG_IDLE
                q.nr_ready -= 1
            else:
                q.free_tags[n] = tag
                n += 1
        q.nfree = n
        if q.batch and q.fetch_fd == ring_fd:
            q.fetch_armed = 0

    def release(self, int d):
        """The server's /dev/ublkcN was closed (it exited or died)."""
        self._dev(d, "release")
        self.server_gone(d)

    cdef void server_gone(self, int d) noexcept nogil:
        cdef SimDev *dev = &self.devs[d]
        cdef SimQueue *q
        cdef int qi, tag, ri
        cdef bint reissue = (dev.flags & F_REISSUE) != 0
        dev.server_alive = 0
        if dev.stopped or not dev.started:
            for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
                self.fail_inflight(&self.queues[qi], -EIO)
            return
        if dev.flags & F_ANY_RECOVERY:
            dev.state = S_FAIL_IO if dev.flags & F_RECOVERY_FAIL_IO else S_QUIESCED
        else:
            dev.state = S_DEAD
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            q = &self.queues[qi]
            q.nfree = 0
            self.batch_reset(q)
            for tag in range(q.depth):
                if q.tags[tag].state == TAG_SERVER or q.tags[tag].state == TAG_GETDATA:
                    ri = q.tags[tag].req
                    if reissue:
                        q.pending[(q.pend_head + q.pend_count) % self.nreq] = ri
                        q.pend_count += 1
                    else:
                        self.complete(ri, -EIO)
                q.tags[tag].state = TAG_IDLE
            q.nr_ready = 0
            if dev.state != S_QUIESCED:
                self.fail_pending(q, -EREMOTEIO if dev.state == S_FAIL_IO else -EIO)
        if dev.state == S_DEAD:
            dev.started = 0
            dev.stopped = 1

    cdef void fail_inflight(self, SimQueue *q, int32_t res) noexcept nogil:
        """Complete the requests q's server holds with res; every tag is left without a FETCH."""
        cdef int tag
        for tag in range(q.depth):
            if q.tags[tag].state == TAG_SERVER or q.tags[tag].state == TAG_GETDATA:
                self.complete(q.tags[tag].req, res)
            q.tags[tag].state = TAG_IDLE
        q.nfree = 0
        self.batch_reset(q)
        q.nr_ready = 0

    def start_user_recovery(self, int d):
        dev = self._dev(d, "START_USER_RECOVERY")
        if not dev.flags & F_ANY_RECOVERY:
            raise OSError(EINVAL, "START_USER_RECOVERY: device was added without UBLK_F_USER_RECOVERY*")
        if dev.server_alive or dev.state not in (S_QUIESCED, S_FAIL_IO):
            raise OSError(EBUSY, "START_USER_RECOVERY: the device's server is still alive")

    def end_user_recovery(self, int d):
        """END_USER_RECOVERY: EAGAIN until the new server has fetched every tag."""
        dev = self._dev(d, "END_USER_RECOVERY")
        if dev.server_alive or dev.state not in (S_QUIESCED, S_FAIL_IO):
            raise OSError(EINVAL, "END_USER_RECOVERY: no recovery in progress")
        if not self.all_fetched(dev):
            raise BlockingIOError(EAGAIN, "END_USER_RECOVERY: waiting for every tag's FETCH_REQ")
        dev.state = S_LIVE
        dev.server_alive = 1
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            self.kick_pending(&self.queues[qi])

    def quiesce_dev(self, int d):
        """QUIESCE_DEV: stop handing requests to the server (they wait); its FETCHes are aborted."""
        dev = self._dev(d, "QUIESCE_DEV")
        if not dev.flags & F_QUIESCE:
            raise OSError(EOPNOTSUPP, "QUIESCE_DEV: needs a device added with UBLK_F_QUIESCE "
                                      "(and UBLK_F_USER_RECOVERY)")
        if not dev.started or dev.state == S_DEAD:
            raise OSError(ENODEV, f"QUIESCE_DEV: device {d} has no disk (not started, or stopped)")
        if dev.state != S_LIVE:
            return                    # QUIESCED or FAIL_IO already: the kernel answers 0
        dev.state = S_QUIESCED
        for qi in range(dev.first_q, dev.first_q + dev.nr_queues):
            self.abort_ready(&self.queues[qi])

    def reg_buf(self, int d, uint64_t addr, uint64_t length, uint32_t flags):
        """REG_BUF (UBLK_F_SHMEM_ZC): register memory of this process shared with the
        device's users; returns the lowest free index. Refuses what the 7.2 driver refuses,
        in its order: no device ENODEV; device without SHMEM_ZC EOPNOTSUPP; unknown flags,
        an address or length not a nonzero multiple of the page size EINVAL; a range not
        wholly mapped (or mapped read-only, unless READ_ONLY) EFAULT; pages already in a
        registered buffer EEXIST. Allowed in any state, started or not."""
        dev = self._dev(d, "REG_BUF")
        if not dev.flags & F_SHMEM_ZC:
            raise OSError(EOPNOTSUPP, "REG_BUF: the device was added without UBLK_F_SHMEM_ZC")
        if flags & ~uapi.UBLK_SHMEM_BUF_READ_ONLY or length == 0 or (addr | length) & (PAGE - 1):
            raise OSError(EINVAL, f"REG_BUF: addr {addr:#x} / len {length} must be nonzero page "
                                  f"multiples, flags {flags:#x} only READ_ONLY")
        ranges = shared_ranges(addr, length, bool(flags & uapi.UBLK_SHMEM_BUF_READ_ONLY))
        regs = self._shm_regs.setdefault(d, {})
        for old, _ in regs.values():
            if any(s < oe and os_ < e for s, e, _ in ranges for os_, oe, _ in old):
                raise OSError(EEXIST, "REG_BUF: part of the range is already registered")
        index = next(i for i in range(uapi.UBLK_SHMEM_ZC_IDX_MASK + 2) if i not in regs)
        if index > uapi.UBLK_SHMEM_ZC_IDX_MASK:
            raise OSError(ENOSPC, "REG_BUF: every buffer index is taken")
        regs[index] = ranges, bool(flags & uapi.UBLK_SHMEM_BUF_READ_ONLY)
        self._load_shm(d)
        return index

    def unreg_buf(self, int d, uint64_t index):
        """UNREG_BUF: EINVAL for an index above 65535, ENOENT for one not registered."""
        self._dev(d, "UNREG_BUF")
        if index > uapi.UBLK_SHMEM_ZC_IDX_MASK:
            raise OSError(EINVAL, f"UNREG_BUF: index {index} is above 65535")
        if self._shm_regs.get(d, {}).pop(index, None) is None:
            raise OSError(ENOENT, f"UNREG_BUF: no buffer {index} on device {d}")
        self._load_shm(d)

    def _load_shm(self, int d):
        """Rebuild the device's range table from its registrations (the driver thread is the
        only reader, and this runs in it: no request sees a half-built table)."""
        cdef SimDev *dev = &self.devs[d]
        rows = [(s, e, off, i, ro) for i, (rs, ro) in self._shm_regs.get(d, {}).items()
                for s, e, off in rs]
        cdef SimShm *tab = <SimShm *>malloc(max(1, len(rows)) * sizeof(SimShm))
        if tab == NULL:
            raise MemoryError()
        for k, (s, e, off, i, ro) in enumerate(rows):
            tab[k].start, tab[k].end, tab[k].buf_off, tab[k].index, tab[k].read_only = s, e, off, i, ro
        free(dev.shm)
        dev.shm = tab
        dev.nshm = len(rows)

    def get_params(self, int d):
        """GET_PARAMS (basic part): size, block size, attributes, max_sectors."""
        dev = self._dev(d, "GET_PARAMS")
        return dict(dev_sectors=dev.sectors, logical_bs_shift=dev.lbs_shift, attrs=dev.attrs,
                    max_sectors=dev.max_io_bytes >> 9)

    def update_size(self, int d, uint64_t sectors):
        """UPDATE_SIZE: the disk's capacity becomes ``sectors``, larger or smaller, in any
        state and whatever flags the device was added with, as the kernel takes it: only a
        device without a disk (never started, or stopped) is refused."""
        dev = self._dev(d, "UPDATE_SIZE")
        if not dev.started:
            raise OSError(ENODEV, f"UPDATE_SIZE: device {d} has no disk (not started, or stopped)")
        self._set_capacity(dev, sectors)

    cdef void _set_capacity(self, SimDev *dev, uint64_t sectors) noexcept:
        dev.sectors = sectors
        dev.size = min(sectors, MAX_SECTORS) << 9

    def try_stop_dev(self, int d):
        """TRY_STOP_DEV (SAFE_STOP_DEV): STOP_DEV, unless /dev/ublkbN is open (EBUSY, and
        nothing changes); a device without a disk is ENODEV."""
        dev = self._dev(d, "TRY_STOP_DEV")
        if not dev.started:
            raise OSError(ENODEV, f"TRY_STOP_DEV: device {d} has no disk (not started, or stopped)")
        if dev.openers:
            raise OSError(EBUSY, f"TRY_STOP_DEV: /dev/ublkb{d} is open ({dev.openers} openers)")
        return self.stop_dev(d)

    def open_disk(self, int d):
        """A front opens /dev/ublkbN: counted until close_disk (TRY_STOP_DEV refuses while
        any is open); returns the token close_disk takes."""
        dev = self._dev(d, f"open /dev/ublkb{d}")
        if not dev.started:
            raise OSError(ENOENT, f"open /dev/ublkb{d}: the device is not started")
        dev.openers += 1
        return dev.disk_gen

    def close_disk(self, int d, uint32_t gen):
        """A front of open_disk's token closes (nothing if its device is gone meanwhile)."""
        if 0 <= d < self.max_devs and self.devs[d].present and self.devs[d].disk_gen == gen:
            self.devs[d].openers -= 1

    def dev_info(self, int d):
        dev = self._dev(d, "GET_DEV_INFO")
        return dict(dev_id=d, nr_hw_queues=dev.nr_queues, queue_depth=dev.depth, state=dev.state,
                    max_io_buf_bytes=dev.max_io_bytes, flags=dev.flags,
                    size=(<object>dev.sectors) << 9,
                    logical_block_size=1 << dev.lbs_shift, attrs=dev.attrs, started=bool(dev.started),
                    inflight=dev.inflight, server_alive=bool(dev.server_alive))     # DevInfo's fields

    def list_devs(self):
        return [d for d in range(self.max_devs) if self.devs[d].present]

    # -- request slots for fronts -------------------------------------------------------

    def fill_req(self, int ri, int d, int op, uint32_t flags, uint64_t offset, uint32_t length,
                 uintptr_t buf):
        """Fill request slot ri (owned by the caller's front until it is sent)."""
        if not 0 <= ri < self.nreq:
            raise ValueError(f"request slot {ri} out of range")
        cdef Req *r = &self.reqs[ri]
        r.op = op
        r.flags = flags
        r.dev = d
        r.offset = offset
        r.len = length
        r.done = 0
        r.buf = <uint8_t *>buf
        r.queue = -1


def _mappings():
    """This process's mappings: (start, end, writable, file offset, (dev, inode) or None)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            f = line.split(None, 5)
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            inode = int(f[4])
            out.append((lo, hi, "w" in f[1], int(f[2], 16), (f[3], inode) if inode else None))
    return out


def shared_ranges(uint64_t addr, uint64_t length, bint read_only):
    """The address ranges in this process that reach the pages of [addr, addr+length), each
    (start, end, offset in the buffer): where a kernel, which matches requests by physical
    page, would find them. A file's pages (memfd, hugetlbfs, tmpfs) are reached through
    every mapping of them that exists now; anonymous memory only through the range itself.
    EFAULT if the range is not wholly mapped, or not writable unless read_only."""
    maps = _mappings()
    end = addr + length
    at = addr
    out = []
    for lo, hi, writable, foff, ident in maps:
        if hi <= at or lo > at or at >= end:
            continue
        piece_end = min(hi, end)
        if not writable and not read_only:
            raise OSError(EFAULT, "REG_BUF: the range is mapped read-only (register it READ_ONLY)")
        if ident is None:
            out.append((at, piece_end, at - addr))
        else:
            f0 = foff + (at - lo)
            f1 = f0 + (piece_end - at)
            for lo2, hi2, _, foff2, ident2 in maps:
                if ident2 != ident:
                    continue
                g0, g1 = max(f0, foff2), min(f1, foff2 + hi2 - lo2)
                if g0 < g1:
                    out.append((lo2 + g0 - foff2, lo2 + g1 - foff2, at - addr + g0 - f0))
        at = piece_end
    if at < end:
        raise OSError(EFAULT, f"REG_BUF: [{addr:#x}, {end:#x}) is not wholly mapped")
    return out


def front_msg(int ri) -> int:
    """MSG_RING user_data a front sends to submit request slot ri."""
    return sim_msg(SIM_MSG_FRONT, ri)
