"""SimTransport: the control plane of the simulated driver, shaped like /dev/ublk-control.

Every device, queue and request lives in one SimDriver (one driver thread);
several devices and transports per process are fine. Errors are OSErrors with
the kernel's errnos.
"""
from __future__ import annotations

import errno
import time

from ... import uapi
from ...errors import os_error
from ..base import QUEUE_LIMITS, DevInfo, QueueEndpoint, RequestLimits, Transport
from .channel import SimChannel
from .driver import SimDriver
from .front import FrontSlots, SimBlockDevice
from .loadgen import LoadGen, summarize

FRONT_SLOTS = 8192          # request slots for fronts; the load generator uses the rest


class SimTransport(Transport):
    """An in-process ublk driver. Use as a context manager or call close()."""

    name = "sim"

    def __init__(self, *, random_tags: bool = True, max_devs: int = 64, spin_us: float = 50.0,
                 features: int | None = None):
        """spin_us: how long the driver thread polls its ring before sleeping (a kernel reacts
        at once; a sleeping thread costs a wake-up per hand-off). features: model a driver
        with only these of the simulator's UBLK_F_* (an older kernel's set)."""
        self.driver = SimDriver(max_devs=max_devs, nreq=FRONT_SLOTS + 4096, random_tags=random_tags,
                                spin_us=spin_us, features=features)
        self.driver.start()
        self.front_slots = FrontSlots(FRONT_SLOTS)
        self.loadgen = LoadGen(self.driver, FRONT_SLOTS)

    def close(self) -> None:
        self.driver.shutdown()

    # -- control commands ---------------------------------------------------------------

    def features(self) -> int:
        return self.driver.features

    def add_dev(self, dev_id: int, nr_queues: int, depth: int, max_io_bytes: int, flags: int):
        """ADD_DEV; returns (dev_id, granted_flags)."""
        return self.driver.call(self.driver.add_dev, dev_id, nr_queues, depth, max_io_bytes, flags)

    def set_params(self, dev_id: int, size: int, block_size: int, attrs: int = 0, max_sectors: int = 0,
                   discard: bool = True, limits: RequestLimits | None = None):
        """SET_PARAMS: basic part, the discard part (DISCARD/WRITE_ZEROES allowed) when discard,
        and the request limits' parts."""
        self.driver.call(self.driver.set_params, dev_id, size, block_size.bit_length() - 1, attrs,
                         max_sectors, discard, limits)

    def _wait_ready(self, fn, dev_id: int, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.driver.call(fn, dev_id)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise os_error(errno.ETIMEDOUT, what,
                                   f"the server did not fetch every tag within {timeout} s") from None
                time.sleep(0.001)

    def start_dev(self, dev_id: int, timeout: float = 10.0):
        """START_DEV, waiting (like the kernel) until every tag has a FETCH outstanding."""
        self._wait_ready(self.driver.start_dev, dev_id, timeout, "START_DEV")

    def stop_dev(self, dev_id: int):
        return self.driver.call(self.driver.stop_dev, dev_id)

    def try_stop_dev(self, dev_id: int):
        self.driver.call(self.driver.try_stop_dev, dev_id)

    def del_dev(self, dev_id: int, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.driver.call(self.driver.del_dev, dev_id)
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def release(self, dev_id: int):
        """The server's char device was closed: its process exited or died."""
        self.driver.call(self.driver.release, dev_id)

    def start_user_recovery(self, dev_id: int):
        self.driver.call(self.driver.start_user_recovery, dev_id)

    def end_user_recovery(self, dev_id: int, timeout: float = 10.0):
        self._wait_ready(self.driver.end_user_recovery, dev_id, timeout, "END_USER_RECOVERY")

    def quiesce_dev(self, dev_id: int):
        self.driver.call(self.driver.quiesce_dev, dev_id)

    def get_params(self, dev_id: int) -> dict:
        return self.driver.call(self.driver.get_params, dev_id)

    def update_size(self, dev_id: int, sectors: int):
        self.driver.call(self.driver.update_size, dev_id, sectors)

    def reg_buf(self, dev_id: int, addr: int, length: int, read_only: bool = False) -> int:
        """REG_BUF: the simulated driver matches a request's pages by address: the range
        itself, and every other mapping of the same file pages in this process at the time
        of registration (map the buffer before registering it)."""
        return self.driver.call(self.driver.reg_buf, dev_id, addr, length,
                                uapi.UBLK_SHMEM_BUF_READ_ONLY if read_only else 0)

    def unreg_buf(self, dev_id: int, index: int) -> None:
        self.driver.call(self.driver.unreg_buf, dev_id, index)

    def dev_info(self, dev_id: int) -> DevInfo:
        return DevInfo(**self.driver.call(self.driver.dev_info, dev_id), block_path=self.block_path(dev_id))

    def list_devs(self) -> list[int]:
        return self.driver.call(self.driver.list_devs)

    def queue_limits(self, dev_id: int) -> dict[str, int]:
        got = self.driver.call(self.driver.queue_limits, dev_id)
        return {name: got[name] for name in QUEUE_LIMITS}

    # -- the server side ---------------------------------------------------------------------

    def queue_endpoint(self, dev_id: int, q_id: int) -> QueueEndpoint:
        nr_queues = self.dev_info(dev_id).nr_hw_queues
        if not 0 <= q_id < nr_queues:
            raise ValueError(f"q_id={q_id}: device {dev_id} has {nr_queues} queues")
        iods, cmds, qi = self.driver.call(self.driver.queue_endpoint, dev_id, q_id)
        return QueueEndpoint(q_id, iods, SimChannel(self.driver, dev_id, q_id, qi, cmds))

    # -- the user side -----------------------------------------------------------------------

    def block_path(self, dev_id: int) -> str:
        return f"sim:ublkb{dev_id}"

    def open(self, dev_id: int) -> SimBlockDevice:
        """Open the simulated /dev/ublkb<dev_id>."""
        try:
            info = self.dev_info(dev_id)
        except OSError as e:
            if e.errno != errno.ENODEV:
                raise
            raise os_error(errno.ENOENT, f"open /dev/ublkb{dev_id}", "no such device") from None
        if not info.started:
            raise os_error(errno.ENOENT, f"open /dev/ublkb{dev_id}", "the device is not started")
        return SimBlockDevice(self, dev_id, info)

    def run_load(self, dev_id: int, *, rw: str = "randread", bs: int = 4096, qd: int = 32,
                 runtime: float = 0.0, count: int = 0, read_pct: int | None = None,
                 verify: bool = False, region: int = 0, seed: int = 1, timeout: float = 600.0,
                 buffer=None) -> dict:
        """Our in-process fio: random/sequential read/write/mix at a queue depth.

        rw: randread, randwrite, randrw, read, write, rw. Stops after `count` I/Os or
        `runtime` seconds. verify=True writes a pattern over the region first and then
        checks every block read. buffer: page-aligned writable memory of at least qd * bs
        bytes to do the I/O from (e.g. a buffer the device shares, for SHMEM_ZC) instead
        of the load generator's own. Returns IOPS, MB/s, latency percentiles (us), errors.
        """
        kinds = {"randread": (100, True), "randwrite": (0, True), "randrw": (50, True),
                 "read": (100, False), "write": (0, False), "rw": (50, False)}
        if rw not in kinds:
            raise ValueError(f"rw={rw!r}: choose one of {sorted(kinds)}")
        if not count and not runtime:
            raise ValueError("give count or runtime")
        pct, rnd = kinds[rw]
        if read_pct is not None:
            pct = read_pct
        d, lg = self.driver, self.loadgen
        if verify:
            info = self.dev_info(dev_id)
            reg = region or info.size
            d.call(lg.start, dev_id, qd, bs, 0, False, True, reg, reg // bs, 0.0, seed, buffer)
            pre = lg.wait(timeout)
            if pre["errors"]:
                raise os_error(errno.EIO, "verify prefill", f"{pre['errors']} write errors")
        d.call(lg.start, dev_id, qd, bs, pct, rnd, verify, region, count, runtime, seed, buffer)
        out = lg.wait(timeout)
        return summarize(out, bs)
