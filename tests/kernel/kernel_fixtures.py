"""Helpers for the test_kernel_* tests: a KernelTransport, backends, fio, CLI servers."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import IO, Callable

import pytest

from asuser import as_user
from backend_kinds import build_backend
from pyublk_fast import cli as cli_module, uapi
from pyublk_fast.util import kernel_release

MiB = 1 << 20
DEV_SIZE = 16 * MiB
FIO_TIMEOUT = 240
REPO = Path(__file__).resolve().parents[2]


def fio(*args: str, timeout: float = FIO_TIMEOUT) -> dict:
    """Run fio (JSON output); fail the test with its output unless every job passed."""
    return fio_result(fio_start(*args), timeout)


def fio_start(*args: str) -> subprocess.Popen:
    """Start fio in the background (JSON output); fio_result() waits for it."""
    return subprocess.Popen(["fio", "--output-format=json", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fio_result(proc: subprocess.Popen, timeout: float = FIO_TIMEOUT) -> dict:
    """fio's JSON output once it ends; fail the test with its output unless every job passed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        res = json.loads(out[out.index("{"):])
    except ValueError:
        res = None
    if proc.returncode != 0:
        jobs = out[-3000:] if res is None else [
            {k: j.get(k) for k in ("jobname", "error", "total_err", "first_error")}
            | {f"{d}_bytes": j[d]["io_bytes"] for d in ("read", "write")} for j in res["jobs"]]
        pytest.fail(f"{' '.join(proc.args)} failed (exit {proc.returncode}):\n{jobs}\n{err[-3000:]}")
    for job in res["jobs"]:
        # a job run with --continue_on_error reports its last tolerated error here (and
        # counts them in total_err); a fatal one fails fio's exit status above
        assert job["error"] == 0 or "total_err" in job, job
    return res


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


def need_ext4(*tools: str) -> None:
    """Skip unless mkfs.ext4 and the other e2fsprogs TOOLS are installed and the kernel has
    ext4 (loaded here if it is a module)."""
    for tool in ("mkfs.ext4", *tools):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing: apt-get install e2fsprogs")
    subprocess.run(["modprobe", "-q", "ext4"], capture_output=True, check=False)
    with open("/proc/filesystems") as fh:
        if "ext4" not in fh.read():
            pytest.skip(f"kernel {kernel_release()} has no ext4 (modprobe ext4 failed)")


def make_files(src: Path, count: int, step: int) -> dict[str, str]:
    """COUNT files of random bytes (1000 + i * STEP long) in a new directory SRC; their
    digests (files_digest)."""
    src.mkdir()
    for i in range(count):
        (src / f"f{i}").write_bytes(os.urandom(1000 + i * step))
    return files_digest(str(src))


def files_digest(root: str) -> dict[str, str]:
    """Every file below ROOT, by relative path, to its sha256."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def ext4_with_files(bdev: str, src: Path, mnt: Path) -> None:
    """Make ext4 on BDEV, mount it on MNT, copy SRC in as data/ and unmount."""
    subprocess.run(["mkfs.ext4", "-q", "-F", bdev], check=True, capture_output=True, timeout=120)
    subprocess.run(["mount", bdev, str(mnt)], check=True, capture_output=True, timeout=60)
    try:
        shutil.copytree(src, mnt / "data")
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)


def skip_unless_kernel_has(kt, flags: int, what: str) -> None:
    """Skip, naming the missing UBLK_F_* features, unless the driver has all of ``flags``."""
    missing = flags & ~kt.features()
    if missing:
        pytest.skip(f"{what}: kernel {kernel_release()} lacks {uapi.feature_names(missing)}")


def _cli_main(env: dict, args: list[str],
              before: Callable[[], None] | None) -> subprocess.CompletedProcess:
    os.environ.update(env)
    if before is not None:
        before()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli_in_fork(env: dict, *args: str, before: Callable[[], None] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """What cli() does, run by the CLI's main() in a fork of this process: the same
    commands, daemons and servers without a new interpreter's start, which costs seconds
    under TCG (importing numpy and the package over 9p), where a kill test needs two.
    ``before()`` runs first in the fork (a fault to inject into the server it starts)."""
    return as_user(os.geteuid(), _cli_main, env, list(args), before, timeout=timeout,
                   cwd=str(REPO))


def cli_foreground(env: dict, *args: str,
                   before: Callable[[], None] | None = None) -> tuple[int, IO[str]]:
    """``ARGS --foreground`` (add or recover) served by a forked child of this process, as
    cli_in_fork() does: (its pid, its stdout and stderr). Reap it with os.waitpid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.chdir(REPO)
            os.environ.update(env)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            if before is not None:
                before()
            code = cli_module.main([*args, "--foreground"])
        except BaseException:                             # noqa: BLE001 - for the reader
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    return pid, os.fdopen(r)


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
    """Environment for CLI servers with a private state directory (their records and
    logs); every device whose record is left at the end is deleted. The servers' logs
    are printed: pytest shows them with a failed test."""
    run = tmp_path / "run"
    env = dict(os.environ, PYUBLK_FAST_RUN_DIR=str(run))
    yield env
    for rec in run.glob("*.json"):
        cli_in_fork(env, "del", "-n", rec.stem)
    print(server_logs(env))


def cli_add(env: dict, *args: str, before: Callable[[], None] | None = None) -> tuple[int, str]:
    """``add ARGS`` (by cli_in_fork): (dev_id, /dev/ublkbN) once the server serves I/O."""
    return added(cli_in_fork(env, "add", *args, before=before))


def added(res: subprocess.CompletedProcess) -> tuple[int, str]:
    """(dev_id, /dev/ublkbN) from a successful `add`."""
    assert res.returncode == 0, res.stdout + res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith("/dev/ublkb") and os.path.exists(path), res.stdout
    return int(path[len("/dev/ublkb"):]), path


def server_logs(env: dict) -> str:
    """Every CLI server's log in the state directory, for failure messages."""
    run = Path(env["PYUBLK_FAST_RUN_DIR"])
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(run.glob("server-*.log")))


def writes_completed(dev_id: int) -> int:
    """Write requests /dev/ublkbN has completed (failed ones too): /sys/block/.../stat."""
    with open(f"/sys/block/ublkb{dev_id}/stat") as fh:
        return int(fh.read().split()[4])


def writes_in_flight(dev_id: int) -> int:
    """Write requests /dev/ublkbN has started and not completed: /sys/block/.../inflight."""
    with open(f"/sys/block/ublkb{dev_id}/inflight") as fh:
        return int(fh.read().split()[1])


def server_pid(env: dict, dev_id: int) -> int:
    """The pid of device dev_id's server, from its record."""
    with open(os.path.join(env["PYUBLK_FAST_RUN_DIR"], f"{dev_id}.json")) as fh:
        return json.load(fh)["pid"]
