"""PER_IO_DAEMON (Linux 6.16): one queue served by several threads, each owning its tags.

Written once against the ``transport`` fixture: here the simulated driver;
tests/kernel/test_kernel_per_io_daemon.py imports these functions and runs them on the
real driver, so the simulator is held to what the kernel accepts and refuses. The
driver ties a tag to the thread that fetched it (the simulator: to the ring, one per
server thread): another thread's COMMIT or NEED_GET_DATA for it is EINVAL.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from pyublk_fast import cli, uapi
from pyublk_fast._core.queue import NativeTarget, Queue
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport
from pyublk_fast.transport.sim.driver import SIM_FEATURES
from pyublk_fast.util import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend_kinds import build_backend  # noqa: E402
from test_sim_protocol import (  # noqa: E402,F401  (transport: the simulated driver)
    _submit_in_thread, inflight, kill_and_recover_reissues_everything, run_load, transport)

MiB = 1 << 20
DEPTH = 4
BUF = 64 * 1024


def skip_without_per_io_daemon(t) -> None:
    if not t.features() & uapi.UBLK_F_PER_IO_DAEMON:
        pytest.skip("the driver lacks PER_IO_DAEMON (Linux 6.16)")


def test_add_dev_grants_per_io_daemon_unasked(transport):
    """The 6.16+ driver sets PER_IO_DAEMON on every device: nothing to ask for."""
    skip_without_per_io_daemon(transport)
    dev_id, flags = transport.add_dev(-1, 1, DEPTH, BUF, 0)
    try:
        assert flags & uapi.UBLK_F_PER_IO_DAEMON
    finally:
        transport.del_dev(dev_id)


@pytest.mark.parametrize("kind,data_path,threads", [
    ("memory", "copy", 2), ("memory", "user_copy", 3), ("memory", "need_get_data", 2),
    ("loop", "copy", 2), ("loop", "zero_copy", 2), ("loop-python", "user_copy", 2)])
def test_threads_serve_data(transport, tmp_path, kind, data_path, threads):
    """Bytes written come back through a queue served by several threads, and every
    thread serves a share (the driver hands each tag to the thread that fetched it)."""
    skip_without_per_io_daemon(transport)
    backend, native = build_backend(kind, tmp_path, 16 * MiB)
    with Device(backend, transport, depth=16, data_path=data_path, native=native,
                threads_per_queue=threads) as dev:
        assert dev.flags & uapi.UBLK_F_PER_IO_DAEMON
        # 16 writes of 4..64 KiB in flight together, then 16 reads: every tag busy at once
        pats = [os.urandom(4096 * (1 + i)) for i in range(16)]
        bufs = [bytearray(len(p)) for p in pats]
        with transport.open(dev.dev_id) as blk:
            assert blk.submit([(uapi.UBLK_IO_OP_WRITE, i * 128 * 1024, len(p), p)
                               for i, p in enumerate(pats)]) == [len(p) for p in pats]
            assert blk.submit([(uapi.UBLK_IO_OP_READ, i * 128 * 1024, len(b), b)
                               for i, b in enumerate(bufs)]) == [len(p) for p in pats]
        assert [bytes(b) for b in bufs] == pats
        out = run_load(transport, dev.dev_id, rw="randrw", qd=32, count=2000, verify=True,
                       region=4 * MiB)
        assert out["completed"] == 2000 and out["errors"] == 0 and out["verify_errors"] == 0
        per_thread = [q.requests for q in dev._queues]
        assert len(per_thread) == threads and min(per_thread) > 0, per_thread
        stats = dev.stats()          # one row per queue, its threads' sum
        assert len(stats.counters) == 1
        assert sum(stats.summary()["requests"].values()) == dev.requests_served >= 2000


class Gate(MemoryBackend):
    """A RAM disk whose reads wait until the gate opens (holding their tags at the server)."""

    def __init__(self, size: int = MiB):
        super().__init__(size)
        self.open = threading.Event()
        self.open.set()

    def read(self, offset, buf):
        assert self.open.wait(20), "the test never opened the gate"
        super().read(offset, buf)


def test_another_threads_commit_is_refused(transport):
    """With every tag's request at the server, a thread that did not fetch a tag cannot
    commit it or ask for its data (EINVAL), and the request stays its owner's: the reader
    gets the bytes the owner read, not the stranger's result."""
    skip_without_per_io_daemon(transport)
    backend = Gate()
    pats = [os.urandom(4096) for _ in range(DEPTH)]
    with Device(backend, transport, depth=DEPTH, threads_per_queue=2) as dev:
        with dev.open() as blk:
            for i, p in enumerate(pats):
                blk.pwrite(p, i * 8192)
            backend.open.clear()
            bufs = [bytearray(4096) for _ in range(DEPTH)]
            th, out = _submit_in_thread(blk, [(uapi.UBLK_IO_OP_READ, i * 8192, 4096, b)
                                              for i, b in enumerate(bufs)])
            assert wait_until(lambda: inflight(transport, dev.dev_id) == DEPTH, 10), \
                "the reads never reached the server"
            ep = transport.queue_endpoint(dev.dev_id, 0)
            stranger = Queue(DEPTH, BUF, ep.channel, ep.iods, native=NativeTarget())
            try:
                addr = stranger.buffers()[0].__array_interface__["data"][0]
                for tag in range(DEPTH):
                    for nr in (uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, uapi.UBLK_IO_NEED_GET_DATA):
                        got = stranger.probe_cmd(nr, tag=tag, result=4096, addr=addr)
                        assert got == -errno.EINVAL, (tag, hex(nr), got)
            finally:
                stranger.close()
            assert th.is_alive()
            backend.open.set()
            th.join(10)
            assert out.get("res") == [4096] * DEPTH, out
            assert [bytes(b) for b in bufs] == pats


def test_threads_kill_and_recover_reissues_everything(transport):
    """A server of two threads per queue killed with writes in flight: a new one (two
    threads again) fetches every tag and serves what the dead one held."""
    skip_without_per_io_daemon(transport)
    dev = kill_and_recover_reissues_everything(transport, seed=23, threads_per_queue=2)
    assert dev.threads_per_queue == 2 and dev.flags & uapi.UBLK_F_PER_IO_DAEMON


def test_threads_quiesce_hands_over(transport):
    """quiesce() aborts every thread's fetches: each commits what it holds and exits; a
    new server of other threads recovers the device and serves the data."""
    skip_without_per_io_daemon(transport)
    if not transport.features() & uapi.UBLK_F_QUIESCE:
        pytest.skip("the driver lacks QUIESCE")
    pats = [os.urandom(4096) for _ in range(16)]
    with Device(MemoryBackend(MiB), transport, depth=8, recovery="reissue",
                threads_per_queue=4) as dev:
        with dev.open() as blk:
            for i, p in enumerate(pats[:8]):
                blk.pwrite(p, i * 8192)
            dev.quiesce()
            assert not dev.serving
            assert dev.info().state == uapi.UBLK_S_DEV_QUIESCED
            dev.recover()
            assert sum(th.is_alive() for th in dev._threads) == 4
            for i, p in enumerate(pats[8:], 8):
                blk.pwrite(p, i * 8192)
            assert [blk.pread(4096, i * 8192) for i in range(16)] == pats


@pytest.mark.parametrize("kw,match", [
    (dict(threads_per_queue=0), "out of range 1..8"),
    (dict(threads_per_queue=9), "out of range 1..8"),
    (dict(threads_per_queue=2, batch_io=True), "batch_io serves each queue from one thread")])
def test_bad_thread_counts_are_refused(transport, kw, match):
    with pytest.raises(ValueError, match=match):
        Device(MemoryBackend(MiB), transport, depth=8, **kw)


# ---- the simulator only: a driver older than 6.16, and the CLI -------------------------------

@pytest.mark.parametrize("per_io_daemon", [True, False])
def test_one_server_thread_per_queue_without_per_io_daemon(per_io_daemon):
    """Before PER_IO_DAEMON the queue's first FETCH made its thread the queue's one server:
    another thread's FETCH is EINVAL (the simulator: another ring's). With it each thread
    fetches its own tags and the device starts. Device refuses threads up front on a
    driver without it, naming the kernel that brings it."""
    features = SIM_FEATURES if per_io_daemon else SIM_FEATURES & ~uapi.UBLK_F_PER_IO_DAEMON
    t = SimTransport(features=features)
    queues, dev_id = [], None
    try:
        assert bool(t.features() & uapi.UBLK_F_PER_IO_DAEMON) == per_io_daemon
        if not per_io_daemon:
            with pytest.raises(OSError) as e:
                Device(MemoryBackend(MiB), t, depth=DEPTH, threads_per_queue=2)
            assert e.value.errno == errno.EOPNOTSUPP
            assert "lacks UBLK_F_PER_IO_DAEMON (Linux 6.16+)" in str(e.value), str(e.value)
        dev_id, flags = t.add_dev(-1, 1, DEPTH, BUF, uapi.UBLK_F_PER_IO_DAEMON)
        assert bool(flags & uapi.UBLK_F_PER_IO_DAEMON) == per_io_daemon
        t.set_params(dev_id, MiB, 512)
        for k in range(2):
            ep = t.queue_endpoint(dev_id, 0)
            queues.append(Queue(DEPTH, BUF, ep.channel, ep.iods, native=NativeTarget(),
                                threads=2, thread=k))
        queues[0].fetch_all()                      # tags 0 and 2
        if per_io_daemon:
            queues[1].fetch_all()                  # tags 1 and 3, from another ring
            t.start_dev(dev_id, timeout=5)
            t.stop_dev(dev_id)
        else:
            addr = queues[1].buffers()[1].__array_interface__["data"][0]
            assert queues[1].probe_cmd(uapi.UBLK_IO_FETCH_REQ, tag=1, addr=addr) == -errno.EINVAL
    finally:
        for q in queues:
            q.close()
        if dev_id is not None:
            t.release(dev_id)
            t.del_dev(dev_id)
        t.close()


@pytest.mark.parametrize("argv,message", [
    (["--threads", "0"], "threads_per_queue=0 out of range 1..128"),
    (["-d", "4", "--threads", "5"], "threads_per_queue=5 out of range 1..4"),
    (["--threads", "2", "--batch-io"], "batch_io serves each queue from one thread")])
def test_cli_add_refuses_bad_threads(capsys, argv, message):
    assert cli.main(["add", "-t", "memory", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
