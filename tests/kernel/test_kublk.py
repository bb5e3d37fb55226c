"""The kernel selftests' reference server kublk on the real driver (built by build-kublk).

These check the lane itself end to end (driver + fio + data path) and that our
control plane agrees with the reference server.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from kernel_fixtures import fio
from pyublk_fast import uapi
from pyublk_fast.util import wait_for_path

FIO_TIMEOUT = 180


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def kublk_dev(kublk):
    """Start a kublk device from argv; always `kublk del` it afterwards.

    The kernel picks the id: an id whose char node is gone can still be taken
    while a closing server holds the device, so guessing a free one races."""
    started: list[int] = []

    def add(*args: str) -> str:
        res = run([kublk, "add", *args])
        assert res.returncode == 0, f"kublk add {' '.join(args)}: {res.stdout}{res.stderr}"
        found = re.search(r"^dev id (\d+):", res.stdout, re.M)
        assert found, f"kublk add printed no device id: {res.stdout}"
        dev_id = int(found.group(1))
        started.append(dev_id)
        path = f"/dev/ublkb{dev_id}"
        assert wait_for_path(path, True, timeout=10), f"{path} did not appear"
        return path

    yield add
    for dev_id in started:
        res = run([kublk, "del", "-n", str(dev_id)])
        assert res.returncode == 0, res.stdout + res.stderr
        assert wait_for_path(f"/dev/ublkc{dev_id}", False, timeout=10)


def test_kublk_features_agree_with_ours(kublk, ctrl):
    res = run([kublk, "features"])
    assert res.returncode == 0, res.stderr
    first = res.stdout.split()
    hexes = [int(w.rstrip(":,"), 16) for w in first if w.lower().startswith("0x")]
    assert hexes, res.stdout
    assert hexes[0] == ctrl.get_features()


def test_null_target_randread(kublk_dev, ctrl):
    path = kublk_dev("-t", "null", "-q", "1")
    dev_id = int(path[len("/dev/ublkb"):])
    info = ctrl.get_dev_info(dev_id)
    assert info.state == uapi.DevState.LIVE and info.nr_hw_queues == 1
    assert os.path.exists(f"/proc/{info.ublksrv_pid}"), "kublk's server process is gone"
    job = fio("--name=null", f"--filename={path}", "--rw=randread", "--bs=4k",
              "--iodepth=32", "--ioengine=io_uring", "--direct=1", "--time_based",
              "--runtime=2", timeout=FIO_TIMEOUT)["jobs"][0]
    assert job["read"]["io_bytes"] > 0 and job["read"]["iops"] > 0
    print(f"kublk null randread 4k qd32: {job['read']['iops']:.0f} IOPS (TCG)")


def test_loop_target_fio_crc32c_verify(kublk_dev, tmp_path):
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as fh:
        fh.truncate(64 << 20)
    path = kublk_dev("-t", "loop", "-q", "1", str(backing))
    job = fio("--name=verify", f"--filename={path}", "--rw=randwrite", "--bs=4k",
              "--size=8M", "--iodepth=16", "--ioengine=io_uring", "--direct=1",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", timeout=FIO_TIMEOUT)["jobs"][0]
    assert job["write"]["io_bytes"] == 8 << 20
    assert job["read"]["io_bytes"] == 8 << 20          # the verify pass read it all back
    # Our own bytes through the block device land at the same offset of the file.
    pattern = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 16 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(backing, "rb") as fh:
        fh.seek(16 << 20)
        assert fh.read(1 << 20) == pattern
