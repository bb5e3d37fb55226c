"""Growing the qcow2 engine's virtual size, checked by qemu-img."""
from __future__ import annotations

import errno
import json
import subprocess

import pytest

from pyublk_fast.backends.qcow2 import Qcow2Image

MiB = 1 << 20
GiB = 1 << 30


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
