"""Python backends: turn a batch of tags into handler calls and results.

The queue runner calls ``handle_batch(n)`` once per reaped batch, with the tags
in ``queue.py_tag_array[:n]``; the result list holds bytes or -errno per tag.
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import logging

from .backend import Backend, Request
from .errors import BackendError
from .uapi import (IO_DESC_DTYPE, SECTOR_SHIFT, UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH,
                   UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES)

log = logging.getLogger("pyublk_fast.dispatch")


async def _gather(coros):
    return await asyncio.gather(*coros, return_exceptions=True)


class PythonDispatch:
    """Per-queue adapter between the Cython queue runner and a Python Backend."""

    def __init__(self, backend, queue):
        self.backend = backend
        self.tags = queue.py_tag_array
        # the descriptor array (a kernel's is a page-rounded mapping) as ublksrv_io_desc
        # records; each field a memoryview indexed by tag, which gives a Python int at the
        # cost of one subscript (a numpy record per request would cost ten times more)
        iods = queue.descriptors()[:queue.depth * IO_DESC_DTYPE.itemsize].view(IO_DESC_DTYPE)
        self.op_flags = memoryview(iods["op_flags"])
        self.nr_sectors = memoryview(iods["nr_sectors"])
        self.start_sector = memoryview(iods["start_sector"])
        self.bufs = [memoryview(b) for b in queue.buffers()]
        self.loop: asyncio.AbstractEventLoop | None = None    # made when a handler first returns an awaitable
        self.batched = type(backend).handle_batch is not Backend.handle_batch

    def close(self):
        """Release the views of the queue's descriptors and buffers, and the event loop."""
        if self.loop is not None:
            self.loop.close()
        for view in (self.op_flags, self.nr_sectors, self.start_sector, *self.bufs):
            view.release()
        self.bufs = []

    def _call(self, tag: int):
        op_flags = self.op_flags[tag]
        nbytes = self.nr_sectors[tag] << SECTOR_SHIFT
        offset = self.start_sector[tag] << SECTOR_SHIFT
        op = op_flags & 0xff                  # uapi.op_of, without its per-call checks
        b = self.backend
        if op == UBLK_IO_OP_READ:
            return b.read(offset, self.bufs[tag][:nbytes]), nbytes
        if op == UBLK_IO_OP_WRITE:
            if op_flags & UBLK_IO_F_FUA:      # write() has no FUA flag: make it durable with flush()
                return self._write_fua(offset, self.bufs[tag][:nbytes]), nbytes
            return b.write(offset, self.bufs[tag][:nbytes]), nbytes
        if op == UBLK_IO_OP_FLUSH:
            return b.flush(), 0
        if op == UBLK_IO_OP_DISCARD:
            return b.discard(offset, nbytes), 0
        if op == UBLK_IO_OP_WRITE_ZEROES:
            return b.write_zeroes(offset, nbytes), 0
        raise BackendError(errno.EOPNOTSUPP)

    def _write_fua(self, offset, data):
        """write() then flush(), each sync or async: None, or one awaitable for both."""
        wrote = self.backend.write(offset, data)
        if not inspect.isawaitable(wrote):
            return self.backend.flush()

        async def then_flush():
            await wrote
            flushed = self.backend.flush()
            if inspect.isawaitable(flushed):
                await flushed
        return then_flush()

    @staticmethod
    def _failure(tag, exc) -> int:
        if isinstance(exc, BackendError):
            return -exc.errno
        if isinstance(exc, OSError) and exc.errno:
            return -exc.errno
        log.error("backend failed on tag %d; the request gets EIO", tag, exc_info=exc)
        return -errno.EIO

    def _request(self, tag: int) -> Request:
        op_flags = self.op_flags[tag]
        op = op_flags & 0xff
        nbytes = self.nr_sectors[tag] << SECTOR_SHIFT
        buf = self.bufs[tag][:nbytes] if op in (UBLK_IO_OP_READ, UBLK_IO_OP_WRITE) else None
        return Request(op, self.start_sector[tag] << SECTOR_SHIFT, nbytes, buf,
                       bool(op_flags & UBLK_IO_F_FUA))

    def _handle_batched(self, tags: list[int]) -> list[int]:
        reqs = [self._request(tag) for tag in tags]
        try:
            outs = self.backend.handle_batch(reqs)
            if len(outs) != len(reqs):
                raise ValueError(f"handle_batch returned {len(outs)} results for {len(reqs)} requests")
        except Exception as exc:  # noqa: BLE001
            err = self._failure(tags[0], exc)
            return [err] * len(tags)
        return [r.length if out is None else int(out) for r, out in zip(reqs, outs)]

    def handle_batch(self, n: int) -> list[int]:
        tags = self.tags[:n].tolist()
        if self.batched:
            return self._handle_batched(tags)
        results = [0] * n
        pending = []
        for i, tag in enumerate(tags):
            try:
                ret, nbytes = self._call(tag)
            except Exception as exc:  # noqa: BLE001 - any backend bug fails only this request
                results[i] = self._failure(tag, exc)
                continue
            if ret is not None and inspect.isawaitable(ret):
                pending.append((i, tag, ret, nbytes))
            else:
                results[i] = nbytes
        if pending:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            outs = self.loop.run_until_complete(_gather([p[2] for p in pending]))
            for (i, tag, _, nbytes), out in zip(pending, outs):
                results[i] = self._failure(tag, out) if isinstance(out, BaseException) else nbytes
        return results
