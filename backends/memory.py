"""memory: a RAM disk in pure Python, the README's example backend."""
from pyublk_fast.backend import SizedBackend, register


@register("memory")
class MemoryBackend(SizedBackend):
    """A RAM disk in pure Python (one Python call per request)."""

    can_discard = True
    can_write_zeroes = True
    DEFAULT_SIZE = 64 << 20

    def __init__(self, size: int = DEFAULT_SIZE):
        self.size = size
        self.data = bytearray(size)

    def read(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def discard(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    write_zeroes = discard

    def resize(self, new_size):
        # one extend in place, a single C call under the GIL: a handler on a queue thread
        # sees the old bytes or the grown buffer, and no write is lost to a copy
        self.data.extend(bytes(new_size - len(self.data)))
        self.size = new_size
