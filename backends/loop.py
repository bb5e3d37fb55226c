"""loop: a backing file or block device, served by io_uring from C (no Python per I/O)."""
import mmap
import os

from pyublk_fast.backend import Backend, register


def _zeros(n: int) -> memoryview:
    # page-aligned, so O_DIRECT accepts it
    buf = mmap.mmap(-1, max(n, 4096))
    return memoryview(buf)[:n]


@register("loop")
class LoopBackend(Backend):
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
        st = os.fstat(self.fd)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size <= 0 or size % 512:
            os.close(self.fd)
            raise ValueError(f"{path}: size {size} is not a positive multiple of 512 bytes "
                             f"(truncate it, e.g. `truncate -s 1G {path}`)")
        self.size = size
        self.block_size = 512 if not self.direct else max(512, st.st_blksize if st.st_blksize <= 4096 else 512)
        self.block_size = 512

    def read(self, offset, buf):
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def write(self, offset, data):
        os.pwritev(self.fd, [data], offset)

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        # The native target punches holes; the Python path writes zeros (same contents).
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset, length):
        zeros = _zeros(min(length, 1 << 20))
        for off in range(offset, offset + length, len(zeros)):
            os.pwrite(self.fd, zeros[:min(len(zeros), offset + length - off)], off)

    def native_target(self):
        from ._native_loop import LoopTarget
        return LoopTarget(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
