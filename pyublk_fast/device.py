"""Device: serve a Backend as a ublk block device over a transport.

    with Device(MyBackend(), SimTransport()) as dev:
        blk = dev.open()          # the (simulated) /dev/ublkbN
        blk.pwrite(b"x" * 4096, 0)

start() adds the device, runs one thread per queue (each owning its ring; with
threads_per_queue=N, N threads per queue, each serving its share of the tags),
sets the parameters and starts the device; stop() stops it, lets every queue
drain and deletes it. Several devices per process are fine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import mmap
import os
import threading
import time

import numpy as np

from . import uapi
from concurrent.futures import ThreadPoolExecutor

from ._core.pytask import PyTarget
from ._core.queue import BATCH_DATA_PATHS, Queue
from ._core.ring import SETUP_COOP_TASKRUN, SETUP_SINGLE_ISSUER, Ring
from .errors import BackendError, missing_features_message, os_error
from .stats import Snapshot, snapshot
from .transport.base import DevInfo

log = logging.getLogger("pyublk_fast.device")

#: UBLK_F_* flag that asks the driver for each data path (our own bit for the seed's splice).
PATH_FLAGS = {
    "copy": 0,
    "need_get_data": uapi.UBLK_F_NEED_GET_DATA,
    "user_copy": uapi.UBLK_F_USER_COPY,
    "zero_copy": uapi.UBLK_F_SUPPORT_ZERO_COPY,
    "splice_zc": uapi.SIM_F_SPLICE_ZC,
}
DATA_PATHS = tuple(PATH_FLAGS)
#: Recovery modes: what happens to I/O when the server dies, until a new one recovers it.
RECOVERY_MODES = {
    "fail": uapi.UBLK_F_USER_RECOVERY,                                          # in-flight I/O fails
    "reissue": uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE,  # served again
    "fail_io": uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_FAIL_IO,  # all I/O fails meanwhile
}
#: Queue rings: owned by their thread (the kernel can skip locking), and completions run
#: when the thread enters the kernel anyway instead of interrupting it for each one.
SERVER_RING_FLAGS = SETUP_SINGLE_ISSUER | SETUP_COOP_TASKRUN
#: Data paths every backend can use: the server holds a buffer per tag.
BUFFERED_PATHS = ("copy", "need_get_data", "user_copy")


#: batch_io=None: whether a device uses BATCH_IO when the driver has it (see docs/architecture.md).
DEFAULT_BATCH_IO = False

#: Threads of a device's pool for run_in_thread (made when a handler first uses it).
THREAD_POOL_SIZE = 4

#: How long stop() lets the requests in flight finish (seconds) before it forces the
#: queues out: their handlers' tasks are cancelled and the driver fails the requests.
STOP_TIMEOUT = 10.0

#: Long enough to see a fast disk's completion without sleeping (a wake-up costs tens of
#: microseconds); the budget adapts, so an idle queue still sleeps. The README has the
#: measured effect and `benchmarks/sim/loop_vs_fio.py` measures it again.
DEFAULT_POLL_US = 500.0


#: Data paths that serve shared-memory zero copy requests (see Device._shared_setup).
SHARED_BUFFER_PATHS = ("copy", "user_copy")


class _SharedBuffers:
    """A device's registered shared buffers as its queues see them: ``table`` holds (base,
    length) by index for native code, ``views`` a memoryview each for Python backends."""

    def __init__(self) -> None:
        self.table = np.zeros(2 * (uapi.UBLK_SHMEM_ZC_IDX_MASK + 1), np.uint64)
        self.views: dict[int, memoryview] = {}
        self.owned: dict[int, mmap.mmap | None] = {}
        self.lock = threading.Lock()

    def publish(self, index: int, view: memoryview, addr: int, read_only: bool) -> None:
        self.views[index] = view
        # bit 63: a queue fails a READ flagged in a read-only buffer rather than write there
        self.table[2 * index + 1] = view.nbytes | (1 << 63 if read_only else 0)
        self.table[2 * index] = addr

    def withdraw(self, index: int) -> None:
        self.table[2 * index] = 0
        self.table[2 * index + 1] = 0
        self.views.pop(index, None)


def _shared_view(obj, length: int | None, offset: int, read_only: bool,
                 what: str) -> tuple[memoryview, mmap.mmap | None]:
    """(a byte view of the memory to register, the mapping made for it or None)."""
    if isinstance(obj, int) and not isinstance(obj, bool):
        try:
            size = os.fstat(obj).st_size
        except OSError as exc:
            raise os_error(exc.errno, f"{what}: fd {obj}") from None
        if length is None:
            length = size - offset
        if length <= 0 or offset < 0 or offset + length > size:
            raise ValueError(f"{what}: {length} bytes at offset {offset} do not fit in fd "
                             f"{obj}'s {size} bytes")
        prot = mmap.PROT_READ | (0 if read_only else mmap.PROT_WRITE)
        try:
            mm = mmap.mmap(obj, length, mmap.MAP_SHARED, prot, offset=offset)
        except OSError as exc:
            raise os_error(exc.errno, f"{what}: mmap of fd {obj}") from None
        return memoryview(mm), mm
    if length is not None or offset:
        raise ValueError(f"{what}: length and offset are for a file descriptor; slice the "
                         "buffer instead")
    try:
        view = memoryview(obj).cast("B")
    except TypeError as exc:
        raise TypeError(f"{what}: need a file descriptor or a contiguous buffer ({exc})") from None
    if view.readonly and not read_only:
        raise ValueError(f"{what}: the buffer is read-only: pass read_only=True")
    return view, None


def _unmap(view: memoryview, owned: mmap.mmap | None) -> None:
    """Unmap a mapping register_shared_buffer made (a backend still holding a view of it
    keeps it mapped until that view goes)."""
    if owned is not None:
        view.release()
        try:
            owned.close()
        except BufferError:
            pass


class Device:
    """A ublk device served by a backend. Not started until start() (or `with`).

    ``transport`` None makes a Device that only checks its options (the CLI does so
    before it starts a server): every argument is validated, ``wanted_flags()`` tells
    what ADD_DEV would ask for, and start()/recover() refuse.

    Tuning: ``poll_us`` (None: the backend's ``poll_us``, else DEFAULT_POLL_US) lets
    each queue thread poll its ring up to that long before sleeping; the budget adapts
    (it doubles while work arrives within it, halves when not, so an idle queue sleeps;
    0 always sleeps), and the poll yields its CPU to any other runnable thread.
    ``submit_chunk`` is how many SQEs a queue gathers while handling a batch before it
    submits them, so the backing disk starts on the first ones early. ``batch_io`` True
    serves the queues with BATCH_IO (Linux 7.0: commands for many tags at once, copy and
    user_copy paths), False with a command per tag, None as DEFAULT_BATCH_IO says.
    ``threads_per_queue`` N > 1 serves each queue from N threads, each with its own ring,
    owning every N-th tag (UBLK_F_PER_IO_DAEMON, Linux 6.16: the driver ties a tag to the
    thread that fetched it), so one queue's work spreads over CPUs; 1..depth, not with
    batch_io.
    """

    def __init__(self, backend, transport, *, queues: int = 1, depth: int = 128,
                 max_io_bytes: int = 512 * 1024, data_path: str = "auto", recovery: str | None = None,
                 dev_id: int = -1, native: bool = True, poll_us: float | None = None,
                 submit_chunk: int = 4, ring_flags: int = SERVER_RING_FLAGS,
                 shared_buffers: bool = False, batch_io: bool | None = None,
                 threads_per_queue: int = 1):
        backend.check()
        if data_path != "auto" and data_path not in DATA_PATHS:
            raise ValueError(f"data_path={data_path!r}: choose auto or one of {DATA_PATHS}")
        if recovery is not None and recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery={recovery!r}: choose None or one of {', '.join(RECOVERY_MODES)}")
        if not 1 <= depth <= uapi.UBLK_MAX_QUEUE_DEPTH:
            raise ValueError(f"depth={depth} out of range 1..{uapi.UBLK_MAX_QUEUE_DEPTH}")
        if queues < 1:
            raise ValueError(f"queues={queues} must be >= 1")
        if submit_chunk < 1:
            raise ValueError(f"submit_chunk={submit_chunk} must be >= 1")
        if isinstance(threads_per_queue, bool) or not isinstance(threads_per_queue, int) or \
                not 1 <= threads_per_queue <= depth:
            raise ValueError(f"threads_per_queue={threads_per_queue!r} out of range 1..{depth} "
                             "(the queue depth: each thread serves at least one tag)")
        self.threads_per_queue = threads_per_queue
        self.backend = backend
        self.transport = transport
        self.nr_queues = queues
        self.depth = depth
        self.max_io_bytes = max_io_bytes
        self.recovery = recovery
        self.native = backend.native_target() if native else None
        self.data_path = self._choose_path(data_path)
        if batch_io is None:        # where the driver, the data path and the threads allow it
            self.batch_io = bool(DEFAULT_BATCH_IO and self.data_path in BATCH_DATA_PATHS and
                                 threads_per_queue == 1 and (
                                     transport is None or transport.features() & uapi.UBLK_F_BATCH_IO))
        else:
            self.batch_io = bool(batch_io)
            if self.batch_io and self.data_path not in BATCH_DATA_PATHS:
                raise ValueError(f"batch_io serves the {' and '.join(BATCH_DATA_PATHS)} data paths, "
                                 f"not {self.data_path}: turn batch I/O off or choose another path")
            if self.batch_io and threads_per_queue > 1:
                raise ValueError(f"batch_io serves each queue from one thread, not "
                                 f"threads_per_queue={threads_per_queue}: choose one of them")
            if self.batch_io and transport is not None:
                self._require(uapi.UBLK_F_BATCH_IO, "batch_io")
        if threads_per_queue > 1 and transport is not None:
            self._require(uapi.UBLK_F_PER_IO_DAEMON, f"threads_per_queue={threads_per_queue}")
        self.dev_id = dev_id
        if poll_us is None:
            poll_us = DEFAULT_POLL_US if backend.poll_us is None else backend.poll_us
        if poll_us < 0:
            raise ValueError(f"poll_us={poll_us} must be >= 0 (0: always sleep)")
        self.poll_us = poll_us
        self.submit_chunk = submit_chunk
        self.ring_flags = ring_flags
        self.flags = 0
        self._shm = self._shared_setup() if shared_buffers else None
        self._threads: list[threading.Thread] = []
        self._queues: list[Queue | None] = []
        self._errors: list[BaseException] = []
        self._started = False
        self._closed = False       # stop() closed the backend: this Device cannot serve again
        self._done = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _choose_path(self, wanted: str) -> str:
        """The data path: what the user forced, else copy; checked against backend and driver."""
        if wanted == "auto":
            return "copy"
        offered = BUFFERED_PATHS + tuple(self.backend.data_paths)
        if wanted not in offered:
            raise ValueError(f"data_path={wanted!r} is not available: {type(self.backend).__name__} "
                             f"does not declare it; available: {', '.join(offered)}")
        if self.transport is not None:
            self._require(PATH_FLAGS[wanted], f"data_path={wanted!r}")
        return wanted

    def _require(self, flags: int, what: str) -> None:
        """Refuse ``what`` up front where the driver lacks any of ``flags`` (UBLK_F_*),
        naming the kernel version that brings them."""
        missing = flags & ~self.transport.features()
        if missing:
            raise os_error(errno.EOPNOTSUPP, what,
                           missing_features_message(missing, driver=self.transport.name))

    def wanted_flags(self) -> int:
        """The UBLK_F_* flags ADD_DEV will ask for (data path, recovery mode, shared buffers,
        batch I/O, quiesce, per-I/O daemons for several threads per queue)."""
        flags = PATH_FLAGS[self.data_path] | RECOVERY_MODES.get(self.recovery, 0)
        if self.threads_per_queue > 1:
            flags |= uapi.UBLK_F_PER_IO_DAEMON
        if self._shm is not None:
            flags |= uapi.UBLK_F_SHMEM_ZC
        if self.batch_io:
            flags |= uapi.UBLK_F_BATCH_IO
        if self.recovery and self.transport is not None and self.transport.features() & uapi.UBLK_F_QUIESCE:
            flags |= uapi.UBLK_F_QUIESCE      # lets quiesce() hand the device to a new server
        return flags

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Device":
        """Add, serve and start the device; returns once I/O can flow."""
        if self._started:
            raise RuntimeError("device already started")
        self._check_open()
        t = self.transport
        want = self.wanted_flags()
        self.dev_id, self.flags = t.add_dev(self.dev_id, self.nr_queues, self.depth, self.max_io_bytes, want)
        missing = want & ~self.flags
        if missing:
            t.del_dev(self.dev_id)
            raise os_error(errno.EOPNOTSUPP, "ADD_DEV", f"the driver did not grant "
                           f"{', '.join(uapi.feature_names(missing))}")
        try:
            self._take_shape(t.dev_info(self.dev_id))
            b = self.backend
            attrs = (uapi.UBLK_ATTR_READ_ONLY if b.read_only else 0) | \
                (uapi.UBLK_ATTR_VOLATILE_CACHE if b.can_flush else 0) | (uapi.UBLK_ATTR_FUA if b.can_fua else 0)
            t.set_params(self.dev_id, b.size, b.block_size, attrs,
                         discard=b.can_discard or b.can_write_zeroes, limits=b.request_limits())
            self._spawn_queues()
            t.start_dev(self.dev_id)
        except BaseException:
            self._teardown(delete=True)
            raise
        self._started = True
        return self

    def _take_shape(self, info: DevInfo) -> None:
        """Serve the device as the driver made it: the kernel cuts the queue count to the
        CPU count (like kublk, we ask for what the user said and let it), and a recovered
        device keeps the shape it was added with."""
        shape = (info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes)
        if shape != (self.nr_queues, self.depth, self.max_io_bytes):
            log.info("device %d: serving %d queues of depth %d, %d-byte buffers as the driver has "
                     "it (asked for %d, %d, %d; the kernel makes at most one queue per CPU)",
                     self.dev_id, *shape, self.nr_queues, self.depth, self.max_io_bytes)
            self.nr_queues, self.depth, self.max_io_bytes = shape
        if self.threads_per_queue > self.depth:
            raise ValueError(f"threads_per_queue={self.threads_per_queue}: device {self.dev_id} "
                             f"has queues of depth {self.depth}, too few tags for that many threads")

    def _check_open(self):
        if self.transport is None:
            raise RuntimeError("this Device has no transport: it only checked its options")
        if self._closed:
            raise RuntimeError(f"device {self.dev_id} was stopped and its backend closed: "
                               "make a new Device (with a new backend) to serve again")

    def _spawn_queues(self):
        n = self.threads_per_queue
        ready = [threading.Event() for _ in range(self.nr_queues * n)]
        self._queues = [None] * len(ready)       # runner q_id * n + k serves tags k, k + n, ...
        self._threads = []
        for i in range(len(ready)):
            q_id, k = divmod(i, n)
            th = threading.Thread(target=self._serve_queue, args=(q_id, k, i, ready[i]),
                                  name=f"ublk{self.dev_id}-q{q_id}" + (f"t{k}" if n > 1 else ""),
                                  daemon=True)
            th.start()
            self._threads.append(th)
        for ev in ready:
            ev.wait()
        if self._errors:
            raise self._errors[0]

    def _thread_pool(self) -> ThreadPoolExecutor:
        """The pool run_in_thread uses, shared by the queues; made on first use."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(THREAD_POOL_SIZE, thread_name_prefix=f"ublk{self.dev_id}-io")
            return self._pool

    def _close_pool(self) -> None:
        """After the queues exit: workers still running finish alone; their results are
        dropped (the queues cancelled what awaited them)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _serve_queue(self, q_id: int, k: int, i: int, ready: threading.Event):
        """Serve queue q_id's tags k, k + n, ... (n threads per queue) as runner i."""
        q = None
        try:
            # each thread its own channel: the driver answers a tag on the ring that fetched it
            ep = self.transport.queue_endpoint(self.dev_id, q_id)
            # a Python backend gets a target per thread: its tasks and ring I/O are the thread's
            target = self.native if self.native is not None else PyTarget(self.backend, self._thread_pool)
            q = Queue(self.depth, self.max_io_bytes, ep.channel, ep.iods, native=target,
                      data_path=self.data_path, poll_us=self.poll_us, submit_chunk=self.submit_chunk,
                      ring_flags=self.ring_flags, batch_io=bool(self.flags & uapi.UBLK_F_BATCH_IO),
                      threads=self.threads_per_queue, thread=k)
            self._queues[i] = q
            if self._shm is not None:
                q.share_buffers(self._shm.table, self._shm.views)
            q.fetch_all()
        except BaseException as e:  # reported by start()
            self._errors.append(e)
            ready.set()
            return
        ready.set()
        try:
            errors = q.run()
            if errors:
                log.warning("queue %d (thread %d) of device %d: %d commands refused by the driver",
                            q_id, k, self.dev_id, errors)
        finally:
            q.close()

    def _wake_queues(self):
        with Ring(64) as r:
            sent = 0
            for q in self._queues:
                if q is not None and not q.closed:
                    r.prep_msg_ring(q.ring_fd, 0, q.wake_ud())
                    sent += 1
            if sent:
                r.wait(sent, timeout=5)

    def _teardown(self, delete: bool):
        t = self.transport
        try:
            t.stop_dev(self.dev_id)
        except OSError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if any(th.is_alive() for th in self._threads):
            log.error("device %d: queue threads did not stop after STOP_DEV; forcing them out", self.dev_id)
            self._wake_queues()
            for th in self._threads:
                th.join(10)
            # what they held is the driver's to fail now (as when a server dies): only then
            # can the device be deleted
            t.release(self.dev_id)
        self._close_pool()
        if delete:
            t.del_dev(self.dev_id)

    def stop(self, safe: bool = False) -> None:
        """Stop and delete the device. In-flight requests complete first; never hangs.

        ``safe``: only if the block device is not open (nor mounted): otherwise OSError
        EBUSY, and the device serves on (TRY_STOP_DEV, Linux 7.0+)."""
        if not self._started:
            self._done.set()       # a serve_forever() still starting up stops right away
            return
        if safe:
            self.transport.try_stop_dev(self.dev_id)
        self._started = False
        try:
            self._teardown(delete=True)
        finally:
            self.backend.close()
            self._closed = True
            self._done.set()

    def kill(self) -> None:
        """Simulate the server dying (kill -9): queues vanish without committing, the char dev
        closes. Returns once the driver has seen it (the device is no longer LIVE)."""
        if not self._started:
            return
        self._started = False
        self._wake_queues()
        for th in self._threads:
            th.join(10)
        self._close_pool()
        self.transport.release(self.dev_id)
        self._wait_not_live()

    def _wait_not_live(self, timeout: float = 10.0) -> None:
        """The kernel notices a dead server only once its rings are torn down, which happens
        after the ring fds are closed (io_uring exit work): wait for that state change."""
        deadline = time.monotonic() + timeout
        while self.transport.dev_info(self.dev_id).state == uapi.UBLK_S_DEV_LIVE:
            if time.monotonic() > deadline:
                log.warning("device %d: still LIVE %.0f s after its server left", self.dev_id, timeout)
                return
            time.sleep(0.002)

    def quiesce(self) -> None:
        """Hand the device over (server upgrade, needs recovery=...): new I/O waits, the queues
        finish what they hold and exit, and the char device is released; recover() resumes."""
        if not self._started:
            raise RuntimeError("device is not started")
        what = f"quiesce device {self.dev_id}"
        self._require(uapi.UBLK_F_QUIESCE, what)
        if not self.flags & uapi.UBLK_F_QUIESCE:
            raise os_error(errno.EOPNOTSUPP, what, "it was added without a recovery mode "
                           "(recovery='reissue' or 'fail_io'; the CLI's --recovery)")
        self.transport.quiesce_dev(self.dev_id)
        for th in self._threads:
            th.join(10)
        self._close_pool()
        self._started = False
        self.transport.release(self.dev_id)
        # the kernel makes the device QUIESCED when the char device is finally released,
        # after the queue rings are torn down: return once a new server can recover it
        self._wait_not_live()

    def resize(self, size: int) -> None:
        """Grow the device to ``size`` bytes while it serves (UPDATE_SIZE, Linux 6.16+): the
        backend grows first (``Backend.resize``), then the block device; a file system on it
        can grow after (``resize2fs``). Shrinking is refused: the kernel would take it, but
        a file system or partition on the device would lose what lies past the new end."""
        if not self._started:
            raise RuntimeError("device is not started")
        b = self.backend
        what = f"resize device {self.dev_id} to {size} bytes"
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % b.block_size:
            raise ValueError(f"{what}: the size must be a positive multiple of the block size "
                             f"{b.block_size}")
        if size < b.size:
            raise ValueError(f"{what}: shrinking is refused (it is {b.size} bytes): a file "
                             "system or partition on it would lose what lies past the new end")
        self._require(uapi.UBLK_F_UPDATE_SIZE, what)
        if size > b.size:
            try:
                b.resize(size)
            except BackendError as exc:
                raise os_error(exc.errno, what, exc.args[1]) from None
            except OSError as exc:
                raise os_error(exc.errno or errno.EIO, what, exc.strerror) from None
        self.transport.update_size(self.dev_id, size >> uapi.SECTOR_SHIFT)

    def recover(self) -> "Device":
        """Take over a device whose server died (needs recovery=...): re-serve it with this backend."""
        self._check_open()
        t = self.transport
        t.start_user_recovery(self.dev_id)
        info = t.dev_info(self.dev_id)
        self.flags = info.flags        # what it was added with: quiesce() needs to know
        self._take_shape(info)
        self._errors = []
        self._spawn_queues()
        t.end_user_recovery(self.dev_id)
        self._started = True
        return self

    # -- shared-memory zero copy (UBLK_F_SHMEM_ZC) ------------------------------------------

    def _shared_setup(self) -> "_SharedBuffers":
        if self.data_path not in SHARED_BUFFER_PATHS:
            raise ValueError(f"shared_buffers needs data_path copy or user_copy, not "
                             f"{self.data_path!r}: with need_get_data the 7.2 driver flags a "
                             "write as shared but hands over the server's buffer address, and "
                             "zero copy already has no copy to save")
        if self.transport is not None:
            self._require(uapi.UBLK_F_SHMEM_ZC, "shared_buffers")
        return _SharedBuffers()

    def register_shared_buffer(self, buffer_or_fd, length: int | None = None, offset: int = 0,
                               *, read_only: bool = False) -> int:
        """Share memory with the device's users (UBLK_F_SHMEM_ZC, Linux 7.1+; the Device made
        with ``shared_buffers=True`` and started). Returns the buffer's index.

        ``buffer_or_fd``: a file descriptor (a memfd, a hugetlbfs or tmpfs file), mapped
        here ``length`` bytes (default: to its end) from ``offset``; or a buffer object
        already mapped shared (an ``mmap``), kept referenced until unregistered. Address and
        length must be page multiples. An application that maps the same pages and does
        O_DIRECT I/O from them on /dev/ublkbN has its requests served in place: the driver
        copies nothing; a native backend reads and writes the buffer directly, a Python
        backend gets a memoryview of it. Other requests take the normal data path.
        ``read_only``: pin without write access (a write-sealed memfd): the server maps it
        read-only and serves writes from it; reads into it take the normal data path (the
        7.2 driver does not flag them; a queue would fail one it did with EIO)."""
        shm = self._shm
        what = f"register a shared buffer on device {self.dev_id}"
        if shm is None:
            raise RuntimeError(f"{what}: make the Device with shared_buffers=True")
        if not self._started:
            raise RuntimeError(f"{what}: the device is not started")
        view, owned = _shared_view(buffer_or_fd, length, offset, read_only, what)
        addr = np.frombuffer(view, np.uint8).ctypes.data if view.nbytes else 0
        with shm.lock:
            # the driver gives the lowest free index: the queues know the buffer before any
            # request can point into it
            guess = next(i for i in range(len(shm.table) // 2 + 1) if i not in shm.views)
            if guess > uapi.UBLK_SHMEM_ZC_IDX_MASK:
                raise os_error(errno.ENOSPC, what, "all 65536 buffer indexes are taken")
            shm.publish(guess, view, addr, read_only)
            try:
                index = self.transport.reg_buf(self.dev_id, addr, view.nbytes, read_only)
            except BaseException:
                shm.withdraw(guess)
                _unmap(view, owned)
                raise
            if index != guess:          # someone else registered on this device too
                shm.withdraw(guess)
                shm.publish(index, view, addr, read_only)
            shm.owned[index] = owned
        return index

    def unregister_shared_buffer(self, index: int) -> None:
        """Stop sharing buffer ``index``: requests in it have completed when this returns,
        later ones take the normal data path. A mapping the device made is unmapped."""
        shm = self._shm
        if shm is None or index not in shm.views:
            raise ValueError(f"device {self.dev_id} has no shared buffer {index}")
        with shm.lock:
            self.transport.unreg_buf(self.dev_id, index)
            view = shm.views[index]
            shm.withdraw(index)
            _unmap(view, shm.owned.pop(index, None))

    @property
    def shared_requests(self) -> int:
        """Requests served in place in a shared buffer (they arrived UBLK_IO_F_SHMEM_ZC)."""
        return sum(q.shm_requests for q in self._queues if q is not None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    async def __aenter__(self):
        """`async with Device(...)`: start/stop run in the default executor, the event loop keeps going."""
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, *exc):
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def serve_forever(self, poll: float = 0.5) -> None:
        """Start if needed and serve until stop() is called (from another thread) or Ctrl-C."""
        if not self._started:
            self.start()
        try:
            while not self._done.wait(poll):
                pass
        except KeyboardInterrupt:
            log.info("device %d: interrupted, stopping", self.dev_id)
        finally:
            self.stop()

    def open(self):
        """The device's block-device front (the simulated or real /dev/ublkbN)."""
        if self.dev_id < 0:
            raise FileNotFoundError(2, "the device was never added: call start() (or use `with Device(...)`) first")
        return self.transport.open(self.dev_id)

    @property
    def serving(self) -> bool:
        """True while a queue thread is serving (False once STOP_DEV, from anywhere, ended them)."""
        return any(th.is_alive() for th in self._threads)

    def stats(self) -> "Snapshot":
        """The queues' counters now (pyublk_fast.stats.Snapshot): ``.summary()`` gives
        totals, ``later.summary(since=earlier)`` an interval's rates and latencies. One row
        per queue: the sum of its threads'."""
        snap = snapshot([q for q in self._queues if q is not None])
        n = self.threads_per_queue
        if n > 1 and len(snap.counters) == self.nr_queues * n:
            rows = snap.counters.reshape(self.nr_queues, n, -1).sum(axis=1, dtype=np.uint64)
            snap = dataclasses.replace(snap, counters=rows)
        return snap

    @property
    def requests_served(self) -> int:
        return sum(q.requests for q in self._queues if q is not None)

    def info(self) -> DevInfo:
        return self.transport.dev_info(self.dev_id)
