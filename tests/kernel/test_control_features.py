"""/dev/ublk-control and GET_FEATURES against the real driver."""
from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast._core.ring import SETUP_SQE128, Ring
from pyublk_fast.util import kernel_release
from ublk_ktest import kernel_series


def _version_tuple(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def expected_features(series: tuple[int, int]) -> set[str]:
    """Feature names a mainline kernel of ``series`` reports, per uapi's version table."""
    return {uapi.Feature(bit).name for bit, ver in uapi.KERNEL_VERSION_OF_FEATURE.items()
            if _version_tuple(ver) <= series}


def raw_get_features(cmd_len: int = uapi.UBLK_FEATURES_LEN) -> tuple[int, int]:
    """GET_FEATURES by hand: one SQE128 URING_CMD on our Ring; (cqe res, flags)."""
    fd = os.open("/dev/ublk-control", os.O_RDWR)
    try:
        with Ring(4, SETUP_SQE128) as ring:
            out = np.zeros(1, np.uint64)
            cmd = np.zeros(1, uapi.CTRL_CMD_DTYPE)
            cmd["dev_id"] = 0xFFFFFFFF
            cmd["queue_id"] = 0xFFFF
            cmd["addr"] = out.ctypes.data
            cmd["len"] = cmd_len
            ring.prep_uring_cmd(fd, uapi.UBLK_U_CMD_GET_FEATURES, cmd.tobytes(), 77)
            assert ring.wait(1, timeout=10) == 1
            assert int(ring.cqe_user_data[0]) == 77
            return int(ring.cqe_res[0]), int(out[0])
    finally:
        os.close(fd)


def test_control_device_appears_after_modprobe():
    st = os.stat("/dev/ublk-control")
    assert stat.S_ISCHR(st.st_mode)
    assert os.path.isdir("/sys/module/ublk_drv"), "ublk_drv is not loaded as a module"
    assert (st.st_mode & 0o777) != 0


def test_get_features_via_sqe128_uring_cmd_matches_kernel_version():
    res, flags = raw_get_features()
    assert res == 0, os.strerror(-res)
    names = set(uapi.feature_names(flags))
    series = kernel_series()
    want = expected_features(series)
    assert names == want, (f"kernel {kernel_release()}: got {flags:#x} {sorted(names)}; "
                           f"missing {sorted(want - names)}, unexpected {sorted(names - want)}")
    if series >= (7, 2):
        assert flags == uapi.MAINLINE_FEATURE_MASK == 0xFFFFF
        for f in ("SUPPORT_ZERO_COPY", "AUTO_BUF_REG", "BATCH_IO", "USER_COPY", "SHMEM_ZC"):
            assert f in names
    if series < (6, 15):
        assert "SUPPORT_ZERO_COPY" not in names and "AUTO_BUF_REG" not in names
    assert not [n for n in names if n.startswith("bit ")], "bits uapi does not know"


def test_get_features_with_wrong_length_is_refused():
    res, flags = raw_get_features(cmd_len=4)
    assert res == -errno.EINVAL and flags == 0


def test_ublk_control_get_features_agrees_with_raw_command(ctrl):
    assert ctrl.get_features() == raw_get_features()[1]


def test_closed_control_refuses_commands(ctrl):
    ctrl.close()
    ctrl.close()                      # idempotent
    with pytest.raises(ValueError, match="closed"):
        ctrl.get_features()
