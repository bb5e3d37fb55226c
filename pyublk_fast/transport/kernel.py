"""KernelTransport: real ublk devices through /dev/ublk-control (the interface Device uses).

    with KernelTransport() as t, Device(LoopBackend("disk.img"), t) as dev:
        print(t.block_path(dev.dev_id))       # /dev/ublkbN, served until dev.stop()

Per device the transport opens ``/dev/ublkcN`` once and maps every queue's
descriptor array read-only; :meth:`release` (also done before DEL_DEV) unmaps
and closes them, which is what the kernel sees when a server dies.  Commands
that block in the kernel (START_DEV, END_USER_RECOVERY, DEL_DEV) run on their
own short-lived control ring with a timeout, so several devices per process
never wait on each other.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import uapi
from .._core.kchannel import KernelChannel
from ..errors import missing_features_message, os_error
from ..util import PAGE_SIZE as PAGE, kernel_release, wait_for_path, wait_until
from .base import QUEUE_LIMITS, DevInfo, QueueEndpoint, RequestLimits, Transport
from .control import CONTROL_PATH, CtrlDevInfo, UblkControl, UblkCommandError

IOD_SIZE = uapi.IO_DESC_DTYPE.itemsize
#: Bytes between two queues' descriptor arrays in /dev/ublkcN (the max depth, not the device's).
QUEUE_STRIDE = -(-uapi.UBLK_MAX_QUEUE_DEPTH * IOD_SIZE // PAGE) * PAGE
RECOVERY_FLAGS = (uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
                  | uapi.UBLK_F_USER_RECOVERY_FAIL_IO)
#: What an unprivileged device cannot have, and why the kernel refuses or drops it.
UNPRIVILEGED_REFUSES = {
    uapi.UBLK_F_USER_COPY: "USER_COPY (-u): the server would fill request buffers by pread/"
    "pwrite on /dev/ublkcN, which the kernel does not trust an unprivileged server with "
    "(ADD_DEV fails with EINVAL); use the default copy data path",
    uapi.UBLK_F_SUPPORT_ZERO_COPY: "zero copy (-z): the server would get the kernel's request "
    "pages through /dev/ublkcN, which the kernel does not trust an unprivileged server with "
    "(ADD_DEV fails with EINVAL); use the default copy data path",
    uapi.UBLK_F_USER_RECOVERY: "recovery (--recovery): the kernel drops USER_RECOVERY for "
    "unprivileged devices (an untrusted server could stall error handling)",
}
UDEV_QUEUE = "/run/udev/queue"
"""Exists while udevd has events to handle (what `udevadm settle` waits for)."""
UDEV_BUSY_WAIT = 120.0
"""How long, past node_timeout, a node may wait for a udev that is still at work."""
NODE_HINT = ("a udev rule must give an unprivileged device's /dev/ublkcN and /dev/ublkbN to "
             "its owner (`python -m pyublk_fast udev-rules` prints ours)")


@dataclass
class _Dev:
    """What the transport holds for one device it serves."""

    dev_id: int
    nr_queues: int
    depth: int
    flags: int
    max_io_buf_bytes: int
    fd: int = -1
    maps: dict[int, tuple[int, int]] = field(default_factory=dict)   # q_id -> (addr, length)
    lock: threading.Lock = field(default_factory=threading.Lock)


class KernelTransport(Transport):
    """The real ublk driver. Use as a context manager or call close()."""

    name = "kernel"

    def __init__(self, control_path: str = CONTROL_PATH, *, timeout: float = 30.0,
                 unprivileged: bool = False, node_timeout: float = 5.0,
                 zero_copy: str = "auto") -> None:
        """``unprivileged``: add devices with UBLK_F_UNPRIVILEGED_DEV, owned by the caller;
        ``node_timeout``: how long ADD_DEV then waits for udev to hand /dev/ublkcN over
        (and START_DEV /dev/ublkbN), longer while udev still has events to handle;
        ``zero_copy``: how request pages reach the ring's buffer table: "auto_buf_reg" (the
        driver installs them, 6.16+), "register" (REGISTER_IO_BUF per request, 6.15+) or
        "auto" (AUTO_BUF_REG where the kernel has it)."""
        if zero_copy not in ("auto", "auto_buf_reg", "register"):
            raise ValueError(f"zero_copy={zero_copy!r}: choose auto, auto_buf_reg or register")
        self.zero_copy = zero_copy
        self.control_path = control_path
        self.unprivileged = unprivileged
        self.timeout = timeout
        self.node_timeout = node_timeout
        self.ctrl = UblkControl(control_path, timeout=timeout)   # clear error if no module
        self._devs: dict[int, _Dev] = {}
        self._lock = threading.Lock()
        self._features: int | None = None

    def close(self) -> None:
        """Release every device this transport still holds and close the control device."""
        for dev_id in list(self._devs):
            self.release(dev_id)
        self.ctrl.close()

    def _oneshot(self, timeout: float | None) -> UblkControl:
        return UblkControl(self.control_path, timeout=timeout)

    # -- control commands -------------------------------------------------------------

    def features(self) -> int:
        """UBLK_F_* bits the running kernel supports (GET_FEATURES, cached)."""
        if self._features is None:
            self._features = self.ctrl.get_features()
        return self._features

    def add_dev(self, dev_id: int, nr_queues: int, depth: int, max_io_bytes: int,
                flags: int) -> tuple[int, int]:
        """ADD_DEV; returns (dev_id, granted_flags).

        Zero copy gets AUTO_BUF_REG added where the kernel has it (or zero_copy=
        "auto_buf_reg" insists); otherwise the queues register each request's buffer.  Flags the kernel does not have raise OSError(EOPNOTSUPP) naming
        them and the kernel version that has them, before anything is added.
        """
        if flags & uapi.SIM_FEATURE_MASK:
            raise os_error(errno.EOPNOTSUPP, "ADD_DEV",
                           missing_features_message(flags & uapi.SIM_FEATURE_MASK))
        if self.unprivileged:
            for flag, why in UNPRIVILEGED_REFUSES.items():
                if flags & flag:
                    raise ValueError(f"an unprivileged device cannot use {why}")
        if flags & uapi.UBLK_F_SUPPORT_ZERO_COPY and (
                self.zero_copy == "auto_buf_reg"
                or (self.zero_copy == "auto" and self.features() & uapi.UBLK_F_AUTO_BUF_REG)):
            flags |= uapi.UBLK_F_AUTO_BUF_REG
        missing = flags & ~self.features()
        if missing:
            raise os_error(errno.EOPNOTSUPP, "ADD_DEV", missing_features_message(missing))
        flags |= uapi.UBLK_F_CMD_IOCTL_ENCODE
        if self.unprivileged:
            flags |= uapi.UBLK_F_UNPRIVILEGED_DEV
        info = self.ctrl.add_dev(dev_id, nr_queues, depth, max_io_bytes, flags)
        # root's devices are privileged whatever it asks for: the kernel drops the flag
        self.refused_flags = info.refused_flags & ~uapi.UBLK_F_UNPRIVILEGED_DEV
        with self._lock:
            self._devs[info.dev_id] = _Dev(info.dev_id, info.nr_hw_queues, info.queue_depth,
                                           info.flags, info.max_io_buf_bytes)
        if info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV:
            self._wait_for_node(info.dev_id)
        return info.dev_id, info.flags

    def _udev_granted(self, path: str) -> bool:
        """Wait until the caller may read and write ``path``, a node udev hands over (a new
        one is root's). Past node_timeout, wait on while udev is still at work: a rule that
        runs a helper per node takes seconds on a loaded machine."""
        def granted() -> bool:
            return os.access(path, os.R_OK | os.W_OK)
        if wait_until(granted, self.node_timeout, 0.01):
            return True
        wait_until(lambda: granted() or not os.path.exists(UDEV_QUEUE), UDEV_BUSY_WAIT, 0.01)
        return granted()

    def _wait_for_node(self, dev_id: int) -> None:
        """Wait until udev gave the caller read-write access to /dev/ublkcN (a new node is
        root's, mode 0600); without it no command on the device is possible."""
        path = f"/dev/ublkc{dev_id}"
        if self._udev_granted(path):
            return
        try:
            self.ctrl.del_dev(dev_id, unprivileged=True)
            gone = "it was deleted again"
        except OSError:
            gone = f"it stays until root deletes it: `python -m pyublk_fast del -n {dev_id}`"
        self.release(dev_id)
        raise os_error(
            errno.EACCES, f"unprivileged device {dev_id} added, but {path} did not become "
            f"read-writable for uid {os.geteuid()} within {self.node_timeout} s",
            f"{NODE_HINT}; {gone}", path)

    def _form(self, dev_id: int) -> bool | None:
        """The command form for a device this transport holds (None: let UblkControl find out)."""
        dev = self._devs.get(dev_id)
        return None if dev is None else bool(dev.flags & uapi.UBLK_F_UNPRIVILEGED_DEV)

    def set_params(self, dev_id: int, size: int, block_size: int, attrs: int = 0,
                   max_sectors: int = 0, discard: bool = True,
                   limits: RequestLimits | None = None) -> None:
        """SET_PARAMS: basic (size, block size, attrs), by default discard/write-zeroes, and
        the request limits' parts."""
        if block_size & (block_size - 1) or not 512 <= block_size <= PAGE:
            raise ValueError(f"block_size={block_size} must be a power of two in 512..{PAGE}")
        if size <= 0 or size % block_size:
            raise ValueError(f"size={size} must be a positive multiple of block_size {block_size}")
        dev = self._dev(dev_id)
        p = np.zeros(1, uapi.PARAMS_DTYPE)
        p["len"] = uapi.PARAMS_DTYPE.itemsize
        p["types"] = uapi.UBLK_PARAM_TYPE_BASIC
        b = p["basic"]
        shift = block_size.bit_length() - 1
        b["attrs"] = attrs
        b["logical_bs_shift"] = shift
        b["physical_bs_shift"] = max(shift, 12)
        b["io_opt_shift"] = 12
        b["io_min_shift"] = shift
        b["max_sectors"] = max_sectors or dev.max_io_buf_bytes >> uapi.SECTOR_SHIFT
        b["dev_sectors"] = size >> uapi.SECTOR_SHIFT
        p["basic"] = b
        if discard:
            p["types"] |= uapi.UBLK_PARAM_TYPE_DISCARD
            d = p["discard"]
            d["discard_granularity"] = max(block_size, 4096)
            d["max_discard_sectors"] = (1 << 30) >> uapi.SECTOR_SHIFT
            d["max_write_zeroes_sectors"] = (1 << 30) >> uapi.SECTOR_SHIFT
            d["max_discard_segments"] = 1
            p["discard"] = d
        if limits is not None:
            limits.encode(p)
        self.ctrl.set_params(dev_id, p)

    def start_dev(self, dev_id: int, timeout: float = 10.0) -> None:
        """START_DEV (blocks until every tag has a FETCH); waits for /dev/ublkbN to appear
        (for an unprivileged device, until the caller may read and write it)."""
        form = self._form(dev_id)
        with self._oneshot(timeout) as c:
            c.start_dev(dev_id, unprivileged=form)
        path = self.block_path(dev_id)
        _wait_path(path, timeout)
        # the owner of an unprivileged device gets the block device once udev handed it over
        if form and not self._udev_granted(path):
            raise os_error(errno.EACCES, f"unprivileged device {dev_id} started, but {path} "
                           f"did not become read-writable for uid {os.geteuid()}", NODE_HINT,
                           path)

    def stop_dev(self, dev_id: int) -> None:
        """STOP_DEV: /dev/ublkbN goes away, the queues' commands are aborted."""
        self.ctrl.stop_dev(dev_id)

    def del_dev(self, dev_id: int, timeout: float = 10.0) -> None:
        """Release the char device, then delete (DEL_DEV_ASYNC when the kernel has it).

        DEL_DEV_ASYNC never waits for users of /dev/ublkbN to close it; the
        synchronous DEL_DEV (older kernels) does, bounded by ``timeout``.
        """
        form = self._form(dev_id)
        self.release(dev_id)
        try:
            self.ctrl.del_dev_async(dev_id, unprivileged=form)
            return
        except UblkCommandError as exc:
            # EINVAL also: kernels whose permission check does not know DEL_DEV_ASYNC
            # refuse it for unprivileged devices
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, 524, errno.ENOTTY):
                raise
        with self._oneshot(timeout) as c:
            c.del_dev(dev_id, unprivileged=form)

    def release(self, dev_id: int) -> None:
        """Unmap the descriptor arrays and close /dev/ublkcN (what the kernel sees when a
        server exits or dies). The queues must not run any more."""
        with self._lock:
            dev = self._devs.pop(dev_id, None)
        if dev is None:
            return
        with dev.lock:
            for mm in dev.maps.values():
                try:
                    mm.close()
                except BufferError:
                    # a queue still holds a view: it is unmapped when that view goes away,
                    # never under a running queue
                    pass
            dev.maps.clear()
            if dev.fd >= 0:
                os.close(dev.fd)
                dev.fd = -1

    def start_user_recovery(self, dev_id: int, timeout: float = 10.0) -> None:
        """START_USER_RECOVERY, retried while the kernel still tears the old server down."""
        form = self._form(dev_id)
        self.release(dev_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctrl._execute("START_USER_RECOVERY", dev_id, unprivileged=form)
                return
            except UblkCommandError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    if exc.errno == errno.EBUSY:
                        raise UblkCommandError(errno.EBUSY, "START_USER_RECOVERY",
                                               "the old server still holds /dev/ublkc"
                                               f"{dev_id}: is it still running?") from None
                    raise
            time.sleep(0.05)

    def end_user_recovery(self, dev_id: int, timeout: float = 10.0) -> None:
        """END_USER_RECOVERY (blocks until every tag has a FETCH again)."""
        with self._oneshot(timeout) as c:
            c._execute("END_USER_RECOVERY", dev_id, data0=os.getpid(),
                       unprivileged=self._form(dev_id))

    def _require(self, flag: int, command: str) -> None:
        """Refuse ``command`` up front where the kernel lacks ``flag``, naming the version
        that has it."""
        if not self.features() & flag:
            raise os_error(errno.EOPNOTSUPP, command, missing_features_message(flag))

    def update_size(self, dev_id: int, sectors: int) -> None:
        """UPDATE_SIZE (6.16+, UBLK_F_UPDATE_SIZE): refused up front where the kernel lacks it."""
        self._require(uapi.UBLK_F_UPDATE_SIZE, "UPDATE_SIZE")
        self.ctrl.update_size(dev_id, sectors, unprivileged=self._form(dev_id))

    def try_stop_dev(self, dev_id: int) -> None:
        """TRY_STOP_DEV (7.0+, UBLK_F_SAFE_STOP_DEV): refused up front where the kernel lacks it."""
        self._require(uapi.UBLK_F_SAFE_STOP_DEV, "TRY_STOP_DEV")
        self.ctrl.try_stop_dev(dev_id, unprivileged=self._form(dev_id))

    def quiesce_dev(self, dev_id: int, timeout: float = 10.0) -> None:
        """QUIESCE_DEV (6.16+, UBLK_F_QUIESCE): refused up front where the kernel lacks it.
        It waits in the kernel for the queues to give their commands back, hence a ring
        of its own with a timeout."""
        self._require(uapi.UBLK_F_QUIESCE, "QUIESCE_DEV")
        with self._oneshot(timeout) as c:
            # data[0]: how long the kernel may wait for the queues, in ms (0 would be forever)
            c._execute("QUIESCE_DEV", dev_id, data0=max(1, int(timeout * 1000)),
                       unprivileged=self._form(dev_id))

    def reg_buf(self, dev_id: int, addr: int, length: int, read_only: bool = False) -> int:
        """REG_BUF (7.1+, UBLK_F_SHMEM_ZC): refused up front where the kernel lacks it."""
        self._require(uapi.UBLK_F_SHMEM_ZC, "REG_BUF")
        return self.ctrl.reg_buf(dev_id, addr, length,
                                 uapi.UBLK_SHMEM_BUF_READ_ONLY if read_only else 0,
                                 unprivileged=self._form(dev_id))

    def unreg_buf(self, dev_id: int, index: int) -> None:
        """UNREG_BUF (7.1+, UBLK_F_SHMEM_ZC)."""
        self._require(uapi.UBLK_F_SHMEM_ZC, "UNREG_BUF")
        self.ctrl.unreg_buf(dev_id, index, unprivileged=self._form(dev_id))

    def dev_info(self, dev_id: int) -> DevInfo:
        """GET_DEV_INFO + GET_PARAMS."""
        info = self.ctrl.get_dev_info(dev_id)
        basic = self.ctrl.get_params(dev_id)["basic"]
        return DevInfo(dev_id=dev_id, nr_hw_queues=info.nr_hw_queues, queue_depth=info.queue_depth,
                       state=int(info.state), max_io_buf_bytes=info.max_io_buf_bytes,
                       flags=info.flags, size=int(basic["dev_sectors"]) << uapi.SECTOR_SHIFT,
                       logical_block_size=1 << int(basic["logical_bs_shift"]),
                       attrs=int(basic["attrs"]), started=info.state == uapi.DevState.LIVE,
                       server_alive=info.ublksrv_pid > 0 and pid_alive(info.ublksrv_pid),
                       pid=info.ublksrv_pid, owner_uid=info.owner_uid, owner_gid=info.owner_gid,
                       block_path=info.block_path)

    def list_devs(self) -> list[int]:
        """Ids of every ublk device on the system (from /sys/class/ublk-char)."""
        try:
            names = os.listdir("/sys/class/ublk-char")
        except FileNotFoundError:
            return []
        return sorted(int(n[5:]) for n in names if n.startswith("ublkc") and n[5:].isdigit())

    # -- the server side ----------------------------------------------------------------

    def _dev(self, dev_id: int) -> _Dev:
        with self._lock:
            dev = self._devs.get(dev_id)
            if dev is None:   # a device added elsewhere (recovery by a new process)
                info: CtrlDevInfo = self.ctrl.get_dev_info(dev_id)
                dev = self._devs[dev_id] = _Dev(dev_id, info.nr_hw_queues, info.queue_depth,
                                                info.flags, info.max_io_buf_bytes)
            return dev

    def queue_endpoint(self, dev_id: int, q_id: int) -> QueueEndpoint:
        """Open /dev/ublkcN (once per device) and map queue q_id's descriptors."""
        dev = self._dev(dev_id)
        if not 0 <= q_id < dev.nr_queues:
            raise ValueError(f"q_id={q_id}: device {dev_id} has {dev.nr_queues} queues")
        with dev.lock:
            if dev.fd < 0:
                path = f"/dev/ublkc{dev_id}"
                _wait_path(path, 3.0)
                try:
                    dev.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except PermissionError as exc:
                    raise os_error(exc.errno, f"open {path}", "run as root, or for an "
                                   "unprivileged device as its owner (udev rules)", path) from None
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        raise os_error(errno.EBUSY, f"open {path}", "another server still "
                                       "holds it: kill it, or recover after it exited") from None
                    raise
            if q_id not in dev.maps:
                length = -(-dev.depth * IOD_SIZE // PAGE) * PAGE
                try:
                    dev.maps[q_id] = mmap.mmap(dev.fd, length, mmap.MAP_SHARED, mmap.PROT_READ,
                                               offset=q_id * QUEUE_STRIDE)
                except OSError as exc:
                    raise os_error(exc.errno, f"mmap of queue {q_id}'s descriptors on "
                                   f"/dev/ublkc{dev_id}") from None
            # the array keeps the mapping alive (and un-closable) while a queue uses it
            iods = np.frombuffer(dev.maps[q_id], np.uint8)
            return QueueEndpoint(q_id, iods, KernelChannel(
                q_id, dev.fd, auto_buf_reg=bool(dev.flags & uapi.UBLK_F_AUTO_BUF_REG)))

    # -- the user side ------------------------------------------------------------------

    def block_path(self, dev_id: int) -> str:
        return f"/dev/ublkb{dev_id}"

    def queue_limits(self, dev_id: int) -> dict[str, int]:
        queue = f"/sys/block/ublkb{dev_id}/queue"
        out = {}
        for name in QUEUE_LIMITS:
            try:
                with open(f"{queue}/{name}") as fh:
                    out[name] = int(fh.read())
            except FileNotFoundError:
                raise os_error(errno.ENODEV, f"queue limits of device {dev_id}",
                               f"{queue} does not exist (the device is not started)") from None
        return out

    def open(self, dev_id: int):
        """Open /dev/ublkb<dev_id> (O_DIRECT) as a KernelBlockDevice."""
        from .kblock import KernelBlockDevice
        return KernelBlockDevice(self.block_path(dev_id))


def pid_alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, e.g. a dead server not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_path(path: str, timeout: float) -> None:
    if not wait_for_path(path, True, timeout):
        raise os_error(errno.ETIMEDOUT, f"wait for {path}", f"it did not appear within "
                       f"{timeout} s: is devtmpfs mounted on /dev?")
