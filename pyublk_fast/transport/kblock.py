"""KernelBlockDevice: the user side of a real /dev/ublkbN, with SimBlockDevice's API.

I/O is O_DIRECT through page-aligned buffers, so every call reaches the server
(no page cache in between); flush is fsync, discard BLKDISCARD, write_zeroes
BLKZEROOUT. submit() keeps up to SUBMIT_DEPTH reads and writes in flight at once
through its own io_uring, like the simulated front.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
from typing import Iterable

import numpy as np

from .. import uapi
from .._core.ring import Ring
from ..errors import os_error
from ..util import aligned_array

BLKSSZGET = 0x1268                 # _IO(0x12, 104)
BLKGETSIZE64 = 0x80081272          # _IOR(0x12, 114, size_t)
BLKDISCARD = 0x1277                # _IO(0x12, 119)
BLKZEROOUT = 0x127F                # _IO(0x12, 127)
MAX_CHUNK = 1 << 20
#: Reads/writes submit() keeps in flight at once (the simulated front's slot count).
SUBMIT_DEPTH = 256


class KernelBlockDevice:
    """An open /dev/ublkbN. Errors are OSError(errno) naming the operation. One thread at a time."""

    def __init__(self, path: str, *, direct: bool = True) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise os_error(errno.ENOENT, f"open {path}", "the device is not started, or was "
                           "stopped", path) from None
        self.path = path
        m = re.search(r"(\d+)$", path)
        self.dev_id = int(m.group(1)) if m else -1
        self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
        self.block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
        self.max_io = MAX_CHUNK
        self._bounce = mmap.mmap(-1, MAX_CHUNK)      # page aligned
        self._ring: Ring | None = None               # submit()'s, made on first use

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._bounce.close()
            if self._ring is not None:
                self._ring.close()
                self._ring = None

    def __enter__(self) -> "KernelBlockDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    def _check(self, offset: int, length: int, what: str) -> None:
        """OSError(EINVAL) for a misaligned or out-of-range request, as the kernel gives."""
        if self.fd < 0:
            raise ValueError("block device is closed")
        bs = self.block_size
        if offset < 0 or length < 0 or offset % bs or length % bs:
            raise os_error(errno.EINVAL, f"{what} on {self.path}", f"offset {offset} and "
                           f"length {length} must be multiples of the block size {bs}")
        if offset + length > self.size:
            raise os_error(errno.EINVAL, f"{what} on {self.path}", f"offset {offset} + "
                           f"length {length} is beyond the device size {self.size}")

    def _err(self, exc: OSError, what: str, offset: int, length: int) -> OSError:
        return os_error(exc.errno, f"{what} at offset {offset}, {length} bytes on {self.path}")

    def _transfer(self, what: str, mv: memoryview, offset: int) -> None:
        """Read into ``mv`` (what="read") or write it (what="write") at offset, MAX_CHUNK at a
        time through the page-aligned bounce buffer that O_DIRECT needs."""
        write = what == "write"
        done = 0
        while done < len(mv):
            n = min(MAX_CHUNK, len(mv) - done)
            with memoryview(self._bounce)[:n] as bounce:
                if write:
                    bounce[:] = mv[done:done + n]
                try:
                    moved = (os.pwritev if write else os.preadv)(self.fd, [bounce], offset + done)
                except OSError as exc:
                    raise self._err(exc, what, offset + done, n) from None
                if moved <= 0:
                    raise os_error(errno.EIO, f"{what} at offset {offset + done} on {self.path}",
                                   "no progress" if write else "unexpected end of device")
                if not write:
                    mv[done:done + moved] = bounce[:moved]
            done += moved

    def pread(self, length: int, offset: int) -> bytes:
        """Read length bytes at offset (block aligned)."""
        self._check(offset, length, "read")
        out = bytearray(length)
        self._transfer("read", memoryview(out), offset)
        return bytes(out)

    def pwrite(self, data, offset: int) -> int:
        """Write data (bytes-like, block-size multiple) at offset; returns its length."""
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv), "write")
        self._transfer("write", mv, offset)
        return len(mv)

    def flush(self) -> None:
        """fsync: the server sees a FLUSH when its cache is volatile."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise self._err(exc, "flush", 0, 0) from None

    def _range_ioctl(self, req: int, offset: int, length: int, what: str) -> None:
        self._check(offset, length, what)
        try:
            fcntl.ioctl(self.fd, req, struct.pack("QQ", offset, length))
        except OSError as exc:
            raise self._err(exc, what, offset, length) from None

    def discard(self, offset: int, length: int) -> None:
        """BLKDISCARD of a block-aligned range."""
        self._range_ioctl(BLKDISCARD, offset, length, "discard")

    def write_zeroes(self, offset: int, length: int) -> None:
        """BLKZEROOUT of a block-aligned range (reads back as zeros)."""
        self._range_ioctl(BLKZEROOUT, offset, length, "write_zeroes")

    def submit(self, requests: Iterable[tuple], timeout: float = 30.0) -> list[int]:
        """Run [(op, offset, length, buffer|None)] -> bytes done or -errno, one per request.

        Reads and writes run together, up to SUBMIT_DEPTH in flight (io_uring, O_DIRECT);
        flush, discard and write_zeroes wait for those in flight, then run alone. A
        buffer is bytes-like for writes and writable for reads. TimeoutError when nothing
        completes within ``timeout`` seconds.
        """
        if self.fd < 0:
            raise ValueError("block device is closed")
        if self._ring is None:
            self._ring = Ring(SUBMIT_DEPTH, cq_entries=2 * SUBMIT_DEPTH)
        ring = self._ring
        reqs = list(requests)
        out = [0] * len(reqs)
        inflight: dict[int, tuple] = {}     # index -> (read destination or None, bounce)

        def reap() -> None:
            n = ring.wait(1, timeout)
            for ud, res in zip(ring.cqe_user_data[:n].tolist(), ring.cqe_res[:n].tolist()):
                dst, bounce = inflight.pop(ud)
                if dst is not None and res > 0:
                    dst[:res] = bounce[:res]
                out[ud] = res

        for i, (op, offset, length, buf) in enumerate(reqs):
            if op in (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE):
                try:
                    self._check(offset, length, "read" if op == uapi.UBLK_IO_OP_READ else "write")
                except OSError as exc:
                    out[i] = -exc.errno
                    continue
                mv = memoryview(buf).cast("B")
                if len(mv) < length:
                    raise ValueError(f"request {i}: buffer of {len(mv)} bytes < length {length}")
                mv = mv[:length]
                bounce = aligned_array(length)
                while len(inflight) >= SUBMIT_DEPTH:
                    reap()
                if op == uapi.UBLK_IO_OP_WRITE:
                    bounce[:] = np.frombuffer(mv, np.uint8)
                    ring.prep_write(self.fd, bounce, offset, i)
                    inflight[i] = (None, bounce)
                else:
                    ring.prep_read(self.fd, bounce, offset, i)
                    inflight[i] = (np.frombuffer(mv, np.uint8), bounce)
                continue
            while inflight:
                reap()
            try:
                if op == uapi.UBLK_IO_OP_FLUSH:
                    self.flush()
                elif op == uapi.UBLK_IO_OP_DISCARD:
                    self.discard(offset, length)
                elif op == uapi.UBLK_IO_OP_WRITE_ZEROES:
                    self.write_zeroes(offset, length)
                else:
                    out[i] = -errno.EOPNOTSUPP
            except OSError as exc:
                out[i] = -(exc.errno or errno.EIO)
        while inflight:
            reap()
        return out
