"""The rbd backend on a real (throwaway, single-node) Ceph cluster, served over the
simulated driver: data, snapshots, errors, a dying server and a dying OSD."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import random
import threading
import time

import pytest

from pyublk_fast import uapi
from pyublk_fast.device import Device
from pyublk_fast.util import wait_until

from ceph_cluster import Cluster, ceph, missing  # noqa: F401  (ceph: the session fixture)

#: tests that need the extension but no cluster (those taking `ceph` skip through it)
needs_rbd = pytest.mark.skipif(missing() is not None, reason=str(missing()))

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
R, W = uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE


def rbd(spec, cluster, **kw):
    from pyublk_fast.backends.rbd import RbdBackend
    return RbdBackend(spec, conf=cluster.conf, **kw)


def blocks(rng, n, bs):
    """n distinct bs-aligned offsets in the image, each with its own random block."""
    offs = rng.sample(range(0, SIZE, bs), n)
    return [(off, rng.randbytes(bs)) for off in offs]


@pytest.mark.parametrize("queues,cache", [(1, False), (2, True)])
def test_verify_random_writes_read_back(sim, ceph, queues, cache):
    """fio-style verify: 4 KiB and 64 KiB random writes, 32 in flight, then every block
    read back (also 32 in flight) and the whole image compared with the model; with
    librbd's writeback cache the device takes FLUSH, without it has no cache to flush."""
    spec = ceph.new_image(SIZE)
    rng = random.Random(queues)
    model = bytearray(SIZE)
    backend = rbd(spec, ceph, cache=cache)
    assert backend.size == SIZE and not backend.read_only and backend.can_flush == cache
    with Device(backend, sim, queues=queues, depth=32) as dev, dev.open() as blk:
        for bs in (4 * KiB, 64 * KiB):
            writes = blocks(rng, 48, bs)
            assert blk.submit([(W, off, bs, data) for off, data in writes]) == [bs] * len(writes)
            for off, data in writes:
                model[off:off + bs] = data
            bufs = [bytearray(bs) for _ in writes]
            reqs = [(R, off, bs, buf) for (off, _), buf in zip(writes, bufs)]
            assert blk.submit(reqs) == [bs] * len(writes)
            assert [bytes(b) for b in bufs] == [data for _, data in writes]
        blk.flush()
        assert blk.pread(SIZE, 0) == bytes(model)
    # a new connection (a new server) sees the same bytes: they are in the cluster
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == bytes(model)


@pytest.mark.parametrize("path", ["copy", "need_get_data", "user_copy"])
def test_loadgen_verify(sim, ceph, path):
    """The simulated driver's fio (pattern prefill, then 4 KiB random reads and writes at
    QD32, every block read checked) on each data path the backend serves."""
    spec = ceph.new_image(2 * MiB)
    with Device(rbd(spec, ceph), sim, depth=32, data_path=path) as dev:
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=32, count=2000, verify=True)
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 2000)


def read_fresh(ceph, spec, offset, length) -> bytes:
    """What a second, fresh librbd client reads: what is on the OSDs (nothing of another
    client's cache)."""
    other = rbd(spec, ceph)
    try:
        buf = bytearray(length)
        other._img.pread_into(offset, buf)
    finally:
        other.close()
    return bytes(buf)


def test_fua_write_with_the_cache_is_on_the_osds_when_it_completes(sim, ceph):
    """--cache: the device declares a volatile cache and FUA, and a FUA write is in the
    cluster when it completes: a second, fresh client reads it right after, before any
    FLUSH. Its control, a write without FUA, is then still only in this client's cache
    (librbd's writeback policy, dirty data kept 30 s here), so the check tells them apart."""
    spec = ceph.new_image(SIZE)
    rng = random.Random(11)
    fua, plain = rng.randbytes(64 * KiB), rng.randbytes(64 * KiB)
    backend = rbd(spec, ceph, cache=True, options={"rbd_cache_policy": "writeback",
                                                   "rbd_cache_max_dirty_age": 30})
    with Device(backend, sim, depth=8) as dev, dev.open() as blk:
        attrs = sim.get_params(dev.dev_id)["attrs"]
        assert attrs & uapi.UBLK_ATTR_FUA and attrs & uapi.UBLK_ATTR_VOLATILE_CACHE
        blk.flush()             # librbd writes through its cache until the first flush
        # in different 4 MiB objects: neither write's I/O carries the other's object
        assert blk.submit([(W, 4 * MiB, len(fua), fua, uapi.UBLK_IO_F_FUA)]) == [len(fua)]
        assert blk.submit([(W, 0, len(plain), plain)]) == [len(plain)]
        on_osds = read_fresh(ceph, spec, 4 * MiB, len(fua)), read_fresh(ceph, spec, 0, len(plain))
        blk.flush()
        flushed = read_fresh(ceph, spec, 0, len(plain))
    assert on_osds[1] == bytes(len(plain)), "the control write was on the OSDs before a flush"
    assert on_osds[0] == fua
    assert flushed == plain


def test_without_the_cache_the_device_declares_no_cache_nor_fua_and_does_not_poll(sim, ceph):
    """Without the cache every write is on the OSDs when it completes: no FLUSH, no FUA.
    The queues sleep instead of polling (librbd's threads need the CPUs) unless told."""
    spec = ceph.new_image(MiB)
    with Device(rbd(spec, ceph), sim, depth=8) as dev:
        assert not sim.get_params(dev.dev_id)["attrs"] & (uapi.UBLK_ATTR_FUA |
                                                          uapi.UBLK_ATTR_VOLATILE_CACHE)
        assert dev.poll_us == 0
    backend = rbd(spec, ceph)
    try:
        assert Device(backend, None, poll_us=50).poll_us == 50
    finally:
        backend.close()


def test_discard_and_write_zeroes_read_back_zeros(sim, ceph):
    spec = ceph.new_image(SIZE)
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        blk.pwrite(b"\xa5" * (512 * KiB), 0)
        blk.discard(64 * KiB - 1024, 64 * KiB + 2048)       # partial 64 KiB units at both ends
        blk.write_zeroes(300 * KiB + 512, 3 * 512)
        blk.discard(4 * MiB, 1 * MiB)                          # never written: stays zeros
        got = blk.pread(512 * KiB, 0)
        assert blk.pread(MiB, 4 * MiB) == bytes(MiB)
    want = bytearray(b"\xa5" * (512 * KiB))
    want[64 * KiB - 1024:128 * KiB + 1024] = bytes(64 * KiB + 2048)
    want[300 * KiB + 512:300 * KiB + 2048] = bytes(1536)
    assert got == bytes(want)


def test_snapshot_is_served_read_only_as_it_was(sim, ceph):
    spec = ceph.new_image(SIZE)
    before, after = random.Random(1).randbytes(SIZE), random.Random(2).randbytes(SIZE)
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        blk.pwrite(before, 0)
        blk.flush()
        ceph.cli("snap", "create", f"{spec}@s1")
        blk.pwrite(after, 0)                  # the image moves on; the snapshot does not
    snap = rbd(f"{spec}@s1", ceph)
    assert snap.read_only and snap.size == SIZE
    with Device(snap, sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == before
        assert blk.submit([(W, 0, 4096, bytes(4096))]) == [-errno.EROFS]
        assert blk.submit([(uapi.UBLK_IO_OP_DISCARD, 0, 4096, None)]) == [-errno.EROFS]
        assert blk.pread(4096, 0) == before[:4096]
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == after


def test_resize_grows_the_image_while_it_serves(sim, ceph):
    """Device.resize grows the image (rbd info agrees) and then the device: the old bytes
    stay, the new space reads zeros, a write at the new end is in the cluster. A snapshot
    is refused with EROFS and keeps its size."""
    spec = ceph.new_image(SIZE)
    rng = random.Random(3)
    head, tail = rng.randbytes(64 * KiB), rng.randbytes(64 * KiB)
    with Device(rbd(spec, ceph), sim, depth=8) as dev:
        with dev.open() as blk:
            blk.pwrite(head, SIZE - len(head))
        dev.resize(3 * SIZE)
        assert dev.backend.size == sim.dev_info(dev.dev_id).size == 3 * SIZE
        with dev.open() as blk:
            blk.pwrite(tail, 3 * SIZE - len(tail))
            assert blk.pread(len(head), SIZE - len(head)) == head
            assert blk.pread(MiB, SIZE) == bytes(MiB)
    assert json.loads(ceph.cli("info", "--format", "json", spec))["size"] == 3 * SIZE
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(len(tail), 3 * SIZE - len(tail)) == tail
    ceph.cli("snap", "create", f"{spec}@s1")
    with Device(rbd(f"{spec}@s1", ceph), sim, depth=8) as dev:
        with pytest.raises(OSError) as e:
            dev.resize(4 * SIZE)
        assert e.value.errno == errno.EROFS and "a snapshot is read-only" in str(e.value)
        assert sim.dev_info(dev.dev_id).size == 3 * SIZE


def test_without_the_extension_the_backend_refuses_with_what_to_install():
    """A build without librbd-dev: importing the backends still works (the others serve),
    and the rbd backend names the missing packages."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['pyublk_fast.backends._native_rbd'] = None\n"
            "from pyublk_fast.backend import backend_class\n"
            "cls = backend_class('rbd'); backend_class('loop')\n"
            "try:\n    cls('rbd/x')\nexcept OSError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "the rbd backend was built without librbd (apt-get install librbd-dev librados-dev" \
        in run.stdout, run.stdout


@pytest.mark.parametrize("spec,message", [
    ("nopool/x", "pool 'nopool' does not exist"),
    ("rbd/noimage", "image rbd/noimage does not exist"),
    ("rbd/img1@nosnap", "image rbd/img1 or its snapshot 'nosnap' does not exist"),
    ("img1", "expected POOL/IMAGE or POOL/IMAGE@SNAP"),
    ("rbd/img1@", "expected POOL/IMAGE or POOL/IMAGE@SNAP"),
])
def test_bad_image_is_a_one_line_error(ceph, spec, message):
    if not ceph.cli("ls", "rbd").split().count("img1"):
        ceph.new_image(MiB)
    with pytest.raises((OSError, ValueError)) as exc:
        rbd(spec, ceph)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@needs_rbd
def test_unreachable_cluster_fails_within_the_connect_timeout(tmp_path):
    """A monitor address where nothing listens: the error comes after the timeout, not never."""
    import socket
    with socket.socket() as s:             # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        conf = tmp_path / "ceph.conf"
        conf.write_text(f"[global]\nmon host = v2:127.0.0.1:{s.getsockname()[1]}\n"
                        "auth client required = none\nlog to stderr = false\n")
        from pyublk_fast.backends.rbd import RbdBackend
        t0 = time.monotonic()
        with pytest.raises(OSError, match="cannot reach the Ceph cluster") as exc:
            RbdBackend("rbd/x", conf=str(conf), connect_timeout=2)
        took = time.monotonic() - t0
    assert exc.value.errno == errno.ETIMEDOUT
    assert 1.5 < took < 15, took


def test_bad_keyring_and_missing_permission_are_one_line_errors(ceph, tmp_path):
    """cephx: a wrong key, no keyring, an unknown client, a client whose capabilities do not
    cover the pool; each refused at once with a line naming the client."""
    import subprocess
    spec = ceph.new_image(MiB)
    bad = tmp_path / "bad.keyring"
    subprocess.run(["ceph-authtool", "--create-keyring", str(bad), "--gen-key", "-n", "client.admin"],
                   check=True, capture_output=True)
    limited = ceph.add_client("limited", "mon", "allow r", "osd", "allow rwx pool=other")
    cases = [
        (dict(keyring=str(bad)), errno.EACCES,
         f"the monitors refused client.admin: wrong key or unknown client (keyring {bad})"),
        (dict(keyring=str(tmp_path / "none")), errno.ENOENT,
         f"no key for client.admin: no keyring found at {tmp_path}/none"),
        (dict(client_id="nobody"), errno.EACCES, "the monitors refused client.nobody"),
        (dict(client_id="limited", keyring=limited), errno.EPERM,
         f"client.limited may not open {spec} (its capabilities do not cover this pool)"),
    ]
    for kw, err, message in cases:
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            rbd(spec, ceph, connect_timeout=5, **kw)
        assert exc.value.errno == err and message in str(exc.value), (kw, str(exc.value))
        assert time.monotonic() - t0 < 5, kw


def test_bad_options_and_missing_conf(ceph, tmp_path):
    from pyublk_fast.backends.rbd import RbdBackend
    with pytest.raises(ValueError, match="connect timeout must be > 0"):
        RbdBackend("rbd/x", conf=ceph.conf, connect_timeout=0)
    with pytest.raises(OSError, match=f"reading {tmp_path}/none.conf"):
        RbdBackend("rbd/x", conf=str(tmp_path / "none.conf"))
    with pytest.raises(OSError, match="ceph option no_such_option"):
        RbdBackend("rbd/x", conf=ceph.conf, options={"no_such_option": "1"})


def test_command_line_options_build_the_backend(sim, ceph):
    """`add -t rbd --image ... --conf ... --id ...`: the options reach the constructor."""
    from pyublk_fast.backend import backend_class
    cls = backend_class("rbd")
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    spec = ceph.new_image(MiB)
    ns = parser.parse_args(["--image", spec, "--conf", ceph.conf, "--id", "admin",
                            "--connect-timeout", "5", "--op-timeout", "7"])
    backend = cls.from_args(ns)
    try:
        assert backend.size == MiB and backend.image == spec and not backend.can_flush
    finally:
        backend.close()
    backend = cls.from_args(parser.parse_args(["--image", spec, "--conf", ceph.conf, "--cache",
                                               "--exclusive"]))
    assert backend.can_flush
    assert ceph.lock_holder(spec)[0] == backend._img.client_name
    backend.close()
    with pytest.raises(ValueError, match="expected POOL/IMAGE"):
        cls.from_args(parser.parse_args(["--image", "nopool"]))


def test_kill_and_recover_reissues_in_flight_writes(sim, ceph):
    """The server dies (kill -9) with writes in flight: they wait in the driver, the
    recovered queues (on the same image handle: the simulated driver recovers in
    process) serve them, none is lost."""
    spec = ceph.new_image(SIZE)
    rng = random.Random(7)
    writes = blocks(rng, 512, 16 * KiB)
    out = {}
    dev = Device(rbd(spec, ceph), sim, depth=16, recovery="reissue").start()
    try:
        blk = dev.open()
        th = threading.Thread(target=lambda: out.update(res=blk.submit(
            [(W, off, len(d), d) for off, d in writes], timeout=60)))
        th.start()
        assert wait_until(lambda: dev.requests_served >= 64, 30), "no write completed"
        dev.kill()
        assert th.is_alive(), "every write finished before the kill: none was in flight"
        dev.recover()
        th.join(60)
        assert not th.is_alive()
        assert out["res"] == [16 * KiB] * len(writes)
        bufs = [bytearray(16 * KiB) for _ in writes]
        assert blk.submit([(R, off, len(b), b) for (off, _), b in zip(writes, bufs)]) == \
            [16 * KiB] * len(writes)
        assert [bytes(b) for b in bufs] == [d for _, d in writes]
        blk.close()
    finally:
        dev.stop()


@needs_rbd
def test_osd_lost_during_io_fails_with_eio_and_the_server_stays_up(sim, caplog):
    """The OSD dies: requests wait up to op_timeout, then fail with EIO and a log line;
    the server keeps answering (more requests fail the same way) and stops cleanly."""
    cluster = Cluster()
    try:
        spec = cluster.new_image(SIZE)
        data = random.Random(3).randbytes(MiB)
        backend = rbd(spec, cluster, op_timeout=2)
        with Device(backend, sim, depth=8) as dev, dev.open() as blk:
            blk.pwrite(data, 0)
            blk.flush()
            cluster.kill_osd()
            caplog.set_level(logging.WARNING, logger="pyublk_fast.queue")
            t0 = time.monotonic()
            res = blk.submit([(W, MiB + i * 4096, 4096, bytes(4096)) for i in range(4)]
                             + [(R, 2 * MiB, 4096, bytearray(4096))], timeout=60)
            took = time.monotonic() - t0
            assert res == [-errno.EIO] * 5
            assert 1.5 < took < 20, took
            assert blk.submit([(R, 0, 4096, bytearray(4096))], timeout=60) == [-errno.EIO]
            assert any("failed: EIO" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        cluster.stop()


def test_python_path_serves_the_same_image(sim, ceph):
    """--python: blocking librbd calls from the Python handlers; the bytes agree with the
    native target's."""
    spec = ceph.new_image(SIZE)
    data = random.Random(5).randbytes(2 * MiB)
    with Device(rbd(spec, ceph), sim, depth=8, native=False) as dev, dev.open() as blk:
        blk.pwrite(data, MiB)
        blk.discard(MiB, 64 * KiB)
        blk.write_zeroes(2 * MiB, 4096)
        blk.flush()
        got = blk.pread(2 * MiB, MiB)
    want = bytearray(data)
    want[:64 * KiB] = bytes(64 * KiB)
    want[MiB:MiB + 4096] = bytes(4096)
    assert got == bytes(want)
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(2 * MiB, MiB) == bytes(want)


@pytest.mark.parametrize("image,message", [
    ("nopool/x", "pyublk_fast: pool 'nopool' does not exist"),
    ("rbd/nothere", "pyublk_fast: image rbd/nothere does not exist"),
])
def test_cli_add_names_what_is_missing(ceph, image, message):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "pyublk_fast", "add", "-t", "rbd", "--image", image,
                          "--conf", ceph.conf], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip() == message, run.stderr


# -- the exclusive lock (--exclusive) --------------------------------------------------------

#: A server in its own process (its own Ceph client): it holds the lock, then is killed or
#: stopped. Each stdin line "OFFSET LENGTH SEED" is a write of SEED's random bytes; it
#: answers the write's result.
OWNER = r"""
import random, sys
from pyublk_fast import uapi
from pyublk_fast.backends.rbd import RbdBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport
spec, conf = sys.argv[1:]
backend = RbdBackend(spec, conf=conf, exclusive=True, op_timeout=5)
with SimTransport() as sim, Device(backend, sim, depth=8) as dev, dev.open() as blk:
    print("serving", backend._img.client_name, flush=True)
    for line in sys.stdin:
        off, n, seed = map(int, line.split())
        data = random.Random(seed).randbytes(n)
        print(*blk.submit([(uapi.UBLK_IO_OP_WRITE, off, n, data)], timeout=60), flush=True)
"""


class Owner:
    """The OWNER server, started on spec; .client is its client.GID."""

    def __init__(self, ceph, spec):
        import subprocess
        import sys
        self.proc = subprocess.Popen([sys.executable, "-c", OWNER, spec, ceph.conf], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        word, self.client = self.line().split()
        assert word == "serving"

    def line(self) -> str:
        """Its next answer, within 60 s (it never hangs the test)."""
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the owner did not answer within 60 s"
        return self.proc.stdout.readline()

    def write(self, off, n, seed) -> int:
        self.proc.stdin.write(f"{off} {n} {seed}\n")
        self.proc.stdin.flush()
        return int(self.line())

    def signal(self, sig):
        import os
        os.kill(self.proc.pid, sig)

    def end(self):
        import signal
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()


#: what one write of these tests covers (a request, within the device's max I/O size)
CHUNK = 256 * KiB


def pattern(seed, n=CHUNK) -> bytes:
    return random.Random(seed).randbytes(n)


def test_exclusive_lock_is_held_and_a_second_server_is_refused_naming_it(sim, ceph):
    """The lock is this server's for as long as it serves; a second --exclusive server is
    refused at once with a one-line error naming the holder (which answered: it is alive),
    and the first serves on. No lock is broken, nobody blocklisted."""
    spec = ceph.new_image(SIZE)
    backend = rbd(spec, ceph, exclusive=True, connect_timeout=5)
    with Device(backend, sim, depth=8) as dev, dev.open() as blk:
        client, addr = ceph.lock_holder(spec)
        assert client == backend._img.client_name
        blk.pwrite(pattern(1), 0)
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            rbd(spec, ceph, exclusive=True, connect_timeout=5)
        assert time.monotonic() - t0 < 4, "a live holder should answer at once"
        assert exc.value.errno == errno.EBUSY
        assert str(exc.value) == (f"[Errno {errno.EBUSY}] image {spec} is locked by {client} at "
                                  f"{addr}: another server holds it (--exclusive)")
        blk.pwrite(pattern(2), CHUNK)
        assert blk.pread(2 * CHUNK, 0) == pattern(1) + pattern(2)
        assert ceph.lock_holder(spec) == (client, addr)
    assert addr not in ceph.blocklist()
    # closed: the lock went with it, the next server takes it without breaking anything
    again = rbd(spec, ceph, exclusive=True)
    assert ceph.lock_holder(spec)[0] == again._img.client_name
    again.close()


def test_exclusive_needs_the_feature_and_a_writable_image(ceph):
    spec = ceph.new_image(MiB)
    ceph.cli("feature", "disable", spec, "fast-diff,object-map,exclusive-lock")
    with pytest.raises(OSError) as exc:
        rbd(spec, ceph, exclusive=True)
    assert exc.value.errno == errno.EINVAL and str(exc.value).endswith(
        f"image {spec} lacks the exclusive-lock feature --exclusive needs "
        f"(rbd feature enable {spec} exclusive-lock)")
    rbd(spec, ceph).close()            # without --exclusive it serves as before
    with pytest.raises(ValueError, match="a snapshot is read-only, it has no exclusive lock"):
        rbd(f"{spec}@s", ceph, exclusive=True)


def test_kill_9_of_the_holder_then_a_new_server_takes_the_lock_over(sim, ceph, caplog):
    """The holder dies by SIGKILL (its watch on the image lingers in the OSD for 30 s):
    the new server's notification goes unanswered, so it blocklists the dead holder,
    breaks its lock and takes it, within the connect timeout, not the watch's 30 s. What
    the dead server wrote is there, and what the new one writes reads back."""
    import signal
    spec = ceph.new_image(SIZE)
    old = Owner(ceph, spec)
    try:
        assert old.write(0, CHUNK, 1) == CHUNK
        client, addr = ceph.lock_holder(spec)
        assert client == old.client
        old.signal(signal.SIGKILL)
        old.end()
        caplog.set_level(logging.WARNING, logger="pyublk_fast.backends.rbd")
        t0 = time.monotonic()
        backend = rbd(spec, ceph, exclusive=True, connect_timeout=3)
        assert 2.5 < time.monotonic() - t0 < 15
        assert f"took the exclusive lock over from {client} at {addr}" in caplog.text
        assert ceph.lock_holder(spec)[0] == backend._img.client_name
        assert addr in ceph.blocklist()
        with Device(backend, sim, depth=8) as dev, dev.open() as blk:
            assert blk.pread(CHUNK, 0) == pattern(1)
            blk.pwrite(pattern(2), CHUNK)
            assert blk.pread(2 * CHUNK, 0) == pattern(1) + pattern(2)
        with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
            assert blk.pread(2 * CHUNK, 0) == pattern(1) + pattern(2)
    finally:
        old.end()


def test_a_half_dead_holder_is_blocklisted_before_its_lock_is_broken(sim, ceph):
    """The holder is stopped (SIGSTOP: alive, silent). The new server takes the lock over;
    when the old one wakes up, its writes fail (it was blocklisted before its lock was
    broken) and the new server's data stays as written."""
    import signal
    spec = ceph.new_image(SIZE)
    old = Owner(ceph, spec)
    try:
        assert old.write(0, CHUNK, 1) == CHUNK
        old.signal(signal.SIGSTOP)
        backend = rbd(spec, ceph, exclusive=True, connect_timeout=3)
        with Device(backend, sim, depth=8) as dev, dev.open() as blk:
            blk.pwrite(pattern(2), 0)
            old.signal(signal.SIGCONT)
            assert old.write(0, CHUNK, 3) == -errno.EIO
            assert old.write(CHUNK, CHUNK, 3) == -errno.EIO
            blk.pwrite(pattern(4), CHUNK)
            assert blk.pread(2 * CHUNK, 0) == pattern(2) + pattern(4)
        assert old.proc.poll() is None, "the blocklisted server should serve on (with errors)"
    finally:
        old.end()
    with Device(rbd(spec, ceph), sim, depth=8) as dev, dev.open() as blk:
        assert blk.pread(2 * CHUNK, 0) == pattern(2) + pattern(4)


# -- the bench's reference -----------------------------------------------------------------

def test_bench_fio_reference_counts_librbds_threads(ceph, tmp_path, monkeypatch):
    """The bench's fio rbd reference, on an image of the bench's, counts the CPU of every
    thread of fio's processes: librbd's messenger and completion threads do most of an rbd
    request's client work, and the backend's rows count them in the server's process.
    fio's own figure (its job's thread) is several times smaller."""
    from pyublk_fast.bench import refs
    from pyublk_fast.bench.services import RbdImage
    raw = tmp_path / "raw"
    raw.write_bytes(random.Random(7).randbytes(SIZE))
    jobs = []
    parse = refs.parse_fio
    monkeypatch.setattr(refs, "parse_fio", lambda out: jobs.append(parse(out)) or jobs[-1])
    image = RbdImage(str(tmp_path), lambda kind: str(raw), conf=ceph.conf, pool=ceph.pool)
    try:
        target, env = image.fio_target()
        r = refs.fio(target, "randwrite", 4096, 16, 1.0, env=env)
    finally:
        image.close()
    assert r["ios"] > 100 and r["errors"] == 0
    assert r["cpu_s"] > 1.5 * jobs[0]["cpu_s"] > 0, (r["cpu_s"], jobs[0]["cpu_s"])
