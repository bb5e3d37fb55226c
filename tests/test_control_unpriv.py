"""Host-side checks of how unprivileged devices' control commands are encoded (no kernel).

An unprivileged device's commands carry "/dev/ublkcN\\0" at the start of the buffer at
``addr``, ``dev_path_len`` counts it (NUL included), the payload follows and ``len``
covers both.  The bytes built here are the bytes the kernel reads.
"""
from __future__ import annotations

import ctypes
import errno
import os

import numpy as np
import pytest

from asuser import as_user

from pyublk_fast import uapi
from pyublk_fast.transport.control import (UblkControl, char_dev_path, ctrl_cmd, hint_for,
                                           path_form_buffer)
from pyublk_fast.transport.kernel import KernelTransport


def _memory_at(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


@pytest.mark.parametrize("dev_id", [0, 7, 42, 1048575])
def test_char_dev_path_is_nul_terminated(dev_id):
    path = char_dev_path(dev_id)
    assert path == f"/dev/ublkc{dev_id}".encode() + b"\0"
    assert path.count(b"\0") == 1


def test_path_then_dev_info_payload():
    info = np.zeros(1, uapi.DEV_INFO_DTYPE)
    info["dev_id"] = 12
    info["flags"] = uapi.UBLK_F_UNPRIVILEGED_DEV
    buf, plen = path_form_buffer(12, info)
    assert plen == len(b"/dev/ublkc12\0") == 13
    assert buf.dtype == np.uint8 and buf.nbytes == 13 + uapi.DEV_INFO_DTYPE.itemsize == 77
    raw = buf.tobytes()
    assert raw[:13] == b"/dev/ublkc12\0"
    assert raw[13:] == info.tobytes()
    back = np.frombuffer(raw[13:], uapi.DEV_INFO_DTYPE)[0]
    assert int(back["dev_id"]) == 12 and int(back["flags"]) == uapi.UBLK_F_UNPRIVILEGED_DEV


def test_path_only_for_commands_without_payload():
    buf, plen = path_form_buffer(3, None)
    assert buf.tobytes() == b"/dev/ublkc3\0" and plen == 12


def test_params_payload_follows_the_path_byte_for_byte():
    p = np.zeros(1, uapi.PARAMS_DTYPE)
    p["len"] = uapi.PARAMS_DTYPE.itemsize
    p["types"] = uapi.UBLK_PARAM_TYPE_BASIC
    p["basic"]["dev_sectors"] = 32768
    p["basic"]["logical_bs_shift"] = 9
    buf, plen = path_form_buffer(5, p)
    raw = buf.tobytes()
    assert raw[:plen] == b"/dev/ublkc5\0"
    assert raw[plen:] == p.tobytes()
    assert int.from_bytes(raw[plen:plen + 4], "little") == uapi.PARAMS_DTYPE.itemsize


def test_ctrl_cmd_layout_for_the_path_form():
    info = np.zeros(1, uapi.DEV_INFO_DTYPE)
    buf, plen = path_form_buffer(9, info)
    cmd = ctrl_cmd(9, buf, data0=0, dev_path_len=plen)
    raw = cmd.tobytes()
    assert len(raw) == 32
    assert int.from_bytes(raw[0:4], "little") == 9                  # dev_id
    assert int.from_bytes(raw[4:6], "little") == 0xFFFF             # queue_id: none
    assert int.from_bytes(raw[6:8], "little") == 12 + 64            # len: path + payload
    addr = int.from_bytes(raw[8:16], "little")
    assert addr == buf.ctypes.data
    assert _memory_at(addr, 12) == b"/dev/ublkc9\0"                 # what the kernel copies
    assert int.from_bytes(raw[24:26], "little") == 12               # dev_path_len, NUL included
    assert raw[26:32] == bytes(6)


def test_ctrl_cmd_plain_form_unchanged():
    info = np.zeros(1, uapi.DEV_INFO_DTYPE)
    raw = ctrl_cmd(4, info, data0=77).tobytes()
    assert int.from_bytes(raw[6:8], "little") == 64
    assert int.from_bytes(raw[8:16], "little") == info.ctypes.data
    assert int.from_bytes(raw[16:24], "little") == 77
    assert raw[24:32] == bytes(8)                                   # no dev_path_len


def test_ctrl_cmd_without_buffer_in_path_form_points_at_the_path():
    buf, plen = path_form_buffer(1, None)
    raw = ctrl_cmd(1, buf, dev_path_len=plen).tobytes()
    assert int.from_bytes(raw[6:8], "little") == plen == 12
    assert _memory_at(int.from_bytes(raw[8:16], "little"), 12) == b"/dev/ublkc1\0"


def test_oversized_buffer_is_refused():
    with pytest.raises(ValueError, match=r"u16"):
        path_form_buffer(1, np.zeros(70000, np.uint8))


def test_hints_name_the_char_node_and_the_limit():
    assert "/dev/ublkc3" in hint_for("DEL_DEV", errno.EACCES, 3)
    assert "udev rule" in hint_for("STOP_DEV", errno.EACCES, 3)
    assert "ublks_max=" in hint_for("ADD_DEV", errno.EACCES, -1)
    assert "--unprivileged" in hint_for("ADD_DEV", errno.EPERM, -1)
    assert "/dev/ublkc8 is missing" in hint_for("GET_DEV_INFO2", errno.ENOENT, 8)


@pytest.mark.parametrize("flag,name", [(uapi.UBLK_F_USER_COPY, "USER_COPY"),
                                       (uapi.UBLK_F_SUPPORT_ZERO_COPY, "zero copy"),
                                       (uapi.UBLK_F_USER_RECOVERY, "recovery")])
def test_transport_refuses_before_asking_the_kernel(flag, name):
    """The refusal comes before any command: /dev/null stands in for the control node,
    so reaching the kernel would fail differently."""
    with KernelTransport("/dev/null", unprivileged=True) as t:
        with pytest.raises(ValueError, match=f"unprivileged device cannot use {name}"):
            t.add_dev(-1, 1, 8, 1 << 20, flag)


def test_control_open_error_names_udev_and_root(tmp_path):
    """A user who may not open the control node is told both ways out (as root: a child
    as uid 65534; as a normal user: the node made unreadable to its owner)."""
    node = tmp_path / "ublk-control"
    node.write_bytes(b"")
    node.chmod(0o600)
    if os.geteuid() == 0:
        def open_it():
            as_user(65534, lambda: UblkControl(str(node)).close())
    else:
        node.chmod(0)

        def open_it():
            UblkControl(str(node)).close()
    with pytest.raises(PermissionError) as ei:
        open_it()
    msg = str(ei.value)
    assert "add a udev rule" in msg and "run as root" in msg and "--unprivileged" in msg, msg
