"""A model test of async Python backends: random interleavings, data checked.

The backend serves a file by ring I/O, and each handler awaits a random plan of things
(ring sleeps of 0-3 ms, awaited or not, ring nops, bare yields, thread jobs) before and after its I/O.
Batches of reads, writes, discards and flushes go to the device all at once, on any data
path, one or two queues. Requests of one batch never overlap (concurrent overlapping
writes have no defined order), so each read is checked against the writes of the batches
before it, and at the end the device and the file hold exactly the model's bytes.
"""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from pyublk_fast import aio, uapi
from pyublk_fast.backend import Backend
from pyublk_fast.device import BUFFERED_PATHS, DATA_PATHS, Device
from pyublk_fast.transport.sim import SimTransport

SECTOR = 512
SLOT = 16 * 1024                 # a batch's requests lie in distinct slots: no overlaps
NSLOTS = 32
SIZE = SLOT * NSLOTS
OPS = {"read": uapi.UBLK_IO_OP_READ, "write": uapi.UBLK_IO_OP_WRITE,
       "discard": uapi.UBLK_IO_OP_DISCARD}

#: what a handler awaits before and after its I/O: (what, seconds); "started" is a ring
#: sleep it does not await (its request completes once the sleep is over)
waits = st.lists(st.one_of(st.tuples(st.sampled_from(["sleep", "started"]),
                                     st.sampled_from([0, 0.0005, 0.001, 0.003])),
                           st.tuples(st.sampled_from(["nop", "yield", "thread"]), st.just(0))),
                 max_size=2)


@st.composite
def batch(draw):
    """Requests in distinct slots: [(op, offset, length, seed of the written bytes, waits
    before, waits after, by buffer)], whether a flush goes with them, and its waits."""
    reqs = []
    for slot in draw(st.lists(st.integers(0, NSLOTS - 1), unique=True, max_size=12)):
        first = draw(st.integers(0, SLOT // SECTOR - 1))
        n = draw(st.integers(1, SLOT // SECTOR - first))
        reqs.append((draw(st.sampled_from(sorted(OPS))), slot * SLOT + first * SECTOR,
                     n * SECTOR, draw(st.integers(0, 2**32)), draw(waits), draw(waits),
                     draw(st.booleans())))
    return reqs, draw(st.booleans()), draw(waits)


class Jittery(Backend):
    """A file served by ring I/O; each request awaits its plan's waits around its I/O and
    moves data by the request's own path (pread/pwrite_request) or through its buffer."""

    size = SIZE
    can_discard = True
    data_paths = ("zero_copy", "splice_zc")

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.plans: dict[tuple[str, int], tuple] = {}

    async def wait(self, plan):
        io = aio.current()
        for what, seconds in plan:
            if what == "sleep":
                await io.sleep(seconds)
            elif what == "started":
                io.sleep(seconds)
            elif what == "nop":
                await io.nop()
            elif what == "yield":
                await asyncio.sleep(0)
            else:
                await io.run_in_thread(time.sleep, 0.0002)

    async def serve(self, key, io_op):
        """The request's plan around io_op(io, by_buffer), which gives what to await."""
        before, after, by_buffer = self.plans.get(key, ((), (), False))
        await self.wait(before)
        await io_op(aio.current(), by_buffer)
        await self.wait(after)

    async def rw(self, io, by_buffer, read, offset, buf):
        """Through the request's buffer, or by the request's own path (pread_request...)."""
        if by_buffer and buf is not None:
            assert await (io.read if read else io.write)(self.fd, buf, offset) == len(buf)
        else:
            await (io.pread_request if read else io.pwrite_request)(self.fd, offset)

    async def read(self, offset, buf):
        await self.serve(("read", offset), lambda io, by_buffer: self.rw(io, by_buffer, True, offset, buf))

    async def write(self, offset, data):
        await self.serve(("write", offset), lambda io, by_buffer: self.rw(io, by_buffer, False, offset, data))

    async def discard(self, offset, length):
        await self.serve(("discard", offset),
                         lambda io, _: io.fallocate(self.fd, aio.PUNCH_HOLE | aio.KEEP_SIZE, offset, length))

    async def flush(self):
        await self.serve(("flush", 0), lambda io, _: io.fdatasync(self.fd))

    def close(self):
        os.close(self.fd)


@pytest.fixture(scope="module")
def transport():
    t = SimTransport()
    yield t
    t.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return str(tmp_path_factory.mktemp("aio_model") / "disk.img")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(plan=st.lists(batch(), min_size=1, max_size=4), data_path=st.sampled_from(DATA_PATHS),
       queues=st.sampled_from([1, 2]))
def test_concurrent_requests_match_the_model(transport, image, plan, data_path, queues):
    with open(image, "wb") as fh:
        fh.truncate(SIZE)
    model = bytearray(SIZE)
    be = Jittery(image)
    with Device(be, transport, queues=queues, depth=16, data_path=data_path) as dev, \
            dev.open() as blk:
        for reqs, flush, flush_waits in plan:
            be.plans = {(op, off): (before, after, by_buffer and data_path in BUFFERED_PATHS)
                        for op, off, _, _, before, after, by_buffer in reqs}
            be.plans["flush", 0] = (flush_waits, [], False)
            batch, want = [], []
            for op, off, n, seed, *_ in reqs:
                buf = random.Random(seed).randbytes(n) if op == "write" else \
                    bytearray(n) if op == "read" else None
                batch.append((OPS[op], off, n, buf))
                want.append(n if op != "discard" else 0)
            if flush:
                batch.append((uapi.UBLK_IO_OP_FLUSH, 0, 0, None))
                want.append(0)
            assert blk.submit(batch) == want
            for (op, off, n, *_), (_, _, _, buf) in zip(reqs, batch):
                if op == "read":                 # no write of this batch overlaps it
                    assert bytes(buf) == model[off:off + n], (off, n)
            for (op, off, n, *_), (_, _, _, buf) in zip(reqs, batch):
                if op != "read":
                    model[off:off + n] = buf if op == "write" else bytes(n)
        assert blk.pread(SIZE, 0) == model
    with open(image, "rb") as fh:
        assert fh.read() == model
