"""The ublk control plane: commands to ``/dev/ublk-control`` over an SQE128 io_uring.

Each command is an ``IORING_OP_URING_CMD`` whose 32-byte ``struct
ublksrv_ctrl_cmd`` sits in the SQE's command area; buffers it points at are
numpy arrays kept alive until the completion is reaped.  Command codes are the
ioctl-encoded ones (``UBLK_U_CMD_*``, kernel 6.4+).  Kernel errors become
:class:`UblkCommandError` (an ``OSError`` with the errno, the command's name and
a hint; also a ``PermissionError``/``FileExistsError``/... where Python has one).
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyublk_fast import uapi
from pyublk_fast._core.ring import SETUP_SQE128, Ring

CONTROL_PATH = "/dev/ublk-control"
DEFAULT_MAX_IO_BUF_BYTES = 1 << 20
DEFAULT_TIMEOUT = 30.0
"""Seconds a command may take before TimeoutError (DEL_DEV waits for users to close)."""
_NO_QUEUE = 0xFFFF            # header.queue_id for device-wide commands
_ANY_DEV = 0xFFFFFFFF         # dev_id -1: "the next free id" (ADD_DEV)
_MAX_DEV_ID = (1 << 20) - 1   # UBLK_MAX_UBLKS - 1 (MINORBITS = 20)
ENOTSUPP = 524                # kernel-internal "not supported" that may leak out

# Commands that exist only from some kernel on: what to tell the user.
_COMMAND_NEEDS: dict[str, int | str] = {
    "GET_FEATURES": "Linux 6.5",
    "DEL_DEV_ASYNC": "Linux 6.14",
    "UPDATE_SIZE": uapi.UBLK_F_UPDATE_SIZE,
    "QUIESCE_DEV": uapi.UBLK_F_QUIESCE,
    "TRY_STOP_DEV": uapi.UBLK_F_SAFE_STOP_DEV,
    "REG_BUF": uapi.UBLK_F_SHMEM_ZC,
    "UNREG_BUF": uapi.UBLK_F_SHMEM_ZC,
}


# ---- errors ------------------------------------------------------------------------
class UblkCommandError(OSError):
    """A control command failed in the kernel: ``errno``, ``command`` and ``hint``."""

    def __init__(self, err: int, command: str, hint: str = "") -> None:
        text = f"{command}: {os.strerror(err)}"
        if hint:
            text += f" ({hint})"
        super().__init__(err, text)
        self.command = command
        self.hint = hint


_ERROR_CLASSES: dict[type, type] = {}


def command_error(err: int, command: str, hint: str = "") -> UblkCommandError:
    """A :class:`UblkCommandError` that is also Python's OSError subclass for ``err``."""
    builtin = type(OSError(err, ""))
    cls: type = UblkCommandError
    if builtin is not OSError:
        cls = _ERROR_CLASSES.get(builtin) or _ERROR_CLASSES.setdefault(
            builtin, type(f"Ublk{builtin.__name__}", (UblkCommandError, builtin), {}))
    return cls(err, command, hint)


def _kernel_release() -> str:
    return os.uname().release


def _ublks_max() -> str:
    try:
        with open("/sys/module/ublk_drv/parameters/ublks_max") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _needs(command: str) -> str:
    need = _COMMAND_NEEDS.get(command)
    if isinstance(need, int):
        name = uapi.Feature(need).name
        return f"UBLK_F_{name}, Linux {uapi.KERNEL_VERSION_OF_FEATURE.get(need, '?')}+"
    return f"{need}+" if need else "a newer kernel"


def _add_dev_problems(args: dict[str, Any]) -> list[str]:
    """What in ADD_DEV's arguments the kernel is known to refuse with EINVAL."""
    out = []
    depth, queues, flags = args["depth"], args["nr_queues"], args["flags"]
    if not 1 <= depth <= uapi.UBLK_MAX_QUEUE_DEPTH:
        out.append(f"depth {depth} must be 1..{uapi.UBLK_MAX_QUEUE_DEPTH}")
    if not 1 <= queues <= uapi.UBLK_MAX_NR_QUEUES:
        out.append(f"nr_queues {queues} must be 1..{uapi.UBLK_MAX_NR_QUEUES}")
    if args["dev_id"] != -1 and args["dev_id"] > _MAX_DEV_ID:
        out.append(f"dev_id {args['dev_id']} is above {_MAX_DEV_ID}")
    rec = flags & (uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
                   | uapi.UBLK_F_USER_RECOVERY_FAIL_IO)
    if rec and (not rec & uapi.UBLK_F_USER_RECOVERY or
                rec == uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
                | uapi.UBLK_F_USER_RECOVERY_FAIL_IO):
        out.append("USER_RECOVERY_REISSUE/FAIL_IO need USER_RECOVERY, and exclude each other")
    copy = uapi.UBLK_F_USER_COPY | uapi.UBLK_F_SUPPORT_ZERO_COPY
    if flags & uapi.UBLK_F_ZONED and not flags & copy:
        out.append("ZONED needs USER_COPY or SUPPORT_ZERO_COPY (and CONFIG_BLK_DEV_ZONED)")
    if flags & uapi.UBLK_F_UNPRIVILEGED_DEV and flags & copy:
        out.append("UNPRIVILEGED_DEV excludes USER_COPY and zero copy")
    if flags & uapi.UBLK_F_AUTO_BUF_REG and not flags & uapi.UBLK_F_SUPPORT_ZERO_COPY:
        out.append("AUTO_BUF_REG needs SUPPORT_ZERO_COPY")
    return out


def hint_for(command: str, err: int, dev_id: int | None = None,
             args: dict[str, Any] | None = None) -> str:
    """A one-line explanation of ``err`` from ``command`` and what to do about it."""
    if err in (errno.EOPNOTSUPP, ENOTSUPP):
        return (f"kernel {_kernel_release()} does not support {command}: needs "
                f"{_needs(command)} (kernels before 6.4 also refuse ioctl-encoded commands)")
    if err == errno.ENODEV and dev_id is not None:
        return f"there is no ublk device {dev_id} (see /sys/class/ublk-char/)"
    if err == errno.EPERM:
        return "needs CAP_SYS_ADMIN (root), or a device added with UNPRIVILEGED_DEV"
    if err == errno.EINTR:
        return "interrupted by a signal while the kernel waited; retry"
    if command == "ADD_DEV":
        if err in (errno.ENOSPC, errno.EMFILE):
            return (f"device limit reached: ublk_drv allows ublks_max={_ublks_max()} "
                    "devices; delete unused ones or reload with `modprobe ublk_drv "
                    "ublks_max=N`")
        if err == errno.EEXIST:
            return f"device id {dev_id} is taken: pass dev_id=-1 for the next free one"
        if err == errno.EACCES:
            return "unprivileged device limit reached (unprivileged_ublks_max)"
        if err == errno.EINVAL:
            found = _add_dev_problems(args or {}) if args else []
            return "; ".join(found) if found else (
                "invalid arguments: depth 1..4096, nr_queues >= 1, known flag combinations")
    if command == "SET_PARAMS":
        if err == errno.EACCES:
            return "parameters can only be set before START_DEV"
        if err == errno.EINVAL:
            return ("invalid parameters: basic is required, logical_bs_shift 9..page shift "
                    "and <= physical_bs_shift, max_sectors <= max_io_buf_bytes/512, devt "
                    "is read-only, dma alignment 2^n-1 < 4096, segment sizes >= 4096")
    if command == "START_DEV":
        if err == errno.EEXIST:
            return "the device is already started"
        if err == errno.EINVAL:
            return "set parameters first (SET_PARAMS with basic)"
    if command == "GET_QUEUE_AFFINITY" and err == errno.EINVAL:
        return "queue_id is out of range for this device"
    if command == "UPDATE_SIZE" and err == errno.EINVAL:
        return "the device must be LIVE and added with UBLK_F_UPDATE_SIZE"
    if err == errno.EBUSY:
        return "the device is busy (being started, stopped or recovered); retry later"
    return ""


# ---- device info -----------------------------------------------------------------------
@dataclass(frozen=True)
class DevInfo:
    """``struct ublksrv_ctrl_dev_info`` as the kernel returned it."""

    dev_id: int
    nr_hw_queues: int
    queue_depth: int
    state: uapi.DevState
    max_io_buf_bytes: int
    ublksrv_pid: int
    flags: int
    ublksrv_flags: int
    owner_uid: int
    owner_gid: int
    asked_flags: int | None = None   # what ADD_DEV asked for (None for GET_DEV_INFO)

    @classmethod
    def from_record(cls, rec: np.void, asked_flags: int | None = None) -> "DevInfo":
        """Build from one DEV_INFO_DTYPE record."""
        state = int(rec["state"])
        return cls(int(rec["dev_id"]), int(rec["nr_hw_queues"]), int(rec["queue_depth"]),
                   uapi.DevState(state) if state in uapi.DevState._value2member_map_ else state,
                   int(rec["max_io_buf_bytes"]), int(rec["ublksrv_pid"]), int(rec["flags"]),
                   int(rec["ublksrv_flags"]), int(rec["owner_uid"]), int(rec["owner_gid"]),
                   asked_flags)

    @property
    def refused_flags(self) -> int:
        """Flags ADD_DEV asked for that the kernel did not grant (0 for GET_DEV_INFO)."""
        return 0 if self.asked_flags is None else self.asked_flags & ~self.flags

    @property
    def implied_flags(self) -> int:
        """Flags the kernel set without being asked (e.g. CMD_IOCTL_ENCODE)."""
        return 0 if self.asked_flags is None else self.flags & ~self.asked_flags

    @property
    def feature_names(self) -> list[str]:
        """Names of the granted flags."""
        return uapi.feature_names(self.flags)

    @property
    def char_path(self) -> str:
        """The server's character device."""
        return f"/dev/ublkc{self.dev_id}"

    @property
    def block_path(self) -> str:
        """The block device users see (after START_DEV)."""
        return f"/dev/ublkb{self.dev_id}"


# ---- the control device ------------------------------------------------------------------
class UblkControl:
    """An open ``/dev/ublk-control`` plus a private SQE128 ring; one command at a time."""

    def __init__(self, path: str = CONTROL_PATH, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"{path} missing: ublk driver not loaded: run `modprobe "
                "ublk_drv` (needs CONFIG_BLK_DEV_UBLK)", path) from None
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"no permission to open {path}: run as root, or use "
                "UNPRIVILEGED_DEV with udev rules that grant access", path) from None
        try:
            self._ring = Ring(8, SETUP_SQE128)
        except BaseException:
            os.close(self._fd)
            raise
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_ud = 1
        self._inflight: dict[int, Any] = {}   # user_data -> buffers the kernel may still use

    # -- plumbing
    def close(self) -> None:
        """Close the ring and the control device (idempotent)."""
        with self._lock:
            if self._fd >= 0:
                self._ring.close()
                os.close(self._fd)
                self._fd = -1
                self._inflight.clear()

    def __enter__(self) -> "UblkControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _execute(self, command: str, dev_id: int, buf: np.ndarray | None = None,
                 data0: int = 0, args: dict[str, Any] | None = None) -> int:
        if self._fd < 0:
            raise ValueError("UblkControl is closed")
        op = getattr(uapi, f"UBLK_U_CMD_{command}")
        cmd = np.zeros(1, uapi.CTRL_CMD_DTYPE)
        cmd["dev_id"] = dev_id & 0xFFFFFFFF
        cmd["queue_id"] = _NO_QUEUE
        if buf is not None:
            cmd["addr"] = buf.ctypes.data
            cmd["len"] = buf.nbytes
        cmd["data"][0, 0] = data0
        with self._lock:
            ud = self._next_ud
            self._next_ud += 1
            self._inflight[ud] = buf
            self._ring.prep_uring_cmd(self._fd, op, cmd.tobytes(), ud)
            res = self._wait_for(ud, command)
        if res < 0:
            raise command_error(-res, command, hint_for(command, -res, dev_id, args))
        return res

    def _wait_for(self, ud: int, command: str) -> int:
        ring = self._ring
        while True:
            try:
                n = ring.wait(1, self.timeout)
            except TimeoutError:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"{command}: no answer from the kernel within "
                    f"{self.timeout} s (DEL_DEV waits until /dev/ublkbN is closed; "
                    "START_DEV until every queue has fetched)") from None
            found = None
            for i in range(n):
                done = int(ring.cqe_user_data[i])
                self._inflight.pop(done, None)     # late answers to timed-out commands
                if done == ud:
                    found = int(ring.cqe_res[i])
            if found is not None:
                return found

    # -- commands
    def get_features(self) -> int:
        """The UBLK_F_* flags this kernel supports (decode with uapi.feature_names)."""
        buf = np.zeros(1, np.uint64)
        self._execute("GET_FEATURES", _ANY_DEV, buf)
        return int(buf[0])

    def add_dev(self, dev_id: int = -1, nr_queues: int = 1, depth: int = 128,
                max_io_buf_bytes: int = DEFAULT_MAX_IO_BUF_BYTES, flags: int = 0) -> DevInfo:
        """Create a device (state DEAD until START_DEV); returns what the kernel filled in.

        ``dev_id=-1`` takes the next free id.  The kernel clears flags it does not
        know and adds some: see ``DevInfo.refused_flags`` / ``implied_flags``.
        """
        _check_int("dev_id", dev_id, -1, 0xFFFFFFFE)
        _check_int("nr_queues", nr_queues, 0, 0xFFFF)
        _check_int("depth", depth, 0, 0xFFFF)
        _check_int("max_io_buf_bytes", max_io_buf_bytes, 0, 0xFFFFFFFF)
        _check_int("flags", flags, 0, (1 << 64) - 1)
        if flags & uapi.SIM_FEATURE_MASK:
            raise ValueError(f"flags {flags:#x} include simulator-only bits "
                             f"({uapi.SIM_FEATURE_MASK:#x}): mask them off for a real kernel")
        info = np.zeros(1, uapi.DEV_INFO_DTYPE)
        info["dev_id"] = dev_id & 0xFFFFFFFF
        info["nr_hw_queues"] = nr_queues
        info["queue_depth"] = depth
        info["max_io_buf_bytes"] = max_io_buf_bytes
        info["ublksrv_pid"] = os.getpid()
        info["flags"] = flags
        args = dict(dev_id=dev_id, nr_queues=nr_queues, depth=depth, flags=flags)
        self._execute("ADD_DEV", dev_id, info, args=args)
        return DevInfo.from_record(info[0], asked_flags=flags)

    def del_dev(self, dev_id: int) -> None:
        """Delete a device; waits until the kernel has released its id."""
        self._execute("DEL_DEV", _dev(dev_id))

    def del_dev_async(self, dev_id: int) -> None:
        """Delete a device without waiting for its id to be freed."""
        self._execute("DEL_DEV_ASYNC", _dev(dev_id))

    def get_dev_info(self, dev_id: int) -> DevInfo:
        """The device's current ``ublksrv_ctrl_dev_info`` (state, pid, flags...)."""
        info = np.zeros(1, uapi.DEV_INFO_DTYPE)
        self._execute("GET_DEV_INFO", _dev(dev_id), info)
        return DevInfo.from_record(info[0])

    def set_params(self, dev_id: int, params: np.ndarray | np.void) -> None:
        """SET_PARAMS from a PARAMS_DTYPE record (``len`` 0 means the whole struct)."""
        buf = np.zeros(1, uapi.PARAMS_DTYPE)
        try:
            buf[0] = params if isinstance(params, np.void) else np.asarray(params).reshape(-1)[0]
        except (TypeError, ValueError, IndexError) as exc:
            raise TypeError("params must be a uapi.PARAMS_DTYPE record or 1-element array "
                            f"({exc})") from None
        if buf[0]["len"] == 0:
            buf["len"] = uapi.PARAMS_DTYPE.itemsize
        self._execute("SET_PARAMS", _dev(dev_id), buf)

    def get_params(self, dev_id: int) -> np.void:
        """The device's ``struct ublk_params`` (devt filled in by the kernel)."""
        buf = np.zeros(1, uapi.PARAMS_DTYPE)
        buf["len"] = uapi.PARAMS_DTYPE.itemsize
        self._execute("GET_PARAMS", _dev(dev_id), buf)
        return buf[0]

    def start_dev(self, dev_id: int, pid: int | None = None) -> None:
        """Make /dev/ublkbN appear; blocks until every queue's FETCH commands are in.

        ``pid`` is the server's (6.17+: the process that opened /dev/ublkcN).
        """
        self._execute("START_DEV", _dev(dev_id), data0=os.getpid() if pid is None else pid)

    def stop_dev(self, dev_id: int) -> None:
        """Remove /dev/ublkbN and abort the server's outstanding commands."""
        self._execute("STOP_DEV", _dev(dev_id))

    def update_size(self, dev_id: int, sectors: int) -> None:
        """Resize a LIVE device to ``sectors`` 512-byte sectors (UBLK_F_UPDATE_SIZE)."""
        _check_int("sectors", sectors, 0, (1 << 64) - 1)
        self._execute("UPDATE_SIZE", _dev(dev_id), data0=sectors)

    def get_queue_affinity(self, dev_id: int, queue_id: int) -> set[int]:
        """CPUs whose I/O goes to queue ``queue_id``."""
        _check_int("queue_id", queue_id, 0, 0xFFFF)
        ncpu = os.cpu_count() or 1
        words = max(1, -(-max(ncpu, 1024) // 64))      # cpumask in u64 words
        buf = np.zeros(words, np.uint64)
        self._execute("GET_QUEUE_AFFINITY", _dev(dev_id), buf, data0=queue_id)
        bits = np.unpackbits(buf.view(np.uint8), bitorder="little")
        return {int(i) for i in np.flatnonzero(bits)}


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value} is out of range {lo}..{hi}")


def _dev(dev_id: int) -> int:
    _check_int("dev_id", dev_id, 0, 0xFFFFFFFE)
    return int(dev_id)
