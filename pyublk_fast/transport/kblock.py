"""KernelBlockDevice: the user side of a real /dev/ublkbN, with SimBlockDevice's API.

I/O is O_DIRECT through a page-aligned bounce buffer, so every call reaches the
server (no page cache in between); flush is fsync, discard BLKDISCARD,
write_zeroes BLKZEROOUT. submit() runs its requests one after another.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
from typing import Iterable

OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES = 0, 1, 2, 3, 5
BLKSSZGET = 0x1268                 # _IO(0x12, 104)
BLKGETSIZE64 = 0x80081272          # _IOR(0x12, 114, size_t)
BLKDISCARD = 0x1277                # _IO(0x12, 119)
BLKZEROOUT = 0x127F                # _IO(0x12, 127)
MAX_CHUNK = 1 << 20


class KernelBlockDevice:
    """An open /dev/ublkbN. Errors are OSError(errno) naming the operation. One thread at a time."""

    def __init__(self, path: str, *, direct: bool = True) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{path} does not exist: the device is not "
                                    "started (or was stopped)", path) from None
        self.path = path
        m = re.search(r"(\d+)$", path)
        self.dev_id = int(m.group(1)) if m else -1
        self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
        self.block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
        self.max_io = MAX_CHUNK
        self._bounce = mmap.mmap(-1, MAX_CHUNK)      # page aligned

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._bounce.close()

    def __enter__(self) -> "KernelBlockDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    def _check(self, offset: int, length: int, what: str) -> None:
        if self.fd < 0:
            raise ValueError("block device is closed")
        bs = self.block_size
        if offset < 0 or length < 0 or offset % bs or length % bs:
            raise ValueError(f"{what}: offset {offset} and length {length} must be multiples "
                             f"of the block size {bs}")
        if offset + length > self.size:
            raise ValueError(f"{what}: offset {offset} + length {length} is beyond the device "
                             f"size {self.size}")

    def _err(self, exc: OSError, what: str, offset: int, length: int) -> OSError:
        return OSError(exc.errno, f"{what} at offset {offset}, {length} bytes on {self.path}: "
                       f"{os.strerror(exc.errno)}")

    def pread(self, length: int, offset: int) -> bytes:
        """Read length bytes at offset (block aligned)."""
        self._check(offset, length, "read")
        out = bytearray(length)
        done = 0
        while done < length:
            n = min(MAX_CHUNK, length - done)
            try:
                got = os.preadv(self.fd, [memoryview(self._bounce)[:n]], offset + done)
            except OSError as exc:
                raise self._err(exc, "read", offset + done, n) from None
            if got <= 0:
                raise OSError(errno.EIO, f"read at offset {offset + done} on {self.path}: "
                              "unexpected end of device")
            out[done:done + got] = self._bounce[:got]
            done += got
        return bytes(out)

    def pwrite(self, data, offset: int) -> int:
        """Write data (bytes-like, block-size multiple) at offset; returns its length."""
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv), "write")
        done = 0
        while done < len(mv):
            n = min(MAX_CHUNK, len(mv) - done)
            self._bounce[:n] = mv[done:done + n]
            try:
                put = os.pwritev(self.fd, [memoryview(self._bounce)[:n]], offset + done)
            except OSError as exc:
                raise self._err(exc, "write", offset + done, n) from None
            if put <= 0:
                raise OSError(errno.EIO, f"write at offset {offset + done} on {self.path}: "
                              "no progress")
            done += put
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
        """Run [(op, offset, length, buffer|None)] one after another -> bytes or -errno each."""
        out = []
        for op, offset, length, buf in requests:
            try:
                if op == OP_READ:
                    data = self.pread(length, offset)
                    memoryview(buf).cast("B")[:length] = data
                    out.append(length)
                elif op == OP_WRITE:
                    out.append(self.pwrite(memoryview(buf).cast("B")[:length], offset))
                elif op == OP_FLUSH:
                    self.flush()
                    out.append(0)
                elif op == OP_DISCARD:
                    self.discard(offset, length)
                    out.append(0)
                elif op == OP_WRITE_ZEROES:
                    self.write_zeroes(offset, length)
                    out.append(0)
                else:
                    out.append(-errno.EOPNOTSUPP)
            except ValueError:
                out.append(-errno.EINVAL)
            except OSError as exc:
                out.append(-(exc.errno or errno.EIO))
        return out
