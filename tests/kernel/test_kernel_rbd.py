"""The rbd backend on the real driver, against a throwaway Ceph cluster started in the
guest (tools/ceph/start-cluster, on its loopback interface): fio's crc32c verify (with
librbd's cache: FUA writes too), and the
CLI server with --exclusive killed (-9) under fio, then `recover` (a new server breaks
the dead one's lock and serves the requests it left)."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from ceph_cluster import Cluster, missing
from kernel_fixtures import MiB, cli_add, cli_env, cli_in_fork, fio, fio_verify_args, kt  # noqa: F401
from kernel_fixtures import server_pid, writes_completed
from pyublk_fast.device import Device
from pyublk_fast.util import wait_for_path, wait_until

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

#: the cluster's steps take far longer under the VM's emulated CPUs
TIMEOUT_SCALE = 10


@pytest.fixture(scope="module")
def ceph():
    cluster = Cluster(timeout_scale=TIMEOUT_SCALE)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("cache", [False, True])
def test_rbd_fio_verify(kt, ceph, cache):
    """fio's crc32c verify on a 2-queue device. With --cache the disk has a write-back
    cache and FUA, and fio writes with O_SYNC: each write reaches the server as a FUA
    request (then a FLUSH: a block device's O_DSYNC write is both); without the cache
    the disk is write through and has no FUA."""
    from pyublk_fast.backends.rbd import RbdBackend
    spec = ceph.new_image(16 * MiB)
    with Device(RbdBackend(spec, conf=ceph.conf, cache=cache), kt, queues=2, depth=32) as dev:
        queue = f"/sys/block/ublkb{dev.dev_id}/queue"
        with open(f"{queue}/fua") as fua, open(f"{queue}/write_cache") as wc:
            assert (fua.read().strip(), wc.read().strip()) == (("1", "write back") if cache else
                                                               ("0", "write through"))
        sync = ["--sync=1"] if cache else []
        out = fio(*sync, *fio_verify_args(kt.block_path(dev.dev_id), size=6 * MiB))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0


KILL_AFTER = 200        # of the job's 1024 writes: the server dies with the job under way


def test_rbd_exclusive_kill9_under_fio_then_recover(ceph, cli_env):
    """kill -9 of the --exclusive server while fio writes (crc32c): `recover` starts a new
    server, which breaks the dead one's lock (blocklisting it first) and serves the
    requests it left; fio sees no error and reads every block back verified."""
    spec = ceph.new_image(16 * MiB)
    dev_id, path = cli_add(cli_env, "-t", "rbd", "--image", spec, "--conf", ceph.conf,
                           "--exclusive", "--connect-timeout", "20", "--recovery")
    pid = server_pid(cli_env, dev_id)
    job = subprocess.Popen(["fio", "--output-format=json", "--name=rec", f"--filename={path}",
                            "--rw=randwrite", "--bs=4k", "--size=4M", "--iodepth=16",
                            "--ioengine=io_uring", "--direct=1", "--verify=crc32c",
                            "--verify_fatal=1", "--do_verify=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: job.poll() is not None or writes_completed(dev_id) >= KILL_AFTER,
                          300, 0.01), f"fio completed {writes_completed(dev_id)} writes in 300 s"
        assert job.poll() is None, "fio finished before the kill: make the job longer"
        holder = ceph.lock_holder(spec)
        os.kill(pid, signal.SIGKILL)
        assert wait_for_path(f"/proc/{pid}", present=False, timeout=10, interval=0.05)
        res = cli_in_fork(cli_env, "recover", "-n", str(dev_id))
        assert res.returncode == 0, res.stdout + res.stderr
        out, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, out[-2000:] + err[-2000:]
    res = json.loads(out[out.index("{"):])["jobs"][0]
    assert res["error"] == 0 and res["write"]["io_bytes"] == res["read"]["io_bytes"] == 4 * MiB
    assert server_pid(cli_env, dev_id) != pid
    new = ceph.lock_holder(spec)
    assert new[0] != holder[0] and holder[1] in ceph.blocklist()
