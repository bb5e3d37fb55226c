"""slow-aio-loop: the loop backend's Python path with each request first sleeping 50 ms on
its queue's ring, so that a server killed under load dies with coroutines in flight.
Registered on import: servers load it with ``--module slow_aio_backend``."""
from pyublk_fast import aio
from pyublk_fast.backend import register
from pyublk_fast.backends.loop import LoopBackend

DELAY = 0.05


@register("slow-aio-loop")
class SlowAioLoop(LoopBackend):
    """loop served by coroutines that sleep 50 ms on the ring before each read and write."""

    async def read(self, offset, buf):
        await aio.current().sleep(DELAY)
        await super().read(offset, buf)

    async def write(self, offset, data):
        await aio.current().sleep(DELAY)
        await super().write(offset, data)

    def native_target(self):
        return None                  # always the Python handlers
