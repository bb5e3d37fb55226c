"""Error mapping of the control plane (pure logic; runs with the other kernel tests)."""
from __future__ import annotations

import errno
import os

import pytest

from asuser import as_user

from pyublk_fast import uapi
from pyublk_fast.transport.control import (ENOTSUPP, UblkCommandError, UblkControl,
                                           command_error, hint_for)


@pytest.mark.parametrize("err, builtin", [
    (errno.EEXIST, FileExistsError), (errno.EPERM, PermissionError),
    (errno.EACCES, PermissionError), (errno.ENOENT, FileNotFoundError),
    (errno.ETIMEDOUT, TimeoutError), (errno.EINVAL, None), (errno.EBUSY, None),
])
def test_errors_are_oserror_subclasses_with_errno(err, builtin):
    exc = command_error(err, "ADD_DEV", "a hint")
    assert isinstance(exc, UblkCommandError) and isinstance(exc, OSError)
    if builtin is not None:
        assert isinstance(exc, builtin)
    assert exc.errno == err and exc.command == "ADD_DEV" and exc.hint == "a hint"
    assert str(exc) == f"[Errno {err}] ADD_DEV: {os.strerror(err)} (a hint)"


def test_hints_name_limits_features_and_versions():
    assert "ublks_max" in hint_for("ADD_DEV", errno.EMFILE)
    assert "ublks_max" in hint_for("ADD_DEV", errno.ENOSPC)
    h = hint_for("UPDATE_SIZE", errno.EOPNOTSUPP)
    assert "UBLK_F_UPDATE_SIZE" in h and uapi.KERNEL_VERSION_OF_FEATURE[
        uapi.UBLK_F_UPDATE_SIZE] in h
    assert "UBLK_F_SHMEM_ZC, Linux 7.1+" in hint_for("REG_BUF", ENOTSUPP)
    assert "busy" in hint_for("DEL_DEV", errno.EBUSY)
    assert "before START_DEV" in hint_for("SET_PARAMS", errno.EACCES)
    assert hint_for("GET_DEV_INFO", errno.ENODEV, dev_id=3).startswith("there is no ublk device 3")
    assert hint_for("GET_DEV_INFO", errno.EIO) == ""


def test_missing_control_node_says_how_to_load_the_driver(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"modprobe ublk_drv.*CONFIG_BLK_DEV_UBLK"):
        UblkControl(str(tmp_path / "ublk-control"))


def test_unprivileged_open_says_who_may_open_it():
    """A normal user (nobody) opening the real root-only node gets a PermissionError."""
    with pytest.raises(PermissionError) as ei:
        as_user(65534, lambda: UblkControl().close())
    assert "run as root, or use UNPRIVILEGED_DEV" in str(ei.value)
