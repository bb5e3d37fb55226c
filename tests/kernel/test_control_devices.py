"""ADD_DEV / GET_DEV_INFO / SET_PARAMS / DEL_DEV with UblkControl on the real driver."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast.transport.control import UblkCommandError
from pyublk_fast.util import kernel_release, wait_for_path
from ublk_ktest import kernel_series


def test_add_info_delete_round_trip(ctrl):
    info = ctrl.add_dev(nr_queues=1, depth=64, max_io_buf_bytes=512 << 10)
    try:
        assert info.state == uapi.DevState.DEAD
        assert (info.nr_hw_queues, info.queue_depth) == (1, 64)
        assert info.max_io_buf_bytes == 512 << 10
        assert info.ublksrv_pid in (-1, os.getpid())   # 7.2: -1 until START_DEV
        assert info.refused_flags == 0
        assert wait_for_path(info.char_path, True), f"{info.char_path} did not appear"
        assert not os.path.exists(info.block_path), "block device before START_DEV"
        again = ctrl.get_dev_info(info.dev_id)
        assert again.dev_id == info.dev_id and again.state == uapi.DevState.DEAD
        assert (again.nr_hw_queues, again.queue_depth, again.flags) == (1, 64, info.flags)
        assert again.asked_flags is None and again.refused_flags == 0
    finally:
        ctrl.del_dev(info.dev_id)
    assert wait_for_path(info.char_path, False), f"{info.char_path} still there after DEL_DEV"
    with pytest.raises(UblkCommandError) as exc:
        ctrl.get_dev_info(info.dev_id)
    assert exc.value.errno == errno.ENODEV and exc.value.command == "GET_DEV_INFO"
    assert f"no ublk device {info.dev_id}" in str(exc.value)


def test_queue_count_is_cut_to_cpus_and_depth_echoed(ctrl):
    info = ctrl.add_dev(nr_queues=64, depth=4096)
    assert info.nr_hw_queues == min(64, os.cpu_count())
    assert info.queue_depth == 4096
    ctrl.del_dev(info.dev_id)


def test_explicit_id_and_id_clash(ctrl):
    info = ctrl.add_dev(dev_id=9)
    assert info.dev_id == 9 and info.char_path == "/dev/ublkc9"
    with pytest.raises(FileExistsError) as exc:      # also a UblkCommandError
        ctrl.add_dev(dev_id=9)
    assert isinstance(exc.value, UblkCommandError) and exc.value.errno == errno.EEXIST
    assert "dev_id=-1" in str(exc.value)
    ctrl.del_dev(9)


def test_unknown_flag_is_reported_as_refused(ctrl):
    unknown = 1 << 40
    asked = unknown | uapi.UBLK_F_USER_COPY
    info = ctrl.add_dev(flags=asked)
    try:
        assert info.asked_flags == asked
        assert info.refused_flags == unknown
        assert info.flags & uapi.UBLK_F_USER_COPY
        assert info.implied_flags & uapi.UBLK_F_CMD_IOCTL_ENCODE
        assert "USER_COPY" in info.feature_names
        assert ctrl.get_dev_info(info.dev_id).flags == info.flags
    finally:
        ctrl.del_dev(info.dev_id)


@pytest.mark.parametrize("kwargs, words, since", [
    (dict(depth=5000), "depth 5000 must be 1..4096", (6, 0)),
    (dict(depth=0), "depth 0 must be 1..4096", (6, 0)),
    (dict(nr_queues=0), "nr_queues 0 must be", (6, 0)),
    # the recovery-flag combination check came with USER_RECOVERY_FAIL_IO (6.13)
    (dict(flags=uapi.UBLK_F_USER_RECOVERY_REISSUE), "need USER_RECOVERY", (6, 13)),
])
def test_bad_add_dev_arguments_fail_with_einval_and_a_reason(ctrl, kwargs, words, since):
    if kernel_series() < since:
        pytest.skip(f"kernel {kernel_release()} does not check this (since {since})")
    with pytest.raises(UblkCommandError) as exc:
        ctrl.add_dev(**kwargs)
    assert exc.value.errno == errno.EINVAL and exc.value.command == "ADD_DEV"
    assert words in str(exc.value)


def test_python_side_argument_errors(ctrl):
    with pytest.raises(TypeError, match="depth must be an int"):
        ctrl.add_dev(depth="64")
    with pytest.raises(ValueError, match="nr_queues=-1"):
        ctrl.add_dev(nr_queues=-1)
    with pytest.raises(ValueError, match="simulator-only"):
        ctrl.add_dev(flags=uapi.SIM_F_SPLICE_ZC)
    with pytest.raises(ValueError, match="dev_id=-1"):
        ctrl.del_dev(-1)


def test_delete_missing_device(ctrl):
    with pytest.raises(UblkCommandError) as exc:
        ctrl.del_dev(4000)
    assert exc.value.errno == errno.ENODEV and "no ublk device 4000" in str(exc.value)


def _basic_params(sectors: int) -> np.ndarray:
    p = np.zeros(1, uapi.PARAMS_DTYPE)
    p["types"] = uapi.UBLK_PARAM_TYPE_BASIC
    b = p["basic"]
    b["logical_bs_shift"] = 9
    b["physical_bs_shift"] = 12
    b["io_opt_shift"] = 12
    b["io_min_shift"] = 9
    b["max_sectors"] = 256
    b["dev_sectors"] = sectors
    p["basic"] = b
    return p


def test_params_round_trip_and_devt(ctrl):
    info = ctrl.add_dev(max_io_buf_bytes=1 << 20)
    try:
        ctrl.set_params(info.dev_id, _basic_params(123456))
        got = ctrl.get_params(info.dev_id)
        assert got["types"] & uapi.UBLK_PARAM_TYPE_BASIC
        assert got["types"] & uapi.UBLK_PARAM_TYPE_DEVT    # filled in by the kernel
        basic = got["basic"]
        assert (int(basic["dev_sectors"]), int(basic["logical_bs_shift"]),
                int(basic["physical_bs_shift"]), int(basic["max_sectors"])) == (123456, 9, 12, 256)
        rdev = os.stat(info.char_path).st_rdev
        assert (int(got["devt"]["char_major"]), int(got["devt"]["char_minor"])) == (
            os.major(rdev), os.minor(rdev))
        assert int(got["devt"]["disk_major"]) == 0           # no disk before START_DEV
    finally:
        ctrl.del_dev(info.dev_id)


def test_invalid_params_are_refused_with_a_hint(ctrl):
    info = ctrl.add_dev(max_io_buf_bytes=64 << 10)
    try:
        bad = _basic_params(1000)
        bad["basic"]["logical_bs_shift"] = 8
        with pytest.raises(UblkCommandError) as exc:
            ctrl.set_params(info.dev_id, bad)
        assert exc.value.errno == errno.EINVAL and "logical_bs_shift" in str(exc.value)
        too_big = _basic_params(1000)
        too_big["basic"]["max_sectors"] = 1024          # 512 KiB > max_io_buf_bytes
        with pytest.raises(UblkCommandError, match="max_sectors"):
            ctrl.set_params(info.dev_id, too_big)
        with pytest.raises(TypeError, match="PARAMS_DTYPE"):
            ctrl.set_params(info.dev_id, b"\0" * 152)
    finally:
        ctrl.del_dev(info.dev_id)


def test_queue_affinity(ctrl):
    info = ctrl.add_dev(nr_queues=os.cpu_count())
    try:
        cpus: set[int] = set()
        for q in range(info.nr_hw_queues):
            mask = ctrl.get_queue_affinity(info.dev_id, q)
            assert mask and mask <= set(range(os.cpu_count()))
            assert not mask & cpus, "a CPU mapped to two queues"
            cpus |= mask
        assert cpus == set(range(os.cpu_count()))
        with pytest.raises(UblkCommandError) as exc:
            ctrl.get_queue_affinity(info.dev_id, info.nr_hw_queues)
        assert exc.value.errno == errno.EINVAL and "queue_id" in str(exc.value)
    finally:
        ctrl.del_dev(info.dev_id)


def test_del_dev_async(ctrl):
    info = ctrl.add_dev()
    ctrl.del_dev_async(info.dev_id)
    assert wait_for_path(info.char_path, False)
