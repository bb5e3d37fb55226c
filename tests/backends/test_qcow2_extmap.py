"""The qcow2 backend's extent map (pyublk_fast.aio.ExtentMap) over the simulated driver:
requests in published clusters are served by the queues in C and never reach Python;
every change of a cluster's place (discard, reallocation) takes it out of the map and
waits for the map's I/O in flight on it; a failed flush and a read-only image keep
writes out of it; random I/O on two queues through a tiny (always evicting) map
matches a model, qemu-img check and qemu-img compare."""
from __future__ import annotations

import errno
import random
import threading
import time
import types

import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.qcow2 import ringio
from pyublk_fast.backends.qcow2.l2 import DATA
from pyublk_fast.backends.qcow2_backend import Qcow2Backend
from pyublk_fast.device import Device

from test_qcow2_image import assert_check_clean, assert_same_as_raw
from test_qcow2_ring import SIZE, _batch, _image, _run_batch

KiB = 1 << 10
CS = 64 * KiB
READ, WRITE, FLUSH, DISCARD = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE,
                               uapi.UBLK_IO_OP_FLUSH, uapi.UBLK_IO_OP_DISCARD)
PATHS = ["copy", "user_copy", "zero_copy", "splice_zc"]


def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _host(backend: Qcow2Backend, vc: int) -> int:
    with backend.data._lock:
        kind, host = backend.image._map.lookup(vc)
    assert kind == DATA
    return host


def _count_handler_calls(backend: Qcow2Backend) -> list:
    """Count the requests whose read/write handler runs (the map's never do)."""
    calls: list = []
    for name in ("read", "write"):
        real = getattr(backend.data, name)

        def counted(offset, buf, real=real, name=name):
            calls.append((name, offset, len(buf)))
            return real(offset, buf)
        setattr(backend.data, name, counted)
    return calls


@pytest.mark.parametrize("path", PATHS)
def test_requests_in_published_clusters_never_reach_python(sim, tmp_path, path):
    """After one request per cluster published it, 4 KiB reads and writes inside the
    clusters are served from the map (the handlers do not run: only the FUA write
    reaches them, for its flush) and move the right bytes, on every data path."""
    rng = random.Random(path)
    img, model = _image(tmp_path, 16, None, rng)
    model[:] = rng.randbytes(SIZE)
    backend = Qcow2Backend(img)
    with Device(backend, sim, queues=2, depth=32, data_path=path) as dev, dev.open() as blk:
        blk.pwrite(model, 0)
        for vc in range(SIZE // CS):
            assert blk.pread(512, vc * CS) == model[vc * CS:vc * CS + 512]
        assert backend.data.map.entries == SIZE // CS
        calls = _count_handler_calls(backend)
        served = backend.data.map.served
        for _ in range(6):                    # batches of 8 on distinct blocks
            batch = []
            for k, block in enumerate(rng.sample(range(SIZE // 4096), 8)):
                data = rng.randbytes(4096) if k % 3 == 0 else bytearray(4096)
                batch.append((WRITE if k % 3 == 0 else READ, block * 4096, 4096, data))
            assert blk.submit(batch) == [4096] * 8
            for op, off, n, buf in batch:
                if op == READ:
                    assert bytes(buf) == bytes(model[off:off + n]), f"read at {off:#x}"
                else:
                    model[off:off + n] = buf
        assert calls == [], "a request inside a published cluster reached Python"
        assert backend.data.map.served - served == 48
        fua = rng.randbytes(4096)
        assert blk.submit([(WRITE, 8192, 4096, fua, uapi.UBLK_IO_F_FUA)]) == [4096]
        model[8192:12288] = fua
        assert calls == [("write", 8192, 4096)]
        assert blk.pread(SIZE, 0) == bytes(model)
    backend.close()
    assert backend.data.map.entries == 0
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert_same_as_raw(img, str(raw))


@pytest.mark.parametrize("path", ["copy", "zero_copy"])
def test_discard_waits_for_the_maps_io_in_flight_on_its_cluster(sim, tmp_path, path):
    """A request served from the map is in flight on cluster X (a MapReader stands in
    for its queue, so that it stays there) when a discard of X arrives: the discard
    takes X out of the map and waits, X still mapped in the image, until that I/O
    ends; then X reads as zeros and the image is clean."""
    rng = random.Random(path)
    img, model = _image(tmp_path, 16, None, rng)
    x = 5
    backend = Qcow2Backend(img)
    with Device(backend, sim, queues=2, depth=32, data_path=path) as dev, dev.open() as blk:
        old = rng.randbytes(CS)
        blk.pwrite(old, x * CS)
        assert blk.pread(4096, x * CS) == old[:4096]
        host_x = _host(backend, x)
        reader = backend.data.map.reader()
        assert reader.enter(x) == (backend.data.fd, host_x)
        out: list = []

        def discard():
            with dev.open() as other:
                out.append(other.submit([(DISCARD, x * CS, CS, None)]))
        t = threading.Thread(target=discard)
        t.start()
        try:
            _wait_for(lambda: backend.data._gates.waits > 0, "the discard to wait")
            assert backend.data.map.lookup(x) is None, "still published while unmapping"
            assert t.is_alive() and _host(backend, x) == host_x, \
                "the discard went ahead with the map's I/O in flight"
            # other clusters are still served (by the handlers, while X's set drains)
            assert blk.pread(4096, 9 * CS) == bytes(4096)
        finally:
            reader.leave(x)
            t.join(10)
            reader.close()
        assert out == [[0]]
        assert blk.pread(CS, x * CS) == bytes(CS)
    assert_check_clean(img)


@pytest.mark.parametrize("path", ["copy", "zero_copy", "splice_zc"])
def test_a_write_after_reallocation_lands_in_the_new_cluster(sim, tmp_path, path):
    """X is published at host cluster H; X is discarded, a flush frees H, Y takes H;
    X is written again (a new cluster). Writes and reads of X served from the map then
    go to X's new cluster: Y keeps its bytes."""
    rng = random.Random(path)
    img, model = _image(tmp_path, 16, None, rng)
    x, y = 2, 7
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=32, data_path=path) as dev, dev.open() as blk:
        blk.pwrite(rng.randbytes(CS), x * CS)
        blk.pread(4096, x * CS)
        h = _host(backend, x)
        assert backend.data.map.lookup(x) == (backend.data.fd, h, True)
        assert blk.submit([(DISCARD, x * CS, CS, None)]) == [0]
        assert backend.data.map.lookup(x) is None
        blk.flush()
        ydata = rng.randbytes(CS)
        blk.pwrite(ydata, y * CS)
        assert _host(backend, y) == h, "Y did not take X's old cluster: nothing tested"
        xdata = bytearray(rng.randbytes(CS))
        blk.pwrite(xdata, x * CS)
        assert _host(backend, x) != h
        assert blk.pread(4096, x * CS) == xdata[:4096]       # publishes X again
        served = backend.data.map.served
        piece = rng.randbytes(8192)
        blk.pwrite(piece, x * CS + 16 * KiB)
        xdata[16 * KiB:24 * KiB] = piece
        assert blk.pread(8192, x * CS + 16 * KiB) == piece
        assert backend.data.map.served == served + 2
        assert blk.pread(CS, y * CS) == ydata, "a write to X landed in X's old cluster"
        assert blk.pread(CS, x * CS) == xdata
    assert_check_clean(img)


@pytest.mark.parametrize("path", ["copy", "zero_copy"])
def test_random_io_on_two_queues_through_a_tiny_map(sim, tmp_path, monkeypatch, path):
    """Batches of disjoint requests (writes, reads, discards, write zeroes, flushes; half
    of them inside one cluster) from two queues, with a map of 8 entries for 64
    clusters: entries are replaced all the time, discarded clusters are reallocated.
    Every read matches the model; qemu-img check and compare after."""
    monkeypatch.setattr(ringio, "_MAP_MAX", 8)
    rng = random.Random(f"tiny/{path}")
    img, model = _image(tmp_path, 16, None, rng)
    backend = Qcow2Backend(img)
    assert backend.data.map.capacity == 8
    with Device(backend, sim, queues=2, depth=32, data_path=path) as dev, dev.open() as blk:
        for i in range(60):
            _run_batch(blk, model, rng, _batch(rng, CS, rng.randrange(2, 17)), f"batch {i}")
        assert blk.pread(SIZE, 0) == bytes(model)
        blk.flush()
        # how many hit the map depends on the two queues' timing; some must, or the
        # replacements and reallocations above were never served from it
        assert backend.data.map.served > 0
        assert backend.data.map.entries <= 8
    assert_check_clean(img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert_same_as_raw(img, str(raw))


class _FailingSync:
    """A queue's aio whose fdatasync fails (EBADF: an fsync of no file)."""

    def __init__(self, io) -> None:
        self._io = io

    def __getattr__(self, name):
        return getattr(self._io, name)

    def fdatasync(self, fd):
        return self._io.fsync(-1)


def test_a_failed_flush_keeps_writes_out_of_the_map(sim, tmp_path, monkeypatch):
    """A cluster published for writing; a flush fails: from then on a write into it fails
    (EIO, from the handlers) instead of being served from the map, and its bytes stay;
    reads are still served from the map."""
    rng = random.Random(4)
    img, model = _image(tmp_path, 16, None, rng)
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=8) as dev, dev.open() as blk:
        data = rng.randbytes(CS)
        blk.pwrite(data, 0)
        assert blk.pread(4096, 0) == data[:4096]
        assert backend.data.map.lookup(0)[2] is True
        real = ringio.aio.current
        monkeypatch.setattr(ringio, "aio", types.SimpleNamespace(
            current=lambda: _FailingSync(real())))
        assert blk.submit([(FLUSH, 0, 0, None)]) == [-errno.EIO]   # any failure, to the block layer
        assert backend.image._flush_failed is not None
        monkeypatch.undo()
        assert blk.submit([(WRITE, 4096, 4096, rng.randbytes(4096))]) == [-errno.EIO]
        served = backend.data.map.served
        assert blk.pread(CS, 0) == data
        assert blk.pread(4096, 4096) == data[4096:8192]
        assert backend.data.map.served == served + 2
