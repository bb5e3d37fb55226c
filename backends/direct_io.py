"""O_DIRECT helpers shared by the file-backed backends (loop, qcow2)."""
import errno
import fcntl
import mmap
import os
import stat
import struct

BLKSSZGET = 0x1268      # <linux/fs.h>: a block device's logical block size


def aligned_zeros(n: int) -> memoryview:
    """n zero bytes in page-aligned memory, so O_DIRECT accepts them."""
    buf = mmap.mmap(-1, max(n, mmap.PAGESIZE))
    return memoryview(buf)[:n]


def direct_block_size(fd: int) -> int:
    """The smallest block O_DIRECT I/O on fd accepts: a block device's logical block size;
    for a file, 512 if a 512-byte direct read is accepted, else 4096."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    try:
        os.preadv(fd, [aligned_zeros(512)], 512)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return 4096
    return 512
