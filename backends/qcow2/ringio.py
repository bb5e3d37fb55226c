"""RingData: an image's guest data moved on the serving queue's io_uring ring.

The qcow2 backend's handlers are coroutines (``pyublk_fast.aio``): a request's data goes
between the request and the image file by the device's data path (``pread_request``,
``pwrite_request``: the tag buffer, the request's pages as a fixed buffer, or a splice)
while the queue serves its other requests. The metadata (L1/L2 tables, refcounts) stays
with the engine, in Python, under the image's lock, which is never held across an
``await``: the queues of a device are threads that all take it.

Data goes through a descriptor of its own, opened with O_DIRECT when the file system
allows it and a cluster is at least a page: a smaller cluster may share a page with
metadata, which the engine writes through the page cache, and O_DIRECT and buffered
writes to one page race.

Allocating writes keep the engine's crash order: the new cluster is counted (its
refcount written), then all of it is written (the request's bytes, the rest zeros or
the backing file's), and only once every byte is in the file does the L2 entry point
at it. Meanwhile the virtual cluster is marked: other writes to it wait, reads still
see the old mapping. A discard or zeroing that unmaps a cluster waits until no data
I/O on it is in flight, since its host cluster may be handed out again at once.
Waiting is on an eventfd read on the ring, woken by whoever clears the way, from
any queue's thread.

The common request (a read, or a write without FUA, within one cluster holding data
of its own) never reaches Python: such clusters are published in an extent map
(``pyublk_fast.aio.ExtentMap``), whose hits the queue thread serves in C. A cluster is
published when a request on it misses the map (the handlers below run then), and only
once its L2 entry is in the file and in the engine's tables: an allocating write's
cluster, after its entry is written. Before a discard or zeroing changes a published
cluster it withdraws it from the map and waits until the map's I/O in flight on it
has ended (``in_flight``), woken by the map's ``on_drained``. A failed flush forbids
the map's writes; a read-only image publishes clusters for reading only.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from typing import Any

from pyublk_fast import aio
from pyublk_fast.aio import ExtentMap, Unmapped

from ..direct_io import aligned_zeros, direct_block_size
from .format import OFLAG_COPIED, Qcow2Error, corrupt
from .image import Qcow2Image, unpin
from .l2 import COMPRESSED, DATA, UNALLOC

__all__ = ["RingData"]

_UNMAP_CHUNK = 4096      # clusters unmapped per hold of the image's lock
_MAP_MAX = 1 << 18       # clusters the extent map holds at most (32 bytes each)


async def _all(ops: list) -> None:
    """Await every op (all were started), then raise the first failure."""
    err = None
    for op in ops:
        try:
            await op
        except OSError as e:
            err = err or e
    if err is not None:
        raise err


class _Gates:
    """Virtual clusters with data I/O or an allocation in flight, and requests waiting
    for them. Used under the image's lock."""

    def __init__(self) -> None:
        self.io: dict[int, int] = {}       # vc -> data ops in flight on its host cluster
        self.alloc: set[int] = set()       # vcs whose new cluster is being written
        self.unmap: dict[int, int] = {}    # vc -> requests waiting to unmap it
        self._waits: dict[int, list] = {}  # vc -> [eventfd, not yet woken, reads pending]
        self.waits = 0                     # waits begun, in all (for tests and curiosity)

    def enter(self, vc: int) -> None:
        self.io[vc] = self.io.get(vc, 0) + 1

    def leave(self, vc: int) -> None:
        n = self.io[vc] - 1
        if n:
            self.io[vc] = n
        else:
            del self.io[vc]
            self.wake(vc)

    def busy(self, vc: int) -> bool:
        """Data I/O of the handlers or an allocation on vc is in flight."""
        return vc in self.io or vc in self.alloc

    def sleeper(self, vc: int) -> int:
        """Register a wait for vc; returns the eventfd to read (on the ring) until woken."""
        w = self._waits.get(vc)
        if w is None:
            w = self._waits[vc] = [os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC), 0, 0]
        w[1] += 1
        w[2] += 1
        self.waits += 1
        return w[0]

    def wake(self, vc: int) -> None:
        """vc's state changed: every waiter looks again."""
        w = self._waits.get(vc)
        if w is not None and w[1]:
            os.eventfd_write(w[0], w[1])
            w[1] = 0

    def woke(self, vc: int) -> None:
        """A waiter's read ended (woken or cancelled)."""
        w = self._waits[vc]
        w[2] -= 1
        if w[2] == 0:
            os.close(w[0])
            del self._waits[vc]

    def close(self) -> None:
        for w in self._waits.values():
            os.close(w[0])
        self._waits.clear()


# how a write reaches a cluster (_Job.how)
_IN_PLACE, _SET_COPIED, _ALLOC = 0, 1, 2


class _Job:
    """One cluster's part of a write: piece [o, o + n) of virtual cluster vc, from byte
    ``at`` of the request (or zeros)."""

    __slots__ = ("vc", "o", "at", "n", "how", "host", "entry", "fresh", "backing", "pins",
                 "packed", "ok")

    def __init__(self, vc: int, o: int, at: int, n: int) -> None:
        self.vc, self.o, self.at, self.n = vc, o, at, n
        self.host = self.entry = 0
        self.how = _IN_PLACE
        self.fresh = False        # a new cluster, freed again if the write fails
        self.backing: list = []   # runs of the old data for the rest (COW): backing file's
        self.pins: list = []      # or decompressed, its cache slots held (image.unpin)
        self.packed = 0           # the compressed cluster it replaces, uncounted once it did
        self.ok = False


class RingData:
    """The data I/O of one open image, for handlers running on a queue's ring."""

    def __init__(self, image: Qcow2Image, path: str, readonly: bool) -> None:
        self.image = image
        self._lock = image._lock
        self._gates = _Gates()
        self.fd = self.zero_fd = -1
        self.direct = False
        self.block_size = 512
        cs = image.cluster_size
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            if cs >= mmap.PAGESIZE:
                self._open_direct(path, flags)
            if self.fd < 0:
                self.fd = os.open(path, flags)
            self.zero_fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        self._zeros = aligned_zeros(cs)
        self._cb = image._cb
        self._readonly = readonly
        clusters = max(-(-image.size // cs), 4)
        self.map = ExtentMap(self._cb, min(1 << (clusters - 1).bit_length(), _MAP_MAX),
                             self._drained)

    def _open_direct(self, path: str, flags: int) -> None:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError:
            return                      # no O_DIRECT here (tmpfs on older kernels)
        try:
            bs = direct_block_size(fd)
        except OSError:
            os.close(fd)
            raise
        if bs > 4096 or self.image.size % bs:
            os.close(fd)                # requests could not be aligned to it
            return
        self.fd, self.direct, self.block_size = fd, True, bs

    def close(self) -> None:
        if hasattr(self, "map"):          # (not when __init__ failed before making it)
            self.map.clear()
        self._gates.close()
        for name in ("fd", "zero_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # ---------------------------------------------------------------- waiting
    async def _wait(self, io: Any, vc: int, efd: int) -> None:
        """Wait (registered with sleeper(vc) under the lock) until vc's state changes."""
        try:
            await io.read(efd, bytearray(8), 0)
        finally:
            with self._lock:
                self._gates.woke(vc)

    def _drained(self) -> None:
        """The map's I/O on a set being withdrawn ended (a queue thread, the GIL held):
        the unmappings waiting look again."""
        with self._lock:
            for vc in self._gates.unmap:
                self._gates.wake(vc)

    def _publish(self, offset: int, length: int) -> None:
        """A request missed the map: publish its cluster if the request lies in one that
        holds data of its own (COPIED), read and written in place, and no unmapping of
        it waits."""
        vc = offset >> self._cb
        if (offset + length - 1) >> self._cb != vc or offset + length > self.image._size:
            return
        with self._lock:
            if vc in self._gates.unmap:
                return
            m = self.image._map
            e = m.entry(vc)
            if not e & OFLAG_COPIED:
                return
            kind, host = m.decode(e, vc)
            if kind != DATA:
                return
            try:
                m.writable(host, vc, e)
            except Qcow2Error:
                return          # not for the map: the general path says what is wrong
            self.map.publish(vc, self.fd, host, not self._readonly
                             and self.image._flush_failed is None)

    # ---------------------------------------------------------------- reading
    async def read(self, offset: int, buf: Any) -> None:
        self._publish(offset, len(buf))
        await self._read_runs(aio.current(), offset, len(buf), buf)

    async def _read_runs(self, io: Any, offset: int, length: int, buf: Any) -> None:
        g, cb, fd = self._gates, self._cb, self.fd
        mapped = not isinstance(buf, Unmapped)
        pins: list = []          # decompressed clusters the runs read from
        loaded: list = []        # those this request decompressed, held until mapped
        try:
            while True:
                missing: list = []
                with self._lock:
                    runs = self.image.map_data(offset, length, fd, pins, missing)
                    blocked = None
                    if not missing:
                        held = [vc for rfd, _, at, n in runs if rfd == fd
                                for vc in range((offset + at) >> cb,
                                                ((offset + at + n - 1) >> cb) + 1)]
                        blocked = next((vc for vc in held if vc in g.unmap), None)
                        if blocked is None:
                            for vc in held:
                                g.enter(vc)
                            break
                        efd = g.sleeper(blocked)
                    unpin(pins)
                if blocked is None:
                    await self._load(io, missing, loaded)
                else:
                    await self._wait(io, blocked, efd)
        finally:
            unpin(loaded)       # mapped (pinned again in pins), or failed
        try:
            if len(runs) == 1 and runs[0][0] >= 0:
                rfd, where, _, _ = runs[0]
                await io.pread_request(rfd, where)
                return
            ops = []
            for rfd, where, at, n in runs:
                if rfd < 0 and mapped:
                    self._fill_zeros(buf[at:at + n])
                    continue
                ops.append(io.pread_request(rfd, where, at, n) if rfd >= 0 else
                           io.pread_request(self.zero_fd, 0, at, n))
            await _all(ops)
        finally:
            unpin(pins)
            if held:
                with self._lock:
                    for vc in held:
                        g.leave(vc)

    @staticmethod
    async def _load(io: Any, missing: list, loaded: list) -> None:
        """Read the compressed clusters ``missing`` (map_data's) on the ring, decompress
        them in a worker thread (not on the queue's), cache them, pinned, in ``loaded``."""
        raws = [bytearray(c.span(e)[1]) for c, e, _ in missing]
        # a short read ends at the end of the file, past which the data reads as zeros
        await _all([io.read(c.image_fd, raw, c.span(e)[0])
                    for (c, e, _), raw in zip(missing, raws)])
        datas = await io.run_in_thread(
            lambda: [c.unpack(raw, e, voff) for (c, e, voff), raw in zip(missing, raws)])
        for (c, e, _), data in zip(missing, datas):
            loaded.append((c, c.put(e, data)))

    def _fill_zeros(self, mv: memoryview) -> None:
        z = self._zeros
        for i in range(0, len(mv), len(z)):
            n = min(len(z), len(mv) - i)
            mv[i:i + n] = z[:n]

    # ---------------------------------------------------------------- writing
    async def write(self, offset: int, data: Any) -> None:
        self._publish(offset, len(data))
        await self._write(aio.current(), offset, len(data), False)

    async def _write(self, io: Any, offset: int, length: int, zeros: bool) -> None:
        """Write the request's bytes (or, with ``zeros``, zeros) to [offset, offset +
        length), cluster by cluster."""
        cb, cs, g = self.image._cb, self.image._cs, self._gates
        pending, pos, end = [], offset, offset + length
        while pos < end:
            o = pos & (cs - 1)
            n = min(cs - o, end - pos)
            pending.append(_Job(pos >> cb, o, pos - offset, n))
            pos += n
        while pending:
            jobs, later, err = [], [], None
            with self._lock:
                try:
                    self.image._check_range(offset, length)
                    self.image._check_writable()
                    for job in pending:
                        if job.vc in g.alloc or job.vc in g.unmap:
                            later.append(job)
                        elif self._plan(job, zeros):
                            jobs.append(job)
                except OSError as e:
                    err = e
            try:
                if err is None:
                    err = await self._move(io, jobs, zeros)
            except BaseException:
                with self._lock:      # cancelled: its I/O may still land, keep its clusters
                    self._finish(jobs, False)
                raise
            blocked = None
            with self._lock:
                self._finish(jobs, True)
                if err is None:
                    blocked = next((j.vc for j in later if j.vc in g.alloc or j.vc in g.unmap),
                                   None)
                    if blocked is not None:
                        efd = g.sleeper(blocked)
            if err is not None:
                raise err
            if blocked is not None:
                await self._wait(io, blocked, efd)
            pending = later

    def _plan(self, job: _Job, zeros: bool) -> bool:
        """Under the lock: decide how job's cluster is written and claim it (data I/O in
        flight, or a new cluster counted and marked); False if nothing is to be written
        (zeros onto a cluster that reads as zeros). Raises before claiming anything."""
        img, vc, cs = self.image, job.vc, self.image._cs
        e = img._map.entry(vc)
        kind, host = img._map.decode(e, vc)
        if kind == COMPRESSED:    # copied on write into a new cluster
            job.packed, host = e, 0
        cow = kind == UNALLOC and img._backing is not None
        if zeros and kind != DATA and not cow and not job.packed:
            return False
        if host:                  # data, or a zero cluster with a preallocated host cluster
            img._map.writable(host, vc, e)
        job.entry = e
        if kind == DATA:
            job.how, job.host = (_IN_PLACE if e & OFLAG_COPIED else _SET_COPIED), host
            self._gates.enter(vc)
            return True
        try:
            if (cow or job.packed) and (job.o or job.n < cs):
                if cow:
                    img._backing._map_clipped(vc << img._cb, cs, 0, job.backing, job.pins)
                else:
                    cache = img._decompressed()
                    job.pins.append((cache, cache.pin(e, vc << img._cb)))
                    job.backing.append((cache.fd, job.pins[0][1], 0, cs))
            if not host:
                host = img._refs.alloc() << img._cb
                job.fresh = True
        except BaseException:
            unpin(job.pins)
            raise
        job.how, job.host = _ALLOC, host
        self._gates.alloc.add(vc)
        return True

    async def _move(self, io: Any, jobs: list, zeros: bool) -> OSError | None:
        """Every job's bytes to the file; job.ok says whether all of them got there.
        Returns the first failure."""
        fd, cs = self.fd, self.image._cs
        err = None
        started: list = []
        cow: list = []
        for job in jobs:
            job.ok = True
            where = job.host + job.o
            if zeros:
                started.append((job, io.write(fd, self._zeros[:job.n], where), job.n))
            else:
                started.append((job, io.pwrite_request(fd, where, job.at, job.n), 0))
            if job.how == _ALLOC and job.backing:
                # the backing file's bytes of the cluster, to write around the new ones
                # (a backing file cut short since reads zeros: buf holds them)
                buf = aligned_zeros(cs)
                started += [(job, io.read(rfd, buf[at:at + n], off), 0)
                            for rfd, off, at, n in job.backing if rfd >= 0]
                cow.append((job, buf))
            elif job.how == _ALLOC:
                started += self._around(io, job, self._zeros)
        err = await self._settle(started) or err
        started = [op for job, buf in cow if job.ok for op in self._around(io, job, buf)]
        return await self._settle(started) or err

    def _around(self, io: Any, job: _Job, src: memoryview) -> list:
        """Write the rest of job's new cluster, around its piece, from src (a cluster)."""
        tail, cs = job.o + job.n, self.image._cs
        ops = []
        if job.o:
            ops.append((job, io.write(self.fd, src[:job.o], job.host), job.o))
        if tail < cs:
            ops.append((job, io.write(self.fd, src[tail:cs], job.host + tail), cs - tail))
        return ops

    @staticmethod
    async def _settle(started: list) -> OSError | None:
        """Await every started (job, op, bytes it must write or 0); a failed op fails its
        job. Returns the first failure."""
        err = None
        for job, op, want in started:
            try:
                got = await op
                if want and got != want:      # the file system is full, most likely
                    raise OSError(errno.EIO, f"short write to the image: {got} of {want} bytes")
            except OSError as e:
                err, job.ok = err or e, False
        return err

    def _finish(self, jobs: list, done: bool) -> None:
        """Under the lock, after the data I/O (``done``; else abandoned mid-way, its I/O
        perhaps still landing): point the L2 entries of the clusters whose bytes all got
        there at them, free the new clusters of the others, let go of every claim."""
        img, g = self.image, self._gates
        err = None
        for job in jobs:
            vc = job.vc
            try:
                if not done:
                    pass
                elif job.how == _SET_COPIED:
                    if job.ok and img._map.entry(vc) == job.entry:
                        l2off, t, i = img._map.slot(vc)
                        img._map.set_entry(l2off, t, i, job.host | OFLAG_COPIED)
                elif job.how == _ALLOC:
                    self._commit(job)
            except OSError as e:
                err = err or e
            finally:
                unpin(job.pins)
                if job.how == _ALLOC:
                    g.alloc.discard(vc)
                    g.wake(vc)
                else:
                    g.leave(vc)
        if err is not None:
            raise err

    def _commit(self, job: _Job) -> None:
        """Point the L2 entry of job's virtual cluster at its new cluster if every byte
        of that is in the file; else, or if that fails, give a cluster taken for it
        back (no entry ever pointed at it)."""
        img, vc = self.image, job.vc
        done = False
        try:
            if job.ok:
                l2off, t, i = img._map.slot(vc)
                if int(t[i]) != job.entry:
                    raise corrupt(f"L2 entry of virtual offset {vc << img._cb:#x} "
                                  "changed during its allocating write")
                img._map.set_entry(l2off, t, i, job.host | OFLAG_COPIED)
                done = True
        finally:
            if not done and job.fresh:
                img._refs.abandon(job.host >> img._cb)
        if done and job.packed:
            img._drop_compressed(job.packed)

    # ---------------------------------------------------------------- the rest
    def discard(self, offset: int, length: int) -> Any:
        return self._zero_range(offset, length, True)

    def write_zeroes(self, offset: int, length: int) -> Any:
        return self._zero_range(offset, length, False)

    async def _zero_range(self, offset: int, length: int, discard: bool) -> None:
        """Whole clusters: metadata only (zero flag, or unmapped for a discard), once no
        data I/O on them is in flight; partial ones: zeros written."""
        io = aio.current()
        img, g, cs, end = self.image, self._gates, self.image._cs, offset + length
        first, last = -(-offset // cs), end // cs        # the whole clusters
        parts = []
        if first > last:
            parts.append((offset, length))
        else:
            parts += [(offset, first * cs - offset)] if offset < first * cs else []
            parts += [(last * cs, end - last * cs)] if last * cs < end else []
        todo = range(first, max(first, last))
        busy: list[int] = []           # whole clusters waiting for their data I/O to end
        waiting: set[int] = set()
        try:
            while todo or busy:
                if todo:               # a long range: the lock is let go between chunks
                    chunk, todo = todo[:_UNMAP_CHUNK], todo[_UNMAP_CHUNK:]
                else:
                    chunk, busy = busy, []
                with self._lock:
                    img._check_range(offset, length)
                    img._check_writable()
                    for vc in chunk:
                        if vc not in waiting:
                            # marked before the counts are read: a request that ends
                            # after this wakes the wait below (the module's doc)
                            waiting.add(vc)
                            g.unmap[vc] = g.unmap.get(vc, 0) + 1
                            self.map.withdraw(vc)
                        if g.busy(vc) or self.map.in_flight(vc):
                            busy.append(vc)
                            continue
                        img._zero_cluster(vc, discard)
                        self._unwait(vc, waiting)
                    if busy and not todo:
                        efd = g.sleeper(busy[0])
                if todo:
                    await asyncio.sleep(0)
                elif busy:
                    await self._wait(io, busy[0], efd)
        finally:
            if waiting:
                with self._lock:
                    for vc in list(waiting):
                        self._unwait(vc, waiting)
        for pos, n in parts:
            await self._write(io, pos, n, True)

    def _unwait(self, vc: int, waiting: set) -> None:
        g = self._gates
        waiting.discard(vc)
        self.map.settle(vc)
        if g.unmap[vc] == 1:
            del g.unmap[vc]
        else:
            g.unmap[vc] -= 1
        g.wake(vc)

    async def flush(self) -> None:
        with self._lock:
            token = self.image.flush_begin()
        err = None
        try:
            await aio.current().fdatasync(self.fd)
        except OSError as e:
            err = e
        with self._lock:
            try:
                self.image.flush_done(err, token)      # raises what failed
            finally:
                if self.image._flush_failed is not None:
                    self.map.forbid_writes()
