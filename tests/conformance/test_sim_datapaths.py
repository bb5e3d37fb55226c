"""The simulated driver's data-path entry points, probed from inside a live request.

A raw Queue with a Python backend holds each request while the test calls the
driver's USER_COPY and (seed RFC) splice entry points on it, checking every rule
and its errno in the RFC's order, with data checked.
"""
from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast._core.codec import splice_pos, user_copy_pos
from pyublk_fast._core.pytask import PyTarget
from pyublk_fast._core.queue import Queue
from pyublk_fast.backend import Backend
from pyublk_fast.transport.sim.chardev import splice_probe, user_copy_probe

DIRECT = uapi.SPLICE_F_DIRECT
R2R = uapi.SPLICE_F_READ_TO_READ
DEPTH = 4


def nbytes_of(iod) -> int:
    """A request's length in bytes, from its descriptor."""
    return int(iod["nr_sectors"]) << uapi.SECTOR_SHIFT


def serve(sim, flags, probe):
    """Add a device with `flags`, serve it with a raw Queue whose handler calls probe(q, tag, iod)."""
    dev_id, granted = sim.add_dev(-1, 1, DEPTH, 64 * 1024, flags)
    assert granted & flags == flags
    sim.set_params(dev_id, 1 << 20, 512)
    ep = sim.queue_endpoint(dev_id, 0)
    q = None
    ready = threading.Event()

    class Probe(Backend):
        size = 1 << 20

        def handle_batch(self, requests):
            iods = q.descriptors()
            return [probe(dev_id, r.tag, iods[r.tag]) for r in requests]

    def run():
        nonlocal q
        q = Queue(DEPTH, 64 * 1024, ep.channel, ep.iods, native=PyTarget(Probe(), None))
        q.fetch_all()
        ready.set()
        q.run()
        q.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert ready.wait(5), "the queue thread did not fetch its tags"
    sim.start_dev(dev_id)
    return dev_id, th


@pytest.fixture
def pipe():
    """(read end, write end) of a pipe, closed after the test."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def stop(sim, dev_id, th):
    sim.stop_dev(dev_id)
    th.join(10)
    assert not th.is_alive()
    sim.del_dev(dev_id)


def test_splice_write_checks_in_rfc_order_and_moves_the_bytes(sim, pipe):
    payload = os.urandom(8192)
    got = {}
    r, w = pipe

    def probe(dev_id, tag, iod):
        d = sim.driver
        pos = splice_pos(0, tag, 0)
        nbytes = nbytes_of(iod)
        got["no_direct"] = splice_probe(d, dev_id, pos, w, 512, 0)
        got["drained_r2r"] = splice_probe(d, dev_id, pos, r, 512, DIRECT | R2R)
        got["bad_tag"] = splice_probe(d, dev_id, splice_pos(0, DEPTH, 0), w, 512, DIRECT)
        got["bad_queue"] = splice_probe(d, dev_id, splice_pos(1, tag, 0), w, 512, DIRECT)
        got["len0"] = splice_probe(d, dev_id, pos, w, 0, DIRECT)
        got["past_end"] = splice_probe(d, dev_id, splice_pos(0, tag, nbytes - 512), w, 1024, DIRECT)
        # the failed call above still counted 1024 bytes: 1024 + 8192 > 8192 now
        got["total_exceeded"] = splice_probe(d, dev_id, pos, w, nbytes, DIRECT)
        return nbytes

    dev_id, th = serve(sim, uapi.SIM_F_SPLICE_ZC, probe)
    try:
        with sim.open(dev_id) as blk:
            blk.pwrite(payload, 4096)
        assert got == dict(no_direct=-errno.EPERM, drained_r2r=-errno.EINVAL, bad_tag=-errno.EINVAL,
                           bad_queue=-errno.EINVAL, len0=-errno.EACCES, past_end=-errno.EINVAL,
                           total_exceeded=-errno.EACCES)

        # a fresh request: the running total was reset when it was queued; good splices move data
        moved = {}

        def good(dev_id, tag, iod):
            d = sim.driver
            nbytes = nbytes_of(iod)
            moved["r2r_on_write"] = splice_probe(d, dev_id, splice_pos(0, tag, 0), w, 512, DIRECT | R2R)
            moved["first"] = splice_probe(d, dev_id, splice_pos(0, tag, 0), w, 4096, DIRECT)
            moved["second"] = splice_probe(d, dev_id, splice_pos(0, tag, 4096), w, nbytes - 4096, DIRECT)
            moved["data"] = os.read(r, nbytes)
            return nbytes
        probe_ref = good
        stop(sim, dev_id, th)
        dev_id, th = serve(sim, uapi.SIM_F_SPLICE_ZC, probe_ref)
        with sim.open(dev_id) as blk:
            blk.pwrite(payload, 0)
        assert moved["r2r_on_write"] == -errno.EINVAL
        assert (moved["first"], moved["second"]) == (4096, 4096)
        assert moved["data"] == payload
    finally:
        stop(sim, dev_id, th)


def test_splice_read_to_read_fills_the_request(sim, pipe):
    r, w = pipe
    want = os.urandom(4096)
    out = {}

    def probe(dev_id, tag, iod):
        d = sim.driver
        op = uapi.op_of(int(iod["op_flags"]))
        if op != uapi.UBLK_IO_OP_READ:
            return -errno.EOPNOTSUPP
        out["no_r2r"] = splice_probe(d, dev_id, splice_pos(0, tag, 0), w, 512, DIRECT)   # counts 512
        os.write(w, want)
        out["r2r"] = splice_probe(d, dev_id, splice_pos(0, tag, 0), r, 4096, DIRECT | R2R)
        os.write(w, want)
        # 512 + 4096 + 4096 > 8192: the failed call's bytes count against the request
        out["over"] = splice_probe(d, dev_id, splice_pos(0, tag, 4096), r, 4096, DIRECT | R2R)
        os.read(r, 4096)
        return 8192

    dev_id, th = serve(sim, uapi.SIM_F_SPLICE_ZC, probe)
    try:
        with sim.open(dev_id) as blk:
            assert blk.pread(8192, 8192)[:4096] == want
        assert out == dict(no_r2r=-errno.EINVAL, r2r=4096, over=-errno.EACCES)
    finally:
        stop(sim, dev_id, th)


def test_splice_needs_the_feature_and_data(sim, pipe):
    r, w = pipe
    out = {}

    def probe(dev_id, tag, iod):
        out.setdefault("res", []).append(splice_probe(sim.driver, dev_id, splice_pos(0, tag, 0), w, 512, DIRECT))
        return nbytes_of(iod)

    dev_id, th = serve(sim, 0, probe)          # a device without SPLICE_ZC
    try:
        with sim.open(dev_id) as blk:
            blk.pwrite(b"z" * 512, 0)
        assert out["res"] == [-errno.EINVAL]
    finally:
        stop(sim, dev_id, th)


def test_user_copy_rules_and_data(sim):
    payload = os.urandom(8192)
    out = {}

    def probe(dev_id, tag, iod):
        d = sim.driver
        op = uapi.op_of(int(iod["op_flags"]))
        nbytes = nbytes_of(iod)
        buf = np.zeros(nbytes, np.uint8)
        if op == uapi.UBLK_IO_OP_WRITE:
            out["wrong_dir"] = user_copy_probe(d, dev_id, user_copy_pos(0, tag, 0), buf, True)
            out["bad_pos"] = user_copy_probe(d, dev_id, 4096, buf, False)
            out["bad_tag"] = user_copy_probe(d, dev_id, user_copy_pos(0, DEPTH + 1, 0), buf, False)
            out["past_end"] = user_copy_probe(d, dev_id, user_copy_pos(0, tag, nbytes + 512), buf, False)
            out["half"] = user_copy_probe(d, dev_id, user_copy_pos(0, tag, nbytes // 2), buf, False)
            out["read"] = user_copy_probe(d, dev_id, user_copy_pos(0, tag, 0), buf, False)
            out["data"] = buf.tobytes()
        else:
            buf[:] = np.frombuffer(payload[:nbytes], np.uint8)
            out["fill"] = user_copy_probe(d, dev_id, user_copy_pos(0, tag, 0), buf, True)
        return nbytes

    dev_id, th = serve(sim, uapi.UBLK_F_USER_COPY, probe)
    try:
        with sim.open(dev_id) as blk:
            blk.pwrite(payload, 0)
            assert blk.pread(8192, 0) == payload
        assert out["wrong_dir"] == -errno.EACCES
        assert out["bad_pos"] == -errno.EINVAL
        assert out["bad_tag"] == -errno.EINVAL
        assert out["past_end"] == -errno.EINVAL
        assert out["half"] == 4096
        assert out["read"] == 8192 and out["data"] == payload
        assert out["fill"] == 8192
    finally:
        stop(sim, dev_id, th)


def test_user_copy_refused_without_the_feature(sim):
    out = {}

    def probe(dev_id, tag, iod):
        buf = np.zeros(512, np.uint8)
        out["res"] = user_copy_probe(sim.driver, dev_id, user_copy_pos(0, tag, 0), buf, False)
        return nbytes_of(iod)

    dev_id, th = serve(sim, 0, probe)
    try:
        with sim.open(dev_id) as blk:
            blk.pwrite(b"q" * 512, 0)
        assert out["res"] == -errno.EACCES
    finally:
        stop(sim, dev_id, th)
