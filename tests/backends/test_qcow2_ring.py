"""The qcow2 backend's data I/O on the queue's ring (backends/qcow2/ringio.py), over the
simulated driver: data against a model on every data path with many requests in flight
at once, backing files, the waits between requests on one cluster, and the crash order
of allocating writes (the L2 entry only after all of the cluster's data)."""
from __future__ import annotations

import errno
import os
import random
import types

import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.qcow2 import Qcow2Image, ringio
from pyublk_fast.backends.qcow2.format import OFFSET_MASK
from pyublk_fast.backends.qcow2.l2 import UNALLOC, ClusterMap
from pyublk_fast.backends.qcow2_backend import Qcow2Backend
from pyublk_fast.device import Device

from test_qcow2_image import assert_check_clean, assert_same_as_raw

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
BACKING_SIZE = 3 * MiB + 4096           # shorter than the overlay, not cluster aligned
READ, WRITE, FLUSH, DISCARD, ZEROES = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE,
                                       uapi.UBLK_IO_OP_FLUSH, uapi.UBLK_IO_OP_DISCARD,
                                       uapi.UBLK_IO_OP_WRITE_ZEROES)


def _o_direct_here(directory) -> bool:
    probe = os.path.join(directory, "probe")
    with open(probe, "wb") as f:
        f.truncate(4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


def _image(tmp_path, cluster_bits: int, backing: str | None, rng: random.Random):
    """An empty overlay of SIZE bytes (on a raw or qcow2 backing file with data, or
    none) and what it reads."""
    model = bytearray(SIZE)
    name = None
    if backing is not None:
        data = bytearray(rng.randbytes(BACKING_SIZE))
        name = f"base.{backing}"
        if backing == "raw":
            (tmp_path / name).write_bytes(data)
        else:
            with Qcow2Image.create(str(tmp_path / name), BACKING_SIZE, cluster_bits=12) as b:
                for off in range(0, BACKING_SIZE, 256 * KiB):   # data with holes between
                    b.write(off, data[off:off + 100 * KiB])
                    hole = slice(off + 100 * KiB, off + 256 * KiB)
                    data[hole] = bytes(len(data[hole]))
                b.write_zeroes(512 * KiB, 8 * KiB)              # and a zero cluster
                data[512 * KiB:520 * KiB] = bytes(8 * KiB)
        model[:BACKING_SIZE] = data
    path = str(tmp_path / "top.qcow2")
    Qcow2Image.create(path, SIZE, cluster_bits=cluster_bits, backing_file=name,
                      backing_format=backing).close()
    return path, model


def _extent(rng: random.Random, cs: int, hot: int | None) -> tuple[int, int]:
    """A 512-aligned extent: inside cluster ``hot``, or anywhere, often across a cluster
    boundary, up to three clusters long."""
    if hot is not None:
        off = hot * cs + rng.randrange(cs // 512) * 512
        return off, min(rng.randrange(1, 9) * 512, hot * cs + cs - off)
    if rng.random() < 0.5:
        off = rng.randrange(1, SIZE // cs) * cs - rng.randrange(0, 8) * 512
    else:
        off = rng.randrange(SIZE // 512) * 512
    return off, min(rng.randrange(1, 3 * cs // 512 + 1) * 512, SIZE - off, 192 * KiB)


def _batch(rng: random.Random, cs: int, n: int) -> list[tuple[int, int, int]]:
    """n requests (op, offset, length) on disjoint bytes, so that they may run in any
    order and together; half of them inside one cluster."""
    hot = rng.randrange(SIZE // cs)
    taken: list[tuple[int, int]] = []
    out = []
    for tries in range(50 * n):           # a small cluster fits few: give up on it
        if len(out) == n:
            break
        off, ln = _extent(rng, cs, hot if len(out) < n // 2 and tries < 20 * n else None)
        if any(lo < off + ln and off < hi for lo, hi in taken):
            continue
        taken.append((off, off + ln))
        op = rng.choices([WRITE, READ, DISCARD, ZEROES], [5, 3, 1, 1])[0]
        out.append((op, off, ln))
    return out


def _run_batch(blk, model: bytearray, rng: random.Random, batch, where: str) -> None:
    reqs, reads = [], []
    for op, off, ln in batch:
        buf = rng.randbytes(ln) if op == WRITE else bytearray(ln) if op == READ else None
        reqs.append((op, off, ln, buf))
    if rng.random() < 0.2:
        reqs.append((FLUSH, 0, 0, None))
    res = blk.submit(reqs)
    assert res == [ln if op in (READ, WRITE) else 0 for op, _, ln, _ in reqs], where
    for op, off, ln, buf in reqs:          # disjoint: each read saw the model as it was
        if op == READ:
            reads.append((off, ln, buf))
    for off, ln, buf in reads:
        assert bytes(buf) == bytes(model[off:off + ln]), f"{where}: read {ln}@{off:#x}"
    for op, off, ln, buf in reqs:
        if op == WRITE:
            model[off:off + ln] = buf
        elif op in (DISCARD, ZEROES):
            model[off:off + ln] = bytes(ln)


CASES = [("copy", 16, "raw"), ("need_get_data", 16, "qcow2"), ("user_copy", 12, None),
         ("zero_copy", 16, "raw"), ("zero_copy", 9, "qcow2"), ("splice_zc", 16, "qcow2"),
         ("splice_zc", 12, "raw"), ("copy", 9, None)]


@pytest.mark.parametrize("path,cluster_bits,backing", CASES,
                         ids=[f"{p}-{1 << cb >> 10 or 0.5}k-{b or 'nobacking'}" for p, cb, b in CASES])
def test_random_batches_match_model(sim, tmp_path, path, cluster_bits, backing):
    """Batches of up to 16 requests in flight together (half in one cluster: concurrent
    partial writes allocate it, with copy-on-write from the backing file); every read
    checked; then the whole disk, a reopen by the engine's own reads, qemu-img check
    (no leak either) and qemu-img compare."""
    rng = random.Random(f"{path}/{cluster_bits}/{backing}")
    img, model = _image(tmp_path, cluster_bits, backing, rng)
    cs = 1 << cluster_bits
    backend = Qcow2Backend(img)
    assert backend.data.direct == (cs >= 4096 and _o_direct_here(tmp_path))
    with Device(backend, sim, depth=32, data_path=path) as dev, dev.open() as blk:
        for i in range(30):
            _run_batch(blk, model, rng, _batch(rng, cs, rng.randrange(2, 17)), f"batch {i}")
        assert blk.pread(SIZE, 0) == bytes(model)
        blk.flush()
    with Qcow2Image.open(img, readonly=True) as again:
        assert again.read(0, SIZE) == bytes(model)
    assert_check_clean(img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert_same_as_raw(img, str(raw))


class _SlowIO:
    """A queue's aio with a delay before chosen request-directed operations start
    (after the handler planned them): a window for other requests to arrive meanwhile."""

    def __init__(self, io, delay: float, slow) -> None:
        self._io, self._delay, self._slow = io, delay, slow

    def __getattr__(self, name):
        return getattr(self._io, name)

    async def _late(self, call, *args):
        await self._io.sleep(self._delay)
        return await call(*args)

    def pread_request(self, fd, offset, at=0, length=None):
        if not self._slow("read", offset):
            return self._io.pread_request(fd, offset, at, length)
        return self._late(self._io.pread_request, fd, offset, at, length)

    def pwrite_request(self, fd, offset, at=0, length=None):
        if not self._slow("write", offset):
            return self._io.pwrite_request(fd, offset, at, length)
        return self._late(self._io.pwrite_request, fd, offset, at, length)


@pytest.fixture
def slow_ring(monkeypatch):
    """slow_ring(delay, slow(kind, file_offset) -> bool): from now on, the backend's
    request-directed reads and writes for which slow() is true start ``delay`` late."""
    def install(delay: float, slow) -> None:
        real = ringio.aio.current
        monkeypatch.setattr(ringio, "aio", types.SimpleNamespace(
            current=lambda: _SlowIO(real(), delay, slow)))
    return install


@pytest.mark.parametrize("path", ["copy", "zero_copy", "splice_zc"])
def test_writes_into_one_unallocated_cluster_wait_for_its_allocation(sim, tmp_path, slow_ring, path):
    """16 requests at once into one 64 KiB cluster of an overlay: 4 KiB writes into its
    even slots (the first allocates it, copying the backing file's bytes; its data write
    is slowed so the others arrive meanwhile and wait), reads of the odd slots (the
    backing file's bytes before, during and after). One cluster is allocated: no leak."""
    rng = random.Random(path)
    img, model = _image(tmp_path, 16, "raw", rng)
    cs, vc = 64 * KiB, 5
    slow_ring(0.2, lambda kind, off: kind == "write")
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=32, data_path=path) as dev, dev.open() as blk:
        reqs = []
        for slot in range(16):
            off = vc * cs + slot * 4096
            if slot % 2 == 0:
                data = rng.randbytes(4096)
                reqs.append((WRITE, off, 4096, data))
                model[off:off + 4096] = data
            else:
                reqs.append((READ, off, 4096, bytearray(4096)))
        assert blk.submit(reqs) == [4096] * 16
        for op, off, ln, buf in reqs:
            if op == READ:
                assert bytes(buf) == bytes(model[off:off + ln]), f"read at {off:#x}"
        assert blk.pread(SIZE, 0) == bytes(model)
        assert backend.data._gates.waits > 0, "no write waited for the allocation"
    assert_check_clean(img)


@pytest.mark.parametrize("kind", ["read", "write"])
@pytest.mark.parametrize("path", ["copy", "zero_copy"])
def test_discard_waits_for_data_io_on_its_cluster(sim, tmp_path, slow_ring, path, kind):
    """A read (or an in-place write) of cluster X is in flight, slowed, when a discard
    of X and a write allocating cluster Y arrive. Were X's host cluster freed at once, Y
    would take it, and the late read would return Y's bytes (the late write would
    overwrite them). The discard waits instead: the read gets X's bytes, Y keeps its
    own, X reads as zeros after. (X is not in the extent map: its I/O takes the
    handlers' path; test_qcow2_extmap.py has the map's.)"""
    rng = random.Random(f"{path}/{kind}")
    img, model = _image(tmp_path, 16, None, rng)
    cs = 64 * KiB
    x, y = 3 * cs, 9 * cs
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=32, data_path=path) as dev, dev.open() as blk:
        old = rng.randbytes(cs)
        blk.pwrite(old, x)
        assert backend.data.map.lookup(x // cs) is None
        with backend.data._lock:
            host_x = backend.image._map.lookup(x // cs)[1]
        slow_ring(0.3, lambda k, off: k == kind and off // cs == host_x // cs)
        new_y = rng.randbytes(cs)
        first = (READ, x, cs, bytearray(cs)) if kind == "read" else (WRITE, x, cs, rng.randbytes(cs))
        res = blk.submit([first, (DISCARD, x, cs, None), (WRITE, y, cs, new_y)])
        assert res == [cs, 0, cs]
        if kind == "read":
            assert bytes(first[3]) == old, "the read returned another cluster's bytes"
        assert blk.pread(cs, y) == new_y, "the late write landed in the reused cluster"
        assert blk.pread(cs, x) == bytes(cs)
        assert backend.data._gates.waits > 0, "the discard did not wait"
    assert_check_clean(img)


def _failing_data_fd(backend: Qcow2Backend, img: str) -> None:
    """Make the backend's data descriptor refuse writes (EBADF): its metadata (written
    by the engine on its own descriptor) still goes to the file."""
    os.close(backend.data.fd)
    backend.data.fd = os.open(img, os.O_RDONLY)


@pytest.mark.parametrize("backing", [None, "raw"])
@pytest.mark.parametrize("path", ["copy", "zero_copy", "splice_zc"])
def test_failed_allocating_write_leaves_no_l2_entry(sim, tmp_path, caplog, path, backing):
    """An allocating write whose data I/O fails fails its request with that errno and
    leaves no L2 entry (the cluster it counted is freed again: qemu-img check finds no
    leak); an in-place write that fails leaves the old data. Then a backend with a
    working descriptor writes the same cluster (reusing that one)."""
    rng = random.Random(f"{path}/{backing}")
    img, model = _image(tmp_path, 16, backing, rng)
    cs = 64 * KiB
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=8, data_path=path) as dev, dev.open() as blk:
        kept = rng.randbytes(4096)
        blk.pwrite(kept, 0)
        model[0:4096] = kept
        _failing_data_fd(backend, img)
        res = blk.submit([(WRITE, 7 * cs + 4096, 8192, rng.randbytes(8192)),   # partial: COW
                          (WRITE, 9 * cs, cs, rng.randbytes(cs)),              # whole cluster
                          (WRITE, 0, 4096, rng.randbytes(4096))])              # in place
        assert res == [-errno.EIO] * 3          # the block layer's word for any failure
        assert "failed: EBADF" in caplog.text        # the server's errno, logged
        with backend.data._lock:
            assert backend.image._map.lookup(7)[0] == UNALLOC
            assert backend.image._map.lookup(9)[0] == UNALLOC
    assert_check_clean(img)
    # (read back by a new device: on splice_zc a failed write's bytes stay in its tag's
    # pipe, where the tag's next read would find them)
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=8, data_path=path) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == bytes(model)
        data = rng.randbytes(8192)
        blk.pwrite(data, 7 * cs + 4096)
        model[7 * cs + 4096:7 * cs + 12288] = data
        assert blk.pread(SIZE, 0) == bytes(model)
    assert_check_clean(img)


@pytest.mark.parametrize("path", ["copy", "zero_copy", "splice_zc"])
def test_l2_entry_written_only_after_the_whole_cluster(sim, tmp_path, monkeypatch, path):
    """Whenever an L2 entry is pointed at a new cluster, that cluster already holds all
    its bytes in the file: the request's, and zeros or the backing file's around them
    (so a crash between the two can leave the old mapping, never a new one to stale
    bytes)."""
    rng = random.Random(path)
    img, model = _image(tmp_path, 16, "raw", rng)
    cs = 64 * KiB
    checked = []
    real = ClusterMap.set_entry
    fd = os.open(img, os.O_RDONLY)

    def check_then_set(self, off, t, i, value):
        host = value & OFFSET_MASK
        vc = expect["vc"]
        got = os.pread(fd, cs, host)
        assert got == bytes(model[vc * cs:(vc + 1) * cs]), f"cluster {vc}: entry before data"
        checked.append(vc)
        real(self, off, t, i, value)

    expect = {}
    monkeypatch.setattr(ClusterMap, "set_entry", check_then_set)
    try:
        with Device(Qcow2Backend(img), sim, depth=8, data_path=path) as dev, dev.open() as blk:
            for vc, o, n in [(2, 4096, 8192), (60, 0, 512), (61, cs - 1024, 1024), (8, 0, cs)]:
                data = rng.randbytes(n)
                model[vc * cs + o:vc * cs + o + n] = data
                expect["vc"] = vc
                blk.pwrite(data, vc * cs + o)
            assert blk.pread(SIZE, 0) == bytes(model)
    finally:
        os.close(fd)
    assert checked == [2, 60, 61, 8]
    assert_check_clean(img)


def test_read_only_image_serves_reads_and_refuses_writes(sim, tmp_path):
    rng = random.Random(3)
    img, model = _image(tmp_path, 16, "raw", rng)
    with Device(Qcow2Backend(img), sim, depth=8) as dev, dev.open() as blk:
        blk.pwrite(b"w" * 8192, 4096)
        model[4096:12288] = b"w" * 8192
    backend = Qcow2Backend(img, read_only=True)
    with Device(backend, sim, depth=8, data_path="zero_copy") as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == bytes(model)
        for _ in range(2):      # published by the first, read from the map by the second
            assert blk.pread(4096, 4096) == model[4096:8192]
        assert backend.data.map.served == 1
        assert backend.data.map.lookup(0)[2] is False, "published for writing"
        for op, buf in [(WRITE, b"x" * 4096), (DISCARD, None), (ZEROES, None)]:
            res = blk.submit([(op, 4096, 4096, buf)])
            assert res == [-errno.EROFS]
        assert blk.pread(SIZE, 0) == bytes(model)


def test_discard_of_many_clusters(sim, tmp_path):
    """A discard of more clusters than are unmapped per hold of the image's lock (512 B
    clusters: 8190 of them), while reads run: the rest of the disk keeps its data."""
    rng = random.Random(9)
    img, model = _image(tmp_path, 9, None, rng)
    model[:] = rng.randbytes(SIZE)
    with Device(Qcow2Backend(img), sim, depth=32) as dev, dev.open() as blk:
        blk.pwrite(model, 0)
        head = bytearray(1024)
        res = blk.submit([(DISCARD, 1024, SIZE - 2048, None), (READ, 0, 1024, head)])
        assert res == [0, 1024] and head == model[:1024]
        model[1024:SIZE - 1024] = bytes(SIZE - 2048)
        assert blk.pread(SIZE, 0) == bytes(model)
    assert_check_clean(img)
