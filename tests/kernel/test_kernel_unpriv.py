"""Unprivileged ublk devices (UBLK_F_UNPRIVILEGED_DEV) on a real kernel, run by a normal user.

The user's side runs in a forked child that dropped to uid/gid 65534 (everything is
imported before the fork, so the child needs no access to this checkout or Python).
Root's side does what udev rules do on a real system: /dev/ublk-control is made
world read-writable, and a watcher chowns /dev/ublkcN and /dev/ublkbN of unprivileged
devices to their owner_uid (from GET_DEV_INFO2) as soon as they appear.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import subprocess
import tempfile
import threading
import time

import pytest

import pyublk_fast.backends  # noqa: F401  (the CLI imports these lazily: load before forking)
import pyublk_fast.backends.loop  # noqa: F401
import pyublk_fast.backends.null  # noqa: F401
from asuser import as_user
from kernel_fixtures import MiB, delete_devices_left, fio, fio_verify_args
from pyublk_fast import cli, uapi
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.control import UblkControl
from pyublk_fast.transport.kernel import KernelTransport
from pyublk_fast.util import wait_for_path

USER, OTHER = 65534, 65533
CONTROL = "/dev/ublk-control"
UBLKS_MAX = "/sys/module/ublk_drv/parameters/ublks_max"


# ---- running code as another user ---------------------------------------------------------
def user_cli(run_dir: str, *args: str) -> tuple[int, str, str]:
    """python -m pyublk_fast ARGS inside the current (already uid-dropped) process."""
    os.environ["PYUBLK_FAST_RUN_DIR"] = run_dir
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _dev_id_of(path: str) -> int:
    assert path.startswith("/dev/ublkb"), path
    return int(path[len("/dev/ublkb"):])


# ---- root's side: what udev does ------------------------------------------------------------
def _root_owned(path: str) -> bool:
    """Whether the node exists and still belongs to root (it may vanish at any moment)."""
    try:
        return os.stat(path).st_uid == 0
    except FileNotFoundError:
        return False


class UdevStandIn:
    """Chowns the nodes of unprivileged devices to their owner, like ublksrv's udev rule."""

    def __init__(self) -> None:
        self.ctrl = UblkControl()
        self.stop = threading.Event()
        self.chowned: list[str] = []
        self.thread = threading.Thread(target=self._run, name="udev-stand-in", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            try:
                names = os.listdir("/sys/class/ublk-char")
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith("ublkc") and name[5:].isdigit():
                    self._handle(int(name[5:]))

    def _handle(self, dev_id: int) -> None:
        """chown a new device's nodes to its owner, as a udev rule would."""
        nodes = [f"/dev/ublkc{dev_id}", f"/dev/ublkb{dev_id}"]
        todo = [p for p in nodes if _root_owned(p)]
        if not todo:
            return
        try:
            info = self.ctrl.get_dev_info2(dev_id)
        except OSError:
            return                       # being deleted, or not ready
        if not info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV:
            return
        for p in todo:
            try:
                os.chown(p, info.owner_uid, info.owner_gid)
                self.chowned.append(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.ctrl.close()


@pytest.fixture
def udev():
    """/dev/ublk-control open to users and device nodes handed to their owners; devices
    added during the test are deleted by root afterwards."""
    old_mode = stat.S_IMODE(os.stat(CONTROL).st_mode)
    os.chmod(CONTROL, 0o666)
    stand_in = UdevStandIn()
    with KernelTransport() as t:
        before = set(t.list_devs())
    try:
        yield stand_in
    finally:
        stand_in.close()
        os.chmod(CONTROL, old_mode)
        with KernelTransport() as t:
            delete_devices_left(t, before)


@pytest.fixture
def run_dir():
    """A state directory (and scratch space) the test user owns."""
    d = tempfile.mkdtemp(prefix="pyublk-unpriv-")
    os.chmod(d, 0o755)
    os.chown(d, USER, USER)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


# ---- the user's side ------------------------------------------------------------------------
def _write_read_back(path: str, offset: int, size: int) -> tuple[bytes, bytes]:
    """Write random bytes through the block device, fsync, read them back with O_DIRECT
    (past the page cache, so from the server)."""
    data = os.urandom(size)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == size
        os.fsync(fd)
    finally:
        os.close(fd)
    import mmap
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == size
    finally:
        os.close(fd)
    return data, bytes(buf)


def _user_info(dev_id: int):
    with UblkControl() as c:
        info = c.get_dev_info(dev_id)          # GET_DEV_INFO2 with the path form
        params = c.get_params(dev_id)
    return (info.owner_uid, info.owner_gid, info.flags, int(info.state),
            int(params["basic"]["dev_sectors"]) << uapi.SECTOR_SHIFT)


@pytest.mark.parametrize("target", ["memory", "loop", "null"])
def test_cli_add_verify_list_del(udev, run_dir, target):
    args = ["add", "-t", target, "--unprivileged"]
    img = os.path.join(run_dir, "disk.img")
    if target == "loop":
        with open(img, "wb") as fh:
            fh.truncate(16 * MiB)
        os.chown(img, USER, USER)
        args += ["-f", img]
    else:
        args += ["-s", "16M"]
    code, out, err = as_user(USER, user_cli, run_dir, *args)
    assert code == 0, out + err
    path = out.strip().splitlines()[-1]
    dev_id = _dev_id_of(path)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (USER, USER), "the udev stand-in did not chown the node"

    # GET_DEV_INFO2 as the owner: the kernel recorded who added it
    owner_uid, owner_gid, flags, state, size = as_user(USER, _user_info, dev_id)
    assert (owner_uid, owner_gid) == (USER, USER)
    assert flags & uapi.UBLK_F_UNPRIVILEGED_DEV
    assert not flags & (uapi.UBLK_F_USER_COPY | uapi.UBLK_F_SUPPORT_ZERO_COPY)
    assert state == uapi.DevState.LIVE and size == 16 * MiB

    # data through /dev/ublkbN, as the owner
    if target == "null":                       # null keeps nothing: I/O only
        as_user(USER, fio, "--name=n", f"--filename={path}", "--rw=randrw", "--bs=4k",
                "--size=4M", "--ioengine=io_uring", "--direct=1", cwd=run_dir)
    else:
        data, back = as_user(USER, _write_read_back, path, 13 * MiB + 4096, 1 * MiB)
        assert back == data
        as_user(USER, fio, *fio_verify_args(path), cwd=run_dir)

    # list, as the owner
    code, out, err = as_user(USER, user_cli, run_dir, "list", "--json")
    assert code == 0, err
    row = {r["dev_id"]: r for r in json.loads(out)}[dev_id]
    assert row["owner_uid"] == USER and row["state_name"] == "LIVE", row
    assert "UNPRIVILEGED_DEV" in row["features"] and row["target"] == target, row

    # another user can neither delete nor stop it
    with pytest.raises(PermissionError) as ei:
        as_user(OTHER, lambda: UblkControl().del_dev(dev_id))
    assert ei.value.errno == errno.EACCES and f"/dev/ublkc{dev_id}" in str(ei.value)
    other_dir = tempfile.mkdtemp(prefix="pyublk-other-")
    os.chown(other_dir, OTHER, OTHER)
    try:
        code, out, err = as_user(OTHER, user_cli, other_dir, "del", "-n", str(dev_id))
    finally:
        subprocess.run(["rm", "-rf", other_dir], check=False)
    assert code == 1 and "Permission denied" in err, out + err
    assert as_user(USER, _user_info, dev_id)[3] == uapi.DevState.LIVE

    # the owner deletes it
    code, out, err = as_user(USER, user_cli, run_dir, "del", "-n", str(dev_id))
    assert code == 0, out + err
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)
    if target == "loop":                       # the bytes reached the backing file
        with open(img, "rb") as fh:
            fh.seek(13 * MiB + 4096)
            assert fh.read(len(data)) == data


def _in_process_memory_device() -> tuple[int, bool, int, int]:
    """Device(MemoryBackend) over KernelTransport(unprivileged=True), in this process."""
    backend = MemoryBackend(8 * MiB)
    with KernelTransport(unprivileged=True) as t:
        dev = Device(backend, t).start()
        try:
            data, back = _write_read_back(t.block_path(dev.dev_id), 1 * MiB, 256 * 1024)
            in_backend = bytes(backend.data[1 * MiB:1 * MiB + len(data)]) == data
            info = t.dev_info(dev.dev_id)
        finally:
            dev.stop()
        gone = wait_for_path(f"/dev/ublkc{dev.dev_id}", False, 10)
    return dev.dev_id, back == data and in_backend and gone, info.owner_uid, info.flags


def test_in_process_device(udev):
    dev_id, ok, owner, flags = as_user(USER, _in_process_memory_device)
    assert ok, "bytes read back (or found in the backend) differ, or the device stayed"
    assert owner == USER and flags & uapi.UBLK_F_UNPRIVILEGED_DEV
    assert f"/dev/ublkc{dev_id}" in udev.chowned and f"/dev/ublkb{dev_id}" in udev.chowned


def test_root_reads_and_deletes_a_users_device(udev, run_dir):
    """Root needs the path form too for an unprivileged device; UblkControl finds out."""
    code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", "null", "--unprivileged")
    assert code == 0, out + err
    dev_id = _dev_id_of(out.strip().splitlines()[-1])
    with UblkControl() as c:
        info = c.get_dev_info(dev_id)         # plain GET_DEV_INFO refused, then GET_DEV_INFO2
        assert info.owner_uid == USER and info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV
        assert c.uses_path_form(dev_id)
        with pytest.raises(OSError) as ei:
            c.get_dev_info(dev_id, unprivileged=False)
        assert ei.value.errno == errno.EINVAL  # what the kernel says to the plain form
    root_env = dict(os.environ, PYUBLK_FAST_RUN_DIR=os.path.join(run_dir, "root-view"))
    from kernel_fixtures import cli as root_cli
    res = root_cli("del", "-n", str(dev_id), env=root_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)


def _raw_add(flags: int):
    with UblkControl() as c:
        return c.add_dev(-1, 1, 8, 1 << 20, flags | uapi.UBLK_F_CMD_IOCTL_ENCODE)


def _transport_add(flags: int):
    with KernelTransport(unprivileged=True) as t:
        return t.add_dev(-1, 1, 8, 1 << 20, flags)


@pytest.mark.parametrize("flag,opt,name", [(uapi.UBLK_F_USER_COPY, "-u", "USER_COPY"),
                                           (uapi.UBLK_F_SUPPORT_ZERO_COPY, "-z", "zero copy")])
def test_copy_paths_refused(udev, run_dir, flag, opt, name):
    code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", "null", "--unprivileged", opt)
    assert code == 1 and "cannot use -z or -u" in err and "/dev/ublkcN" in err, err
    with pytest.raises(ValueError, match=f"unprivileged device cannot use {name}"):
        as_user(USER, _transport_add, flag)
    # what the kernel itself says when asked anyway
    with pytest.raises(OSError) as ei:
        as_user(USER, _raw_add, flag | uapi.UBLK_F_UNPRIVILEGED_DEV)
    assert ei.value.errno == errno.EINVAL
    assert "UNPRIVILEGED_DEV excludes USER_COPY and zero copy" in str(ei.value)


def test_kernel_drops_recovery_for_unprivileged(udev):
    info = as_user(USER, _raw_add, uapi.UBLK_F_UNPRIVILEGED_DEV | uapi.UBLK_F_USER_RECOVERY)
    try:
        assert info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV
        assert not info.flags & uapi.UBLK_F_USER_RECOVERY
    finally:
        with UblkControl() as c:
            c.del_dev(info.dev_id)


def test_normal_user_without_unprivileged_is_told(udev, run_dir):
    code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", "null")
    assert code == 1 and "CAP_SYS_ADMIN" in err and "--unprivileged" in err, err


def test_root_asking_unprivileged_gets_a_privileged_device(udev):
    info = _raw_add(uapi.UBLK_F_UNPRIVILEGED_DEV)
    try:
        assert not info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV and info.owner_uid == 0
    finally:
        with UblkControl() as c:
            c.del_dev(info.dev_id)


def test_control_node_closed_to_users(udev, run_dir):
    os.chmod(CONTROL, 0o600)
    code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", "null", "--unprivileged")
    assert code == 1, out + err
    assert "no permission to open /dev/ublk-control" in err
    assert "add a udev rule" in err and "run as root" in err, err


def test_unprivileged_limit_reached(udev, run_dir):
    try:
        old = open(UBLKS_MAX).read().strip()
        with open(UBLKS_MAX, "w") as fh:
            fh.write("0")
    except OSError as exc:
        pytest.skip(f"cannot lower {UBLKS_MAX}: {exc}")
    try:
        code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", "null", "--unprivileged")
    finally:
        with open(UBLKS_MAX, "w") as fh:
            fh.write(old)
    assert code == 1 and "Permission denied" in err, out + err
    assert "unprivileged device limit reached" in err and "ublks_max=0" in err, err


def test_no_udev_rule_means_a_clear_error(run_dir):
    """Without the udev stand-in /dev/ublkcN stays root's: ADD_DEV works, nothing else."""
    old_mode = stat.S_IMODE(os.stat(CONTROL).st_mode)
    os.chmod(CONTROL, 0o666)
    with KernelTransport() as t:
        before = set(t.list_devs())

    def add():
        with KernelTransport(unprivileged=True, node_timeout=0.5) as t:
            t.add_dev(-1, 1, 8, 1 << 20, 0)
    try:
        with pytest.raises(PermissionError) as ei:
            as_user(USER, add)
    finally:
        os.chmod(CONTROL, old_mode)
        with KernelTransport() as t:
            left = set(t.list_devs()) - before
            for dev_id in left:
                t.del_dev(dev_id)
    msg = str(ei.value)
    assert "did not become read-writable for uid 65534" in msg and "udev rule" in msg, msg
    assert "stays until root deletes it" in msg and len(left) == 1, msg
