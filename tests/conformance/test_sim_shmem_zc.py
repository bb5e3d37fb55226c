"""Shared-memory zero copy (UBLK_F_SHMEM_ZC, REG_BUF / UNREG_BUF): what the driver accepts
and refuses, and I/O from an application's buffer served in place.

Written once against the ``transport`` fixture: here the simulated driver;
tests/kernel/test_kernel_shmem_zc.py imports these functions and runs them on the 7.2
kernel, whose answers the simulated driver must give too. The "client" is this test: it
maps a memfd, has the device register the same pages, and does O_DIRECT I/O from its own
mapping of them, as an application sharing a buffer with its ublk server would.
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport
from pyublk_fast.util import PAGE_SIZE as PAGE

MiB = 1 << 20
SHARED = 4 * MiB


@pytest.fixture
def transport(sim):
    """The driver under test: the simulated one (the kernel suite overrides this fixture)."""
    return sim


@pytest.fixture
def memfd():
    fd = os.memfd_create("pyublk-shmem-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SHARED)
    yield fd
    os.close(fd)


def _addr(buf) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def _bare_dev(transport, flags: int) -> int:
    dev_id, granted = transport.add_dev(-1, 1, 4, MiB, flags)
    assert granted & uapi.UBLK_F_SHMEM_ZC == flags & uapi.UBLK_F_SHMEM_ZC
    return dev_id


class Client:
    """The application: its own mapping of the shared pages and O_DIRECT I/O from it."""

    def __init__(self, transport, dev: Device, memfd: int):
        self.mm = mmap.mmap(memfd, SHARED, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = np.frombuffer(self.mm, np.uint8)
        if isinstance(transport, SimTransport):
            self.blk, self.fd = dev.open(), -1
        else:
            self.blk, self.fd = None, os.open(transport.block_path(dev.dev_id),
                                              os.O_RDWR | os.O_DIRECT)

    def io(self, op: int, offset: int, buf: np.ndarray) -> None:
        if self.blk is not None:
            assert self.blk.submit([(op, offset, buf.nbytes, buf)]) == [buf.nbytes]
        elif op == uapi.UBLK_IO_OP_WRITE:
            assert os.pwrite(self.fd, buf, offset) == buf.nbytes
        else:
            assert os.preadv(self.fd, [buf], offset) == buf.nbytes

    def close(self) -> None:
        if self.blk is not None:
            self.blk.close()
        else:
            os.close(self.fd)


# ---- control commands ------------------------------------------------------------------

def test_reg_buf_refusals(transport, memfd):
    """Each refusal of the 7.2 driver, with its errno, and what it accepts."""
    mm = mmap.mmap(memfd, SHARED, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    ro = mmap.mmap(memfd, 16 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
    a = _addr(mm)
    plain = _bare_dev(transport, 0)
    dev = _bare_dev(transport, uapi.UBLK_F_SHMEM_ZC)
    try:
        assert _errno(transport.reg_buf, plain, a, PAGE) == errno.EOPNOTSUPP
        assert _errno(transport.reg_buf, dev, a + 512, PAGE) == errno.EINVAL
        assert _errno(transport.reg_buf, dev, a, PAGE + 512) == errno.EINVAL
        assert _errno(transport.reg_buf, dev, a, 0) == errno.EINVAL
        assert _errno(transport.reg_buf, dev, 0, PAGE) == errno.EFAULT           # not mapped
        hole = mmap.mmap(-1, 4 * PAGE)
        gone = _addr(hole)
        hole.close()
        assert _errno(transport.reg_buf, dev, gone, 4 * PAGE) == errno.EFAULT   # unmapped
        assert _errno(transport.reg_buf, dev, _addr(ro), PAGE) == errno.EFAULT   # read-only map
        assert _errno(transport.reg_buf, 0xFFFFF, a, PAGE) == errno.ENODEV
        # accepted before the device is started; indexes are the lowest free ones
        i0 = transport.reg_buf(dev, a, 16 * PAGE)
        i1 = transport.reg_buf(dev, a + 32 * PAGE, 16 * PAGE)
        assert (i0, i1) == (0, 1)
        assert _errno(transport.reg_buf, dev, a, 16 * PAGE) == errno.EEXIST
        assert _errno(transport.reg_buf, dev, a + 8 * PAGE, 16 * PAGE) == errno.EEXIST
        # the same pages through another mapping are the same pages
        assert _errno(transport.reg_buf, dev, _addr(ro), 16 * PAGE, True) == errno.EEXIST
        transport.unreg_buf(dev, i0)
        assert _errno(transport.unreg_buf, dev, i0) == errno.ENOENT
        assert _errno(transport.unreg_buf, dev, 999) == errno.ENOENT
        assert _errno(transport.unreg_buf, dev, 65536) == errno.EINVAL
        assert transport.reg_buf(dev, _addr(ro), 16 * PAGE, True) == 0   # READ_ONLY pins it
        anon = mmap.mmap(-1, 4 * PAGE)                                    # private memory too
        assert transport.reg_buf(dev, _addr(anon), 4 * PAGE) == 2
    finally:
        transport.del_dev(plain)
        transport.del_dev(dev)       # buffers still registered go with the device
    del anon
    ro.close()
    mm.close()


def test_device_api_refusals(transport, memfd):
    dev = Device(MemoryBackend(8 * MiB), transport, depth=8)
    with pytest.raises(RuntimeError, match="shared_buffers=True"):
        dev.register_shared_buffer(memfd)
    with pytest.raises(ValueError, match="need_get_data"):
        Device(MemoryBackend(8 * MiB), transport, data_path="need_get_data", shared_buffers=True)
    dev = Device(MemoryBackend(8 * MiB), transport, depth=8, shared_buffers=True)
    with pytest.raises(RuntimeError, match="not started"):
        dev.register_shared_buffer(memfd)
    with dev:
        assert dev.flags & uapi.UBLK_F_SHMEM_ZC
        with pytest.raises(ValueError, match="read-only"):
            dev.register_shared_buffer(bytes(PAGE))
        with pytest.raises(ValueError, match="do not fit"):
            dev.register_shared_buffer(memfd, 2 * SHARED)
        with pytest.raises(OSError) as e:
            dev.register_shared_buffer(memfd, PAGE + 512)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ValueError, match="no shared buffer 7"):
            dev.unregister_shared_buffer(7)
        i = dev.register_shared_buffer(memfd)
        with pytest.raises(OSError) as e:
            dev.register_shared_buffer(memfd, PAGE)
        assert e.value.errno == errno.EEXIST
        dev.unregister_shared_buffer(i)
        assert dev.register_shared_buffer(memfd) == i


# ---- the data path ---------------------------------------------------------------------

def _check_in_place(transport, dev: Device, memfd: int,
                    backend_data=None) -> tuple[tuple[int, int], dict]:
    """Write from and read into the client's mapping of the shared pages at 4 KiB and
    128 KiB: the bytes come back, every request was served in place, and requests from
    other memory take the normal path. Returns where the server mapped the pages and
    what was written where."""
    client = Client(transport, dev, memfd)
    rng = np.random.default_rng(7)
    try:
        index = dev.register_shared_buffer(memfd)
        base = dev.shared_requests
        expect = {}
        for k, (bs, at) in enumerate([(4096, 0), (128 * 1024, 64 * 1024), (4096, 3 * MiB),
                                      (128 * 1024, 2 * MiB + 4096)]):
            src = client.mem[at:at + bs]
            src[:] = rng.integers(0, 256, bs, dtype=np.uint8)
            off = k * 256 * 1024
            client.io(uapi.UBLK_IO_OP_WRITE, off, src)
            expect[off] = src.copy()
        written = dev.shared_requests - base
        assert written == 4
        for k, (off, data) in enumerate(expect.items()):
            dst = client.mem[SHARED - (k + 1) * 128 * 1024:][:data.nbytes]
            dst[:] = 0
            client.io(uapi.UBLK_IO_OP_READ, off, dst)
            assert np.array_equal(dst, data), f"read back at {off}"
            if backend_data is not None:
                assert bytes(backend_data(off, data.nbytes)) == data.tobytes()
        assert dev.shared_requests - base == 8
        # a buffer the driver does not know: the normal data path
        other = np.frombuffer(mmap.mmap(-1, 128 * 1024), np.uint8)
        other[:] = rng.integers(0, 256, other.nbytes, dtype=np.uint8)
        client.io(uapi.UBLK_IO_OP_WRITE, 4 * MiB, other)
        back = client.mem[:other.nbytes]
        client.io(uapi.UBLK_IO_OP_READ, 4 * MiB, back)
        assert np.array_equal(back, other)
        assert dev.shared_requests - base == 9              # the read into the shared pages
        server_map = (int(dev._shm.table[2 * index]), int(dev._shm.table[2 * index + 1]))
        assert server_map[1] == SHARED and server_map[0] != _addr(client.mm)
        dev.unregister_shared_buffer(index)
        client.io(uapi.UBLK_IO_OP_READ, 0, client.mem[:4096])
        assert dev.shared_requests - base == 9
        assert np.array_equal(client.mem[:4096], expect[0])
    finally:
        client.close()
    return server_map, expect


def test_read_only_buffer_serves_writes_in_place_and_reads_by_copy(transport, memfd):
    """READ_ONLY (a write-sealed memfd's case): writes from it are served in place, a read
    into it is not handed over there (the server mapped it read-only) but copied."""
    backend = MemoryBackend(8 * MiB)
    with Device(backend, transport, depth=8, shared_buffers=True) as dev:
        client = Client(transport, dev, memfd)
        try:
            index = dev.register_shared_buffer(memfd, read_only=True)
            assert dev._shm.views[index].readonly
            src = client.mem[:128 * 1024]
            src[:] = np.random.default_rng(3).integers(0, 256, src.nbytes, dtype=np.uint8)
            client.io(uapi.UBLK_IO_OP_WRITE, MiB, src)
            assert dev.shared_requests == 1
            assert bytes(backend.data[MiB:MiB + src.nbytes]) == src.tobytes()
            dst = client.mem[MiB:MiB + src.nbytes]
            client.io(uapi.UBLK_IO_OP_READ, MiB, dst)
            assert dev.shared_requests == 1
            assert np.array_equal(dst, src)
            dev.unregister_shared_buffer(index)
        finally:
            client.close()


@pytest.mark.parametrize("data_path", ["copy", "user_copy"])
def test_python_backend_gets_the_shared_pages(transport, memfd, data_path):
    """A Python backend's buffer is a view of the server's own mapping of the shared pages."""
    seen = []

    class Seeing(MemoryBackend):
        def write(self, offset, data):
            seen.append((_addr(data), len(data)))
            return super().write(offset, data)

    backend = Seeing(8 * MiB)
    with Device(backend, transport, depth=8, data_path=data_path, native=False,
                shared_buffers=True) as dev:
        (base, length), _ = _check_in_place(transport, dev, memfd,
                                            lambda off, n: backend.data[off:off + n])
    # the four writes from the shared pages were handed over in the server's own mapping
    # of them (not the client's), the fifth in the server's tag buffer
    assert len(seen) == 5
    assert all(base <= a and a + n <= base + length for a, n in seen[:4]), (seen, base)
    assert not base <= seen[4][0] < base + length


def test_native_loop_reads_and_writes_the_shared_pages(transport, memfd, tmp_path):
    """The native loop backend's file I/O goes straight to and from the shared pages."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as fh:
        fh.truncate(8 * MiB)
    with Device(LoopBackend(str(path)), transport, depth=8, shared_buffers=True) as dev:
        assert dev.native is not None
        _, expect = _check_in_place(transport, dev, memfd)
    with open(path, "rb") as fh:                  # what reached the backing file
        for off, data in expect.items():
            fh.seek(off)
            assert fh.read(data.nbytes) == data.tobytes(), f"backing file at {off}"
