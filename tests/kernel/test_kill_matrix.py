"""Kill matrix: kill -9 a CLI server under fio, recover, and lose no acknowledged write.

Every case adds a device with the CLI's ``add ... --recovery MODE`` (its main() in a fork
of this process, see kernel_fixtures.cli_in_fork), runs fio 4 KiB random writes at QD16
(libaio, O_DIRECT, crc32c verify headers), kills the server with SIGKILL once
/sys/block/ublkbN/stat counts KILL_AT completed writes of the run, runs ``recover -n N``
and checks what fio wrote:

- ``reissue``: the requests the dead server held are served again by the new one, and
  new ones wait for it: fio sees no error at all, and ``fio --verify_only`` then reads
  back and checks every block it wrote.
- ``fail_io``: I/O fails while no server runs. Region A is written by a first fio run
  that ends before the kill (every write acknowledged) and is checked by
  ``--verify_only`` after the recovery. Region B's run is the one killed: it counts
  write errors instead of stopping (at least MIN_FAILED must occur, and every write is
  either acknowledged or counted failed), and its own verify pass reads back every
  write it saw acknowledged (fio drops failed writes from its verify list). That pass
  must not start before the new server runs, so fio is stopped (SIGSTOP) once some
  writes have failed and continued after ``recover``.

Each case also asserts that no server failed a request (the queues log every failed one),
and for qcow2 that ``qemu-img check`` finds no corruption and no leak after the final
stop (a write killed between its refcount update and its data leaks a cluster, which the
recovering server reclaims when it opens the image).
Further tests kill a recovering server, kill qcow2 at its most fragile point, kill a
Python backend with coroutines in flight, and kill under a mounted ext4.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess

import pytest

from kernel_fixtures import (MiB, cli_add, cli_env, cli_foreground, cli_in_fork, fio,  # noqa: F401
                             fio_result, fio_start, kt, need_ext4, server_logs, skip_unless_kernel_has,
                             writes_completed, writes_in_flight)
from pyublk_fast import uapi
from pyublk_fast.backend import backend_class
from pyublk_fast.device import BUFFERED_PATHS, PATH_FLAGS, RECOVERY_MODES
from pyublk_fast.transport.kernel import pid_alive
from pyublk_fast.util import wait_until

IMG_SIZE = 16 * MiB
BLOCK = 4096
REGION = 2 * MiB          # the killed reissue run: 512 writes of 4 KiB
FAIL_REGION = 4 * MiB     # the killed fail_io run: longer, see _kill_fail_io
BURST = 16                # writes fio submits at once (QD16) ...
THINK_US = 8000           # ... then it pauses: a run lasts a second or two, also while
                          # its writes fail at once (a rate limit, or thinktime counted in
                          # completed blocks, would count only successful ones)
KILL_AT = 8 * BURST       # completed writes of the killed run before the kill
KILL_IN_FLIGHT = 8        # ... just after seeing at least these in flight
MIN_FAILED = BURST        # fail_io: writes that must fail before fio is held
TIMEOUT = 60
LIVE = uapi.UBLK_S_DEV_LIVE

#: (case name, -t target, its add options); each runs on the buffered paths and on those
#: its backend declares (zero copy: the Python ones move data by ring request I/O)
TARGETS = [("loop", "loop", []), ("loop-python", "loop", ["--python"]), ("qcow2", "qcow2", [])]
PATH_OPTS = {"copy": [], "user_copy": ["-u"], "zero_copy": ["-z"]}


def _paths(target: str) -> list[str]:
    """The data paths of the target's cases: the buffered ones and those it declares."""
    declared = backend_class(target).data_paths
    return [p for p in PATH_OPTS if p in BUFFERED_PATHS or p in declared]


CASES = [pytest.param(target, opts, path, mode, id=f"{name}-{path}-{mode}")
         for name, target, opts in TARGETS for path in _paths(target)
         for mode in ("reissue", "fail_io")]


def _image(tmp_path, target: str, size: int = IMG_SIZE) -> str:
    if target == "qcow2":
        img = str(tmp_path / "disk.qcow2")
        # 4 KiB clusters: every 4 KiB write to a new place allocates one, so the kill lands
        # inside allocations and the writes after `recover` allocate again
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                        img, str(size)], check=True, capture_output=True, timeout=60)
    else:
        img = str(tmp_path / "disk.img")
        with open(img, "wb") as fh:
            fh.truncate(size)
    return img


def _job(path: str, name: str, offset: int, size: int, *extra: str) -> list[str]:
    """fio 4 KiB random writes over [offset, offset + size) with crc32c verify headers, in
    paced bursts of BURST; the same arguments plus --verify_only check the blocks a
    finished run wrote. The job runs as a thread of the process we start, so that
    SIGSTOP holds it."""
    return [f"--name={name}", f"--filename={path}", "--rw=randwrite", "--bs=4k",
            f"--iodepth={BURST}", f"--iodepth_batch_submit={BURST}",
            f"--iodepth_batch_complete_min={BURST}", f"--thinktime={THINK_US}",
            f"--thinktime_blocks={BURST}", "--thinktime_blocks_type=issue",
            "--ioengine=libaio", "--direct=1",
            f"--offset={offset}", f"--size={size}", "--verify=crc32c", "--verify_fatal=1",
            "--verify_state_save=0", "--thread", *extra]


def _state(kt, dev_id: int) -> int:
    return kt.dev_info(dev_id).state


def _wait_not_live(kt, dev_id: int) -> None:
    """Wait for the kernel to see the server dead (it tears its rings down first)."""
    assert wait_until(lambda: _state(kt, dev_id) != LIVE, TIMEOUT), "device still LIVE"


def _kill_server(kt, dev_id: int, writer: subprocess.Popen, at: int,
                 in_flight: int = KILL_IN_FLIGHT) -> int:
    """SIGKILL the device's server once ``at`` writes completed, just after seeing at least
    ``in_flight`` in flight, while ``writer`` still runs; returns its pid once the kernel
    has seen it die (the device left LIVE)."""
    pid = kt.dev_info(dev_id).pid                 # the kernel's server pid, as `list --json`
    assert pid > 0 and pid_alive(pid), kt.dev_info(dev_id)

    def due() -> bool:
        return (writes_completed(dev_id) >= at and writes_in_flight(dev_id) >= in_flight
                or writer.poll() is not None)
    assert wait_until(due, TIMEOUT, 0.0005), \
        f"{writes_completed(dev_id)} of {at} writes in {TIMEOUT} s"
    os.kill(pid, signal.SIGKILL)
    assert writer.poll() is None, "the writer ended before the kill: make its run longer"
    _wait_not_live(kt, dev_id)
    return pid


def _recover(env, kt, dev_id: int, dead_pid: int) -> None:
    res = cli_in_fork(env, "recover", "-n", str(dev_id))
    assert res.returncode == 0, res.stdout + res.stderr
    info = kt.dev_info(dev_id)
    assert info.state == LIVE and info.pid not in (0, dead_pid), info


def _recover_and_verify(env, kt, dev_id: int, dead_pid: int, writer: subprocess.Popen,
                        job: list[str]) -> None:
    """``recover``; then the writer of ``job`` (reissue: its writes waited for the new
    server) ends with no error, all of REGION written, and every block reads back."""
    _recover(env, kt, dev_id, dead_pid)
    assert fio_result(writer)["jobs"][0]["write"]["io_bytes"] == REGION
    assert fio(*job, "--verify_only")["jobs"][0]["read"]["io_bytes"] == REGION


def _stop(env, kt, dev_id: int) -> None:
    """Stop the server as `del` does (SIGTERM): it deletes the device, closes the backend
    and exits. No server failed a request: every failed one is logged by its queue."""
    pid = kt.dev_info(dev_id).pid
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not pid_alive(pid), TIMEOUT), f"server {pid} still runs"
    assert dev_id not in kt.list_devs()
    logs = server_logs(env)
    assert not re.search(r"queue \d+: .* failed: ", logs), logs


def _qemu_img_check(img: str, leaks: bool = False) -> dict:
    """qemu-img check's findings: no corruption, no check error and, unless ``leaks``,
    no leaked cluster."""
    res = subprocess.run(["qemu-img", "check", "--output=json", img], capture_output=True,
                         text=True, timeout=120)
    info = json.loads(res.stdout)
    assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
    assert leaks or info.get("leaks", 0) == 0, info
    return info


def _kill_reissue(env, kt, dev_id: int, path: str) -> None:
    job = _job(path, "w", 0, REGION)
    writer = fio_start(*job, "--do_verify=0")
    dead = _kill_server(kt, dev_id, writer, KILL_AT)
    _recover_and_verify(env, kt, dev_id, dead, writer, job)


def _kill_fail_io(env, kt, dev_id: int, path: str) -> None:
    a = _job(path, "a", 0, REGION, "--iodepth_batch_complete_min=1", "--thinktime=0")
    assert fio(*a, "--do_verify=0")["jobs"][0]["write"]["io_bytes"] == REGION
    b = _job(path, "b", REGION, FAIL_REGION, "--do_verify=1", "--continue_on_error=write",
             f"--ignore_error=,{errno.EIO}:{errno.EREMOTEIO}")
    writer = fio_start(*b)
    dead = _kill_server(kt, dev_id, writer, writes_completed(dev_id) + KILL_AT)
    # No server: every write completing now has failed (EIO in flight, EREMOTEIO new).
    # Once some have, hold fio, or it would reach its verify pass before `recover`; the
    # rest of its bursts leave at least 0.4 s for that.
    failing = writes_completed(dev_id)
    assert wait_until(lambda: writes_completed(dev_id) >= failing + MIN_FAILED
                      or writer.poll() is not None, TIMEOUT, 0.0005)
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        assert writer.poll() is None, "fio ended before the recovery: make its run longer"
        _recover(env, kt, dev_id, dead)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    w = fio_result(writer)["jobs"][0]
    written = w["write"]["io_bytes"] // BLOCK
    assert w["total_err"] >= MIN_FAILED, w
    assert written + w["total_err"] == FAIL_REGION // BLOCK, w
    assert w["read"]["io_bytes"] == w["write"]["io_bytes"], w    # each acknowledged one verified
    assert fio(*a, "--verify_only")["jobs"][0]["read"]["io_bytes"] == REGION


@pytest.mark.parametrize("target,opts,data_path,mode", CASES)
def test_kill9_recover(cli_env, kt, tmp_path, target, opts, data_path, mode):
    skip_unless_kernel_has(kt, PATH_FLAGS[data_path] | RECOVERY_MODES[mode],
                           f"{data_path} with recovery {mode}")
    img = _image(tmp_path, target)
    dev_id, path = cli_add(cli_env, "-t", target, "-f", img, "--recovery", mode, *opts,
                           *PATH_OPTS[data_path])
    (_kill_reissue if mode == "reissue" else _kill_fail_io)(cli_env, kt, dev_id, path)
    _stop(cli_env, kt, dev_id)
    if target == "qcow2":
        _qemu_img_check(img)


def test_kill9_with_aio_tasks_in_flight(cli_env, kt, tmp_path):
    """A Python backend whose requests each sleep 50 ms on the ring first (slow_aio_backend:
    the server dies with coroutines awaiting), recovery reissue: killed under fio and
    recovered, fio sees no error and every block it wrote reads back."""
    skip_unless_kernel_has(kt, RECOVERY_MODES["reissue"], "recovery reissue")
    img = _image(tmp_path, "loop")
    dev_id, path = cli_add(cli_env, "--module", "slow_aio_backend", "-t", "slow-aio-loop",
                           "-f", img, "--recovery", "reissue")
    _kill_reissue(cli_env, kt, dev_id, path)
    _stop(cli_env, kt, dev_id)


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def _kill_child(pid: int, out) -> None:
    """SIGKILL a server we forked; it must not have exited before."""
    try:
        os.kill(pid, signal.SIGKILL)
    finally:
        status = os.waitpid(pid, 0)[1]
        text = out.read()
        out.close()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, text


def _stop_before_end_of_recovery() -> None:
    """In the server to be: stop (SIGSTOP) once its queues have fetched every tag again,
    before END_USER_RECOVERY, so that it is killed in the middle of the recovery."""
    from pyublk_fast.transport.kernel import KernelTransport
    end = KernelTransport.end_user_recovery

    def stop_then_end(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGSTOP)
        return end(self, *args, **kwargs)
    KernelTransport.end_user_recovery = stop_then_end


def test_kills_during_and_right_after_recovery(cli_env, kt, tmp_path):
    """qcow2 under fio: the server is killed, then the one recovering the device is killed
    in the middle of its recovery (START_USER_RECOVERY done, every tag fetched again,
    END_USER_RECOVERY not sent), then the next one right after it reported the device
    live (it serves the reissued writes). A fourth server recovers the device: fio sees
    no error, every block it wrote reads back, and qemu-img check finds no corruption."""
    skip_unless_kernel_has(kt, RECOVERY_MODES["reissue"], "recovery reissue")
    img = _image(tmp_path, "qcow2")
    dev_id, path = cli_add(cli_env, "-t", "qcow2", "-f", img, "--recovery", "reissue")
    job = _job(path, "w", 0, REGION)
    writer = fio_start(*job, "--do_verify=0")
    _kill_server(kt, dev_id, writer, KILL_AT)

    during, out = cli_foreground(cli_env, "recover", "-n", str(dev_id),
                                 before=_stop_before_end_of_recovery)
    try:
        assert wait_until(lambda: _proc_state(during) in "tTZ", TIMEOUT), "it did not stop"
        assert _proc_state(during) != "Z" and _state(kt, dev_id) != LIVE
    finally:
        _kill_child(during, out)

    after, out = cli_foreground(cli_env, "recover", "-n", str(dev_id))
    try:
        assert select.select([out], [], [], TIMEOUT)[0], "no word from the third server"
        assert out.readline().strip() == path
        assert _state(kt, dev_id) == LIVE
    finally:
        _kill_child(after, out)
    _wait_not_live(kt, dev_id)

    _recover_and_verify(cli_env, kt, dev_id, after, writer, job)
    _stop(cli_env, kt, dev_id)
    _qemu_img_check(img)


def _die_after_allocations(n: int):
    """A fault for the server to be: SIGKILL itself right after its n-th qcow2 cluster
    allocation, whose refcount is then on disk while the cluster is not written yet (an
    appended one lies past the end of the file)."""
    def install() -> None:
        from pyublk_fast.backends.qcow2.refcount import Refcounts
        alloc, count = Refcounts.alloc, itertools.count(1)

        def alloc_then_die(self):
            c = alloc(self)
            if next(count) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return c
        Refcounts.alloc = alloc_then_die
    return install


def test_qcow2_kill_between_refcount_and_cluster_write(cli_env, kt, tmp_path):
    """The qcow2 server dies by SIGKILL exactly between counting a new cluster and writing
    it, mid-fio: the image then holds a counted cluster past its end, a leak. The
    recovered server reclaims it when it opens the image and serves every write: fio
    sees no error, every block reads back, and qemu-img check finds no corruption and no
    leak."""
    skip_unless_kernel_has(kt, RECOVERY_MODES["reissue"], "recovery reissue")
    img = _image(tmp_path, "qcow2")
    dev_id, path = cli_add(cli_env, "-t", "qcow2", "-f", img, "--recovery", "reissue",
                           before=_die_after_allocations(KILL_AT))
    job = _job(path, "w", 0, REGION)
    writer = fio_start(*job, "--do_verify=0")
    dead = kt.dev_info(dev_id).pid
    assert wait_until(lambda: not pid_alive(dead) or writer.poll() is not None, TIMEOUT)
    assert writer.poll() is None, "fio ended before the server's fault"
    _wait_not_live(kt, dev_id)
    # qemu-img check does not look past the end of the file: it sees the counted cluster
    # as a leak in a copy grown by 1 MiB
    grown = str(tmp_path / "grown.qcow2")
    shutil.copyfile(img, grown)
    os.truncate(grown, os.path.getsize(grown) + MiB)
    assert _qemu_img_check(grown, leaks=True).get("leaks", 0) >= 1
    _recover_and_verify(cli_env, kt, dev_id, dead, writer, job)
    _stop(cli_env, kt, dev_id)
    _qemu_img_check(img)


def _sh(*cmd: str, timeout: float = 120) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}{res.stderr}"


def _digests(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def _write_synced(root) -> dict[str, str]:
    """Files of 4 KiB to 1 MiB of random bytes, each fsynced, and their directory: their
    digests by name."""
    root.mkdir()
    for i in range(8):
        with open(root / f"f{i}", "wb") as fh:
            fh.write(os.urandom(BLOCK * (1 + 36 * i)))
            fh.flush()
            os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return _digests(root)


def _kernel_log_mark(text: str) -> None:
    with open("/dev/kmsg", "w") as fh:
        fh.write(text + "\n")


def _kernel_log_since(text: str) -> list[str]:
    """The kernel log's messages after the last one that is ``text``."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    msgs = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:        # records overwritten while reading: go on
                continue
            msgs.append(rec.split(";", 1)[-1].split("\n", 1)[0])
    finally:
        os.close(fd)
    last = max((i for i, m in enumerate(msgs) if m == text), default=None)
    assert last is not None, f"the kernel log lost the mark {text!r}"
    return msgs[last + 1:]


EXT4_TROUBLE = re.compile(r"EXT4-fs (error|warning)|I/O error|Aborting journal|JBD2.*(error|abort)",
                          re.IGNORECASE)


@pytest.mark.parametrize("mode", ["reissue", "fail_io"])
def test_kill9_under_mounted_ext4(cli_env, kt, tmp_path, mode):
    """kill -9 while ext4 is mounted on the device, files were written and fsynced, and a
    writer appends and fsyncs more. ``reissue``: the file system never sees an error (its
    kernel log says nothing, the writer's fsyncs all succeed). ``fail_io``: its journal
    aborts on the failed writes (it turns read-only); after ``recover`` a new mount
    replays the journal. Either way fsck.ext4 -fn finds it clean after umount and the
    synced files read back intact after mounting again (with ``reissue`` also every
    block the writer wrote)."""
    skip_unless_kernel_has(kt, RECOVERY_MODES[mode], f"recovery {mode}")
    need_ext4()
    img = _image(tmp_path, "loop", 64 * MiB)
    dev_id, path = cli_add(cli_env, "-t", "loop", "-f", img, "--recovery", mode)
    _sh("mkfs.ext4", "-q", "-F", path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mark = f"pyublk_fast test: kill -9 under ext4 on ublkb{dev_id}, pid {os.getpid()}"
    job = ["--name=during", f"--directory={mnt}/during", "--rw=write", "--bs=16k", "--nrfiles=4",
           "--filesize=1M", "--fsync=4", "--ioengine=psync", f"--thinktime={THINK_US}",
           "--thinktime_blocks=4", "--thinktime_blocks_type=issue", "--verify=crc32c",
           "--verify_fatal=1", "--verify_state_save=0", "--thread"]
    _sh("mount", path, str(mnt))
    writer = None
    try:
        synced = _write_synced(mnt / "synced")
        (mnt / "during").mkdir()
        _kernel_log_mark(mark)
        # with fail_io it goes on after failed writes until the file system turns read-only
        writer = fio_start(*job, "--do_verify=0",
                           *(["--continue_on_error=all"] if mode == "fail_io" else []))
        # buffered writes reach the device in small batches (fsync): kill after a few
        dead = _kill_server(kt, dev_id, writer, writes_completed(dev_id) + 8, in_flight=1)
        if mode == "fail_io":
            abort = f"Aborting journal on device ublkb{dev_id}"
            assert wait_until(lambda: any(m.startswith(abort) for m in _kernel_log_since(mark)),
                              TIMEOUT, 0.05), "ext4 did not abort its journal"
        _recover(cli_env, kt, dev_id, dead)
        if mode == "reissue":
            assert fio_result(writer)["jobs"][0]["write"]["io_bytes"] == 4 * MiB  # no error
            trouble = [m for m in _kernel_log_since(mark) if EXT4_TROUBLE.search(m)]
            assert not trouble, "\n".join(trouble)
    finally:
        if writer is not None and writer.poll() is None:   # it is of no further use
            writer.kill()
            writer.wait()
        _sh("umount", str(mnt))
    _kernel_log_mark(mark + ": mount again")
    _sh("mount", path, str(mnt))
    try:
        assert _digests(mnt / "synced") == synced
        if mode == "reissue":
            assert fio(*job, "--verify_only")["jobs"][0]["read"]["io_bytes"] == 4 * MiB
    finally:
        _sh("umount", str(mnt))
    log = _kernel_log_since(mark + ": mount again")
    assert not [m for m in log if EXT4_TROUBLE.search(m)], "\n".join(log)
    assert any("recovery complete" in m for m in log) == (mode == "fail_io"), "\n".join(log)
    _sh("fsck.ext4", "-fn", path)
    _stop(cli_env, kt, dev_id)
