"""loop: a backing file or block device, served by io_uring from C (no Python per I/O),
or, with --python, by the same ring I/O asked for from Python handlers."""
import errno
import os
import stat

from pyublk_fast import aio
from pyublk_fast.backend import FileBackend, register
from pyublk_fast.errors import BackendError

from .direct_io import direct_block_size


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
            self.block_size = direct_block_size(self.fd) if self.direct else 512
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

    # The Python path (`--python`): the same I/O, asked for in Python per request and
    # moved by the queue's ring, by whatever data path the device has (a reference for
    # backends of your own: see pyublk_fast.aio). A plain function returning the
    # operation saves a coroutine per request; the async ones show the general form.

    def read(self, offset, buf):
        return aio.current().pread_request(self.fd, offset)

    def write(self, offset, data):
        return aio.current().pwrite_request(self.fd, offset)

    def flush(self):
        return aio.current().fdatasync(self.fd)

    def discard(self, offset, length):
        return aio.current().fallocate(self.fd, aio.PUNCH_HOLE | aio.KEEP_SIZE, offset, length)

    async def write_zeroes(self, offset, length):
        io = aio.current()
        try:
            await io.fallocate(self.fd, aio.ZERO_RANGE | aio.KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # no ZERO_RANGE here (tmpfs): a punched hole reads back as zeros too
            await io.fallocate(self.fd, aio.PUNCH_HOLE | aio.KEEP_SIZE, offset, length)

    def resize(self, new_size):
        """Grow the backing file to new_size (a hole: it reads as zeros). A file the user
        already made that large is taken as it is; so must be a block device (grow it
        first) and a read-only file."""
        have = os.lseek(self.fd, 0, os.SEEK_END)
        if have < new_size:
            blk = stat.S_ISBLK(os.fstat(self.fd).st_mode)
            if blk or self.read_only:
                what = "block device" if blk else "read-only file"
                raise BackendError(errno.ENOSPC, f"{self.path} is a {what} of {have} bytes: "
                                   f"grow it to {new_size} first")
            os.ftruncate(self.fd, new_size)
        self.size = new_size

    def native_target(self):
        from ._native_loop import LoopTarget
        return LoopTarget(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
