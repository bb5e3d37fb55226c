"""Helpers for the test_kernel_* tests: a KernelTransport, backends, fio."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend_kinds import build_backend

MiB = 1 << 20
DEV_SIZE = 16 * MiB
FIO_TIMEOUT = 240
REPO = Path(__file__).resolve().parents[2]


def fio(*args: str, timeout: float = FIO_TIMEOUT) -> dict:
    """Run fio (JSON output); fail the test with its output unless every job passed."""
    res = subprocess.run(["fio", "--output-format=json", *args], capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"fio {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout[res.stdout.index("{"):])
    for job in out["jobs"]:
        assert job["error"] == 0, job
    return out


def fio_verify_args(path: str, size: int = 12 * MiB) -> list[str]:
    """Three jobs on disjoint thirds: 4k, 64k, 128k random writes, each verified (crc32c)."""
    third = size // 3
    args = ["--ioengine=io_uring", "--direct=1", "--iodepth=16", "--rw=randwrite",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", f"--filename={path}",
            f"--size={third}"]
    for i, bs in enumerate(("4k", "64k", "128k")):
        args += [f"--name=bs{bs}", f"--bs={bs}", f"--offset={i * third}"]
    return args


def make_backend(kind: str, tmp_path: Path, size: int = DEV_SIZE):
    """(backend, native) for kind: memory, loop, loop-python, qcow2, null."""
    return build_backend(kind, tmp_path, size)


def delete_devices_left(t, before: set[int]) -> None:
    """Stop and delete the devices added since ``before``. Stopping is best effort (the
    device may be stopped already; DEL_DEV stops a live one too), but a device that
    cannot be deleted fails the teardown: it would stay for every test after it."""
    errors = []
    for dev_id in sorted(set(t.list_devs()) - before):
        try:
            t.stop_dev(dev_id)
        except OSError:
            pass
        try:
            t.del_dev(dev_id)
        except OSError as exc:
            if exc.errno != errno.ENODEV:       # gone meanwhile: its CLI server deleted it
                errors.append(f"device {dev_id}: {exc}")
    assert not errors, f"devices left behind could not be deleted: {errors}"


@pytest.fixture
def kt():
    """A KernelTransport; devices still present at the end are stopped and deleted."""
    from pyublk_fast.transport.kernel import KernelTransport
    t = KernelTransport()
    before = set(t.list_devs())
    try:
        yield t
        delete_devices_left(t, before)
    finally:
        t.close()


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """python -m pyublk_fast ARGS (from the repo root)."""
    return subprocess.run([sys.executable, "-m", "pyublk_fast", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)
