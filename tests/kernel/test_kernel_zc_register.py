"""Kernel zero copy through REGISTER_IO_BUF / UNREGISTER_IO_BUF (the 6.15 way), not AUTO_BUF_REG."""
from __future__ import annotations

import os

import pytest

from kernel_fixtures import DEV_SIZE, MiB, fio, fio_verify_args, make_backend  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.device import Device
from pyublk_fast.transport.kernel import KernelTransport
from pyublk_fast.util import kernel_release


@pytest.fixture
def kt_register():
    t = KernelTransport(zero_copy="register")
    if not t.features() & uapi.UBLK_F_SUPPORT_ZERO_COPY:
        t.close()
        pytest.skip(f"kernel {kernel_release()} lacks SUPPORT_ZERO_COPY (6.15+)")
    yield t
    t.close()


@pytest.mark.parametrize("queues", [1, 2])
def test_loop_zero_copy_by_register_io_buf_passes_fio_verify(kt_register, tmp_path, queues):
    backend, native = make_backend("loop", tmp_path)
    with Device(backend, kt_register, queues=queues, depth=32, data_path="zero_copy", native=native) as dev:
        assert not dev.flags & uapi.UBLK_F_AUTO_BUF_REG
        out = fio(*fio_verify_args(kt_register.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert sum(q.cmd_errors for q in dev._queues if q is not None) == 0


def test_register_mode_bytes_match_the_backing_file(kt_register, tmp_path):
    backend, native = make_backend("loop", tmp_path)
    payload = os.urandom(2 * MiB)
    with Device(backend, kt_register, depth=16, data_path="zero_copy") as dev, dev.open() as blk:
        blk.pwrite(payload, 1 * MiB)
        assert blk.pread(2 * MiB, 1 * MiB) == payload
    with open(backend.path, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(2 * MiB) == payload
