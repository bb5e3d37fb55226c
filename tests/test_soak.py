"""Soak: start/stop cycles of a Device, and of the simulated driver, leave nothing behind.

Each cycle starts a Device on the simulated driver, writes a pattern, reads it back and
stops the device. Afterwards the process holds no more threads than before the first
cycle, no more fds, Python objects or resident memory than after a warm-up (memory up
to allocator noise), and the driver holds no device.
"""
from __future__ import annotations

import gc
import random
from typing import NamedTuple

import pytest

from procstat import Usage, usage
from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import BUFFERED_PATHS, DATA_PATHS, Device
from pyublk_fast.transport.sim import SimTransport
from pyublk_fast.transport.sim.driver import SimDriver
from pyublk_fast.util import wait_until

KiB = 1 << 10
MiB = 1 << 20
CYCLES = 200
TRANSPORT_CYCLES = 50
#: Cycles before fds, objects and memory are taken as the reference: the first devices
#: fill caches that stay (lazy imports, the allocator's pools and per-thread arenas).
WARMUP = 20
IO = 64 * KiB                 # each cycle's write: one full request (max_io_bytes)
SIZE = 1 * MiB                # the memory backend's size
DEPTH = 4
#: Allowed RSS growth from the warm-up to the end. glibc hands each new queue thread one
#: of a bounded set of malloc arenas and keeps what is freed there (and freed blocks
#: below the heap's top) mapped, so RSS grows in steps of a few hundred KiB until the
#: heaps settle: measured at most 1 MiB over the 180 cycles on any path. The smallest
#: leak worth finding, one cycle's request buffers (DEPTH x IO, of which the I/O
#: touches IO), is 64 KiB a cycle: 11 MiB; a kept memory backend is 180 MiB.
RSS_SLACK_KIB = 4 * 1024
#: Allowed growth in live Python objects (after a collection) from the warm-up to the
#: end: measured within +-3. Whatever a cycle keeps that holds other objects (a Device,
#: a queue, a backend) is at least one such object a cycle, 180 in all.
OBJECT_SLACK = 50
#: How long an exiting thread may take to vanish from /proc/self/task: join() returns
#: before the kernel has reaped the thread, and io_uring's io-wq workers exit after
#: their ring is closed.
THREAD_EXIT_S = 10.0

CASES = [("loop", path) for path in DATA_PATHS] + [("memory", path) for path in BUFFERED_PATHS]


class Held(NamedTuple):
    usage: Usage
    objects: int


def pattern(cycle: int) -> bytes:
    return random.Random(cycle).randbytes(IO)


def settled(threads: int) -> Held:
    """What the process holds once it is back to at most `threads` threads (or the
    timeout passed), after a collection (garbage is not a leak)."""
    wait_until(lambda: usage().threads <= threads, THREAD_EXIT_S)
    gc.collect()
    return Held(usage(), len(gc.get_objects()))


def assert_flat(start: Usage, base: Held, end: Held) -> None:
    """Threads back to where they were before the first cycle; fds, objects and RSS to
    the warm-up's."""
    assert end.usage.threads <= start.threads, f"threads leaked: {start} before, {end.usage} after"
    assert end.usage.fds <= base.usage.fds, f"fds leaked: {base.usage} after warm-up, {end.usage} after"
    assert end.objects - base.objects <= OBJECT_SLACK, \
        f"{end.objects - base.objects} more Python objects than after the warm-up"
    grown = end.usage.rss_kib - base.usage.rss_kib
    assert grown <= RSS_SLACK_KIB, f"RSS grew by {grown} KiB: {base.usage} after warm-up, {end.usage} after"


@pytest.mark.parametrize("kind,path", CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_device_cycles_leave_nothing_behind(sim, backing_file, kind, path):
    """200 start/write/read/stop cycles: data right every time, nothing kept."""
    def backend():
        return LoopBackend(backing_file) if kind == "loop" else MemoryBackend(SIZE)
    slots = SIZE // IO
    start = usage()
    for cycle in range(CYCLES):
        if cycle == WARMUP:
            base = settled(start.threads)
        offset = cycle % slots * IO
        with Device(backend(), sim, depth=DEPTH, max_io_bytes=IO, data_path=path,
                    native=kind == "loop") as dev:
            assert (dev.dev_id, dev.data_path) == (0, path), "a device of an earlier cycle is left"
            with dev.open() as blk:
                if kind == "loop" and cycle:    # the file kept what the last device wrote
                    assert blk.pread(IO, (cycle - 1) % slots * IO) == pattern(cycle - 1)
                assert blk.pwrite(pattern(cycle), offset) == IO
                assert blk.pread(IO, offset) == pattern(cycle)
    assert sim.list_devs() == []
    assert_flat(start, base, settled(start.threads))


def test_transport_cycles_leave_nothing_behind():
    """SimTransport started and closed 50 times, a device served on each: its driver
    thread goes, and no fd, object or memory stays."""
    start = usage()
    for cycle in range(TRANSPORT_CYCLES):
        if cycle == WARMUP:
            base = settled(start.threads)
        with SimTransport() as t:
            with Device(MemoryBackend(SIZE), t, depth=DEPTH, max_io_bytes=IO) as dev, dev.open() as blk:
                assert blk.pwrite(pattern(cycle), 0) == IO
                assert blk.pread(IO, 0) == pattern(cycle)
            assert t.list_devs() == []
        assert t.driver.native_thread_id is None, "the driver thread runs on after close()"
        # a closed driver waits for the cycle collector (see the next test): collect it
        # here (it is young: the cheap collection of the young generations finds it) so
        # the figures show what is never freed
        gc.collect(1)
    assert_flat(start, base, settled(start.threads))


def _drivers() -> int:
    return sum(isinstance(o, SimDriver) for o in gc.get_objects())


def test_a_closed_transport_is_freed_without_the_cycle_collector():
    """A closed driver (its C tables: ~1.6 MB of address space) goes when its transport
    does; garbage cycles are freed only by a collection, which counts Python objects,
    not the memory behind them."""
    gc.collect()
    before = _drivers()
    gc.disable()
    try:
        with SimTransport():
            pass
        after = _drivers()
    finally:
        gc.enable()
    assert after == before
