"""The ublk control plane: commands to ``/dev/ublk-control`` over an SQE128 io_uring.

Each command is an ``IORING_OP_URING_CMD`` whose 32-byte ``struct
ublksrv_ctrl_cmd`` sits in the SQE's command area; buffers it points at are
numpy arrays kept alive until the completion is reaped.  Command codes are the
ioctl-encoded ones (``UBLK_U_CMD_*``, kernel 6.4+).  Kernel errors become
:class:`UblkCommandError` (an ``OSError`` with the errno, the command's name and
a hint; also a ``PermissionError``/``FileExistsError``/... where Python has one).

Unprivileged devices (``UBLK_F_UNPRIVILEGED_DEV``): every command but ADD_DEV and
GET_FEATURES names the device's char node: the buffer at ``addr`` starts with
``"/dev/ublkcN\\0"`` (``dev_path_len`` bytes, NUL included), the command's own
payload follows and ``len`` covers both; GET_DEV_INFO becomes GET_DEV_INFO2.  The
kernel checks the caller's access to that node (read, or read-write for commands
that change the device).  :class:`UblkControl` picks the form per device: the one
ADD_DEV granted, or, for a device added elsewhere, the path form once a command in
the plain form was refused and GET_DEV_INFO2 shows the flag.
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
from pyublk_fast.errors import errno_message, os_error
from pyublk_fast.util import kernel_release

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


#: Commands on a device's block device: ENODEV also when it has none (not started, stopped).
_NEED_DISK = ("UPDATE_SIZE", "QUIESCE_DEV", "TRY_STOP_DEV")


#: What the 7.2 driver's REG_BUF / UNREG_BUF refusals mean.
_SHMEM_HINTS = {
    ("REG_BUF", errno.EINVAL): "the buffer's address and length must be nonzero multiples of "
    "the page size, flags only READ_ONLY",
    ("REG_BUF", errno.EFAULT): "the range is not wholly mapped in this process, or is mapped "
    "read-only (register it read_only)",
    ("REG_BUF", errno.EEXIST): "part of the range is already registered on this device",
    ("REG_BUF", errno.EOPNOTSUPP): "the device was added without UBLK_F_SHMEM_ZC",
    ("UNREG_BUF", errno.ENOENT): "no buffer of that index is registered on this device",
    ("UNREG_BUF", errno.EINVAL): "buffer indexes are 0..65535",
}


# ---- errors ------------------------------------------------------------------------
class UblkCommandError(OSError):
    """A control command failed in the kernel: ``errno``, ``command`` and ``hint``."""

    def __init__(self, err: int, command: str, hint: str = "") -> None:
        super().__init__(err, errno_message(err, command, hint))
        self.command = command
        self.hint = hint


_ERROR_CLASSES: dict[type, type] = {}


def command_error(err: int, command: str, hint: str = "") -> UblkCommandError:
    """A :class:`UblkCommandError` that is also Python's OSError subclass for ``err``."""
    builtin = type(os_error(err, command))
    cls: type = UblkCommandError
    if builtin is not OSError:
        cls = _ERROR_CLASSES.get(builtin) or _ERROR_CLASSES.setdefault(
            builtin, type(f"Ublk{builtin.__name__}", (UblkCommandError, builtin), {}))
    return cls(err, command, hint)


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
    if (command, err) in _SHMEM_HINTS:
        return _SHMEM_HINTS[command, err]
    if err in (errno.EOPNOTSUPP, ENOTSUPP):
        return (f"kernel {kernel_release()} does not support {command}: needs "
                f"{_needs(command)} (kernels before 6.4 also refuse ioctl-encoded commands)")
    if err == errno.ENODEV and dev_id is not None:
        if command in _NEED_DISK:
            return (f"there is no ublk device {dev_id}, or it has no block device (not "
                    "started, or stopped)")
        return f"there is no ublk device {dev_id} (see /sys/class/ublk-char/)"
    if err == errno.EPERM:
        if command == "ADD_DEV":
            return ("needs CAP_SYS_ADMIN (root); a normal user must ask for UNPRIVILEGED_DEV "
                    "(--unprivileged)")
        return "needs CAP_SYS_ADMIN (root), or a device added with UNPRIVILEGED_DEV"
    if err == errno.EINTR:
        return "interrupted by a signal while the kernel waited; retry"
    if err == errno.EACCES and dev_id is not None and command not in ("ADD_DEV", "SET_PARAMS"):
        return (f"no access to /dev/ublkc{dev_id}: commands on an unprivileged device need "
                "read-write access to its char node (read for GET_*), which a udev rule gives "
                "the device's owner; other users cannot control it")
    if err == errno.ENOENT and dev_id is not None:
        return (f"/dev/ublkc{dev_id} is missing: an unprivileged device is named by its char "
                "node, which must exist in this mount namespace")
    if command == "ADD_DEV":
        if err in (errno.ENOSPC, errno.EMFILE):
            return (f"device limit reached: ublk_drv allows ublks_max={_ublks_max()} "
                    "devices; delete unused ones or reload with `modprobe ublk_drv "
                    "ublks_max=N`")
        if err == errno.EEXIST:
            return f"device id {dev_id} is taken: pass dev_id=-1 for the next free one"
        if err == errno.EACCES:
            return (f"unprivileged device limit reached: ublk_drv allows ublks_max="
                    f"{_ublks_max()} unprivileged devices; delete unused ones, or as root raise "
                    "it: `echo N > /sys/module/ublk_drv/parameters/ublks_max`")
        if err == errno.EINVAL:
            found = _add_dev_problems(args or {}) if args else []
            return "; ".join(found) if found else (
                "invalid arguments: depth 1..4096, nr_queues >= 1, known flag combinations")
    if command == "SET_PARAMS":
        if err == errno.EACCES:
            return ("parameters can only be set before START_DEV (or, for an unprivileged "
                    f"device, the caller lacks read-write access to /dev/ublkc{dev_id})")
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
    if command == "TRY_STOP_DEV" and err == errno.EBUSY:
        return (f"/dev/ublkb{dev_id} is open or mounted: close or unmount it first (STOP_DEV "
                "stops it anyway)")
    if err == errno.EBUSY:
        return "the device is busy (being started, stopped or recovered); retry later"
    return ""


# ---- command encoding ------------------------------------------------------------------
def char_dev_path(dev_id: int) -> bytes:
    """``b"/dev/ublkcN\\0"``: how an unprivileged device's commands name it."""
    return f"/dev/ublkc{dev_id}".encode() + b"\0"


def path_form_buffer(dev_id: int, payload: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(buffer, dev_path_len) for an unprivileged device's command: the NUL-terminated
    char device path, then ``payload``'s bytes (none for commands without a buffer)."""
    path = char_dev_path(dev_id)
    body = b"" if payload is None else payload.reshape(-1).view(np.uint8).tobytes()
    if len(path) + len(body) > 0xFFFF:
        raise ValueError(f"command buffer of {len(path) + len(body)} bytes does not fit "
                         "ublksrv_ctrl_cmd.len (u16)")
    return np.frombuffer(path + body, np.uint8).copy(), len(path)


def ctrl_cmd(dev_id: int, buf: np.ndarray | None, data0: int = 0,
             dev_path_len: int = 0) -> np.ndarray:
    """The 32-byte ``struct ublksrv_ctrl_cmd`` (one CTRL_CMD_DTYPE record) for a device-wide
    command on ``dev_id`` whose buffer is ``buf``."""
    cmd = np.zeros(1, uapi.CTRL_CMD_DTYPE)
    cmd["dev_id"] = dev_id & 0xFFFFFFFF
    cmd["queue_id"] = _NO_QUEUE
    if buf is not None:
        cmd["addr"] = buf.ctypes.data
        cmd["len"] = buf.nbytes
    cmd["data"][0, 0] = data0
    cmd["dev_path_len"] = dev_path_len
    return cmd


# ---- device info -----------------------------------------------------------------------
@dataclass(frozen=True)
class CtrlDevInfo:
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
    def from_record(cls, rec: np.void, asked_flags: int | None = None) -> "CtrlDevInfo":
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
            raise os_error(errno.ENOENT, f"open {path}", "ublk driver not loaded: run "
                           "`modprobe ublk_drv`, which needs CONFIG_BLK_DEV_UBLK", path) from None
        except PermissionError as exc:
            raise os_error(exc.errno, f"no permission to open {path} (uid {os.geteuid()})",
                           "run as root, or use UNPRIVILEGED_DEV (--unprivileged) and add a "
                           'udev rule that opens it to users, e.g. KERNEL=="ublk-control", '
                           'MODE="0666"', path) from None
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
        self._path_form: dict[int, bool] = {}  # dev_id -> commands carry /dev/ublkcN

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
                 data0: int = 0, args: dict[str, Any] | None = None,
                 unprivileged: bool | None = False) -> int:
        """Run one command; ``unprivileged``: True path form, False plain, None as the
        device needs (see :meth:`uses_path_form`)."""
        if unprivileged is None:
            unprivileged = self._path_form.get(dev_id)
            if unprivileged is None:
                try:
                    return self._execute(command, dev_id, buf, data0, args, False)
                except UblkCommandError as exc:
                    # what an unprivileged device answers to the plain form: the kernel
                    # refused it in its permission check, before doing anything
                    if exc.errno != errno.EINVAL:
                        raise
                    if not self.uses_path_form(dev_id):
                        raise
                    unprivileged = True
            return self._execute(command, dev_id, buf, data0, args, unprivileged)
        if self._fd < 0:
            raise ValueError("UblkControl is closed")
        sent = buf
        plen = 0
        if unprivileged:
            sent, plen = path_form_buffer(dev_id, buf)
            if command == "GET_DEV_INFO":
                command = "GET_DEV_INFO2"
        op = getattr(uapi, f"UBLK_U_CMD_{command}")
        cmd = ctrl_cmd(dev_id, sent, data0, plen)
        with self._lock:
            ud = self._next_ud
            self._next_ud += 1
            self._inflight[ud] = sent
            self._ring.prep_uring_cmd(self._fd, op, cmd.tobytes(), ud)
            res = self._wait_for(ud, command)
        if res < 0:
            raise command_error(-res, command, hint_for(command, -res, dev_id, args))
        if plen and buf is not None:      # what the kernel wrote after the path
            buf.reshape(-1).view(np.uint8)[:] = sent[plen:]
        return res

    def uses_path_form(self, dev_id: int) -> bool:
        """Whether commands for ``dev_id`` must carry its char device path (an
        unprivileged device); asks GET_DEV_INFO2 once and remembers the answer."""
        known = self._path_form.get(dev_id)
        if known is not None:
            return known
        info = np.zeros(1, uapi.DEV_INFO_DTYPE)
        try:
            self._execute("GET_DEV_INFO2", dev_id, info, unprivileged=True)
        except UblkCommandError as exc:
            if exc.errno == errno.EACCES:      # the path check ran: an unprivileged device
                return True
            return False                       # no device, no permission, no GET_DEV_INFO2
        flag = bool(int(info[0]["flags"]) & uapi.UBLK_F_UNPRIVILEGED_DEV)
        self._path_form[dev_id] = flag
        return flag

    def _wait_for(self, ud: int, command: str) -> int:
        ring = self._ring
        while True:
            try:
                n = ring.wait(1, self.timeout)
            except TimeoutError:
                raise os_error(errno.ETIMEDOUT, command, f"no answer from the kernel within "
                               f"{self.timeout} s: DEL_DEV waits until /dev/ublkbN is closed, "
                               "START_DEV until every queue has fetched") from None
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
                max_io_buf_bytes: int = DEFAULT_MAX_IO_BUF_BYTES, flags: int = 0) -> CtrlDevInfo:
        """Create a device (state DEAD until START_DEV); returns what the kernel filled in.

        ``dev_id=-1`` takes the next free id.  The kernel clears flags it does not
        know and adds some: see ``CtrlDevInfo.refused_flags`` / ``implied_flags``.
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
        granted = CtrlDevInfo.from_record(info[0], asked_flags=flags)
        self._path_form[granted.dev_id] = bool(granted.flags & uapi.UBLK_F_UNPRIVILEGED_DEV)
        return granted

    def del_dev(self, dev_id: int, unprivileged: bool | None = None) -> None:
        """Delete a device; waits until the kernel has released its id.

        ``unprivileged`` (every device command takes it): True sends the path form,
        False the plain one, None (default) what the device needs.
        """
        self._execute("DEL_DEV", _dev(dev_id), unprivileged=unprivileged)
        self._path_form.pop(dev_id, None)

    def del_dev_async(self, dev_id: int, unprivileged: bool | None = None) -> None:
        """Delete a device without waiting for its id to be freed."""
        self._execute("DEL_DEV_ASYNC", _dev(dev_id), unprivileged=unprivileged)
        self._path_form.pop(dev_id, None)

    def get_dev_info(self, dev_id: int, unprivileged: bool | None = None) -> CtrlDevInfo:
        """The device's current ``ublksrv_ctrl_dev_info`` (state, pid, flags, owner...);
        GET_DEV_INFO2 for an unprivileged device."""
        info = np.zeros(1, uapi.DEV_INFO_DTYPE)
        self._execute("GET_DEV_INFO", _dev(dev_id), info, unprivileged=unprivileged)
        return CtrlDevInfo.from_record(info[0])

    def get_dev_info2(self, dev_id: int) -> CtrlDevInfo:
        """GET_DEV_INFO2 (Linux 6.5+): always names /dev/ublkcN, works for any device
        whose char node the caller may read (root: all)."""
        info = np.zeros(1, uapi.DEV_INFO_DTYPE)
        self._execute("GET_DEV_INFO2", _dev(dev_id), info, unprivileged=True)
        return CtrlDevInfo.from_record(info[0])

    def set_params(self, dev_id: int, params: np.ndarray | np.void,
                   unprivileged: bool | None = None) -> None:
        """SET_PARAMS from a PARAMS_DTYPE record (``len`` 0 means the whole struct)."""
        buf = np.zeros(1, uapi.PARAMS_DTYPE)
        try:
            buf[0] = params if isinstance(params, np.void) else np.asarray(params).reshape(-1)[0]
        except (TypeError, ValueError, IndexError) as exc:
            raise TypeError("params must be a uapi.PARAMS_DTYPE record or 1-element array "
                            f"({exc})") from None
        if buf[0]["len"] == 0:
            buf["len"] = uapi.PARAMS_DTYPE.itemsize
        self._execute("SET_PARAMS", _dev(dev_id), buf, unprivileged=unprivileged)

    def get_params(self, dev_id: int, unprivileged: bool | None = None) -> np.void:
        """The device's ``struct ublk_params`` (devt filled in by the kernel)."""
        buf = np.zeros(1, uapi.PARAMS_DTYPE)
        buf["len"] = uapi.PARAMS_DTYPE.itemsize
        self._execute("GET_PARAMS", _dev(dev_id), buf, unprivileged=unprivileged)
        return buf[0]

    def start_dev(self, dev_id: int, pid: int | None = None,
                  unprivileged: bool | None = None) -> None:
        """Make /dev/ublkbN appear; blocks until every queue's FETCH commands are in.

        ``pid`` is the server's (6.17+: the process that opened /dev/ublkcN).
        """
        self._execute("START_DEV", _dev(dev_id), data0=os.getpid() if pid is None else pid,
                      unprivileged=unprivileged)

    def stop_dev(self, dev_id: int, unprivileged: bool | None = None) -> None:
        """Remove /dev/ublkbN and abort the server's outstanding commands."""
        self._execute("STOP_DEV", _dev(dev_id), unprivileged=unprivileged)

    def try_stop_dev(self, dev_id: int, unprivileged: bool | None = None) -> None:
        """STOP_DEV unless /dev/ublkbN is open: then EBUSY (UBLK_F_SAFE_STOP_DEV, Linux 7.0+)."""
        self._execute("TRY_STOP_DEV", _dev(dev_id), unprivileged=unprivileged)

    def update_size(self, dev_id: int, sectors: int, unprivileged: bool | None = None) -> None:
        """Set a started device's capacity to ``sectors`` 512-byte sectors
        (UBLK_F_UPDATE_SIZE, Linux 6.16+)."""
        _check_int("sectors", sectors, 0, (1 << 64) - 1)
        self._execute("UPDATE_SIZE", _dev(dev_id), data0=sectors, unprivileged=unprivileged)

    def reg_buf(self, dev_id: int, addr: int, length: int, flags: int = 0,
                unprivileged: bool | None = None) -> int:
        """REG_BUF (UBLK_F_SHMEM_ZC, Linux 7.1+): pin ``length`` bytes of shared memory at
        ``addr`` in this process; requests whose pages all lie there arrive flagged
        UBLK_IO_F_SHMEM_ZC with (index, offset) instead of a copy. Returns the index."""
        _check_int("addr", addr, 0, (1 << 64) - 1)
        _check_int("length", length, 0, (1 << 64) - 1)
        _check_int("flags", flags, 0, 0xFFFFFFFF)
        reg = np.zeros(1, uapi.SHMEM_BUF_REG_DTYPE)
        reg["addr"] = addr
        reg["len"] = length
        reg["flags"] = flags
        return self._execute("REG_BUF", _dev(dev_id), reg, unprivileged=unprivileged)

    def unreg_buf(self, dev_id: int, index: int, unprivileged: bool | None = None) -> None:
        """UNREG_BUF: unpin buffer ``index`` of the device (requests in flight finish first)."""
        _check_int("index", index, 0, (1 << 64) - 1)
        self._execute("UNREG_BUF", _dev(dev_id), data0=index, unprivileged=unprivileged)

    def get_queue_affinity(self, dev_id: int, queue_id: int,
                           unprivileged: bool | None = None) -> set[int]:
        """CPUs whose I/O goes to queue ``queue_id``."""
        _check_int("queue_id", queue_id, 0, 0xFFFF)
        ncpu = os.cpu_count() or 1
        words = max(1, -(-max(ncpu, 1024) // 64))      # cpumask in u64 words
        buf = np.zeros(words, np.uint64)
        self._execute("GET_QUEUE_AFFINITY", _dev(dev_id), buf, data0=queue_id,
                      unprivileged=unprivileged)
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
