"""Every shipped backend served over the simulated driver, data checked against a model."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import time

import pytest

from pyublk_fast.backend import Backend
from pyublk_fast.device import Device
from pyublk_fast.errors import BackendError

from conftest import BACKEND_KINDS, DEV_SIZE

KiB = 1 << 10
DATA_KINDS = [k for k, (stores, _) in BACKEND_KINDS.items() if stores]
PATHS = ["copy", "need_get_data"]
BUFFERED = ["copy", "need_get_data", "user_copy"]
#: paths with no server buffer: for backends that declare them (request-directed I/O only)
UNBUFFERED = ["zero_copy", "splice_zc"]
UNBUFFERED_KINDS = {"loop-native", "null-native", "loop-python", "qcow2"}
LOOP_KINDS = ["loop-native", "loop-python"]
#: every (backend kind, data path) pair the framework offers
COMBOS = [(k, p) for k in DATA_KINDS for p in BUFFERED + (UNBUFFERED if k in UNBUFFERED_KINDS else [])]


def _rand_extent(rng: random.Random, max_len: int = 192 * KiB) -> tuple[int, int]:
    """A 512-aligned extent, often straddling a 64 KiB qcow2 cluster boundary."""
    if rng.random() < 0.5:
        boundary = rng.randrange(1, DEV_SIZE // (64 * KiB)) * 64 * KiB
        off = boundary - rng.randrange(1, 16) * 512
    else:
        off = rng.randrange(0, DEV_SIZE // 512) * 512
    length = min(rng.randrange(1, max_len // 512 + 1) * 512, DEV_SIZE - off)
    return off, length


@pytest.mark.parametrize("kind,path", COMBOS)
def test_random_io_matches_model(sim, make_backend, kind, path):
    backend, native = make_backend(kind)
    model = bytearray(DEV_SIZE)
    rng = random.Random(f"{kind}/{path}")
    with Device(backend, sim, depth=16, data_path=path, native=native) as dev, dev.open() as blk:
        for i in range(60):
            off, n = _rand_extent(rng)
            r = rng.random()
            if r < 0.5:
                data = rng.randbytes(n)
                assert blk.pwrite(data, off) == n
                model[off:off + n] = data
            elif r < 0.6:
                blk.discard(off, n)
                model[off:off + n] = bytes(n)
            elif r < 0.7:
                blk.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            elif r < 0.75:
                blk.flush()
            else:
                assert blk.pread(n, off) == bytes(model[off:off + n]), f"step {i}: read {n}@{off}"
        # the whole device, in max-size chunks
        assert blk.pread(DEV_SIZE, 0) == bytes(model)


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_discard_and_write_zeroes_read_back_zeros(sim, make_backend, kind):
    backend, native = make_backend(kind)
    with Device(backend, sim, depth=8, native=native) as dev, dev.open() as blk:
        blk.pwrite(b"\xa5" * (256 * KiB), 0)
        blk.discard(64 * KiB - 1024, 64 * KiB + 2048)        # partial clusters at both ends
        blk.write_zeroes(200 * KiB + 512, 3 * 512)
        blk.flush()
        got = blk.pread(256 * KiB, 0)
    want = bytearray(b"\xa5" * (256 * KiB))
    want[64 * KiB - 1024:128 * KiB + 1024] = bytes(64 * KiB + 2048)
    want[200 * KiB + 512:200 * KiB + 2048] = bytes(3 * 512)
    assert got == bytes(want)


@pytest.mark.parametrize("path", BUFFERED + UNBUFFERED)
def test_null_native_completes_everything(sim, make_backend, path):
    backend, native = make_backend("null-native")
    with Device(backend, sim, depth=8, data_path=path, native=native) as dev:
        with dev.open() as blk:
            assert blk.pwrite(b"x" * 8192, 4096) == 8192
            assert len(blk.pread(8192, 4096)) == 8192
            blk.flush()
            blk.discard(0, 4096)
            blk.write_zeroes(0, 4096)
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=32, count=3000)
        assert r["errors"] == 0 and r["completed"] == 3000


@pytest.mark.parametrize("kind", ["loop-native", "loop-python", "qcow2"])
def test_restart_keeps_data(sim, make_backend, kind):
    rng = random.Random(kind)
    data = rng.randbytes(300 * KiB)
    backend, native = make_backend(kind)
    with Device(backend, sim, depth=8, native=native) as dev, dev.open() as blk:
        blk.pwrite(data, 60 * KiB)
        blk.flush()
    backend, native = make_backend(kind)                 # same file, new backend and device
    with Device(backend, sim, depth=8, native=native) as dev, dev.open() as blk:
        assert blk.pread(300 * KiB, 60 * KiB) == data
        assert blk.pread(60 * KiB, 0) == bytes(60 * KiB)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_loadgen_verify(sim, make_backend, kind, path):
    backend, native = make_backend(kind)
    with Device(backend, sim, depth=16, data_path=path, native=native) as dev:
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=32, count=2000, verify=True, region=1 << 20)
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 2000)


@pytest.mark.parametrize("poll_us", [0, 200])
@pytest.mark.parametrize("submit_chunk", [1, 4, 1000])
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_polling_server_and_submit_chunks_keep_data(sim, make_backend, kind, submit_chunk, poll_us):
    """A server that sleeps or polls its CQ (it must still see backing-file completions
    that the kernel queues as task work) and any submit chunk size serve the same bytes."""
    backend, native = make_backend(kind)
    with Device(backend, sim, depth=16, native=native, poll_us=poll_us,
                submit_chunk=submit_chunk) as dev:
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=32, count=2000, verify=True, region=1 << 20)
        with dev.open() as blk:
            blk.pwrite(b"\xa5" * 8192, 4096)
            assert blk.pread(16384, 0)[4096:12288] == b"\xa5" * 8192
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 2000)


def test_submit_chunk_must_be_positive(sim, make_backend):
    backend, native = make_backend("memory")
    with pytest.raises(ValueError, match="submit_chunk=0 must be >= 1"):
        Device(backend, sim, native=native, submit_chunk=0)


class AsyncMemory(Backend):
    """A RAM disk whose handlers are coroutines that yield to the loop before touching data."""

    can_discard = True

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)

    async def read(self, offset, buf):
        await asyncio.sleep(0)
        buf[:] = self.data[offset:offset + len(buf)]

    async def write(self, offset, data):
        await asyncio.sleep(0)
        self.data[offset:offset + len(data)] = data

    async def discard(self, offset, length):
        await asyncio.sleep(0)
        self.data[offset:offset + length] = bytes(length)


@pytest.mark.parametrize("path", PATHS)
def test_async_backend(sim, path):
    backend = AsyncMemory(1 << 20)
    rng = random.Random(path)
    model = bytearray(1 << 20)
    with Device(backend, sim, depth=8, data_path=path) as dev, dev.open() as blk:
        reqs = []
        for i in range(64):                              # many in flight, distinct blocks
            buf = rng.randbytes(4096)
            model[i * 8192:i * 8192 + 4096] = buf
            reqs.append((1, i * 8192, 4096, buf))
        assert blk.submit(reqs) == [4096] * 64
        blk.discard(0, 4096)
        model[0:4096] = bytes(4096)
        assert blk.pread(1 << 20, 0) == bytes(model)
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=16, count=1000, verify=True, region=256 * KiB)
    assert (r["errors"], r["verify_errors"]) == (0, 0)


class Failing(Backend):
    """A RAM disk that fails chosen offsets: ENOSPC via BackendError, or a bare exception."""

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)

    def read(self, offset, buf):
        if offset == 8192:
            raise RuntimeError("backend bug")
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        if offset == 4096:
            raise BackendError(errno.ENOSPC)
        if offset == 8192:
            raise ZeroDivisionError("backend bug")
        self.data[offset:offset + len(data)] = data


@pytest.mark.parametrize("path", PATHS)
def test_backend_errors_reach_the_front(sim, path):
    with Device(Failing(1 << 20), sim, depth=4, data_path=path) as dev, dev.open() as blk:
        with pytest.raises(OSError) as ei:
            blk.pwrite(b"x" * 512, 4096)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as ei:
            blk.pwrite(b"x" * 512, 8192)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:
            blk.pread(512, 8192)
        assert ei.value.errno == errno.EIO
        # the device keeps working, other requests of the same batch are unaffected
        res = blk.submit([(1, 0, 512, b"a" * 512), (1, 4096, 512, b"b" * 512), (1, 12288, 512, b"c" * 512)])
        assert res == [512, -errno.ENOSPC, 512]
        assert blk.pread(512, 0) == b"a" * 512
        assert blk.pread(512, 12288) == b"c" * 512


def test_backend_error_takes_either_sign_and_refuses_non_errnos(sim):
    assert BackendError(errno.ENOSPC).errno == BackendError(-errno.ENOSPC).errno == errno.ENOSPC
    for bad in (0, True, 4096, -5000, "EIO", None):
        with pytest.raises(ValueError, match="errno number"):
            BackendError(bad)

    class Negative(Failing):
        def write(self, offset, data):
            raise BackendError(-errno.ENOSPC)      # the kernel's sign: still a failure

    with Device(Negative(1 << 20), sim, depth=4) as dev, dev.open() as blk:
        with pytest.raises(OSError) as ei:
            blk.pwrite(b"x" * 4096, 0)
        assert ei.value.errno == errno.ENOSPC
        assert blk.pread(4096, 0) == bytes(4096)


class HalfAsync(Backend):
    """Some handlers sync and some async, per the flags: flushes are counted."""

    can_fua = True

    def __init__(self, size: int, async_write: bool, async_flush: bool):
        self.size = size
        self.data = bytearray(size)
        self.flushed_upto = []          # how many bytes had been written at each flush
        self.written = 0
        if async_write:
            self.write = self._write_async
        if async_flush:
            self.flush = self._flush_async

    def read(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data
        self.written += len(data)

    async def _write_async(self, offset, data):
        await asyncio.sleep(0)
        self.data[offset:offset + len(data)] = data
        self.written += len(data)

    def flush(self):
        self.flushed_upto.append(self.written)

    async def _flush_async(self):
        await asyncio.sleep(0)
        self.flushed_upto.append(self.written)


@pytest.mark.parametrize("async_write,async_flush", [(False, True), (True, False), (True, True)])
def test_sync_and_async_handlers_mix(sim, async_write, async_flush):
    from pyublk_fast import uapi
    be = HalfAsync(1 << 20, async_write, async_flush)
    with Device(be, sim, depth=8) as dev, dev.open() as blk:
        assert blk.pwrite(b"p" * 4096, 0) == 4096
        blk.flush()
        assert be.flushed_upto == [4096]
        # FUA: the flush runs after the write's data is in, each awaited if async
        assert blk.submit([(uapi.UBLK_IO_OP_WRITE, 8192, 4096, b"q" * 4096, uapi.UBLK_IO_F_FUA)]) == [4096]
        assert be.flushed_upto == [4096, 8192]
        assert blk.pread(12288, 0) == b"p" * 4096 + bytes(4096) + b"q" * 4096


def test_batch_result_beyond_the_request_fails_it(sim, caplog):
    class Overclaims(BatchMemory):
        def handle_batch(self, requests):
            super().handle_batch(requests)
            return [2 * r.length if r.op == 0 else None for r in requests]

    with Device(Overclaims(1 << 20), sim, depth=4) as dev, dev.open() as blk:
        assert blk.pwrite(b"o" * 4096, 0) == 4096
        with pytest.raises(OSError) as ei:
            blk.pread(4096, 0)
        assert ei.value.errno == errno.EIO
    assert "result 8192 is neither bytes done (at most the request's) nor -errno" in caplog.text


@pytest.mark.parametrize("kind", ["memory", "loop-native", "loop-python"])
def test_read_only_backend_refuses_writes(sim, make_backend, kind, tmp_path):
    from pyublk_fast.backends.loop import LoopBackend
    backend, native = make_backend(kind)
    if kind == "memory":
        backend.data[0:512] = b"r" * 512
        backend.read_only = True
    else:
        with open(backend.path, "r+b") as f:
            f.write(b"r" * 512)
        backend.close()
        backend = LoopBackend(backend.path, read_only=True)
    with Device(backend, sim, depth=4, native=native) as dev, dev.open() as blk:
        with pytest.raises(OSError) as ei:
            blk.pwrite(b"w" * 512, 0)
        assert ei.value.errno in (errno.EROFS, errno.EPERM, errno.EBADF)
        assert blk.pread(512, 0) == b"r" * 512


def test_backend_size_not_multiple_of_block_size(sim):
    class Odd(Backend):
        size = 4096 + 100

    with pytest.raises(ValueError, match="size"):
        Device(Odd(), sim)

    class BadBlock(Backend):
        size = 1 << 20
        block_size = 1000

    with pytest.raises(ValueError, match="block_size"):
        Device(BadBlock(), sim)


@pytest.mark.parametrize("kind", sorted(set(DATA_KINDS) - UNBUFFERED_KINDS))
@pytest.mark.parametrize("path", UNBUFFERED)
def test_unbuffered_paths_refused_for_backends_that_do_not_declare_them(sim, make_backend, kind, path):
    backend, native = make_backend(kind)
    with pytest.raises(ValueError, match="does not declare"):
        Device(backend, sim, depth=4, data_path=path, native=native)
    backend.close()


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("path", BUFFERED + UNBUFFERED)
def test_loadgen_verify_on_every_loop_path(sim, make_backend, kind, path):
    backend, native = make_backend(kind)
    with Device(backend, sim, depth=16, data_path=path, native=native) as dev:
        for bs in (4096, 65536):
            r = sim.run_load(dev.dev_id, rw="randrw", bs=bs, qd=32, count=1500, verify=True)
            assert r["errors"] == 0 and r["verify_errors"] == 0, (bs, r)
            assert r["completed"] == 1500


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("path", BUFFERED + UNBUFFERED)
def test_fua_writes_on_every_loop_path(sim, make_backend, kind, path):
    """FUA writes (RWF_DSYNC, or a datasync after a splice) complete and land in the file."""
    from pyublk_fast import uapi
    backend, native = make_backend(kind)
    blocks = [bytes([i + 1]) * 8192 for i in range(16)]
    with Device(backend, sim, depth=8, data_path=path, native=native) as dev, dev.open() as blk:
        reqs = [(uapi.UBLK_IO_OP_WRITE, i * 8192, 8192, b, uapi.UBLK_IO_F_FUA) for i, b in enumerate(blocks)]
        assert blk.submit(reqs) == [8192] * 16
        assert blk.pread(16 * 8192, 0) == b"".join(blocks)
    with open(backend.path, "rb") as f:
        assert f.read(16 * 8192) == b"".join(blocks)


class BatchMemory(Backend):
    """A backend that takes a whole batch per call (Backend.handle_batch)."""

    can_discard = True

    def __init__(self, size):
        self.size = size
        self.data = bytearray(size)
        self.calls = []

    def handle_batch(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            if r.op == 0:
                r.buf[:] = self.data[r.offset:r.offset + r.length]
            elif r.op == 1:
                self.data[r.offset:r.offset + r.length] = r.buf
            elif r.op == 3 and r.offset >= self.size // 2:
                out.append(-errno.ENOSPC)
                continue
            out.append(None)
        return out


def test_batch_backend_gets_whole_batches_and_moves_data(sim):
    be = BatchMemory(1 << 20)
    with Device(be, sim, depth=32) as dev, dev.open() as blk:
        reqs = [(1, 4096 * i, 4096, bytes([i]) * 4096) for i in range(64)]
        assert blk.submit(reqs) == [4096] * 64
        got = [bytearray(4096) for _ in range(64)]
        assert blk.submit([(0, 4096 * i, 4096, got[i]) for i in range(64)]) == [4096] * 64
        assert all(bytes(g) == bytes([i]) * 4096 for i, g in enumerate(got))
        with pytest.raises(OSError) as e:
            blk.discard(1 << 19, 4096)
        assert e.value.errno == errno.ENOSPC
    assert max(be.calls) > 1, "requests reached the backend in batches"


def test_fua_write_on_a_python_backend_is_flushed(sim):
    from pyublk_fast import uapi
    from pyublk_fast.backends.memory import MemoryBackend

    class Counting(MemoryBackend):
        flushes = 0

        def flush(self):
            self.flushes += 1

    be = Counting(1 << 20)
    with Device(be, sim, depth=4) as dev, dev.open() as blk:
        assert blk.submit([(uapi.UBLK_IO_OP_WRITE, 0, 4096, b"f" * 4096)]) == [4096]
        assert be.flushes == 0
        assert blk.submit([(uapi.UBLK_IO_OP_WRITE, 4096, 4096, b"g" * 4096, uapi.UBLK_IO_F_FUA)]) == [4096]
        assert be.flushes == 1
        assert blk.pread(8192, 0) == b"f" * 4096 + b"g" * 4096


@pytest.fixture
def loop_dev_4k(tmp_path):
    """A kernel loop device with 4096-byte logical blocks over a file (needs root)."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup (util-linux) to make a 4k-sector loop device")
    img = tmp_path / "4k.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    p = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(img)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"losetup could not make a loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    yield dev, img
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("native", [True, False])
def test_loop_on_a_4k_sector_device_declares_4k_blocks(sim, loop_dev_4k, native):
    """O_DIRECT on a 4k-sector disk refuses 512-byte I/O: the device must say 4096."""
    from pyublk_fast.backends.loop import LoopBackend
    dev_path, img = loop_dev_4k
    backend = LoopBackend(dev_path)
    assert backend.direct and backend.block_size == 4096
    data = random.Random(4).randbytes(64 * KiB)
    with Device(backend, sim, depth=8, native=native) as dev, dev.open() as blk:
        assert blk.pwrite(data, 12288) == len(data)
        assert blk.pread(len(data), 12288) == data
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=8, count=400, verify=True)
        assert (r["errors"], r["verify_errors"]) == (0, 0)


def test_loop_file_on_a_4k_sector_filesystem_declares_4k_blocks(sim, loop_dev_4k, tmp_path):
    """A file's O_DIRECT alignment is its disk's sector size (probed), not 512."""
    import shutil
    import subprocess
    from pyublk_fast.backends.loop import LoopBackend
    dev_path, _ = loop_dev_4k
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev_path], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev_path, str(mnt)], check=True, capture_output=True)
    try:
        path = mnt / "f.img"
        path.write_bytes(bytes(256 * KiB))
        backend = LoopBackend(str(path))
        try:
            assert backend.direct and backend.block_size == 4096
            data = random.Random(5).randbytes(32 * KiB)
            with Device(backend, sim, depth=4) as dev, dev.open() as blk:
                assert blk.pwrite(data, 4096) == len(data)
                assert blk.pread(len(data), 4096) == data
        finally:
            backend.close()               # (Device closed it already unless a check failed)
        with open(path, "rb") as f:
            assert f.read()[4096:4096 + len(data)] == data
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _failure_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.queue" and "failed:" in r.getMessage()]


def test_failed_requests_are_logged_with_the_reason(sim, caplog):
    """An application that sees an errno finds the request and the reason in the log, and a
    burst of failures is counted in rate-limited lines instead of one line each."""
    caplog.set_level(logging.WARNING, logger="pyublk_fast.queue")
    with Device(Failing(1 << 20), sim, depth=32) as dev, dev.open() as blk:
        with pytest.raises(OSError):
            blk.pwrite(b"x" * 512, 4096)
        deadline = time.monotonic() + 10
        while not _failure_lines(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _failure_lines(caplog)[0] == "queue 0: WRITE of 512 bytes at offset 4096 failed: ENOSPC"
        res = blk.submit([(1, 4096, 512, b"y" * 512)] * 20)
        assert res == [-errno.ENOSPC] * 20
    lines = _failure_lines(caplog)        # stop() logged what was still counted
    counted = 0
    for line in lines:
        more = re.search(r"\(and (\d+) more failed requests", line)
        counted += 1 + (int(more.group(1)) if more else 0)
    assert counted == 21 and len(lines) <= 3, lines
