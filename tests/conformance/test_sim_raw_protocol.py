"""The simulated driver driven by a hand-written server: every command and result, byte-exact.

The "server" here is the test itself: it writes the command (what the SQE's cmd area
carries on a kernel) into the queue's command slot and posts the MSG_RING, then reads
the driver's completions from its own ring, like a kernel server reads its CQEs.
"""
from __future__ import annotations

import concurrent.futures
import errno
import os
import threading

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast._core.codec import decode_user_data, encode_user_data
from pyublk_fast._core.queue import NativeTarget, Queue
from pyublk_fast._core.ring import Ring, SQE_CQE_SKIP_SUCCESS
from pyublk_fast.util import wait_until

SIM_CMD = np.dtype([("cmd_op", "<u4"), ("result", "<i4"), ("addr", "<u8"), ("user_data", "<u8"),
                    ("ring_fd", "<i4"), ("nr_elem", "<u2"), ("flags", "<u2"), ("elem_bytes", "u1"),
                    ("multishot", "u1"), ("br_entries", "<u2"), ("pad", "<u4")])
assert SIM_CMD.itemsize == 40
DEPTH = 4
BUF = 64 * 1024


class RawServer:
    """One queue of one simulated device, served by hand."""

    def __init__(self, sim, flags=0, depth=DEPTH, size=1 << 20):
        self.sim = sim
        self.dev_id, self.flags = sim.add_dev(-1, 1, depth, BUF, flags)
        sim.set_params(self.dev_id, size, 512)
        ep = sim.queue_endpoint(self.dev_id, 0)
        ch = ep.channel
        self.channel = ch
        self.iods, self.fd = ep.iods, ch.driver_ring_fd
        self.cmds = ch.cmd_slots.view(SIM_CMD)
        self.ring = Ring(64)
        self.bufs = np.zeros((depth, BUF), np.uint8)
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.backlog = []

    def addr(self, tag):
        return self.bufs[tag].__array_interface__["data"][0]

    def send(self, tag, op_nr, result=0, addr=None, user_data=None):
        self.cmds[tag] = (uapi.io_cmd_op(op_nr), result, self.addr(tag) if addr is None else addr,
                          encode_user_data(tag, op_nr) if user_data is None else user_data,
                          self.ring.fd, 0, 0, 0, 0, 0, 0)
        self.ring.prep_msg_ring(self.fd, 0, self.channel.server_message(tag), sqe_flags=SQE_CQE_SKIP_SUCCESS)
        self.ring.submit()

    def cqes(self, n=1, timeout=5.0):
        """The next n completions (extra ones reaped meanwhile are kept for later calls)."""
        while len(self.backlog) < n:
            k = self.ring.wait(1, timeout)
            self.backlog += list(zip(self.ring.cqe_user_data[:k].tolist(), self.ring.cqe_res[:k].tolist()))
        got, self.backlog = self.backlog[:n], self.backlog[n:]
        return got

    def fetch_all(self):
        for tag in range(len(self.bufs)):
            self.send(tag, uapi.UBLK_IO_FETCH_REQ)

    def start(self):
        self.fetch_all()
        self.sim.start_dev(self.dev_id)
        self.blk = self.sim.open(self.dev_id)

    def front(self, fn, *args):
        """Run a blocking front call in a thread; returns its future."""
        return self.pool.submit(fn, *args)

    def request(self):
        """Wait for the next request: (tag, op, start_sector, nr_sectors, res)."""
        (ud, res), = self.cqes(1)
        tag = decode_user_data(ud)[0]
        iod = self.iods[tag]
        return tag, int(iod["op_flags"]) & 0xff, int(iod["start_sector"]), int(iod["nr_sectors"]), res

    def close(self):
        if hasattr(self, "blk"):             # opened by start()
            self.blk.close()
        self.sim.stop_dev(self.dev_id)
        self.sim.del_dev(self.dev_id)
        self.pool.shutdown()
        self.ring.close()


@pytest.fixture
def raw(sim):
    servers = []

    def make(**kw):
        s = RawServer(sim, **kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_start_needs_every_fetch_and_params(raw, sim):
    s = raw()
    for tag in range(DEPTH - 1):
        s.send(tag, uapi.UBLK_IO_FETCH_REQ)
    with pytest.raises(TimeoutError):
        sim.start_dev(s.dev_id, timeout=0.2)
    s.send(DEPTH - 1, uapi.UBLK_IO_FETCH_REQ)
    sim.start_dev(s.dev_id)
    assert sim.dev_info(s.dev_id).state == uapi.UBLK_S_DEV_LIVE
    assert sim.get_params(s.dev_id)["dev_sectors"] == (1 << 20) >> uapi.SECTOR_SHIFT


def test_write_delivers_descriptor_and_bytes_then_commit_completes(raw):
    s = raw()
    s.start()
    payload = os.urandom(8192)
    fut = s.front(s.blk.pwrite, payload, 4096)
    tag, op, sector, nr, res = s.request()
    assert (op, sector, nr, res) == (uapi.UBLK_IO_OP_WRITE, 8, 16, uapi.UBLK_IO_RES_OK)
    assert int(s.iods[tag]["addr"]) == s.addr(tag)
    assert s.bufs[tag][:8192].tobytes() == payload
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=8192)
    assert fut.result(5) == 8192


def test_result_larger_than_request_is_clamped_and_read_copies_back(raw):
    s = raw()
    s.start()
    fut = s.front(s.blk.pread, 4096, 0)
    tag, op, sector, nr, res = s.request()
    assert op == uapi.UBLK_IO_OP_READ and nr == 8
    s.bufs[tag][:4096] = np.frombuffer(b"R" * 4096, np.uint8)
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=1 << 20)
    assert fut.result(5) == b"R" * 4096


def test_partial_read_requeues_the_rest(raw):
    s = raw()
    s.start()
    fut = s.front(s.blk.pread, 4096, 8192)
    tag, _, sector, nr, _ = s.request()
    assert (sector, nr) == (16, 8)
    s.bufs[tag][:2048] = 1
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=2048)
    tag2, op2, sector2, nr2, _ = s.request()           # the remainder, on any tag
    assert (op2, sector2, nr2) == (uapi.UBLK_IO_OP_READ, 20, 4)
    s.bufs[tag2][:2048] = 2
    s.send(tag2, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=2048)
    assert fut.result(5) == b"\x01" * 2048 + b"\x02" * 2048


@pytest.mark.parametrize("result,want", [(-errno.ENOSPC, errno.ENOSPC), (-errno.EBADMSG, errno.EIO),
                                         (0, errno.EIO)])
def test_errors_reach_the_front_like_blk_status(raw, result, want):
    s = raw()
    s.start()
    fut = s.front(s.blk.pread, 512, 0)
    tag, *_ = s.request()
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=result)
    with pytest.raises(OSError) as e:
        fut.result(5)
    assert e.value.errno == want


def test_bad_commands_get_the_kernels_errors_and_leave_the_device_usable(raw):
    s = raw()
    s.start()
    # a FETCH once every tag was fetched
    s.send(0, uapi.UBLK_IO_FETCH_REQ, user_data=0xAAAA)
    assert s.cqes(1) == [(0xAAAA, -errno.EBUSY)]
    # COMMIT for a tag still waiting for a request
    s.send(1, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512, user_data=0xBBBB)
    assert s.cqes(1) == [(0xBBBB, -errno.EBUSY)]
    # NEED_GET_DATA for a tag still waiting for a request
    s.send(2, uapi.UBLK_IO_NEED_GET_DATA, user_data=0xCCCC)
    assert s.cqes(1) == [(0xCCCC, -errno.EBUSY)]
    # an unknown command
    s.send(3, 0x2f, user_data=0xDDDD)
    assert s.cqes(1) == [(0xDDDD, -errno.EOPNOTSUPP)]
    # still serves I/O
    fut = s.front(s.blk.pwrite, b"k" * 512, 0)
    tag, *_ = s.request()
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512)
    assert fut.result(5) == 512


def test_commit_without_buffer_is_refused(raw):
    s = raw()
    s.start()
    fut = s.front(s.blk.pread, 512, 0)
    tag, *_ = s.request()
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512, addr=0, user_data=0xEEEE)
    assert s.cqes(1) == [(0xEEEE, -errno.EINVAL)]
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512)      # a proper commit still works
    assert len(fut.result(5)) == 512


def test_need_get_data_flow(raw):
    s = raw(flags=uapi.UBLK_F_NEED_GET_DATA)
    for tag in range(DEPTH):
        s.send(tag, uapi.UBLK_IO_FETCH_REQ, addr=0)       # no buffer needed up front
    s.sim.start_dev(s.dev_id)
    s.blk = s.sim.open(s.dev_id)
    payload = os.urandom(4096)
    fut = s.front(s.blk.pwrite, payload, 0)
    tag, op, _, _, res = s.request()
    assert (op, res) == (uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_RES_NEED_GET_DATA)
    s.send(tag, uapi.UBLK_IO_NEED_GET_DATA)
    (ud, res), = s.cqes(1)
    assert (decode_user_data(ud)[0], res) == (tag, uapi.UBLK_IO_RES_OK)
    assert s.bufs[tag][:4096].tobytes() == payload
    s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=4096)
    assert fut.result(5) == 4096


def test_stop_aborts_outstanding_fetches(raw, sim):
    s = raw()
    s.start()
    s.blk.close()
    sim.stop_dev(s.dev_id)
    got = s.cqes(DEPTH)
    assert sorted(decode_user_data(ud)[0] for ud, _ in got) == list(range(DEPTH))
    assert {res for _, res in got} == {uapi.UBLK_IO_RES_ABORT}
    with pytest.raises(FileNotFoundError):
        sim.open(s.dev_id)


def test_tags_are_handed_out_in_any_order_and_never_twice(raw):
    s = raw(depth=16)
    s.start()
    order = []
    for i in range(64):
        fut = s.front(s.blk.pread, 512, 512 * i)
        tag, *_ = s.request()
        order.append(tag)
        s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512)
        fut.result(5)
    assert len(set(order)) > 4 and order != sorted(order)


def test_more_requests_than_tags_wait_for_a_tag(raw):
    s = raw()
    s.start()
    futs = [s.front(s.blk.submit, [(0, 512 * i, 512, bytearray(512)) for i in range(2 * DEPTH)])]
    held = [s.request()[0] for _ in range(DEPTH)]
    assert sorted(held) == list(range(DEPTH))          # every tag busy, the rest wait
    with pytest.raises(TimeoutError):
        s.cqes(1, timeout=0.2)
    for tag in held:
        s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512)
    more = [s.request()[0] for _ in range(DEPTH)]
    for tag in more:
        s.send(tag, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, result=512)
    assert futs[0].result(5) == [512] * (2 * DEPTH)


def test_quiesce_hands_the_device_to_a_new_server(sim, tmp_path):
    from pyublk_fast.backends.loop import LoopBackend
    from pyublk_fast.device import Device
    path = str(tmp_path / "q.img")
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    old = Device(LoopBackend(path), sim, depth=8, recovery="fail").start()
    blk = old.open()
    payload = os.urandom(1 << 20)
    blk.pwrite(payload, 0)
    old.quiesce()
    assert sim.dev_info(old.dev_id).state == uapi.UBLK_S_DEV_QUIESCED
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(blk.pread, 1 << 20, 0)
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(0.2)                          # waits: no server
        new = Device(LoopBackend(path), sim, depth=8, recovery="fail", dev_id=old.dev_id)
        new.dev_id = old.dev_id
        new.recover()
        assert pending.result(5) == payload
    blk.close()
    new.stop()


def test_quiesce_needs_the_quiesce_flag_which_needs_recovery(raw, sim):
    s = raw()
    s.start()
    with pytest.raises(OSError) as e:
        sim.quiesce_dev(s.dev_id)
    assert e.value.errno == errno.EOPNOTSUPP and "UBLK_F_QUIESCE" in str(e.value)
    with pytest.raises(OSError) as e:
        sim.add_dev(-1, 1, DEPTH, BUF, uapi.UBLK_F_QUIESCE)
    assert e.value.errno == errno.EINVAL



def test_a_closed_queue_gets_no_requests_copied_into_its_buffers(sim):
    """A queue closed with its tags still armed (a forced exit, before the release):
    no request is copied into the buffers it let go (freed memory in a real server;
    here still held by the test, to see it); the write waits, then fails at the release."""
    dev_id, _ = sim.add_dev(-1, 1, DEPTH, BUF, 0)
    sim.set_params(dev_id, 1 << 20, 512, 0)
    ep = sim.queue_endpoint(dev_id, 0)
    q = Queue(DEPTH, BUF, ep.channel, ep.iods, native=NativeTarget())
    bufs = q.buffers()
    q.fetch_all()
    sim.start_dev(dev_id)
    with sim.open(dev_id) as blk:
        q.close()
        out = {}

        def write():
            try:
                out["res"] = blk.pwrite(b"x" * BUF, 0)
            except OSError as e:
                out["errno"] = e.errno
        th = threading.Thread(target=write)
        th.start()
        assert wait_until(lambda: sim.dev_info(dev_id).inflight == 1, 10), "the write never arrived"
        assert not bufs.any() and not out, out      # not delivered: it waits for a server
        sim.release(dev_id)
        th.join(10)
    assert out == {"errno": errno.EIO}
    sim.del_dev(dev_id)
