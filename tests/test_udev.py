"""Host-side checks of the udev support: the helper the rules run (`udev-owner`), the rules
`udev-rules` prints, and how the kernel transport waits for udev. The rules themselves
run under a real udevd in the VM lane (tests/kernel/test_kernel_unpriv.py)."""
from __future__ import annotations

import errno
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from pyublk_fast import cli, uapi, udev
from pyublk_fast.transport import kernel
from pyublk_fast.transport.control import CtrlDevInfo, command_error, hint_for

SHIPPED = udev.RULES_PATH.read_text()
SHIPPED_HELPER = 'IMPORT{program}="/usr/bin/python3 -m pyublk_fast udev-owner %n"'


def rules_lines(text: str) -> list[str]:
    """The rules of a rules file, without comments and blank lines."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def info(flags: int, uid: int, gid: int, dev_id: int = 7) -> CtrlDevInfo:
    return CtrlDevInfo(dev_id, 1, 128, uapi.DevState.LIVE, 1 << 20, 1234, flags, 0, uid, gid)


@pytest.fixture
def run_cli(capsys):
    """python -m pyublk_fast ARGS in this process: (exit status, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(args))
        except SystemExit as exc:               # argparse's errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


class FakeControl:
    """UblkControl as the helper uses it, answering for one device or failing."""

    def __init__(self, answer: CtrlDevInfo | OSError) -> None:
        self.answer = answer
        self.asked: list[int] = []

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_dev_info(self, dev_id: int) -> CtrlDevInfo:
        self.asked.append(dev_id)
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


# ---- udev-owner --------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,unprivileged", [
    (uapi.UBLK_F_UNPRIVILEGED_DEV | uapi.UBLK_F_CMD_IOCTL_ENCODE, 1),
    (uapi.UBLK_F_CMD_IOCTL_ENCODE | uapi.UBLK_F_USER_RECOVERY, 0)])
def test_udev_owner_prints_import_lines(monkeypatch, flags, unprivileged, run_cli):
    fake = FakeControl(info(flags, 1000, 1001))
    monkeypatch.setattr(udev, "UblkControl", fake)
    code, out, err = run_cli("udev-owner", "7")
    assert (code, err) == (0, "")
    # exactly what IMPORT{program} reads: KEY=value lines, nothing else
    assert out == f"UBLK_UNPRIVILEGED={unprivileged}\nUBLK_OWNER_UID=1000\nUBLK_OWNER_GID=1001\n"
    assert fake.asked == [7]


def test_udev_owner_of_a_device_that_is_gone(monkeypatch, run_cli):
    gone = command_error(errno.ENODEV, "GET_DEV_INFO", hint_for("GET_DEV_INFO", errno.ENODEV, 7))
    monkeypatch.setattr(udev, "UblkControl", FakeControl(gone))
    code, out, err = run_cli("udev-owner", "7")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "there is no ublk device 7" in err, err


def test_udev_owner_without_the_driver(monkeypatch, run_cli):
    def no_driver():
        raise FileNotFoundError(errno.ENOENT, "open /dev/ublk-control: No such file or "
                                "directory (ublk driver not loaded: run `modprobe ublk_drv`)")
    monkeypatch.setattr(udev, "UblkControl", no_driver)
    code, out, err = run_cli("udev-owner", "3")
    assert code == 1 and out == "" and "ublk driver not loaded" in err, err


@pytest.mark.parametrize("args,needle", [(["udev-owner"], "required: N"),
                                         (["udev-owner", "x"], "invalid int value: 'x'")])
def test_udev_owner_argument_errors(args, needle, run_cli):
    code, out, err = run_cli(*args)
    assert code == 2 and needle in err, err


def test_rules_read_what_the_helper_prints():
    """Every UBLK_* key the rules use is one the helper prints, and the other way round."""
    used = set(re.findall(r"\bUBLK_[A-Z_]+\b", "\n".join(rules_lines(SHIPPED))))
    printed = {line.split("=")[0] for line in
               udev.owner_properties(info(uapi.UBLK_F_UNPRIVILEGED_DEV, 1, 2)).splitlines()}
    assert used == printed == {"UBLK_UNPRIVILEGED", "UBLK_OWNER_UID", "UBLK_OWNER_GID"}


# ---- udev-rules --------------------------------------------------------------------------------
def test_shipped_rules_file():
    assert SHIPPED.count(SHIPPED_HELPER) == 1
    rules = rules_lines(SHIPPED)
    assert 'KERNEL=="ublk-control", MODE="0666"' in rules
    # only an unprivileged device's nodes are handed over, on every event but remove
    assert rules[-2:] == ['ENV{UBLK_UNPRIVILEGED}=="1", OWNER="$env{UBLK_OWNER_UID}", '
                          'GROUP="$env{UBLK_OWNER_GID}", MODE="0600"', 'LABEL="pyublk_fast_end"']
    assert 'ACTION=="remove", GOTO="pyublk_fast_end"' in rules
    assert "udev-rules" in SHIPPED and udev.RULES_NAME in SHIPPED   # how to install it


@pytest.mark.parametrize("found,prefix", [(True, ""),
                                          (False, f"/usr/bin/env PYTHONPATH={udev.PACKAGE_ROOT} ")])
def test_udev_rules_for_this_interpreter(monkeypatch, found, prefix, run_cli):
    """The shipped rules with the helper started by the interpreter that prints them; with
    PYTHONPATH when that interpreter would not find this package by itself."""
    monkeypatch.setattr(udev, "imports_this_package", lambda python: found)
    code, out, err = run_cli("udev-rules")
    assert (code, err) == (0, "")
    helper = f'IMPORT{{program}}="{prefix}{sys.executable} -m pyublk_fast udev-owner %n"'
    assert out == SHIPPED.replace(SHIPPED_HELPER, helper), out


def fake_python(tmp_path: Path, script: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("script,expected", [
    (f"echo {udev.PACKAGE_ROOT}", True),
    ("echo /usr/lib/python3/dist-packages", False),       # another copy
    ("echo 'No module named pyublk_fast' >&2; exit 1", False)])
def test_imports_this_package(tmp_path, script, expected):
    assert udev.imports_this_package(fake_python(tmp_path, script)) is expected


def test_imports_this_package_runs_like_udev(tmp_path, monkeypatch):
    """From /, without PYTHONPATH: how udev starts the helper."""
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    python = fake_python(tmp_path, 'echo "$(pwd) ${PYTHONPATH-unset}" > "$(dirname "$0")/seen"')
    udev.imports_this_package(python)
    assert (tmp_path / "seen").read_text() == "/ unset\n"


def test_udev_rules_refuses_a_path_with_a_space(monkeypatch):
    monkeypatch.setattr(udev, "imports_this_package", lambda python: True)
    with pytest.raises(ValueError, match="a path has a space"):
        udev.rules_text("/opt/my python/bin/python3")


# ---- waiting for udev --------------------------------------------------------------------------
def waiter(node_timeout: float):
    return types.SimpleNamespace(node_timeout=node_timeout)


def later(delay: float, fn) -> threading.Thread:
    th = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    th.start()
    return th


def test_node_wait_gives_up_when_udev_is_idle(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "UDEV_QUEUE", str(tmp_path / "queue"))    # udev idle
    t0 = time.monotonic()
    assert not kernel.KernelTransport._udev_granted(waiter(0.1), str(tmp_path / "ublkc0"))
    assert time.monotonic() - t0 < 5          # not UDEV_BUSY_WAIT


def test_node_wait_goes_on_while_udev_works(tmp_path, monkeypatch):
    """Past node_timeout, as long as udev has events queued (its rule's helper is slow)."""
    queue, path = tmp_path / "queue", tmp_path / "ublkc0"
    queue.touch()
    monkeypatch.setattr(kernel, "UDEV_QUEUE", str(queue))
    th = later(0.5, path.touch)               # udev hands the node over late
    t0 = time.monotonic()
    try:
        assert kernel.KernelTransport._udev_granted(waiter(0.05), str(path))
        assert time.monotonic() - t0 >= 0.5
    finally:
        th.join()
    # udev finishes its queue without handing the node over: no
    th = later(0.5, queue.unlink)
    try:
        assert not kernel.KernelTransport._udev_granted(waiter(0.05), str(tmp_path / "ublkc1"))
    finally:
        th.join()
    assert not os.path.exists(queue)
