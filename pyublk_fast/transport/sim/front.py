"""SimBlockDevice: the simulated /dev/ublkbN, the user side of a SimTransport's device.

Requests go to the driver thread the way a front ring would send them: the request
slot is filled in place (SimDriver.fill_req) and one MSG_RING carries its index; the
driver posts the result back to this device's ring under the same index.
"""
from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

import numpy as np

from ... import uapi
from ..._core.ring import Ring
from ...errors import os_error
from ...util import PAGE_SIZE, aligned_array
from ..base import DevInfo
from .driver import front_msg

if TYPE_CHECKING:
    from .transport import SimTransport

class FrontSlots:
    """The driver's request slots for fronts, shared by one transport's block devices."""

    def __init__(self, n: int):
        self._slots = list(range(n - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self, n: int) -> list[int]:
        with self._lock:
            if len(self._slots) < n:
                raise os_error(errno.EBUSY, f"reserve {n} request slots",
                               "too many requests in flight on the simulated devices")
            out = self._slots[-n:]
            del self._slots[-n:]
            return out

    def give(self, slots: list[int]):
        with self._lock:
            self._slots.extend(slots)


class SimBlockDevice:
    """The simulated /dev/ublkbN: read/write/flush/discard/write_zeroes, one or many in flight.

    Errors surface as OSError(errno), as from a real block device. One thread at a time.
    """

    def __init__(self, transport: SimTransport, dev_id: int, info: DevInfo, slots: int = 256):
        self.transport = transport
        self.dev_id = dev_id
        self.size = info.size
        self.block_size = info.logical_block_size
        self._slots = transport.front_slots.take(slots)
        self._ring = Ring(512, cq_entries=1024)
        self._lock = threading.Lock()
        # slots of requests a submit() stopped waiting for (a timeout, an interrupt) -> their
        # buffers: the driver may still fill or read them, so both stay theirs until it answers
        self._lost: dict[int, object] = {}
        self._opened = None
        d = transport.driver
        try:
            # the driver counts opens, as the block layer does (TRY_STOP_DEV refuses while any)
            self._opened = d.call(d.open_disk, dev_id)
            # the block layer splits I/O into requests of at most this (max_sectors, max_segments)
            self.max_io = d.call(d.queue_limits, dev_id)["max_rq_bytes"]
        except BaseException:
            self.close()
            raise

    def close(self):
        # a submit() in another thread ends first: its requests hold request slots the
        # driver may still write to, which must not go back to the pool before
        with self._lock:
            self._close()

    def _close(self):
        if self._ring is not None:
            self._ring.close()
            self._ring = None
            self.transport.front_slots.give([s for s in self._slots if s not in self._lost])
            if self._opened is not None:
                d = self.transport.driver
                try:
                    d.call(d.close_disk, self.dev_id, self._opened)
                except RuntimeError:         # the driver was shut down first: nothing to count
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(self, requests, timeout: float = 30.0) -> list[int]:
        """Run many requests at once: [(op, offset, length, buffer|None[, flags])] -> bytes or -errno each.

        flags are UBLK_IO_F_* request flags (e.g. UBLK_IO_F_FUA).

        Up to len(slots) are in flight together; a buffer is bytes-like for writes and a
        writable buffer for reads.
        """
        reqs = list(requests)
        results = [0] * len(reqs)
        keep = {}           # request index -> the buffer the driver reads or fills
        copy_back = []
        with self._lock:
            if self._ring is None:
                raise ValueError("block device is closed")
            inflight = {}   # slot -> request index
            try:
                self._run(reqs, results, inflight, keep, copy_back, timeout)
            except BaseException:
                for slot, i in inflight.items():
                    self._lost[slot] = keep.get(i)
                raise
        for dst, bounce in copy_back:
            dst[:bounce.nbytes] = bounce
        return results

    def _run(self, reqs, results, inflight, keep, copy_back, timeout):
        """submit()'s loop: as many requests in flight as there are free slots, until
        every one is answered."""
        d = self.transport.driver
        free = [s for s in self._slots if s not in self._lost]
        nxt = 0
        while nxt < len(reqs) or inflight:
            while nxt < len(reqs) and free:
                op, offset, length, buf, *rest = reqs[nxt]
                flags = rest[0] if rest else 0
                addr = 0
                if buf is not None:
                    arr = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
                    if arr.nbytes < length:
                        raise ValueError(f"request {nxt}: buffer of {arr.nbytes} bytes < length {length}")
                    if arr.__array_interface__["data"][0] % PAGE_SIZE:
                        # page-aligned bounce buffer, like the page cache in front of a real disk
                        bounce = aligned_array(length)
                        if op == uapi.UBLK_IO_OP_WRITE:
                            bounce[:] = arr[:length]
                        else:
                            copy_back.append((arr, bounce))
                        arr = bounce
                    addr = arr.__array_interface__["data"][0]
                    keep[nxt] = arr
                slot = free.pop()
                d.fill_req(slot, self.dev_id, op, flags, offset, length, addr)
                self._ring.prep_msg_ring(d.fd, self._ring.fd, front_msg(slot))
                inflight[slot] = nxt
                nxt += 1
            n = self._ring.wait(1, timeout)
            for ud, res in zip(self._ring.cqe_user_data[:n].tolist(), self._ring.cqe_res[:n].tolist()):
                if ud in inflight:
                    results[inflight.pop(ud)] = res
                    free.append(ud)
                elif ud in self._lost:          # an earlier submit's request, answered at last
                    del self._lost[ud]
                    free.append(ud)
                elif res < 0:
                    raise os_error(res, "simulated block device", "could not reach the driver")

    def _one(self, op, offset, length, buf, what):
        reqs = [(op, offset, length, buf)]
        res = self.submit(reqs)
        self._check(res, reqs, what)
        return res[0]

    def _chunks(self, offset, length):
        step = self.max_io
        for off in range(offset, offset + length, step):
            yield off, min(step, offset + length - off)

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        mv = memoryview(out)
        reqs = [(uapi.UBLK_IO_OP_READ, off, n, mv[off - offset:off - offset + n]) for off, n in self._chunks(offset, length)]
        self._check(self.submit(reqs), reqs, "read")
        return bytes(out)

    def pwrite(self, data, offset: int) -> int:
        mv = memoryview(data).cast("B")
        reqs = [(uapi.UBLK_IO_OP_WRITE, off, n, mv[off - offset:off - offset + n]) for off, n in self._chunks(offset, len(mv))]
        self._check(self.submit(reqs), reqs, "write")
        return len(mv)

    def _check(self, results, reqs, what):
        for (op, off, n, _), res in zip(reqs, results):
            if res < 0:
                raise os_error(res, f"{what} at offset {off}, {n} bytes on /dev/ublkb{self.dev_id}")

    def flush(self) -> None:
        self._one(uapi.UBLK_IO_OP_FLUSH, 0, 0, None, "flush")

    def discard(self, offset: int, length: int) -> None:
        self._one(uapi.UBLK_IO_OP_DISCARD, offset, length, None, "discard")

    def write_zeroes(self, offset: int, length: int) -> None:
        self._one(uapi.UBLK_IO_OP_WRITE_ZEROES, offset, length, None, "write_zeroes")
