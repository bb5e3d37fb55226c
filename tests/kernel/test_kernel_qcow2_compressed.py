"""A compressed qcow2 image (as distribution cloud images are) served by the real ublk
driver: read whole through /dev/ublkbN, checksum equal to what qemu-img reads; writes
over compressed clusters, then qemu-img check clean and the image equal to the model."""
from __future__ import annotations

import hashlib
import random
import shutil
import subprocess

import pytest

from kernel_fixtures import MiB, kt, skip_unless_kernel_has  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.backends.qcow2_backend import Qcow2Backend
from pyublk_fast.device import Device

SIZE = 8 * MiB


def _qemu_img(*args: str) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("data_path", ["copy", "user_copy"])
def test_compressed_image_through_the_kernel(kt, tmp_path, data_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed in the VM (qemu-utils)")
    if data_path == "user_copy":
        skip_unless_kernel_has(kt, uapi.UBLK_F_USER_COPY, "user copy")
    rng = random.Random(data_path)
    src = bytearray()
    while len(src) < SIZE:       # random (stored as is), repeated (compressed), zeros
        n = rng.randrange(1, 200) * 1024
        src += rng.choice([rng.randbytes(n), rng.randbytes(11) * (n // 11) + bytes(n % 11),
                           bytes(n)])
    src = src[:SIZE]
    raw = tmp_path / "src.raw"
    raw.write_bytes(src)
    img = str(tmp_path / "cloud.qcow2")
    _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), img)
    model = bytearray(src)
    with Device(Qcow2Backend(img), kt, queues=2, depth=32, data_path=data_path) as dev, \
            dev.open() as blk:
        got = blk.pread(SIZE, 0)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(src).hexdigest()
        for _ in range(40):      # partial, whole and spanning writes over 64 KiB clusters
            off = rng.randrange(SIZE // 512) * 512
            n = min(rng.randrange(1, 300) * 512, SIZE - off)
            data = rng.randbytes(n)
            blk.pwrite(data, off)
            model[off:off + n] = data
        blk.flush()
        got = blk.pread(SIZE, 0)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest()
    r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "No errors" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "out.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", img, str(out))
    assert out.read_bytes() == bytes(model)
