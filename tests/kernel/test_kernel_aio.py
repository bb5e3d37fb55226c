"""loop --python on a real /dev/ublkbN: requests served by Python handlers that await the
queue's ring (pyublk_fast.aio), on each data path the kernel has, checked by fio."""
from __future__ import annotations

import json
import mmap
import os

import pytest

from kernel_fixtures import (MiB, cli_add, cli_env, cli_in_fork, fio, fio_verify_args,  # noqa: F401
                             kt, skip_unless_kernel_has)
from pyublk_fast.device import PATH_FLAGS

IMG_SIZE = 16 * MiB
FIO_SIZE = 6 * MiB          # three verify jobs of 2 MiB each
PATH_OPTS = {"copy": [], "user_copy": ["-u"], "zero_copy": ["-z"]}


@pytest.mark.parametrize("data_path", list(PATH_OPTS))
def test_loop_python_serves_fio_verify(cli_env, kt, tmp_path, data_path):
    """`add -t loop --python`: fio's crc32c verify passes, and the device's bytes are the
    file's, on copy, user copy and zero copy (request-directed ring I/O on each)."""
    skip_unless_kernel_has(kt, PATH_FLAGS[data_path], f"loop --python on {data_path}")
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.truncate(IMG_SIZE)
    dev_id, path = cli_add(cli_env, "-t", "loop", "--python", "-f", str(img), *PATH_OPTS[data_path])
    with open(os.path.join(cli_env["PYUBLK_FAST_RUN_DIR"], f"{dev_id}.json")) as fh:
        rec = json.load(fh)
    assert (rec["device"]["native"], rec["data_path"]) == (False, data_path), rec
    jobs = fio(*fio_verify_args(path, FIO_SIZE))["jobs"]
    assert [(j["write"]["io_bytes"], j["read"]["io_bytes"]) for j in jobs] == \
        [(FIO_SIZE // 3, FIO_SIZE // 3)] * 3
    buf = mmap.mmap(-1, FIO_SIZE)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == FIO_SIZE
    finally:
        os.close(fd)
    res = cli_in_fork(cli_env, "del", "-n", str(dev_id))
    assert res.returncode == 0, res.stdout + res.stderr
    with open(img, "rb") as fh:
        assert bytes(buf) == fh.read(FIO_SIZE)

