"""Ring I/O for Python backends: what a request handler awaits.

A handler (read, write, flush, discard, write_zeroes) may be an ``async def``. Each
request then runs as its own task on its queue's thread, and its result goes to the
driver the moment the coroutine returns, while the queue keeps serving the others.
Inside, ``current()`` gives the queue's RingIO, whose calls post io_uring operations
on the queue's own ring and return an ``Op`` to await::

    io = aio.current()
    n = await io.read(fd, buf, offset)              # bytes read (short at EOF)
    await io.pread_request(fd, offset)              # the request's data, by its data path
    await io.pwrite_request(fd, offset, at=4096, length=8192)
    await io.fdatasync(fd)
    await io.fallocate(fd, aio.PUNCH_HOLE | aio.KEEP_SIZE, offset, length)
    await io.sleep(0.2)
    value = await io.run_in_thread(blocking_call, arg)

Operations start when called: start several, then await each, and they run together.
Await every operation you start before the handler returns (a request whose handler
returned or raised is committed only once its operations, thread jobs included,
completed: until then they may use its buffer). Errors raise OSError with
the errno; an OSError or BackendError leaving the handler fails the request with its
errno, anything else with EIO (logged). A coroutine may await these operations, other
coroutines and ``asyncio.sleep(0)``; nothing else (no asyncio loop runs here: wrap
asyncio-only libraries with run_in_thread). docs/python-backends.md has the rest.

A backend whose data lies in runs of a file (an image format's clusters) can publish
those runs in an ExtentMap (its ``extent_map`` attribute): the reads and writes that
fall in one published extent are then served in C by the queue, and never reach its
handlers.
"""
from ._core.extmap import ExtentMap
from ._core.pytask import FixedFile, Op, RingIO, Unmapped, current

# fallocate() modes (<linux/falloc.h>).
#: fallocate(): the file keeps its size.
KEEP_SIZE = 0x01
#: fallocate(): free the range (with KEEP_SIZE).
PUNCH_HOLE = 0x02
#: fallocate(): make the range read as zeros.
ZERO_RANGE = 0x10

__all__ = ["current", "RingIO", "Op", "FixedFile", "Unmapped", "ExtentMap", "KEEP_SIZE", "PUNCH_HOLE",
           "ZERO_RANGE"]
