"""The ublk protocol at the Device level: tags, queues, devices, errors, server death.

Written once against the ``transport`` fixture: here it is the simulated driver;
tests/kernel/test_kernel_conformance.py imports these same functions and runs them
with ``transport`` = a KernelTransport on a real ublk driver. Only the driver's own
entry points differ, and they are behind the helpers below (run_load, inflight).
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from pyublk_fast import uapi
from pyublk_fast._core.queue import NativeTarget, Queue
from pyublk_fast.backend import Backend
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.util import wait_until

KiB, MiB = 1 << 10, 1 << 20
PATHS = ["copy", "need_get_data"]
#: What new I/O fails with while a recovery="fail_io" device has no server: BLK_STS_TARGET.
FAIL_IO_ERRNO = {"sim": errno.EREMOTEIO, "kernel": errno.EREMOTEIO}
#: What I/O fails with once a device without recovery lost its server or was stopped. The
#: kernel also fails a write that reaches the disk after it was removed (capacity 0) with ENOSPC.
GONE_ERRNOS = {"sim": {errno.EIO, errno.ENODEV}, "kernel": {errno.EIO, errno.ENODEV, errno.ENOSPC}}


@pytest.fixture
def transport(sim):
    """The driver under test: the simulated one (the kernel suite overrides this fixture)."""
    return sim


def run_load(transport, dev_id: int, *, rw: str, bs: int = 4096, qd: int, count: int,
             verify: bool = False, region: int = 0, seed: int = 1) -> dict:
    """count random I/Os at queue depth qd -> {completed, errors, verify_errors}.

    The simulated driver has its own load generator (transport.run_load); on other
    drivers the requests go through the block-device front, qd at a time on distinct
    blocks, each batch submitted from the next CPU so that every hardware queue gets
    some. verify=True writes a pattern over the region first and checks every read.
    """
    if transport.name == "sim":
        return transport.run_load(dev_id, rw=rw, bs=bs, qd=qd, count=count, verify=verify,
                                  region=region, seed=seed)
    read_pct = {"randread": 100, "randwrite": 0, "randrw": 50}[rw]
    rng = random.Random(seed)
    cpus = sorted(os.sched_getaffinity(0))
    out = dict(completed=0, errors=0, verify_errors=0)
    with transport.open(dev_id) as blk:
        nblocks = (region or blk.size) // bs
        model = {}
        if verify:
            for first in range(0, nblocks, qd):
                pats = {b: rng.randbytes(bs) for b in range(first, min(first + qd, nblocks))}
                res = blk.submit([(uapi.UBLK_IO_OP_WRITE, b * bs, bs, p) for b, p in pats.items()])
                if any(r != bs for r in res):
                    raise OSError(errno.EIO, f"verify prefill: write results {set(res)}")
                model.update(pats)
        try:
            batch = 0
            while out["completed"] < count:
                os.sched_setaffinity(0, {cpus[batch % len(cpus)]})
                batch += 1
                blocks = rng.sample(range(nblocks), min(qd, nblocks, count - out["completed"]))
                reqs = []
                for b in blocks:
                    if rng.randrange(100) < read_pct:
                        reqs.append((uapi.UBLK_IO_OP_READ, b * bs, bs, bytearray(bs)))
                    else:
                        reqs.append((uapi.UBLK_IO_OP_WRITE, b * bs, bs, rng.randbytes(bs)))
                res = blk.submit(reqs)
                out["completed"] += len(reqs)
                out["errors"] += sum(r != bs for r in res)
                for (op, off, _, buf), r in zip(reqs, res):
                    if r != bs:
                        continue
                    if op == uapi.UBLK_IO_OP_WRITE:
                        model[off // bs] = buf
                    elif verify and bytes(buf) != model[off // bs]:
                        out["verify_errors"] += 1
        finally:
            os.sched_setaffinity(0, cpus)
    return out


def inflight(transport, dev_id: int) -> int:
    """Requests the driver holds for dev_id (the kernel's from sysfs; 0 once its disk is gone)."""
    if transport.name == "sim":
        return transport.dev_info(dev_id).inflight
    try:
        with open(f"/sys/block/ublkb{dev_id}/inflight") as fh:
            return sum(int(x) for x in fh.read().split())
    except FileNotFoundError:
        return 0


def _patterns(n: int, bs: int = 4096, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(bs) for _ in range(n)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("native", [True, False])
def test_many_in_flight_more_than_tags(transport, backing_file, path, native):
    from pyublk_fast.backends.loop import LoopBackend
    pats = _patterns(200)
    with Device(LoopBackend(backing_file), transport, depth=8, data_path=path, native=native) as dev, \
            dev.open() as blk:
        assert blk.submit([(uapi.UBLK_IO_OP_WRITE, i * 8192, 4096, p) for i, p in enumerate(pats)]) == [4096] * 200
        bufs = [bytearray(4096) for _ in pats]
        assert blk.submit([(uapi.UBLK_IO_OP_READ, i * 8192, 4096, b) for i, b in enumerate(bufs)]) == [4096] * 200
        assert [bytes(b) for b in bufs] == pats
        assert blk.pread(4096, 4096) == bytes(4096)          # the gaps stayed zero


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("native", [True, False])
def test_tag_reuse_loadgen_qd64_on_depth8(transport, backing_file, path, native):
    from pyublk_fast.backends.loop import LoopBackend
    with Device(LoopBackend(backing_file), transport, depth=8, data_path=path, native=native) as dev:
        r = run_load(transport, dev.dev_id, rw="randrw", bs=4096, qd=64, count=4000, verify=True, region=MiB)
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 4000)


@pytest.mark.parametrize("native", [True, False])
def test_two_queues(transport, backing_file, native):
    from pyublk_fast.backends.loop import LoopBackend
    pats = _patterns(64, seed=2)
    with Device(LoopBackend(backing_file), transport, queues=2, depth=8, native=native) as dev:
        assert dev.info().nr_hw_queues == 2
        with dev.open() as blk:
            assert blk.submit([(uapi.UBLK_IO_OP_WRITE, i * 4096, 4096, p) for i, p in enumerate(pats)]) == [4096] * 64
            assert blk.pread(64 * 4096, 0) == b"".join(pats)
        r = run_load(transport, dev.dev_id, rw="randrw", bs=4096, qd=32, count=3000, verify=True, region=MiB)
        assert (r["errors"], r["verify_errors"]) == (0, 0)
        served = [q.requests for q in dev._queues]
    assert all(n > 0 for n in served), f"a queue served nothing: {served}"


def test_several_devices_in_one_transport(transport, backing_file):
    from pyublk_fast.backends.loop import LoopBackend
    from pyublk_fast.backends.null import NullBackend
    before = set(transport.list_devs())
    devs = [Device(MemoryBackend(MiB), transport, depth=4), Device(MemoryBackend(MiB), transport, depth=8, data_path="need_get_data"),
            Device(LoopBackend(backing_file), transport, depth=16), Device(NullBackend(MiB), transport, depth=4)]
    for d in devs:
        d.start()
    try:
        assert len({d.dev_id for d in devs}) == 4
        blks = [d.open() for d in devs[:3]]
        pats = _patterns(3, bs=64 * KiB, seed=3)
        for _ in range(2):                                   # interleaved, each device its own data
            for blk, p in zip(blks, pats):
                blk.pwrite(p, 128 * KiB)
        for blk, p in zip(blks, pats):
            assert blk.pread(64 * KiB, 128 * KiB) == p
            blk.close()
        r = run_load(transport, devs[3].dev_id, rw="randread", qd=16, count=1000)
        assert r["errors"] == 0
    finally:
        for d in devs:
            d.stop()
    assert set(transport.list_devs()) == before


# -- errors at the front ------------------------------------------------------------------

def test_misaligned_and_out_of_range_requests(transport):
    with Device(MemoryBackend(MiB), transport, depth=4) as dev, dev.open() as blk:
        for off, n in [(100, 512), (512, 100), (0, 513), (MiB, 512), (MiB - 512, 1024), (2 * MiB, 4096)]:
            with pytest.raises(OSError) as ei:
                blk.pread(n, off)
            assert ei.value.errno == errno.EINVAL, (off, n)
            with pytest.raises(OSError) as ei:
                blk.pwrite(b"x" * n, off)
            assert ei.value.errno == errno.EINVAL, (off, n)
        with pytest.raises(OSError) as ei:
            blk.discard(MiB - 512, 1024)
        assert ei.value.errno == errno.EINVAL
        blk.pwrite(b"y" * 512, MiB - 512)                    # the last sector is fine
        assert blk.pread(512, MiB - 512) == b"y" * 512


def test_open_device_not_started(transport):
    dev_id, _ = transport.add_dev(-1, 1, 4, 512 * KiB, 0)          # added, never started
    try:
        with pytest.raises(FileNotFoundError):
            transport.open(dev_id)
    finally:
        transport.del_dev(dev_id)


def test_open_device_before_start_and_after_stop(transport):
    dev = Device(MemoryBackend(MiB), transport, depth=4)
    with pytest.raises(FileNotFoundError):
        dev.open()
    dev.start()
    dev.stop()
    with pytest.raises(FileNotFoundError):
        dev.open()


@pytest.mark.parametrize("all_fetched", [False, True], ids=["setting_up", "ready"])
def test_commands_out_of_turn_get_the_drivers_errors(transport, all_fetched):
    """A per-tag command the tag's state does not allow, answered as the 7.2 driver does:
    a tag fetched twice while the device is set up is EINVAL, any FETCH once every tag
    was fetched EBUSY; a COMMIT or NEED_GET_DATA for a tag waiting for a request EBUSY,
    for a tag never fetched EINVAL; a tag beyond the depth EINVAL."""
    depth = 4
    dev_id, _ = transport.add_dev(-1, 1, depth, 64 * KiB, 0)
    transport.set_params(dev_id, MiB, 512, 0)
    ep = transport.queue_endpoint(dev_id, 0)
    q = Queue(depth, 64 * KiB, ep.channel, ep.iods, native=NativeTarget())
    addr = q.buffers()[0].__array_interface__["data"][0]

    def probe(nr, tag, timeout=5.0):
        return q.probe_cmd(nr, tag=tag, result=512, addr=addr, timeout=timeout)
    try:
        if all_fetched:
            q.fetch_all()
        else:       # tag 0 only: a FETCH is answered when a request comes, here never
            with pytest.raises(TimeoutError):
                probe(uapi.UBLK_IO_FETCH_REQ, 0, timeout=0.5)
        assert probe(uapi.UBLK_IO_FETCH_REQ, 0) == (-errno.EBUSY if all_fetched else -errno.EINVAL)
        assert probe(uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, 0) == -errno.EBUSY
        assert probe(uapi.UBLK_IO_NEED_GET_DATA, 0) == -errno.EBUSY
        assert probe(uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, 1) == (-errno.EBUSY if all_fetched else -errno.EINVAL)
        assert probe(uapi.UBLK_IO_FETCH_REQ, depth) == -errno.EINVAL
    finally:
        q.close()
        transport.release(dev_id)
        transport.del_dev(dev_id)


@pytest.mark.parametrize("kwargs", [dict(depth=0), dict(depth=5000), dict(data_path="bogus"),
                                    dict(queues=0), dict(recovery="sometimes")])
def test_bad_device_args(transport, kwargs):
    before = set(transport.list_devs())
    with pytest.raises(ValueError):
        Device(MemoryBackend(MiB), transport, **kwargs)
    assert set(transport.list_devs()) == before


# -- server death, recovery and stop with I/O in flight ----------------------------------------

class Slow(MemoryBackend):
    """A RAM disk that sleeps a little per request and counts what it served."""

    def __init__(self, size: int = MiB, delay: float = 0.002):
        super().__init__(size)
        self.delay = delay
        self.served = 0

    def read(self, offset, buf):
        time.sleep(self.delay)
        super().read(offset, buf)
        self.served += 1

    def write(self, offset, data):
        time.sleep(self.delay)
        super().write(offset, data)
        self.served += 1


def _at(i: int) -> int:
    """Offset of the i-th 4 KiB write of the server-death tests, with 4 KiB gaps: a real
    block layer merges adjacent writes into one request and the kill point counts requests."""
    return i * 8192


def _spaced_writes(pats: list[bytes]) -> list[tuple]:
    return [(uapi.UBLK_IO_OP_WRITE, _at(i), 4096, p) for i, p in enumerate(pats)]


def _submit_in_thread(blk, reqs):
    out = {}

    def run():
        try:
            out["res"] = blk.submit(reqs, timeout=10)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["exc"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _kill(dev):
    """_kill(dev); if it raises, stop the device so the test ends quickly, then re-raise."""
    try:
        dev.kill()
    except BaseException:
        dev.transport.stop_dev(dev.dev_id)
        for th in dev._threads:
            th.join(10)
        raise


def _wait_served(backend, n, timeout=10.0):
    assert wait_until(lambda: backend.served >= n, timeout, 0.001), \
        "backend never reached the kill point"


def _writes_in_flight(dev, backend, pats):
    """Open dev and write pats (spaced) from a thread; return (blk, thread, out) once the
    backend has served 16 of them, the rest still in flight or queued."""
    blk = dev.open()
    th, out = _submit_in_thread(blk, _spaced_writes(pats))
    _wait_served(backend, 16)
    return blk, th, out


@pytest.mark.parametrize("path", PATHS)
def test_kill_without_recovery_fails_in_flight(transport, path):
    backend = Slow()
    pats = _patterns(64, seed=5)
    dev = Device(backend, transport, depth=8, data_path=path).start()
    try:
        blk, th, out = _writes_in_flight(dev, backend, pats)
        _kill(dev)
        th.join(15)
        assert not th.is_alive(), "in-flight I/O hung after the server died"
        assert "exc" not in out, out.get("exc")
        res = out["res"]
        assert set(res) <= {4096, -errno.EIO} | {-e for e in GONE_ERRNOS[transport.name] - {errno.ENODEV}}, set(res)
        assert res.count(4096) >= 8 and -errno.EIO in res
        # every request completed exactly once: the driver holds nothing and counts none twice
        assert inflight(transport, dev.dev_id) == 0
        for i, r in enumerate(res):                          # successes really reached the backend
            if r == 4096:
                assert backend.data[_at(i):_at(i) + 4096] == pats[i]
        assert transport.dev_info(dev.dev_id).state == 0        # DEAD
        with pytest.raises(OSError):
            blk.pread(4096, 0)
        blk.close()
    finally:
        transport.del_dev(dev.dev_id)


@pytest.mark.parametrize("path", PATHS)
def test_kill_with_reissue_completes_everything_after_recover(transport, path):
    kill_and_recover_reissues_everything(transport, seed=6, data_path=path)


def kill_and_recover_reissues_everything(transport, seed: int, **device_kw) -> Device:
    """A server killed with writes in flight (recovery=reissue): they wait for the new
    server and are all served; returns the (stopped) Device."""
    backend = Slow()
    pats = _patterns(64, seed=seed)
    with Device(backend, transport, depth=8, recovery="reissue", **device_kw) as dev:
        blk, th, out = _writes_in_flight(dev, backend, pats)
        _kill(dev)
        time.sleep(0.05)
        assert th.is_alive(), "requests should wait for the new server, not fail"
        assert dev.info().state == 2                      # QUIESCED
        dev.recover()
        th.join(15)
        assert not th.is_alive()
        assert out.get("res") == [4096] * 64, out
        backend.delay = 0
        assert [blk.pread(4096, _at(i)) for i in range(64)] == pats
        assert inflight(transport, dev.dev_id) == 0
        blk.close()
    return dev


@pytest.mark.parametrize("path", PATHS)
def test_kill_with_recovery_fail_new_io_waits_for_recover(transport, path):
    backend = Slow()
    pats = _patterns(64, seed=7)
    with Device(backend, transport, depth=8, data_path=path, recovery="fail") as dev:
        blk, th, out = _writes_in_flight(dev, backend, pats)
        _kill(dev)
        # requests the dead server held fail; queued ones and new I/O wait for the new server
        blk2 = dev.open()
        th2, out2 = _submit_in_thread(blk2, [(uapi.UBLK_IO_OP_WRITE, 512 * KiB, 4096, pats[0])])
        time.sleep(0.05)
        assert th2.is_alive(), "new I/O must wait for the new server"
        assert dev.info().state == 2                      # QUIESCED
        dev.recover()
        th.join(15)
        th2.join(15)
        assert not th.is_alive() and not th2.is_alive()
        assert out2.get("res") == [4096], out2
        res = out["res"]
        assert -errno.EIO in res and set(res) <= {4096, -errno.EIO}, res
        backend.delay = 0
        assert blk.pread(4096, 512 * KiB) == pats[0]
        for i, r in enumerate(res):
            if r == 4096:
                assert blk.pread(4096, _at(i)) == pats[i]
        blk.close()
        blk2.close()


def test_kill_with_recovery_fail_io_fails_new_io_until_recover(transport):
    backend = MemoryBackend(MiB)
    with Device(backend, transport, depth=4, recovery="fail_io") as dev, dev.open() as blk:
        blk.pwrite(b"k" * 4096, 0)
        _kill(dev)
        assert dev.info().state == 3                      # FAIL_IO
        with pytest.raises(OSError) as ei:
            blk.pread(4096, 0)
        assert ei.value.errno == FAIL_IO_ERRNO[transport.name]
        dev.recover()
        assert blk.pread(4096, 0) == b"k" * 4096


@pytest.mark.parametrize("path", PATHS)
def test_stop_with_io_in_flight_never_hangs(transport, path):
    backend = Slow()
    pats = _patterns(64, seed=8)
    before = set(transport.list_devs())
    dev = Device(backend, transport, depth=8, data_path=path).start()
    blk, th, out = _writes_in_flight(dev, backend, pats)
    t0 = time.monotonic()
    dev.stop()
    th.join(15)
    assert not th.is_alive() and time.monotonic() - t0 < 10
    res = out["res"]
    assert set(res) <= {4096} | {-e for e in GONE_ERRNOS[transport.name]}, set(res)
    for i, r in enumerate(res):
        if r == 4096:
            assert backend.data[_at(i):_at(i) + 4096] == pats[i]
    assert set(transport.list_devs()) == before
    blk.close()
