"""loop: a backing file or block device, served by io_uring from C (no Python per I/O)."""
import errno
import fcntl
import mmap
import os
import stat
import struct

from pyublk_fast.backend import FileBackend, register

BLKSSZGET = 0x1268      # <linux/fs.h>: a block device's logical block size


def _zeros(n: int) -> memoryview:
    # page-aligned, so O_DIRECT accepts it
    buf = mmap.mmap(-1, max(n, 4096))
    return memoryview(buf)[:n]


def _direct_block_size(fd: int) -> int:
    """The smallest block O_DIRECT I/O on fd accepts: a block device's logical block size;
    for a file, 512 if a 512-byte direct read is accepted, else 4096."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    try:
        os.preadv(fd, [_zeros(512)], 512)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return 4096
    return 512


@register("loop")
class LoopBackend(FileBackend):
    """A raw file or block device, served by io_uring from C (no Python per I/O)."""

    can_discard = True
    can_write_zeroes = True
    data_paths = ("user_copy", "zero_copy", "splice_zc")
    can_fua = True

    def __init__(self, path: str, *, direct: bool | None = None, read_only: bool = False):
        """direct=None tries O_DIRECT and falls back to buffered I/O when the file refuses it."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self.path = path
        self.read_only = read_only
        self.direct = False
        if direct is not False:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError:
                if direct:
                    raise
        if not self.direct:
            self.fd = os.open(path, flags)
        try:
            self.block_size = _direct_block_size(self.fd) if self.direct else 512
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if self.block_size > 4096:
                raise ValueError(f"{path}: O_DIRECT needs {self.block_size}-byte blocks, more than "
                                 "ublk's 4096; pass direct=False")
            if size <= 0 or size % self.block_size:
                raise ValueError(f"{path}: size {size} is not a positive multiple of {self.block_size} "
                                 f"bytes (truncate it, e.g. `truncate -s 1G {path}`)")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size

    def read(self, offset, buf):
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:                       # past the end of the file: zeros
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def write(self, offset, data):
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [data[done:]], offset + done)

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        # The native target punches holes; the Python path writes zeros (same contents).
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset, length):
        zeros = _zeros(min(length, 1 << 20))
        for off in range(offset, offset + length, len(zeros)):
            self.write(off, zeros[:min(len(zeros), offset + length - off)])

    def native_target(self):
        from ._native_loop import LoopTarget
        return LoopTarget(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
