"""Growing backends (Device.resize on the simulated driver): the loop backend's file, the
qcow2 engine's virtual size (checked by qemu-img), what each refuses."""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.backends.qcow2 import Qcow2Image
from pyublk_fast.backends.qcow2_backend import Qcow2Backend
from pyublk_fast.device import Device

MiB = 1 << 20
GiB = 1 << 30


def _file(path, size: int) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_loop_grows_its_file(sim, tmp_path, native):
    path = _file(tmp_path / "d.img", 4 * MiB)
    head, new = os.urandom(128 * 1024), os.urandom(128 * 1024)
    with Device(LoopBackend(path), sim, depth=16, native=native) as dev:
        with dev.open() as blk:
            blk.pwrite(head, 4 * MiB - len(head))
        dev.resize(10 * MiB)
        assert os.path.getsize(path) == 10 * MiB == sim.dev_info(dev.dev_id).size
        with dev.open() as blk:
            blk.pwrite(new, 9 * MiB)
            assert blk.pread(len(head), 4 * MiB - len(head)) == head
            assert blk.pread(MiB, 5 * MiB) == bytes(MiB)
    with open(path, "rb") as fh:
        fh.seek(9 * MiB)
        assert fh.read(len(new)) == new


def test_loop_takes_a_file_grown_by_the_user(sim, tmp_path):
    """A file already larger than asked is left as it is (the user grew it first)."""
    path = _file(tmp_path / "d.img", 4 * MiB)
    with Device(LoopBackend(path), sim, depth=8) as dev:
        os.truncate(path, 16 * MiB)
        dev.resize(8 * MiB)
        assert os.path.getsize(path) == 16 * MiB and sim.dev_info(dev.dev_id).size == 8 * MiB


def test_loop_read_only_file_must_be_grown_first(sim, tmp_path):
    path = _file(tmp_path / "d.img", 4 * MiB)
    with Device(LoopBackend(path, read_only=True), sim, depth=8) as dev:
        with pytest.raises(OSError) as e:
            dev.resize(8 * MiB)
        assert e.value.errno == errno.ENOSPC and "read-only file of 4194304 bytes" in str(e.value)
        assert os.path.getsize(path) == 4 * MiB and sim.dev_info(dev.dev_id).size == 4 * MiB


def _qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def _check_clean(path: str, size: int) -> None:
    """qemu-img sees the new virtual size and finds nothing wrong, not even a leak."""
    info = json.loads(_qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == size
    res = _qemu_img("check", "--output=json", path)
    assert res.returncode == 0, res.stdout + res.stderr
    found = json.loads(res.stdout)
    assert not any(found.get(k) for k in ("corruptions", "leaks", "check-errors")), found


def test_qcow2_device_grows_its_virtual_size(sim, tmp_path):
    path = str(tmp_path / "d.qcow2")
    Qcow2Image.create(path, 4 * MiB).close()
    model = bytearray(20 * MiB)
    with Device(Qcow2Backend(path), sim, depth=16) as dev:
        with dev.open() as blk:
            model[3 * MiB:4 * MiB] = os.urandom(MiB)
            blk.pwrite(model[3 * MiB:4 * MiB], 3 * MiB)
        dev.resize(20 * MiB)
        assert sim.dev_info(dev.dev_id).size == 20 * MiB
        with dev.open() as blk:
            model[19 * MiB:] = os.urandom(MiB)
            blk.pwrite(model[19 * MiB:], 19 * MiB)
            assert blk.pread(20 * MiB, 0) == model
    _check_clean(path, 20 * MiB)
    raw = str(tmp_path / "d.raw")
    assert _qemu_img("convert", "-O", "raw", path, raw).returncode == 0
    with open(raw, "rb") as fh:
        assert fh.read() == model


def _qemu_io_reads(path: str, *reads: tuple[int, int, int]) -> None:
    """qemu-io reads each (pattern byte, offset, length) back from the image."""
    cmds = [a for pat, off, n in reads for a in ("-c", f"read -P {pat} {off} {n}")]
    res = subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "fail" not in res.stdout.lower(), res.stdout + res.stderr


def test_qcow2_grows_its_l1_table_twice(tmp_path):
    """4 KiB clusters: an L1 cluster maps 1 GiB, so 3 GiB and then 5 GiB each need a larger
    L1 table; qemu's data and ours stay where they were, qemu-img finds the image clean."""
    path = str(tmp_path / "d.qcow2")
    assert _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path,
                     str(16 * MiB)).returncode == 0
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 171 0 1M", "-c",
                          "write -P 205 15M 1M", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with Qcow2Image.open(path) as im:
        im.write(2 * MiB, b"\x11" * 65536)
        im.resize(3 * GiB)
        im.write(3 * GiB - 65536, b"\x22" * 65536)
        im.resize(5 * GiB)
        im.write(4 * GiB, b"\x33" * 4096)
        assert im.size == 5 * GiB
    _check_clean(path, 5 * GiB)
    _qemu_io_reads(path, (171, 0, MiB), (205, 15 * MiB, MiB), (0x11, 2 * MiB, 65536),
                   (0x22, 3 * GiB - 65536, 65536), (0x33, 4 * GiB, 4096), (0, 16 * MiB, MiB))
    with Qcow2Image.open(path) as im:          # our own checks at open pass too
        assert im.read(4 * GiB, 4096) == b"\x33" * 4096


def test_qcow2_refuses_shrinking_and_read_only(tmp_path):
    path = str(tmp_path / "d.qcow2")
    Qcow2Image.create(path, 8 * MiB).close()
    with Qcow2Image.open(path) as im:
        with pytest.raises(ValueError, match="cannot shrink"):
            im.resize(4 * MiB)
    with Qcow2Image.open(path, readonly=True) as im:
        with pytest.raises(OSError) as e:
            im.resize(16 * MiB)
        assert e.value.errno == errno.EROFS
    _check_clean(path, 8 * MiB)
