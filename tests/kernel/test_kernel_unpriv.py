"""Unprivileged ublk devices (UBLK_F_UNPRIVILEGED_DEV) on a real kernel, run by a normal user.

The user's side runs in a forked child that dropped to uid/gid 65534 (everything is
imported before the fork, so the child needs no access to this checkout or Python).
Root's side is what a real system has: systemd-udevd runs with the shipped rules
(`python -m pyublk_fast udev-rules`, installed in the guest's /etc/udev/rules.d), which
open /dev/ublk-control to users and give /dev/ublkcN and /dev/ublkbN of unprivileged
devices to their owner. Another user (65533) gets nowhere with someone else's device.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import mmap
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import pyublk_fast.backends  # noqa: F401  (the CLI imports these lazily: load before forking)
import pyublk_fast.backends.loop  # noqa: F401
import pyublk_fast.backends.null  # noqa: F401
from asuser import as_user
from kernel_fixtures import MiB, delete_devices_left, fio, fio_verify_args
from pyublk_fast import cli, uapi
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport import control
from pyublk_fast.transport.control import UblkControl
from pyublk_fast.transport.kernel import KernelTransport, pid_alive
from pyublk_fast.udev import RULES_NAME, rules_text
from pyublk_fast.util import wait_for_path

USER, OTHER = 65534, 65533
CONTROL = "/dev/ublk-control"
UBLKS_MAX = "/sys/module/ublk_drv/parameters/ublks_max"
RULES = Path("/etc/udev/rules.d") / RULES_NAME
UDEVD = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
FRESH_ID = 4242      # no other test adds a device with this id


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


# ---- root's side: udev with the shipped rules -------------------------------------------------
# The VM's job runs in a chroot, where udevadm refuses to talk to udevd unless told that
# the chroot is the system.
UDEVADM_ENV = dict(os.environ, SYSTEMD_IGNORE_CHROOT="1")


def udevadm(*args: str) -> str:
    """udevadm ARGS (its output; a failure fails the test)."""
    res = subprocess.run(["udevadm", *args], capture_output=True, text=True, timeout=180,
                         env=UDEVADM_ENV)
    assert res.returncode == 0, f"udevadm {' '.join(args)}: {res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def udevadm_test(*runs: str) -> dict[str, str]:
    """`udevadm test ARGS` for each ARGS ("[--action=A] SYS_PATH": what the rules do with
    the device, rule by rule), run at once: each runs the rules' helper, which takes
    seconds under TCG."""
    procs = {p: subprocess.Popen(["udevadm", "test", *p.split()], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=UDEVADM_ENV)
             for p in runs}
    outs = {p: proc.communicate(timeout=180)[0] for p, proc in procs.items()}
    for p, proc in procs.items():
        assert proc.returncode == 0, f"udevadm test {p}: {outs[p][-3000:]}"
    return outs


class Udevd:
    """systemd-udevd with the shipped rules, started for this module (the other kernel
    tests run without udev, as the VM boots)."""

    def __init__(self, daemon: str, log: Path) -> None:
        self.rules = rules_text()         # what `python -m pyublk_fast udev-rules` prints
        RULES.parent.mkdir(parents=True, exist_ok=True)
        RULES.write_text(self.rules)
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([daemon], stdout=fh, stderr=subprocess.STDOUT)
        if not wait_for_path("/run/udev/control", True, 60):
            self.close()
            pytest.fail(f"{daemon} did not start: {self.log_text()}")
        # /dev/ublk-control is older than udevd: have the rules applied to it now
        udevadm("trigger", "--action=add", "--sysname-match=ublk-control")
        self.settle()

    def settle(self) -> None:
        """Wait until udev has handled every event (its helper takes seconds under TCG)."""
        udevadm("settle", "--timeout=150")

    def log_text(self) -> str:
        return self.log.read_text()[-3000:]

    def rules_line(self, needle: str) -> str:
        """"<rules file>:<line>" of the installed rule that contains needle (udevadm test
        names the rule that set each thing this way)."""
        line = next(i for i, text in enumerate(self.rules.splitlines(), 1) if needle in text)
        return f"{RULES}:{line}"

    @contextlib.contextmanager
    def rules_removed(self):
        """udevd without our rules: nothing hands a new device's nodes over. Add the
        device as FRESH_ID: the rules' helper, run late for a deleted device's event, asks
        the driver about whichever device has that id by then, and hands it over."""
        RULES.unlink()
        udevadm("control", "--reload")
        try:
            yield
        finally:
            RULES.write_text(self.rules)
            udevadm("control", "--reload")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        RULES.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def udevd(tmp_path_factory):
    if os.environ.get("UBLK_VM") != "1":
        pytest.skip("starts systemd-udevd and installs udev rules: only inside the VM lane")
    daemon = next((p for p in UDEVD if os.path.exists(p)), None)
    if daemon is None or shutil.which("udevadm") is None:
        pytest.fail("systemd-udevd or udevadm missing: install the Debian package udev "
                    "(`python3 tools/vm/ublk_vm.py prepare` does)")
    assert not os.path.exists("/run/udev/control"), "a udevd runs already"
    old_mode = stat.S_IMODE(os.stat(CONTROL).st_mode)
    d = Udevd(daemon, tmp_path_factory.mktemp("udevd") / "udevd.log")
    try:
        yield d
    finally:
        d.settle()
        d.close()
        os.chmod(CONTROL, old_mode)


@pytest.fixture
def udev(udevd):
    """udevd with the rules; /dev/ublk-control as the rules left it and devices added
    during the test deleted by root afterwards."""
    mode = stat.S_IMODE(os.stat(CONTROL).st_mode)
    with KernelTransport() as t:
        before = set(t.list_devs())
    try:
        yield udevd
    finally:
        os.chmod(CONTROL, mode)
        with KernelTransport() as t:
            delete_devices_left(t, before)


def node(path: str) -> tuple[str, int, int, int]:
    """(type, uid, gid, permission bits) of a device node."""
    st = os.stat(path)
    kind = "chr" if stat.S_ISCHR(st.st_mode) else "blk" if stat.S_ISBLK(st.st_mode) else "?"
    return kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def run_dir():
    """A state directory (and scratch space) the test user owns."""
    d = tempfile.mkdtemp(prefix="pyublk-unpriv-")
    os.chmod(d, 0o755)
    os.chown(d, USER, USER)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


# ---- the user's side ------------------------------------------------------------------------
def _read_direct(path: str, offset: int, size: int) -> bytes:
    """size bytes at offset with O_DIRECT (past the page cache, so from the server)."""
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == size
    finally:
        os.close(fd)
    return bytes(buf)


def _write_read_back(path: str, offset: int, size: int) -> tuple[bytes, bytes]:
    """Write random bytes through the block device, fsync, read them back with O_DIRECT."""
    data = os.urandom(size)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == size
        os.fsync(fd)
    finally:
        os.close(fd)
    return data, _read_direct(path, offset, size)


def _user_info(dev_id: int):
    with UblkControl() as c:
        info = c.get_dev_info(dev_id)          # GET_DEV_INFO2 with the path form
        params = c.get_params(dev_id)
    return (info.owner_uid, info.owner_gid, info.flags, int(info.state),
            int(params["basic"]["dev_sectors"]) << uapi.SECTOR_SHIFT)


def _add(run_dir: str, target: str, *args: str) -> tuple[int, str]:
    """`add -t TARGET --unprivileged ARGS` as the user: (dev_id, /dev/ublkbN). It returns
    once udev handed both nodes to the owner; what the owner then sees of its device, from
    the kernel (GET_DEV_INFO2, GET_PARAMS) and from `list`."""
    code, out, err = as_user(USER, user_cli, run_dir, "add", "-t", target, "--unprivileged",
                             *args)
    assert code == 0, out + err
    path = out.strip().splitlines()[-1]
    dev_id = _dev_id_of(path)
    assert node(path) == ("blk", USER, USER, 0o600)
    assert node(f"/dev/ublkc{dev_id}") == ("chr", USER, USER, 0o600)

    owner_uid, owner_gid, flags, state, size = as_user(USER, _user_info, dev_id)
    assert (owner_uid, owner_gid) == (USER, USER)
    assert flags & uapi.UBLK_F_UNPRIVILEGED_DEV
    assert not flags & (uapi.UBLK_F_USER_COPY | uapi.UBLK_F_SUPPORT_ZERO_COPY)
    assert state == uapi.DevState.LIVE and size == 16 * MiB

    code, out, err = as_user(USER, user_cli, run_dir, "list", "--json")
    assert code == 0, err
    row = {r["dev_id"]: r for r in json.loads(out)}[dev_id]
    assert row["owner_uid"] == USER and row["state_name"] == "LIVE", row
    assert "UNPRIVILEGED_DEV" in row["features"] and row["target"] == target, row
    return dev_id, path


@pytest.mark.parametrize("target", ["loop", "null"])   # memory: test_other_user_is_shut_out
def test_cli_add_verify_list_del(udev, run_dir, target):
    img = os.path.join(run_dir, "disk.img")
    if target == "loop":
        with open(img, "wb") as fh:
            fh.truncate(16 * MiB)
        os.chown(img, USER, USER)
        dev_id, path = _add(run_dir, target, "-f", img)
    else:
        dev_id, path = _add(run_dir, target, "-s", "16M")

    # data through /dev/ublkbN, as the owner
    if target == "null":                       # null keeps nothing: I/O only
        as_user(USER, fio, "--name=n", f"--filename={path}", "--rw=randrw", "--bs=4k",
                "--size=4M", "--ioengine=io_uring", "--direct=1", cwd=run_dir)
    else:
        data, back = as_user(USER, _write_read_back, path, 13 * MiB + 4096, 1 * MiB)
        assert back == data
        as_user(USER, fio, *fio_verify_args(path), cwd=run_dir)

    # the owner deletes it
    code, out, err = as_user(USER, user_cli, run_dir, "del", "-n", str(dev_id))
    assert code == 0, out + err
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)
    if target == "loop":                       # the bytes reached the backing file
        with open(img, "rb") as fh:
            fh.seek(13 * MiB + 4096)
            assert fh.read(len(data)) == data


# ---- another user ------------------------------------------------------------------------------
def _params(size: int) -> np.ndarray:
    p = np.zeros(1, uapi.PARAMS_DTYPE)
    p["types"] = uapi.UBLK_PARAM_TYPE_BASIC
    p["basic"]["logical_bs_shift"] = p["basic"]["physical_bs_shift"] = 9
    p["basic"]["max_sectors"] = (1 << 20) >> uapi.SECTOR_SHIFT
    p["basic"]["dev_sectors"] = size >> uapi.SECTOR_SHIFT
    return p


def _set_params_and_delete(dev_id: int) -> int:
    """As the owner: SET_PARAMS on the unstarted device, GET_PARAMS back its size, DEL_DEV."""
    with UblkControl() as c:
        c.set_params(dev_id, _params(4 * MiB))
        size = int(c.get_params(dev_id)["basic"]["dev_sectors"]) << uapi.SECTOR_SHIFT
        c.del_dev(dev_id)
    return size


def _every_way_in(dev_id: int, unstarted: int, privileged: int) -> dict[str, int]:
    """Everything another user might try on someone's devices: what -> the errno it got
    (0: it worked)."""
    got: dict[str, int] = {}

    def attempt(what, fn):
        try:
            fn()
            got[what] = 0
        except OSError as exc:
            got[what] = exc.errno

    for path in (f"/dev/ublkb{dev_id}", f"/dev/ublkc{dev_id}"):
        for how, flag in (("r", os.O_RDONLY), ("rw", os.O_RDWR)):
            attempt(f"open {path} {how}", lambda: os.close(os.open(path, flag)))
    with UblkControl() as c:                   # /dev/ublk-control is open to every user
        for dev in (dev_id, unstarted):
            # the path form, as the owner sends it: the kernel checks access to /dev/ublkcN
            attempt(f"GET_DEV_INFO2 {dev}", lambda: c.get_dev_info2(dev))
            attempt(f"GET_PARAMS {dev}", lambda: c.get_params(dev, unprivileged=True))
            attempt(f"GET_QUEUE_AFFINITY {dev}",
                    lambda: c.get_queue_affinity(dev, 0, unprivileged=True))
            attempt(f"STOP_DEV {dev}", lambda: c.stop_dev(dev, unprivileged=True))
            attempt(f"DEL_DEV {dev}", lambda: c.del_dev(dev, unprivileged=True))
            attempt(f"DEL_DEV_ASYNC {dev}", lambda: c.del_dev_async(dev, unprivileged=True))
        # only settable before START_DEV: refused to the other user while the owner may
        attempt(f"SET_PARAMS {unstarted}",
                lambda: c.set_params(unstarted, _params(4 * MiB), unprivileged=True))
        attempt(f"START_DEV {unstarted}", lambda: c.start_dev(unstarted, unprivileged=True))
        # the plain form, as for a privileged device: an unprivileged one must be named
        attempt(f"DEL_DEV {dev_id} plain", lambda: c.del_dev(dev_id, unprivileged=False))
        # naming a char device the user may open: the kernel checks it is this device's
        with mock.patch.object(control, "char_dev_path", lambda _: b"/dev/null\0"):
            attempt(f"DEL_DEV {dev_id} as /dev/null", lambda: c.del_dev(dev_id, unprivileged=True))
        # a privileged device: CAP_SYS_ADMIN only
        attempt(f"GET_DEV_INFO {privileged}", lambda: c.get_dev_info(privileged))
        attempt(f"DEL_DEV {privileged}", lambda: c.del_dev(privileged))
    with KernelTransport() as t:               # recovery, as `recover` drives it
        attempt(f"START_USER_RECOVERY {dev_id}", lambda: t.start_user_recovery(dev_id))
        attempt(f"END_USER_RECOVERY {dev_id}", lambda: t.end_user_recovery(dev_id))
    return got


def test_other_user_is_shut_out(udev, run_dir):
    """Another user can open neither node of someone's unprivileged device, and the kernel
    refuses it every control command (it checks access to /dev/ublkcN, which the rules
    give the owner alone); the device stays LIVE with its data. Devices: USER's served
    one, USER's only added one (SET_PARAMS and START_DEV are only possible before
    START_DEV), and root's (privileged: the rules leave its node to root)."""
    dev_id, blk = _add(run_dir, "memory", "-s", "16M")
    chr_ = f"/dev/ublkc{dev_id}"
    unstarted = as_user(USER, _raw_add, uapi.UBLK_F_UNPRIVILEGED_DEV).dev_id   # state DEAD
    privileged = _raw_add(uapi.UBLK_F_UNPRIVILEGED_DEV).dev_id   # root asking: privileged
    data, back = as_user(USER, _write_read_back, blk, 5 * MiB, 512 * 1024)
    assert back == data
    udev.settle()

    # the nodes as udevd made them with the rules
    expect = {blk: ("blk", USER, USER, 0o600), chr_: ("chr", USER, USER, 0o600),
              f"/dev/ublkc{unstarted}": ("chr", USER, USER, 0o600),
              f"/dev/ublkc{privileged}": ("chr", 0, 0, 0o600),
              CONTROL: ("chr", 0, 0, 0o666)}
    assert {p: node(p) for p in expect} == expect, udev.log_text()
    # what udev makes of each node, rule by rule (each run starts the helper: at once). A
    # "change" event re-applies node permissions: the rules hand the node over again.
    owner_rule = udev.rules_line("OWNER=")
    handed = [f"{owner_rule} OWNER {USER}({USER})", f"{owner_rule} GROUP {USER}({USER})",
              f"{owner_rule} MODE 0600", "UBLK_UNPRIVILEGED=1", f"UBLK_OWNER_UID={USER}",
              f"UBLK_OWNER_GID={USER}"]
    cases = {f"/sys/class/ublk-char/ublkc{dev_id}": handed + ["ACTION=add"],
             f"--action=change /sys/class/block/ublkb{dev_id}": handed + ["ACTION=change"]}
    for args, out in udevadm_test(*cases).items():
        assert all(w in out for w in cases[args]), \
            f"udevadm test {args}: wanted {cases[args]}; it said:\n{out[-3000:]}"
    # what the helper told udevd about root's device, kept in udev's database
    props = udevadm("info", "--query=property", f"/dev/ublkc{privileged}").splitlines()
    assert "UBLK_UNPRIVILEGED=0" in props and "UBLK_OWNER_UID=0" in props, props

    got = as_user(OTHER, _every_way_in, dev_id, unstarted, privileged)
    assert got == {**{what: errno.EACCES for what in got},
                   # the kernel's permission check does not know DEL_DEV_ASYNC: it refuses
                   # it for every unprivileged device, to the owner too
                   f"DEL_DEV_ASYNC {dev_id}": errno.EINVAL,
                   f"DEL_DEV_ASYNC {unstarted}": errno.EINVAL,
                   f"DEL_DEV {dev_id} plain": errno.EINVAL,
                   f"DEL_DEV {dev_id} as /dev/null": errno.EPERM,
                   f"GET_DEV_INFO {privileged}": errno.EPERM,
                   f"DEL_DEV {privileged}": errno.EPERM}, got

    # the owner may hand its disk to everyone; the kernel still lets only the owner open it
    as_user(USER, os.chmod, blk, 0o666)
    with pytest.raises(PermissionError) as ei:
        as_user(OTHER, lambda: os.close(os.open(blk, os.O_RDONLY)))
    assert ei.value.errno == errno.EPERM
    as_user(USER, os.chmod, blk, 0o600)

    # the CLI tells the other user in one line, naming the device
    other_dir = tempfile.mkdtemp(prefix="pyublk-other-")
    os.chown(other_dir, OTHER, OTHER)
    try:
        for args in (["del", "-n", str(dev_id)],
                     ["recover", "-n", str(dev_id), "-t", "memory", "-s", "16M"]):
            code, out, err = as_user(OTHER, user_cli, other_dir, *args)
            assert code == 1 and out == "", (args, out, err)
            assert err.count("\n") == 1 and "Permission denied" in err and chr_ in err, err
    finally:
        subprocess.run(["rm", "-rf", other_dir], check=False)

    # nothing happened to the devices: the served one is LIVE, its server alive, its data
    # the owner's; the other is still there for its owner. Root needs the path form too
    # for a user's device: UblkControl finds out.
    with UblkControl() as c:
        info = c.get_dev_info(dev_id)         # plain GET_DEV_INFO refused, then GET_DEV_INFO2
        assert info.state == uapi.DevState.LIVE and pid_alive(info.ublksrv_pid), info
        assert info.owner_uid == USER and info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV
        assert c.uses_path_form(dev_id)
        with pytest.raises(OSError) as ei:
            c.get_dev_info(dev_id, unprivileged=False)
        assert ei.value.errno == errno.EINVAL  # what the kernel says to the plain form
        assert c.get_dev_info(unstarted).state == uapi.DevState.DEAD
        c.del_dev(privileged)
    assert as_user(USER, _read_direct, blk, 5 * MiB, len(data)) == data
    assert as_user(USER, _set_params_and_delete, unstarted) == 4 * MiB
    # root deletes the user's device through the CLI
    code, out, err = as_user(0, user_cli, os.path.join(run_dir, "root-view"), "del", "-n",
                             str(dev_id))
    assert code == 0, out + err
    assert wait_for_path(chr_, False, 10)

    # the helper, asked about a device that is gone (DEL_DEV returned once its id was free)
    code, out, err = as_user(0, user_cli, run_dir, "udev-owner", str(unstarted))
    assert code == 1 and out == "" and f"there is no ublk device {unstarted}" in err, err


def _in_process_memory_device() -> tuple[int, bool, int, int, list]:
    """Device(MemoryBackend) over KernelTransport(unprivileged=True), in this process."""
    backend = MemoryBackend(8 * MiB)
    with KernelTransport(unprivileged=True) as t:
        dev = Device(backend, t).start()
        try:
            # start() returned once the owner may use /dev/ublkbN
            data, back = _write_read_back(t.block_path(dev.dev_id), 1 * MiB, 256 * 1024)
            in_backend = bytes(backend.data[1 * MiB:1 * MiB + len(data)]) == data
            info = t.dev_info(dev.dev_id)
            nodes = [node(f"/dev/ublk{c}{dev.dev_id}") for c in "cb"]
        finally:
            dev.stop()
        gone = wait_for_path(f"/dev/ublkc{dev.dev_id}", False, 10)
    return dev.dev_id, back == data and in_backend and gone, info.owner_uid, info.flags, nodes


def test_in_process_device(udev):
    dev_id, ok, owner, flags, nodes = as_user(USER, _in_process_memory_device)
    assert ok, "bytes read back (or found in the backend) differ, or the device stayed"
    assert owner == USER and flags & uapi.UBLK_F_UNPRIVILEGED_DEV
    assert nodes == [("chr", USER, USER, 0o600), ("blk", USER, USER, 0o600)], udev.log_text()


def _raw_add(flags: int):
    """ADD_DEV only, as the current user."""
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


def test_no_udev_rule_means_a_clear_error(udev):
    """Without the rules /dev/ublkcN stays root's: ADD_DEV works, nothing else."""
    with KernelTransport() as t:
        before = set(t.list_devs())

    def add():
        with KernelTransport(unprivileged=True, node_timeout=0.5) as t:
            t.add_dev(FRESH_ID, 1, 8, 1 << 20, 0)
    with udev.rules_removed(), pytest.raises(PermissionError) as ei:
        as_user(USER, add)
    with KernelTransport() as t:
        left = set(t.list_devs()) - before
    assert left == {FRESH_ID}
    msg = str(ei.value)
    assert "did not become read-writable for uid 65534" in msg and "udev rule" in msg, msg
    assert "udev-rules" in msg and "stays until root deletes it" in msg, msg
