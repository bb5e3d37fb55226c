"""memory: a RAM disk in pure Python, the README's example backend."""
from pyublk_fast.backend import Backend, register


@register("memory")
class MemoryBackend(Backend):
    can_discard = True
    can_write_zeroes = True

    def __init__(self, size: int = 64 << 20):
        self.size = size
        self.data = bytearray(size)

    def read(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def discard(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    write_zeroes = discard
