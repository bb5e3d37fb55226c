"""Helpers for the test_kernel_* tests: a KernelTransport, backends, fio."""
from __future__ import annotations

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


@pytest.fixture
def kt():
    """A KernelTransport; devices still present at the end are stopped and deleted."""
    from pyublk_fast.transport.kernel import KernelTransport
    t = KernelTransport()
    before = set(t.list_devs())
    yield t
    for dev_id in set(t.list_devs()) - before:
        try:
            t.stop_dev(dev_id)
        except OSError:
            pass
        try:
            t.del_dev(dev_id)
        except OSError:
            pass
    t.close()


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """python -m pyublk_fast ARGS (from the repo root)."""
    return cli_wait(cli_start(*args, env=env), timeout)


def cli_start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start python -m pyublk_fast ARGS (from the repo root); cli_wait() collects it."""
    return subprocess.Popen([sys.executable, "-m", "pyublk_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def cli_wait(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    """Wait for a command cli_start() started (killed after timeout seconds)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def cli_env(tmp_path):
    """The CLI's environment with a private state directory; devices whose records are
    left there are deleted after the test."""
    env = dict(os.environ, PYUBLK_FAST_RUN_DIR=str(tmp_path / "run"))
    yield env
    for rec in (tmp_path / "run").glob("*.json"):
        cli("del", "-n", rec.stem, env=env)


def cli_add(env: dict, *args: str) -> tuple[int, str]:
    """`add ARGS`: (dev_id, /dev/ublkbN) once the server serves it."""
    return added(cli("add", *args, env=env))


def added(res: subprocess.CompletedProcess) -> tuple[int, str]:
    """(dev_id, /dev/ublkbN) from a successful `add`."""
    assert res.returncode == 0, res.stdout + res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith("/dev/ublkb") and os.path.exists(path), res.stdout
    return int(path[len("/dev/ublkb"):]), path


def server_pid(env: dict, dev_id: int) -> int:
    """The pid of device dev_id's server, from its record."""
    with open(os.path.join(env["PYUBLK_FAST_RUN_DIR"], f"{dev_id}.json")) as fh:
        return json.load(fh)["pid"]
