"""The CLI on a real kernel: add/list/del, kill -9 mid-fio then recover, teardown while open, errors."""
from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import time

import pytest

from kernel_fixtures import MiB, cli, cli_add, cli_in_fork, fio, kt, make_backend  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.device import Device
from pyublk_fast.transport.kernel import KernelTransport
from pyublk_fast.util import kernel_release, wait_for_path, wait_until


@pytest.fixture
def env(tmp_path):
    """CLI environment with a private state directory; every device left is deleted after."""
    e = dict(os.environ, PYUBLK_FAST_RUN_DIR=str(tmp_path / "run"))
    yield e
    for rec in (tmp_path / "run").glob("*.json"):
        cli("del", "-n", rec.stem, env=e)


def _add(env, *args: str) -> tuple[int, str]:
    res = cli("add", *args, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    path = res.stdout.strip().splitlines()[-1]
    assert path.startswith("/dev/ublkb") and os.path.exists(path), res.stdout
    return int(path[len("/dev/ublkb"):]), path


def _record(env, dev_id: int) -> dict:
    with open(os.path.join(env["PYUBLK_FAST_RUN_DIR"], f"{dev_id}.json")) as fh:
        return json.load(fh)


def test_add_list_del(env, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5a" * (8 * MiB))
    dev_id, path = _add(env, "-t", "loop", "-f", str(img), "-q", "2", "-d", "32")
    with open(path, "rb") as fh:
        assert fh.read(4096) == b"\x5a" * 4096
    res = cli("list", "--json", env=env)
    assert res.returncode == 0, res.stderr
    rows = {r["dev_id"]: r for r in json.loads(res.stdout)}
    row = rows[dev_id]
    assert row["state_name"] == "LIVE" and row["nr_hw_queues"] == 2 and row["queue_depth"] == 32
    assert row["target"] == "loop" and row["file"] == str(img) and row["size"] == 8 * MiB
    pid = _record(env, dev_id)["pid"]
    assert row["pid"] == pid
    res = cli("del", "-n", str(dev_id), env=env)
    assert res.returncode == 0, res.stderr
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)
    assert not os.path.exists(os.path.join(env["PYUBLK_FAST_RUN_DIR"], f"{dev_id}.json"))
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_foreground_sigterm_deletes(env):
    p = subprocess.Popen([*cli_argv(), "add", "-t", "null", "--foreground"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        path = p.stdout.readline().strip()
        assert path.startswith("/dev/ublkb"), p.stderr.read()
        fio("--name=n", f"--filename={path}", "--rw=randread", "--bs=4k", "--size=4M",
            "--ioengine=io_uring", "--direct=1")
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert wait_for_path(path.replace("ublkb", "ublkc"), False, 10)
    finally:
        if p.poll() is None:
            p.kill()


def cli_argv() -> list[str]:
    import sys
    return [sys.executable, "-m", "pyublk_fast"]


def _writes_done(dev_id: int) -> int:
    """Writes the block layer has completed on /dev/ublkbN (field 5 of its stat)."""
    with open(f"/sys/block/ublkb{dev_id}/stat") as fh:
        return int(fh.read().split()[4])


KILL_AFTER = 1000       # of the job's 4096 writes: the server dies with the job well under way


@pytest.mark.parametrize("extra", [[], ["-z"], ["--threads", "2"]], ids=["copy", "zero_copy", "threads"])
def test_kill9_during_fio_then_recover(env, tmp_path, extra):
    img = tmp_path / "r.img"
    with open(img, "wb") as fh:
        fh.truncate(32 * MiB)
    dev_id, path = _add(env, "-t", "loop", "-f", str(img), "-q", "2", "--recovery", *extra)
    pid = _record(env, dev_id)["pid"]
    job = ["fio", "--output-format=json", "--name=rec", f"--filename={path}", "--rw=randwrite",
           "--bs=4k", "--size=16M", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--rate_iops=2000"]
    f = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: f.poll() is not None or _writes_done(dev_id) >= KILL_AFTER,
                          120, 0.01), f"fio completed {_writes_done(dev_id)} writes in 120 s"
        assert f.poll() is None, "fio finished before the kill: make the job longer"
        before_kill = _writes_done(dev_id)
        os.kill(pid, signal.SIGKILL)
        assert wait_for_path(f"/proc/{pid}", present=False, timeout=10, interval=0.05)
        with KernelTransport() as t:        # the driver parks the device once the server is gone
            assert wait_until(lambda: t.dev_info(dev_id).state_name in ("QUIESCED", "FAIL_IO"),
                              10), t.dev_info(dev_id).state_name
        res = cli("list", "--json", env=env)
        state = {r["dev_id"]: r for r in json.loads(res.stdout)}[dev_id]["state_name"]
        assert state in ("QUIESCED", "FAIL_IO"), state
        res = cli("recover", "-n", str(dev_id), env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        out, err = f.communicate(timeout=200)
    finally:
        if f.poll() is None:
            f.kill()
    assert f.returncode == 0, out[-2000:] + err[-2000:]
    job_out = json.loads(out[out.index("{"):])["jobs"][0]
    # every write done, the rest by the new server, and all of it read back and verified
    assert job_out["error"] == 0 and job_out["write"]["io_bytes"] == 16 * MiB
    assert job_out["read"]["io_bytes"] == 16 * MiB
    assert _writes_done(dev_id) > before_kill
    assert _record(env, dev_id)["pid"] != pid
    # the recovered server serves exactly the file's bytes
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 16 * MiB)
        assert os.preadv(fd, [buf], 0) == 16 * MiB
    finally:
        os.close(fd)
    with open(img, "rb") as fh:
        assert bytes(buf) == fh.read(16 * MiB)
    # and takes new writes: a second job writes and verifies its own data
    fio("--name=again", f"--filename={path}", "--rw=randwrite", "--bs=64k", "--size=8M",
        "--ioengine=io_uring", "--direct=1", "--verify=crc32c", "--verify_fatal=1")


def test_teardown_with_block_device_open(kt, tmp_path):
    backend, _ = make_backend("loop", tmp_path)
    dev = Device(backend, kt).start()
    path = kt.block_path(dev.dev_id)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert len(os.pread(fd, 4096, 0)) == 4096
        t0 = time.monotonic()
        dev.stop()
        assert time.monotonic() - t0 < 15, "stop() with /dev/ublkbN open took too long"
        assert dev.dev_id not in kt.list_devs() or not os.path.exists(path)
        # the disk is gone: the kernel marked it dead with capacity 0, so a read through
        # the descriptor still open ends at once (end of device), never hangs
        assert os.pread(fd, 4096, 0) == b""
    finally:
        os.close(fd)


def test_cli_del_with_block_device_open(env, kt):
    """`del` refuses while the block device is open (TRY_STOP_DEV, 7.0+) and the device
    serves on; `del --force` deletes it all the same, at once."""
    if not kt.features() & uapi.UBLK_F_SAFE_STOP_DEV:
        pytest.skip(f"kernel {kernel_release()} lacks SAFE_STOP_DEV (7.0): `del` sees mounts only")
    dev_id, path = cli_add(env, "-t", "null")
    with open(path, "rb") as held:
        held.read(4096)
        res = cli_in_fork(env, "del", "-n", str(dev_id), timeout=30)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert f"device {dev_id} ({path}) is open" in res.stderr and "--force" in res.stderr
        assert kt.dev_info(dev_id).state == uapi.UBLK_S_DEV_LIVE
        assert len(os.pread(held.fileno(), 4096, 1 << 20)) == 4096
        t0 = time.monotonic()
        res = cli_in_fork(env, "del", "-n", str(dev_id), "--force", timeout=30)
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 20
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)


def test_recover_refuses_a_running_server(env):
    dev_id, _ = _add(env, "-t", "null", "--recovery")
    res = cli("recover", "-n", str(dev_id), env=env)
    assert res.returncode == 1 and "still running" in res.stderr, res.stderr


def test_device_busy_second_server(env, kt):
    dev_id, _ = _add(env, "-t", "null")
    with pytest.raises(OSError) as ei:
        kt.queue_endpoint(dev_id, 0)
    assert ei.value.errno == errno.EBUSY and "another server" in str(ei.value)


def test_device_id_taken(env):
    dev_id, _ = _add(env, "-t", "null")
    res = cli("add", "-t", "null", "-n", str(dev_id), env=env)
    assert res.returncode == 1 and f"device id {dev_id} is taken" in res.stderr, res.stderr


def test_splice_zc_is_sim_only(kt):
    from pyublk_fast.backends.null import NullBackend
    with pytest.raises(OSError) as ei:
        Device(NullBackend(1 << 20), kt, data_path="splice_zc")
    assert ei.value.errno == errno.EOPNOTSUPP and "simulated driver" in str(ei.value)


def test_feature_the_kernel_lacks_is_named(kt):
    lacking = next(1 << b for b in range(40) if not kt.features() >> b & 1)
    with pytest.raises(OSError) as ei:
        kt.add_dev(-1, 1, 8, 1 << 20, lacking)
    assert ei.value.errno == errno.EOPNOTSUPP
    assert kernel_release() in str(ei.value) and "lacks" in str(ei.value)


def test_device_limit_reached(kt):
    param = "/sys/module/ublk_drv/parameters/ublks_max"
    try:
        old = open(param).read().strip()
        with open(param, "w") as fh:
            fh.write(str(len(kt.list_devs())))
    except OSError as exc:
        pytest.skip(f"cannot lower {param}: {exc}")
    try:
        try:
            dev_id, _ = kt.add_dev(-1, 1, 8, 1 << 20, 0)
        except OSError as exc:
            assert "limit" in str(exc) and "ublks_max" in str(exc), str(exc)
        else:
            kt.del_dev(dev_id)
            pytest.skip(f"kernel {kernel_release()}: ublks_max does not limit devices added "
                        "by root (only unprivileged ones)")
    finally:
        with open(param, "w") as fh:
            fh.write(old)
