"""Live operations of the CLI on a real kernel: `upgrade` under fio with crc32c verify, and
`resize` of a loop device under a mounted ext4 (grown online by resize2fs), after which
`del` refuses while it is mounted and deletes it once unmounted."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess

import pytest

from kernel_fixtures import (MiB, cli_add, cli_env, cli_in_fork, fio_result,  # noqa: F401
                             fio_start, kt, need_ext4, server_logs, server_pid, skip_unless_kernel_has,
                             writes_completed)
from pyublk_fast import uapi
from pyublk_fast.device import RECOVERY_MODES
from pyublk_fast.transport.kernel import pid_alive
from pyublk_fast.util import wait_for_path, wait_until

TIMEOUT = 120
JOB_SIZE = 16 * MiB       # 4096 writes of 4 KiB ...
BURST = 16                # ... in bursts at QD16 ...
THINK_US = 25000          # ... each followed by a pause: at least 6.4 s of writing, however
                          # long the upgrade makes them wait (a rate limit would catch up)
UPGRADE_AT = 4 * BURST    # completed writes before the upgrade: under way, most still to come


def _image(tmp_path, size: int) -> str:
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as fh:
        fh.truncate(size)
    return img


def _no_failed_requests(env) -> None:
    logs = server_logs(env)
    assert not re.search(r"queue \d+: .* failed: ", logs), logs


def _deleted(kt, dev_id: int) -> None:
    """`del` is done and the kernel has let go of the device's id (DEL_DEV_ASYNC frees
    it a little after the nodes vanish), which the next test may ask for."""
    def gone() -> bool:
        try:
            kt.dev_info(dev_id)
        except OSError as exc:
            return exc.errno == errno.ENODEV
        return False
    assert wait_for_path(f"/dev/ublkc{dev_id}", False, 10)
    assert wait_until(gone, 10), f"device {dev_id} is still known to the kernel"


def test_upgrade_under_fio(cli_env, kt, tmp_path):
    """`upgrade` while fio writes with crc32c headers: a new server takes over the device
    with writes still to come, fio sees no error and every block reads back verified.
    `upgrade` runs by the CLI's main() in a fork of this process, as the kill matrix's
    commands do: a new interpreter's start would outlast the job under TCG, and the new
    server is the same either way, forked from the command's own process (a command of
    a newer pyublk_fast starts a server of that version)."""
    skip_unless_kernel_has(kt, uapi.UBLK_F_QUIESCE | RECOVERY_MODES["reissue"], "upgrade")
    dev_id, path = cli_add(cli_env, "-t", "loop", "-f", _image(tmp_path, 32 * MiB), "-q", "2",
                           "--recovery")
    old = server_pid(cli_env, dev_id)
    writer = fio_start("--name=up", f"--filename={path}", "--rw=randwrite", "--bs=4k",
                       f"--size={JOB_SIZE}", f"--iodepth={BURST}", "--ioengine=io_uring",
                       "--direct=1", f"--thinktime={THINK_US}", f"--thinktime_blocks={BURST}",
                       "--thinktime_blocks_type=issue", "--verify=crc32c", "--verify_fatal=1",
                       "--do_verify=1")
    try:
        assert wait_until(lambda: writer.poll() is not None or
                          writes_completed(dev_id) >= UPGRADE_AT, TIMEOUT, 0.01)
        assert writer.poll() is None, "fio finished before the upgrade: make the job longer"
        res = cli_in_fork(cli_env, "upgrade", "-n", str(dev_id), timeout=TIMEOUT)
        assert res.returncode == 0, res.stdout + res.stderr + server_logs(cli_env)
        assert res.stdout.strip() == path
        after_upgrade = writes_completed(dev_id)
        assert after_upgrade < JOB_SIZE // 4096, (
            "every write completed before the new server took over: the upgrade outlasted "
            "the job's writing (a very slow host?)")
        job = fio_result(writer)["jobs"][0]
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert job["error"] == 0 and job["write"]["io_bytes"] == JOB_SIZE, job
    assert job["read"]["io_bytes"] == JOB_SIZE                  # every block verified
    new = server_pid(cli_env, dev_id)
    info = kt.dev_info(dev_id)
    assert new != old and not pid_alive(old) and info.pid == new
    assert info.state == uapi.UBLK_S_DEV_LIVE and info.flags & uapi.UBLK_F_QUIESCE
    assert writes_completed(dev_id) == JOB_SIZE // 4096       # the rest by the new server
    _no_failed_requests(cli_env)
    res = cli_in_fork(cli_env, "del", "-n", str(dev_id))
    assert res.returncode == 0, res.stderr
    _deleted(kt, dev_id)


def _sh(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout


def _write_file(path, size: int) -> str:
    """A file of distinct 1 MiB blocks, fsynced; its sha256."""
    h = hashlib.sha256()
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as fh:
        for i in range(size // MiB):
            block[:8] = i.to_bytes(8, "little")
            fh.write(block)
            h.update(block)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def _digests(root) -> dict[str, str]:
    """sha256 of every file, read from the device (the page cache dropped first)."""
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.is_file()}


def test_resize_under_mounted_ext4_then_safe_del(cli_env, kt, tmp_path):
    """A 16 MiB loop device carrying a mounted ext4 grows to 48 MiB (`resize`: the file and
    the block device), resize2fs grows the file system online, and a file larger than the
    old device fits; the files read back intact. `del` then refuses in one line naming the
    device, its mount and --force, and the device serves on; after umount (fsck clean)
    `del` deletes it."""
    skip_unless_kernel_has(kt, uapi.UBLK_F_UPDATE_SIZE | uapi.UBLK_F_SAFE_STOP_DEV,
                           "resize and safe del")
    need_ext4("resize2fs", "fsck.ext4")
    img = _image(tmp_path, 16 * MiB)
    dev_id, path = cli_add(cli_env, "-t", "loop", "-f", img)
    _sh("mkfs.ext4", "-q", "-F", path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _sh("mount", path, str(mnt))
    mounted = True
    try:
        want = {"before": _write_file(mnt / "before", 4 * MiB)}
        res = cli_in_fork(cli_env, "resize", "-n", str(dev_id), "-s", "8M")
        assert res.returncode == 1 and "shrinking is refused" in res.stderr, res.stderr
        res = cli_in_fork(cli_env, "resize", "-n", str(dev_id), "-s", "48M")
        assert res.returncode == 0 and res.stdout == f"{path}: 48m\n", res.stdout + res.stderr
        assert os.path.getsize(img) == 48 * MiB
        with open(f"/sys/block/ublkb{dev_id}/size") as fh:
            assert int(fh.read()) * 512 == 48 * MiB
        _sh("resize2fs", path)
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize > 32 * MiB
        want["after"] = _write_file(mnt / "after", 24 * MiB)      # more than the old device
        assert _digests(mnt) == want

        res = cli_in_fork(cli_env, "del", "-n", str(dev_id))
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert f"device {dev_id} ({path}) is mounted on {mnt}" in res.stderr, res.stderr
        assert f"del -n {dev_id} --force" in res.stderr
        assert kt.dev_info(dev_id).state == uapi.UBLK_S_DEV_LIVE
        assert pid_alive(server_pid(cli_env, dev_id))
        assert _digests(mnt) == want
        _sh("umount", str(mnt))
        mounted = False
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=TIMEOUT)
    _sh("fsck.ext4", "-fn", path)
    res = cli_in_fork(cli_env, "del", "-n", str(dev_id))
    assert res.returncode == 0, res.stderr
    _deleted(kt, dev_id)
    _no_failed_requests(cli_env)
