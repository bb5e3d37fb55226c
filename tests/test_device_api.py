"""Device embedding: serve_forever stopped from another thread, and `async with`."""
import asyncio
import sys
import threading
import time

import pytest

from pyublk_fast.backend import Backend
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import DEFAULT_POLL_US, Device
from pyublk_fast.util import wait_until


def test_serve_forever_returns_after_stop_from_another_thread(sim):
    dev = Device(MemoryBackend(1 << 20), sim, depth=4)
    served = threading.Thread(target=dev.serve_forever, kwargs={"poll": 0.05})
    served.start()
    assert wait_until(lambda: dev.dev_id >= 0 and dev.info().started, 10), \
        "serve_forever did not start the device"
    with dev.open() as blk:
        blk.pwrite(b"s" * 512, 512)
        assert blk.pread(512, 512) == b"s" * 512
    dev.stop()
    served.join(10)
    assert not served.is_alive()
    assert sim.list_devs() == []


def test_async_with_serves_while_the_event_loop_runs(sim):
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0.001)

    async def main():
        t = asyncio.create_task(ticker())
        async with Device(MemoryBackend(1 << 20), sim, depth=4) as dev:
            loop = asyncio.get_running_loop()
            blk = await loop.run_in_executor(None, dev.open)
            await loop.run_in_executor(None, blk.pwrite, b"q" * 4096, 0)
            data = await loop.run_in_executor(None, blk.pread, 4096, 0)
            blk.close()
        t.cancel()
        return data

    assert asyncio.run(main()) == b"q" * 4096
    assert ticks, "the event loop kept running while the device served"


def test_poll_budget_default_and_bad_values(sim):
    be = MemoryBackend(1 << 20)
    assert Device(be, sim, queues=4).poll_us == DEFAULT_POLL_US == 500.0
    assert Device(be, sim, poll_us=None).poll_us == DEFAULT_POLL_US
    assert Device(be, sim, poll_us=0).poll_us == 0
    with pytest.raises(ValueError, match="poll_us=-1 must be >= 0"):
        Device(be, sim, poll_us=-1)


def test_a_backend_declares_its_poll_budget(sim):
    class Sleeper(MemoryBackend):
        poll_us = 0         # its completions come from threads of its own

    assert Device(Sleeper(1 << 20), sim).poll_us == 0
    assert Device(Sleeper(1 << 20), sim, poll_us=20).poll_us == 20     # the caller's wins
    with Device(Sleeper(1 << 20), sim) as dev, dev.open() as blk:
        blk.pwrite(b"s" * 4096, 0)
        assert blk.pread(4096, 0) == b"s" * 4096


def test_a_stopped_device_cannot_serve_again(sim):
    """stop() closed the backend; restarting would serve a closed (or reused) fd."""
    dev = Device(MemoryBackend(1 << 20), sim, depth=4)
    with dev, dev.open() as blk:
        assert blk.pwrite(b"s" * 4096, 0) == 4096
    for again in (dev.start, dev.recover):
        with pytest.raises(RuntimeError, match="make a new Device"):
            again()


def _cpu_ticks(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])      # utime + stime


def test_an_idle_queue_sleeps_despite_the_poll_budget(sim):
    """The poll budget halves on every empty wait: once I/O stops, the queue thread sleeps."""
    with Device(MemoryBackend(1 << 20), sim, depth=4) as dev, dev.open() as blk:
        for i in range(200):
            assert blk.pwrite(bytes([i]) * 512, 512 * i) == 512
        tid = dev._threads[0].native_id
        time.sleep(0.1)                      # the budget decays over the first few waits
        before = _cpu_ticks(tid)
        time.sleep(1.0)
        used = _cpu_ticks(tid) - before
        assert used <= 10, f"idle queue thread used {used} of ~100 clock ticks in 1 s"
        assert blk.pread(512, 512 * 199) == bytes([199]) * 512


class Held(Backend):
    """Reads of 0x5a that wait until the test lets them go."""

    size = 1 << 20

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, offset, buf):
        self.entered.set()
        assert self.release.wait(30)
        buf[:] = b"\x5a" * len(buf)


def test_close_from_another_thread_waits_for_the_read_in_flight(sim):
    """One thread closes the block device while another's read is in flight: close waits
    for the read, which gets its data (closing the ring under the reader crashed it)."""
    backend = Held()
    with Device(backend, sim, depth=4) as dev:
        blk = dev.open()
        out: list = []
        reader = threading.Thread(target=lambda: out.append(blk.pread(4096, 0)))
        reader.start()
        assert backend.entered.wait(10), "the read did not reach the backend"
        closer = threading.Thread(target=blk.close)
        closer.start()

        def closing():   # the closer is inside close(), or already out of it
            f = sys._current_frames().get(closer.ident)
            return not closer.is_alive() or (f is not None and f.f_code.co_name == "close")
        assert wait_until(closing, 10)
        assert closer.is_alive(), "close() returned while the read was in flight"
        backend.release.set()
        reader.join(10)
        closer.join(10)
        assert not reader.is_alive() and not closer.is_alive()
        assert out == [b"\x5a" * 4096]
        with pytest.raises(ValueError, match="closed"):
            blk.pread(4096, 0)


class HeldFirst(Backend):
    """Reads of the offset's low byte; the first waits until the test lets it go."""

    size = 1 << 20

    def __init__(self):
        self.release = threading.Event()
        self.reads = 0

    def read(self, offset, buf):
        self.reads += 1
        if self.reads == 1:
            assert self.release.wait(30)
        buf[:] = bytes([offset >> 12 & 0xff]) * len(buf)


def test_a_request_given_up_on_keeps_its_slot_until_answered(sim):
    """A submit that times out leaves its request with the driver: the request's slot
    and buffer stay its own until the answer comes, so the next request is not answered
    with the late one's result (it used to reuse the slot and return the stale answer,
    its own buffer left unfilled)."""
    backend = HeldFirst()
    with Device(backend, sim, depth=4) as dev, dev.open() as blk:
        with pytest.raises(TimeoutError):
            blk.submit([(0, 0, 4096, bytearray(4096))], timeout=0.5)
        backend.release.set()
        assert wait_until(lambda: dev.requests_served >= 1, 10), "the held read did not end"
        for page in (3, 5):
            assert blk.pread(4096, page << 12) == bytes([page]) * 4096
