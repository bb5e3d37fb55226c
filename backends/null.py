"""null: every request completes at once without touching data (like kublk's null)."""
from pyublk_fast import aio
from pyublk_fast.backend import Backend, SizedBackend, register


@register("null")
class NullBackend(SizedBackend):
    """Every request completes at once, data untouched; native target (no Python per I/O)."""

    can_discard = True
    can_write_zeroes = True
    data_paths = ("user_copy", "zero_copy", "splice_zc")
    DEFAULT_SIZE = 250 << 30

    def __init__(self, size: int = DEFAULT_SIZE, block_size: int = 512):
        self.size = size
        self.block_size = block_size

    def read(self, offset, buf):
        pass

    def write(self, offset, data):
        pass

    def discard(self, offset, length):
        pass

    def write_zeroes(self, offset, length):
        pass

    def native_target(self):
        from ._native_null import NullTarget
        return NullTarget()


@register("null-aio")
class AsyncNullBackend(NullBackend):
    """null whose every request is a coroutine awaiting one ring operation: the cost floor
    of an async Python backend."""

    data_paths = ("user_copy", "zero_copy", "splice_zc")

    async def read(self, offset, buf):
        await aio.current().nop()

    async def write(self, offset, data):
        await aio.current().nop()

    native_target = Backend.native_target         # none: the point is the Python path
