"""Async Python backends on the simulated driver: a task per request on the queue's ring.

A request that awaits does not hold up the others of its queue; an exception fails only
its own request (with its errno, or EIO and a log line); stopping or killing the server
cancels what awaits and loses nothing with recovery='reissue'; and every RingIO
operation moves the bytes it says, on every data path.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import re
import threading
import time

import pytest

from pyublk_fast import aio, device as device_module, uapi
from pyublk_fast.backend import Backend
from pyublk_fast.device import DATA_PATHS, Device
from pyublk_fast.errors import BackendError
from pyublk_fast.util import wait_until

KiB, MiB = 1 << 10, 1 << 20
READ, WRITE = uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE
BLOCK = 4096


def submit_in_thread(blk, reqs, timeout: float = 20):
    """blk.submit(reqs) in a thread: (thread, out); out gets "res" (or "exc") and "elapsed"."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            out["res"] = blk.submit(reqs, timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["exc"] = e
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def reads(offsets, length: int = BLOCK) -> tuple[list, list[bytearray]]:
    """READ requests of length bytes at offsets, and their buffers."""
    bufs = [bytearray(length) for _ in offsets]
    return [(READ, off, length, buf) for off, buf in zip(offsets, bufs)], bufs


class AsyncRam(Backend):
    """A RAM disk of random bytes whose handlers are coroutines; subclasses' before()
    runs first in each (sleeps, faults, waits)."""

    size = MiB

    def __init__(self):
        self.data = bytearray(random.Random(self.size).randbytes(self.size))

    async def before(self, offset: int, write: bool) -> None:
        pass

    async def read(self, offset, buf):
        await self.before(offset, False)
        buf[:] = self.data[offset:offset + len(buf)]

    async def write(self, offset, data):
        await self.before(offset, True)
        self.data[offset:offset + len(data)] = data


# -- a request that awaits does not hold up its queue ------------------------------------------

class Sleepy(AsyncRam):
    """Requests at the offsets in `slow` first sleep `delay` seconds on the ring; `order`
    has the offsets of the requests in the order they finished."""

    def __init__(self, slow: set[int], delay: float):
        super().__init__()
        self.slow = slow
        self.delay = delay
        self.asleep = 0
        self.order: list[int] = []

    async def before(self, offset, write):
        if offset in self.slow:
            self.asleep += 1
            await aio.current().sleep(self.delay)
        self.order.append(offset)


def test_a_sleeping_request_does_not_hold_up_its_queue(sim):
    delay = 0.5                           # loose: this machine may be busy
    be = Sleepy({0}, delay)
    with Device(be, sim, queues=1, depth=32) as dev, dev.open() as slow_blk, dev.open() as blk:
        slow_req, (slow_buf,) = reads([0])
        th, out = submit_in_thread(slow_blk, slow_req)
        assert wait_until(lambda: be.asleep == 1, 10), "the slow read never reached its handler"
        offsets = [i * BLOCK for i in range(1, 17)]
        fast_reqs, bufs = reads(offsets)
        t0 = time.monotonic()
        assert blk.submit(fast_reqs) == [BLOCK] * 16
        fast = time.monotonic() - t0
        # every fast read was served while the slow one still slept on the ring
        assert be.order == offsets and th.is_alive()
        assert [bytes(b) for b in bufs] == [be.data[o:o + BLOCK] for o in offsets]
        assert fast < delay, f"16 reads took {fast:.3f} s behind a {delay} s sleep"
        th.join(10)
        assert out["res"] == [BLOCK] and slow_buf == be.data[:BLOCK]
        assert be.order[-1] == 0 and out["elapsed"] >= delay


def test_sleeping_requests_sleep_together(sim):
    """16 reads that each sleep 0.2 s finish in about 0.2 s, not 3.2 s one after another."""
    offsets = [i * BLOCK for i in range(16)]
    be = Sleepy(set(offsets), 0.2)
    with Device(be, sim, queues=1, depth=16) as dev, dev.open() as blk:
        reqs, bufs = reads(offsets)
        t0 = time.monotonic()
        assert blk.submit(reqs) == [BLOCK] * 16
        elapsed = time.monotonic() - t0
    assert [bytes(b) for b in bufs] == [be.data[o:o + BLOCK] for o in offsets]
    assert 0.2 <= elapsed < 1.0, elapsed


# -- exceptions fail only their request --------------------------------------------------------

#: offset -> (what its read does, the errno the request gets)
FAULTS = {
    1 * BLOCK: ("oserror", errno.ENOSPC),
    3 * BLOCK: ("backend_error", errno.ENODATA),
    5 * BLOCK: ("bug", errno.EIO),
    7 * BLOCK: ("future", errno.EIO),
    9 * BLOCK: ("asyncio_sleep", errno.EIO),
}


class Faulty(AsyncRam):
    """Reads of FAULTS' offsets fail, each its own way, before their first await
    (early) or after one on the ring; the other reads also await the ring."""

    def __init__(self, early: bool, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.early = early
        self.loop = loop

    async def before(self, offset, write):
        io = aio.current()
        if not self.early:
            await io.nop()
        what = FAULTS.get(offset, ("ok",))[0]
        if what == "oserror":
            raise OSError(errno.ENOSPC, "no room for this block")
        if what == "backend_error":
            raise BackendError(errno.ENODATA)
        if what == "bug":
            raise ValueError("checksum mismatch in block 5")
        if what == "future":
            await self.loop.create_future()        # an asyncio future: no loop runs here
        if what == "asyncio_sleep":
            await asyncio.sleep(0.01)
        await io.nop()


@pytest.mark.parametrize("early", [False, True], ids=["after_an_await", "before_any_await"])
def test_an_exception_fails_only_its_request(sim, caplog, early):
    caplog.set_level(logging.ERROR, logger="pyublk_fast.aio")
    loop = asyncio.new_event_loop()
    be = Faulty(early, loop)
    offsets = [i * BLOCK for i in range(16)]
    want = [-FAULTS[o][1] if o in FAULTS else BLOCK for o in offsets]
    try:
        with Device(be, sim, queues=1, depth=32) as dev, dev.open() as blk:
            reqs, bufs = reads(offsets)
            assert blk.submit(reqs) == want                  # all in flight together
            for off, buf in zip(offsets, bufs):
                if off not in FAULTS:
                    assert buf == be.data[off:off + BLOCK], off
            # the queue keeps serving, faults and all
            reqs, bufs = reads(offsets)
            assert blk.submit(reqs) == want
            assert bufs[0] == be.data[:BLOCK]
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.name == "pyublk_fast.aio"]
    text = caplog.text
    # OSError and BackendError pass their errno silently; the rest is logged with why
    assert len(errors) == 2 * 3, [r.getMessage() for r in errors]
    assert "ValueError: checksum mismatch in block 5" in text
    assert "awaited <Future pending>" in text and "the request gets EIO" in text
    assert "RuntimeError: no running event loop" in text and "asyncio.sleep(0.01)" in text


class LeavesWork(Backend):
    """Reads of offset 0 start work that takes 0.2 s and do not await it: a ring sleep
    (then fail, or return from a plain function) or a thread job (then fail)."""

    size = MiB

    def __init__(self, how: str):
        self.how = how
        self.job_done = threading.Event()
        self.data = bytes(range(256)) * (self.size // 256)
        if how == "sync_handler":
            self.read = self._read_sync

    def _job(self):
        time.sleep(0.2)
        self.job_done.set()

    def _read_sync(self, offset, buf):
        if offset == 0:
            aio.current().sleep(0.2)
            return
        buf[:] = self.data[offset:offset + len(buf)]

    async def read(self, offset, buf):
        io = aio.current()
        if offset == 0:
            if self.how == "thread_job":
                io.run_in_thread(self._job)
            else:
                io.sleep(0.2)
            raise BackendError(errno.ENOSPC)
        await io.nop()
        buf[:] = self.data[offset:offset + len(buf)]


@pytest.mark.parametrize("how", ["ring_op", "thread_job", "sync_handler"])
def test_a_request_is_committed_after_the_work_it_started(sim, how):
    """The tag's buffer (and its op accounting) belongs to the request until what its
    handler started is done, also when the handler failed or returned without awaiting:
    only then does the request complete and its tag serve the next one."""
    be = LeavesWork(how)
    with Device(be, sim, queues=1, depth=1) as dev, dev.open() as blk:
        t0 = time.monotonic()
        res = blk.submit([(READ, 0, BLOCK, bytearray(BLOCK))], timeout=10)
        assert time.monotonic() - t0 >= 0.2
        assert be.job_done.is_set() == (how == "thread_job")
        assert res == [BLOCK if how == "sync_handler" else -errno.ENOSPC]
        # the same tag serves the next requests: one that awaits the ring, then more
        assert blk.pread(4 * BLOCK, BLOCK) == be.data[BLOCK:5 * BLOCK]


# -- stop and kill with tasks in flight ----------------------------------------------------------

class Held(AsyncRam):
    """Writes wait until `release` is set: even blocks on the ring (sleeps of 10 ms), odd
    ones in a run_in_thread job. `cancelled` has the offsets of the tasks that got
    CancelledError, `jobs_done` counts thread jobs that returned."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.waiting = 0
        self.cancelled: list[int] = []
        self.jobs_done = 0

    def _blocking(self) -> bool:
        ok = self.release.wait(30)
        self.jobs_done += 1
        return ok

    async def before(self, offset, write):
        if not write:
            return
        io = aio.current()
        self.waiting += 1
        try:
            if offset // BLOCK % 2:
                assert await io.run_in_thread(self._blocking)
            else:
                while not self.release.is_set():
                    await io.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(offset)
            raise


def _held_writes(n: int, seed: int) -> tuple[list, list[bytes]]:
    pats = [random.Random(seed + i).randbytes(BLOCK) for i in range(n)]
    return [(WRITE, i * BLOCK, BLOCK, p) for i, p in enumerate(pats)], pats


def _end_under_writes(blk, reqs, arrived, end):
    """Submit reqs from a thread; once arrived() (all of them in their handlers), end()
    (stop or kill), which must return within 5 s. Returns the submit's (thread, out)."""
    th, out = submit_in_thread(blk, reqs)
    assert wait_until(arrived, 10), "the writes never all reached their handlers"
    t0 = time.monotonic()
    end()
    assert time.monotonic() - t0 < 5, f"{end.__name__} took {time.monotonic() - t0:.1f} s"
    return th, out


def test_kill_cancels_tasks_and_reissue_serves_them_again(sim, caplog):
    caplog.set_level(logging.WARNING)
    be = Held()
    old = Device(be, sim, queues=1, depth=8, recovery="reissue").start()
    new = None
    reqs, pats = _held_writes(8, seed=1)
    try:
        with old.open() as blk:
            th, out = _end_under_writes(blk, reqs, lambda: be.waiting == 8, old.kill)
            assert sorted(be.cancelled) == [i * BLOCK for i in range(8)]
            # the thread jobs outlive their queue; they end without posting to a gone ring
            be.release.set()
            assert wait_until(lambda: be.jobs_done == 4, 10)
            assert th.is_alive(), "with reissue the requests wait for a new server"
            fresh = AsyncRam()
            new = Device(fresh, sim, queues=1, depth=8, recovery="reissue", dev_id=old.dev_id)
            new.recover()
            th.join(10)
            assert out.get("res") == [BLOCK] * 8, out
            assert [fresh.data[i * BLOCK:(i + 1) * BLOCK] for i in range(8)] == pats
            assert blk.pread(8 * BLOCK, 0) == b"".join(pats)
    finally:
        be.release.set()
        (new or old).stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_stop_lets_sleeping_requests_finish(sim):
    """stop() with tasks sleeping on the ring lets them finish (in-flight requests complete
    first): every write succeeds and is kept."""
    offsets = [i * BLOCK for i in range(8)]
    be = Sleepy(set(offsets), 0.3)
    reqs, pats = _held_writes(8, seed=2)
    dev = Device(be, sim, queues=1, depth=8).start()
    with dev.open() as blk:
        th, out = _end_under_writes(blk, reqs, lambda: be.asleep == 8, dev.stop)
        th.join(10)
    assert out.get("res") == [BLOCK] * 8, out
    assert [be.data[o:o + BLOCK] for o in offsets] == pats


def test_stop_cancels_tasks_that_never_finish(sim, monkeypatch):
    """stop() gives in-flight requests STOP_TIMEOUT to finish, then forces the queues out:
    the tasks get CancelledError, the requests fail (EIO), the device is deleted."""
    monkeypatch.setattr(device_module, "STOP_TIMEOUT", 0.5)
    be = Held()
    reqs, _ = _held_writes(8, seed=3)
    dev = Device(be, sim, queues=1, depth=8).start()
    try:
        with dev.open() as blk:
            th, out = _end_under_writes(blk, reqs, lambda: be.waiting == 8, dev.stop)
            th.join(10)
            assert out.get("res") == [-errno.EIO] * 8, out
        assert sorted(be.cancelled) == [i * BLOCK for i in range(8)]
        assert dev.dev_id not in sim.list_devs()
    finally:
        be.release.set()
    assert wait_until(lambda: be.jobs_done == 4, 10)


# -- RingIO, operation by operation ------------------------------------------------------------

class Probe(Backend):
    """Each READ runs the test's `probe(io, offset, buf)` coroutine function in its
    handler and keeps its outcome by offset; the request itself succeeds."""

    size = MiB
    data_paths = ("zero_copy", "splice_zc")

    def __init__(self):
        self.probe = None
        self.outcome: dict[int, tuple] = {}

    async def read(self, offset, buf):
        try:
            self.outcome[offset] = ("returned", await self.probe(aio.current(), offset, buf))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.outcome[offset] = ("raised", exc)


class Prober:
    def __init__(self, be: Probe, dev: Device, blk):
        self.be = be
        self.dev = dev
        self.blk = blk

    def run(self, probe, length: int = BLOCK) -> tuple:
        """probe's return value (or its exception, raised here) and the bytes the
        request's reader got."""
        self.be.probe = probe
        self.be.outcome.clear()
        (req,), (buf,) = reads([0], length)
        assert self.blk.submit([req]) == [length]
        how, value = self.be.outcome[0]
        if how == "raised":
            raise value
        return value, bytes(buf)


@contextlib.contextmanager
def probing(sim, data_path: str = "copy"):
    be = Probe()
    with Device(be, sim, queues=1, depth=8, data_path=data_path) as dev, dev.open() as blk:
        yield Prober(be, dev, blk)


@pytest.fixture
def prober(sim):
    with probing(sim) as p:
        yield p


@pytest.fixture
def scratch(tmp_path):
    """A file of 6000 random bytes, open read-write: (fd, its bytes)."""
    data = random.Random(6000).randbytes(6000)
    path = tmp_path / "scratch"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    yield fd, data
    os.close(fd)


def test_read_write_and_a_short_read_at_eof(prober, scratch):
    fd, data = scratch
    new = random.Random(1).randbytes(3000)

    async def probe(io, offset, buf):
        wrote = await io.write(fd, new, 1000)
        head = bytearray(4096)
        tail = bytearray(4096)
        past = bytearray(512)
        return wrote, await io.read(fd, head, 0), head, await io.read(fd, tail, 4096), tail, \
            await io.read(fd, past, 8192)

    (wrote, n_head, head, n_tail, tail, n_past), _ = prober.run(probe)
    want = data[:1000] + new + data[4000:]
    assert wrote == 3000 and os.pread(fd, 6000, 0) == want
    assert (n_head, n_tail, n_past) == (4096, 6000 - 4096, 0)
    assert head == want[:4096] and tail[:6000 - 4096] == want[4096:] and not any(tail[1904:])


def test_readv_writev(prober, scratch):
    fd, data = scratch
    parts = [b"a" * 100, memoryview(b"b" * 3000), bytearray(b"c" * 7)]

    async def probe(io, offset, buf):
        wrote = await io.writev(fd, parts, 50, dsync=True)
        into = [bytearray(10), bytearray(3200), bytearray(5000)]
        return wrote, await io.readv(fd, into, 40), into

    (wrote, got, into), _ = prober.run(probe)
    want = data[:50] + b"a" * 100 + b"b" * 3000 + b"c" * 7 + data[3157:]
    assert wrote == 3107 and os.pread(fd, 6000, 0) == want
    assert got == 6000 - 40 and b"".join(into)[:got] == want[40:]


def test_fsync_fdatasync_nop(prober, scratch):
    fd, _ = scratch
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)

    async def probe(io, offset, buf):
        out = [await io.fsync(fd), await io.fdatasync(fd), await io.nop()]
        for call in (io.fsync, io.fdatasync):
            try:
                await call(closed)
            except OSError as e:
                out.append(e.errno)
        return out

    assert prober.run(probe)[0] == [None, None, None, errno.EBADF, errno.EBADF]


def test_fallocate_punch_hole_and_zero_range(prober, scratch):
    fd, data = scratch

    async def probe(io, offset, buf):
        await io.fallocate(fd, aio.PUNCH_HOLE | aio.KEEP_SIZE, 0, 4096)
        try:
            await io.fallocate(fd, aio.ZERO_RANGE | aio.KEEP_SIZE, 4096, 1000)
        except OSError as e:
            return e.errno
        got = bytearray(6000)
        assert await io.read(fd, got, 0) == 6000
        return got

    got, _ = prober.run(probe)
    want = bytes(5096) + data[5096:]
    if got == errno.EOPNOTSUPP:          # a file system without ZERO_RANGE (tmpfs)
        assert os.pread(fd, 6000, 0) == bytes(4096) + data[4096:]
    else:
        assert got == want and os.pread(fd, 6000, 0) == want
    assert os.fstat(fd).st_size == 6000                  # KEEP_SIZE


def test_register_file(prober, scratch):
    fd, data = scratch
    dup = os.dup(fd)

    async def probe(io, offset, buf):
        f = io.register_file(dup)
        assert (f.fd, repr(f)) == (dup, f"FixedFile(index={f.index}, fd={dup})")
        wrote = await io.write(f, b"fixed" * 100, 10)
        got = bytearray(600)
        n = await io.read(f, got, 0)
        await io.fdatasync(f)
        more = [io.register_file(dup).index for _ in range(63 - f.index)]
        try:
            io.register_file(dup)
        except OSError as e:
            return wrote, n, got, f.index, more, e
        return None

    try:
        (wrote, n, got, first, more, full), _ = prober.run(probe)
    finally:
        os.close(dup)
    assert (wrote, n) == (500, 600) and got == data[:10] + b"fixed" * 100 + data[510:600]
    assert more == list(range(first + 1, 64))
    assert full.errno == errno.ENFILE and "64 fixed files are taken" in str(full)


def test_run_in_thread_returns_or_raises(prober):
    async def probe(io, offset, buf):
        value = await io.run_in_thread(divmod, 17, 5)
        try:
            await io.run_in_thread(int, "seventeen")
        except ValueError as e:
            return value, e, threading.current_thread().name
        return value, None, None

    (value, exc, thread), _ = prober.run(probe)
    assert value == (3, 2)
    assert "invalid literal for int() with base 10: 'seventeen'" in str(exc)
    assert thread.startswith("ublk") and thread.endswith("-q0")     # resumed on its queue


@pytest.mark.parametrize("traced", [False, True], ids=["plain", "traced"])
def test_awaited_results_and_errors(sim, scratch, traced):
    """What an awaited op gives back: its value or its exception, whether the queue's
    thread runs under a tracer (a debugger, coverage: the op's __next__ serves the
    await) or not (its am_send slot)."""
    fd, data = scratch
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)

    async def probe(io, offset, buf):
        got = bytearray(100)
        n = await io.read(fd, got, 50)
        try:
            await io.read(-1, bytearray(8), 0)
        except OSError as e:
            bad = e.errno
        none = await io.nop()
        value = await io.run_in_thread(divmod, 17, 5)
        try:
            await io.run_in_thread(int, "x")
        except ValueError as e:
            thrown = str(e)
        return n, bytes(got), bad, none, value, thrown

    if traced:
        threading.settrace(tracer)
    try:
        with probing(sim) as p:
            out, _ = p.run(probe)
    finally:
        threading.settrace(None)
    assert out == (100, data[50:150], errno.EBADF, None, (3, 2),
                   "invalid literal for int() with base 10: 'x'")
    assert bool(calls) == traced


def test_queue_serves_while_a_thread_job_blocks(prober):
    """A job waits for an event that only another request's handler sets: the queue
    must serve that request while the job blocks."""
    job_running = threading.Event()
    go = threading.Event()

    def job():
        job_running.set()
        return go.wait(10)

    async def probe(io, offset, buf):
        if offset == 0:
            return await io.run_in_thread(job)
        await io.nop()
        go.set()
        return "set"

    prober.be.probe = probe
    (req,), _ = reads([0])
    th, out = submit_in_thread(prober.blk, [req])
    assert job_running.wait(10)
    (fast,), _ = reads([BLOCK])
    with prober.dev.open() as blk:                   # a front submits one batch at a time
        assert blk.submit([fast], timeout=5) == [BLOCK]
    th.join(10)
    assert out.get("res") == [BLOCK], out
    assert prober.be.outcome == {0: ("returned", True), BLOCK: ("returned", "set")}


def test_pread_request_past_the_end_of_the_file(sim, tmp_path):
    """The buffered paths read zeros past the file's end; the others fail with EIO."""
    data = random.Random(2048).randbytes(2048)
    (tmp_path / "short").write_bytes(data)
    fd = os.open(tmp_path / "short", os.O_RDONLY)
    try:
        for path in DATA_PATHS:
            with probing(sim, path) as p:
                if path in device_module.BUFFERED_PATHS:
                    assert p.run(lambda io, off, buf: io.pread_request(fd, 0)) == \
                        (BLOCK, data + bytes(2048)), path
                else:
                    with pytest.raises(OSError) as ei:
                        p.run(lambda io, off, buf: io.pread_request(fd, 0))
                    assert ei.value.errno == errno.EIO, path
    finally:
        os.close(fd)


BAD_CALLS = [
    (lambda io, fd: io.pread_request(fd, 0, 4096), ValueError,
     r"request bytes \[4096, 4096\+0\) are not within its 4096 bytes"),
    (lambda io, fd: io.pwrite_request(fd, 0, 512, 4096), ValueError,
     r"request bytes \[512, 512\+4096\) are not within its 4096 bytes"),
    (lambda io, fd: io.pread_request(fd, 0, -512), ValueError,
     r"request bytes \[-512, -512\+4608\) are not within its 4096 bytes"),
    (lambda io, fd: io.pread_request(fd, 0, 0, 0), ValueError, r"\[0, 0\+0\) are not within"),
    (lambda io, fd: io.pread_request(fd, 0, 0, 1.5), TypeError, "integer"),
    (lambda io, fd: io.sleep(-1), ValueError, r"sleep\(-1.0\): seconds must be >= 0"),
    (lambda io, fd: io.readv(fd, [], 0), ValueError, "readv/writev need at least one buffer"),
    (lambda io, fd: io.read(fd, b"read-only", 0), BufferError, "not writable"),
    (lambda io, fd: io.read("3", bytearray(8), 0), TypeError, "integer"),
    (lambda io, fd: io.write(None, b"x", 0), TypeError, "integer"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_arguments_are_refused_and_leave_nothing_behind(prober, scratch, call, exc, match):
    """A bad argument raises at the call; nothing is posted to the ring (no stale SQE
    reruns an earlier operation: the canary write below must stay undone)."""
    fd, data = scratch

    async def probe(io, offset, buf):
        keep = bytearray(b"C" * 64)
        for _ in range(80):                     # every SQ slot has held this canary write
            await io.write(fd, keep, 0)
        os.pwrite(fd, data[:64], 0)
        try:
            call(io, fd)
        except Exception as e:  # noqa: BLE001 - checked by the test
            caught = e
        else:
            caught = None
        for _ in range(4):
            await io.nop()
        return caught

    caught, _ = prober.run(probe)
    assert isinstance(caught, exc) and re.search(match, str(caught)), repr(caught)
    assert os.pread(fd, 6000, 0) == data, "a refused call ran an old operation again"
    # the queue goes on with every op slot back
    assert prober.run(lambda io, off, buf: io.nop())[0] is None


def test_ring_io_outside_a_request(sim):
    with pytest.raises(RuntimeError, match="this thread serves no queue of a Python backend"):
        aio.current()
    with probing(sim) as p:
        io, _ = p.run(lambda io, off, buf: _value(io))
        with pytest.raises(RuntimeError, match="ring I/O outside a request"):
            io.nop()
    with pytest.raises(RuntimeError, match="after its queue stopped"):
        io.nop()


async def _value(v):
    return v


# -- pread_request / pwrite_request on every data path -----------------------------------------

class Split(Backend):
    """Each request's first 4 KiB live in file A at the request's offset, the rest in
    file B (registered with the ring) right after: two request-directed operations per
    request, at two places of the request, started together."""

    size = MiB
    data_paths = ("zero_copy", "splice_zc")

    def __init__(self, a: str, b: str):
        self.fa = os.open(a, os.O_RDWR)
        self.fb = os.open(b, os.O_RDWR)
        self.fixed: dict = {}
        self.moved: list[tuple[int, int]] = []

    def _b(self, io):
        if io not in self.fixed:
            self.fixed[io] = io.register_file(self.fb)
        return self.fixed[io]

    async def read(self, offset, buf):
        io = aio.current()
        rest = io.pread_request(self._b(io), offset + BLOCK, BLOCK)
        head = io.pread_request(self.fa, offset, 0, BLOCK)
        self.moved.append((await head, await rest))

    async def write(self, offset, data):
        io = aio.current()
        rest = io.pwrite_request(self._b(io), offset + BLOCK, at=BLOCK, dsync=True)
        head = io.pwrite_request(self.fa, offset, length=BLOCK)
        self.moved.append((await head, await rest))

    def close(self):
        os.close(self.fa)
        os.close(self.fb)


@pytest.mark.parametrize("path", DATA_PATHS)
def test_request_parts_on_every_data_path(sim, tmp_path, path):
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.write_bytes(bytes(MiB))
    rng = random.Random(path)
    extents = [(i * 64 * KiB, rng.randrange(9, 128) * 512) for i in range(12)]
    pats = [rng.randbytes(n) for _, n in extents]
    be = Split(str(a), str(b))
    with Device(be, sim, queues=1, depth=16, data_path=path) as dev, dev.open() as blk:
        assert blk.submit([(WRITE, o, n, p) for (o, n), p in zip(extents, pats)]) == \
            [n for _, n in extents]
        reqs = [(READ, o, n, bytearray(n)) for o, n in extents]
        assert blk.submit(reqs) == [n for _, n in extents]
        assert [bytes(r[3]) for r in reqs] == pats
    assert sorted(be.moved) == sorted([(BLOCK, n - BLOCK) for _, n in extents] * 2)
    fa, fb = a.read_bytes(), b.read_bytes()
    for (o, n), p in zip(extents, pats):
        assert fa[o:o + BLOCK] == p[:BLOCK] and fb[o + BLOCK:o + n] == p[BLOCK:]


class PipeThenFile(Backend):
    """A write's first block goes to a full FIFO (its transfer waits for room), the rest
    to a file, both started before either is awaited; a thread then drains the FIFO."""

    size = MiB
    data_paths = ("splice_zc",)

    def __init__(self, fifo: str, path: str):
        self.fifo = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:                                 # fill it: the next write must wait
                self.filled += os.write(self.fifo, bytes(BLOCK))
        os.set_blocking(self.fifo, True)
        self.fd = os.open(path, os.O_RDWR)
        self.drained = b""

    def _drain(self, offset: int, rest: int) -> None:
        # give the file's transfer the chance to run while the FIFO's still waits: with
        # the two sharing the request's pipe unguarded, the file got the FIFO's bytes
        wait_until(lambda: os.pread(self.fd, rest, offset) != bytes(rest), 1.0)
        got = b""
        while len(got) < self.filled + BLOCK:
            got += os.read(self.fifo, 1 << 16)
        self.drained = got[self.filled:]

    async def write(self, offset, data):
        io = aio.current()
        to_fifo = io.pwrite_request(self.fifo, (1 << 64) - 1, length=BLOCK)   # no offset: a pipe
        to_file = io.pwrite_request(self.fd, offset + BLOCK, at=BLOCK)
        await io.run_in_thread(self._drain, offset + BLOCK, len(data) - BLOCK)
        assert await to_fifo == BLOCK and await to_file == len(data) - BLOCK

    def close(self):
        os.close(self.fifo)
        os.close(self.fd)


def test_splices_of_one_request_take_turns(sim, tmp_path):
    """On splice_zc a request's transfers cross its one pipe; started together, the second
    waits for the first instead of taking its bytes."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(bytes(MiB))
    be = PipeThenFile(str(tmp_path / "fifo"), str(tmp_path / "file"))
    data = random.Random(7).randbytes(3 * BLOCK)
    with Device(be, sim, depth=4, data_path="splice_zc") as dev, dev.open() as blk:
        assert blk.pwrite(data, 64 * KiB) == len(data)
    assert be.drained == data[:BLOCK]
    assert (tmp_path / "file").read_bytes()[64 * KiB + BLOCK:64 * KiB + 3 * BLOCK] == data[BLOCK:]
