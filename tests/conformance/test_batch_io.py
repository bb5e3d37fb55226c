"""BATCH_IO (Linux 7.0): the driver's answers to the batch commands, and data served in batches.

Written once against the ``transport`` fixture: here the simulated driver;
tests/kernel/test_kernel_batch_io.py imports these functions and runs them on the
real driver, so the simulator is held to what the kernel accepts and refuses.
The raw checks talk to the driver through a queue that is not serving
(Queue.probe_cmd): one command, one answer.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast._core.queue import NativeTarget, Queue
from pyublk_fast.device import Device
from pyublk_fast.stats import L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend_kinds import build_backend  # noqa: E402
from test_sim_protocol import Slow, _at, _patterns, kill_and_recover_reissues_everything, run_load  # noqa: E402

MiB = 1 << 20
DEPTH = 4
BUF = 64 * 1024
PREP, COMMIT = 0x25, 0x26          # UBLK_IO_PREP_IO_CMDS, UBLK_IO_COMMIT_IO_CMDS (ioctl nr)
HAS_BUF_ADDR = uapi.UBLK_BATCH_F_HAS_BUF_ADDR


@pytest.fixture
def transport(sim):
    """The driver under test: the simulated one (the kernel suite overrides this fixture)."""
    return sim


def skip_without_batch_io(t) -> None:
    if not t.features() & uapi.UBLK_F_BATCH_IO:
        pytest.skip("the driver lacks BATCH_IO (Linux 7.0)")


class RawQueue:
    """Queue 0 of a fresh device (never started), for probe_cmd()."""

    def __init__(self, t, flags: int):
        self.t = t
        self.dev_id, self.flags = t.add_dev(-1, 1, DEPTH, BUF, flags)
        t.set_params(self.dev_id, MiB, 512, 0)
        ep = t.queue_endpoint(self.dev_id, 0)
        self.q = Queue(DEPTH, BUF, ep.channel, ep.iods, native=NativeTarget(),
                       batch_io=bool(self.flags & uapi.UBLK_F_BATCH_IO))
        self.bufs = self.q.buffers()

    def elems(self, tags, with_addr=True, result=0) -> bytes:
        """PREP/COMMIT elements for tags: header (+ the tag buffer's address)."""
        out = b""
        for tag in tags:
            out += np.array([(tag, 0, result)], uapi.ELEM_HEADER_DTYPE).tobytes()
            if with_addr:
                addr = self.bufs[tag % DEPTH].__array_interface__["data"][0]
                out += np.uint64(addr).tobytes()
        return out

    def batch(self, nr, tags, *, flags=HAS_BUF_ADDR, with_addr=True, elem_bytes=16) -> int:
        tags = list(tags)
        return self.q.probe_cmd(nr, elements=self.elems(tags, with_addr), nr_elem=len(tags),
                                flags=flags, elem_bytes=elem_bytes)

    def close(self):
        self.q.close()
        self.t.release(self.dev_id)
        self.t.del_dev(self.dev_id)


@pytest.fixture
def raw(transport):
    made = []

    def make(flags=uapi.UBLK_F_BATCH_IO):
        r = RawQueue(transport, flags)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def test_add_dev_grants_batch_io_without_need_get_data(transport):
    skip_without_batch_io(transport)
    dev_id, flags = transport.add_dev(-1, 1, DEPTH, BUF, uapi.UBLK_F_BATCH_IO | uapi.UBLK_F_NEED_GET_DATA)
    try:
        assert flags & uapi.UBLK_F_BATCH_IO
        assert not flags & uapi.UBLK_F_NEED_GET_DATA      # batches have no NEED_GET_DATA
    finally:
        transport.del_dev(dev_id)


def test_per_tag_commands_refused_on_a_batch_device(raw, transport):
    skip_without_batch_io(transport)
    r = raw()
    addr = r.bufs[0].__array_interface__["data"][0]
    for nr in (uapi.UBLK_IO_FETCH_REQ, uapi.UBLK_IO_COMMIT_AND_FETCH_REQ, uapi.UBLK_IO_NEED_GET_DATA):
        assert r.q.probe_cmd(nr, tag=0, addr=addr) == -errno.EOPNOTSUPP, hex(nr)


def test_batch_header_checks(raw, transport):
    skip_without_batch_io(transport)
    r = raw()
    tags = list(range(DEPTH))
    assert r.batch(PREP, tags + [0]) == -errno.E2BIG                     # nr_elem > depth
    assert r.batch(PREP, tags, elem_bytes=8) == -errno.EINVAL            # 16 B with HAS_BUF_ADDR
    assert r.batch(PREP, tags, flags=HAS_BUF_ADDR | 1 << 8) == -errno.EINVAL     # unknown flag
    assert r.batch(PREP, tags, flags=HAS_BUF_ADDR | uapi.UBLK_BATCH_F_HAS_ZONE_LBA,
                   elem_bytes=24) == -errno.EINVAL                       # not a zoned device
    assert r.batch(PREP, tags, flags=uapi.UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK, with_addr=False,
                   elem_bytes=8) == -errno.EINVAL                        # no AUTO_BUF_REG
    # the copy path needs each tag's buffer address
    assert r.batch(PREP, tags, flags=0, with_addr=False, elem_bytes=8) == -errno.EINVAL


def test_prep_is_all_or_nothing_and_only_once(raw, transport):
    skip_without_batch_io(transport)
    r = raw()
    assert r.batch(COMMIT, [0]) == -errno.EBUSY            # nothing to commit yet
    assert r.batch(PREP, [0, DEPTH]) == -errno.EINVAL      # tag out of range
    assert r.batch(PREP, [1, 2, 1]) == -errno.EINVAL       # twice: 1 and 2 are undone
    assert r.batch(PREP, range(DEPTH)) == 0                # so every tag can be prepared now
    assert r.batch(PREP, [0]) == -errno.EBUSY              # the device is ready: no more PREP
    assert r.batch(COMMIT, [0]) == -errno.EBUSY            # a tag waiting for a request


def test_single_commit_is_answered_when_refused(raw, transport):
    """A serving queue sends a commit of one element asking for no completion when the
    driver takes it (CQE_SKIP_SUCCESS): a refused one still completes, with the errno."""
    skip_without_batch_io(transport)
    r = raw()
    assert r.batch(PREP, range(DEPTH)) == 0
    for tag in (0, DEPTH - 1):             # waiting for a request: nothing to commit
        assert r.q.probe_cmd(COMMIT, elements=r.elems([tag]), flags=HAS_BUF_ADDR, elem_bytes=16,
                             solo=True) == -errno.EBUSY


def test_user_copy_batches_carry_no_buffer(raw, transport):
    skip_without_batch_io(transport)
    if not transport.features() & uapi.UBLK_F_USER_COPY:
        pytest.skip("the driver lacks USER_COPY")
    r = raw(uapi.UBLK_F_BATCH_IO | uapi.UBLK_F_USER_COPY)
    assert r.batch(PREP, range(DEPTH)) == -errno.EINVAL    # HAS_BUF_ADDR without the copy path
    assert r.batch(PREP, range(DEPTH), flags=0, with_addr=False, elem_bytes=8) == 0


def test_batch_commands_refused_without_batch_io(raw, transport):
    r = raw(0)
    assert r.batch(PREP, range(DEPTH)) == -errno.EINVAL


@pytest.mark.parametrize("kind,data_path", [("memory", "copy"), ("memory", "user_copy"),
                                            ("loop", "copy"), ("loop-python", "user_copy")])
def test_batch_io_serves_data(transport, tmp_path, kind, data_path):
    """Bytes written through the block device come back, whoever serves them (a native
    target, Python handlers) and however many requests a FETCH completion carries."""
    skip_without_batch_io(transport)
    backend, native = build_backend(kind, tmp_path, 16 * MiB)
    with Device(backend, transport, depth=16, data_path=data_path, native=native, batch_io=True) as dev:
        assert dev.flags & uapi.UBLK_F_BATCH_IO
        with transport.open(dev.dev_id) as blk:
            for i in range(8):
                data = os.urandom(4096 * (1 + i))
                blk.pwrite(data, i * 64 * 1024)
                assert blk.pread(len(data), i * 64 * 1024) == data
        out = run_load(transport, dev.dev_id, rw="randrw", qd=32, count=2000, verify=True,
                       region=4 * MiB)
        assert out["completed"] == 2000 and out["errors"] == 0 and out["verify_errors"] == 0
        assert dev.requests_served >= 2000


@pytest.mark.parametrize("kind", ["memory", "loop"])
def test_batch_io_costs_no_more_than_per_tag_at_depth_1(transport, tmp_path, kind):
    """One request at a time (synchronous I/O), a batch queue reaps no more completions
    and turns its loop no more often per request than a per-tag one: a commit of one
    element completes only when the driver refuses it, so it no longer wakes the queue
    for a turn of its own after every request. Counted by the queue (Device.stats)."""
    skip_without_batch_io(transport)
    pats = _patterns(48, seed=18)
    per_req = {}
    for batch in (False, True):
        backend, native = build_backend(kind, tmp_path, 16 * MiB)
        with Device(backend, transport, depth=16, native=native, batch_io=batch) as dev, \
                transport.open(dev.dev_id) as blk:
            before = dev.stats().counters.sum(axis=0)
            for i, p in enumerate(pats):
                blk.pwrite(p, _at(i))
            assert [blk.pread(4096, _at(i)) for i in range(len(pats))] == pats
            d = dev.stats().counters.sum(axis=0) - before
            assert bool(dev.flags & uapi.UBLK_F_BATCH_IO) == batch
        reqs = int(d[L["done"]])
        assert reqs >= 2 * len(pats)
        per_req[batch] = (d[L["cqes"]] / reqs, d[L["turns"]] / reqs)
    (cqes, turns), (batch_cqes, batch_turns) = per_req[False], per_req[True]
    assert batch_cqes <= cqes, per_req
    assert batch_turns <= turns * 1.05, per_req


def test_batch_io_stop_with_io_in_flight(transport, tmp_path):
    """Stopping under load ends the FETCH (aborted) and every queue once its requests
    are committed."""
    skip_without_batch_io(transport)
    backend, native = build_backend("memory", tmp_path, 16 * MiB)
    dev = Device(backend, transport, queues=2, depth=8, native=native, batch_io=True).start()
    run_load(transport, dev.dev_id, rw="randwrite", qd=16, count=500)
    dev.stop()
    assert not dev.serving


def test_batch_io_refuses_paths_it_does_not_serve(transport, tmp_path):
    backend, native = build_backend("loop", tmp_path, 16 * MiB)
    for path in ("need_get_data", "zero_copy"):
        with pytest.raises(ValueError, match="batch_io"):
            Device(backend, transport, data_path=path, batch_io=True)


def test_batch_io_kill_and_recover_reissues_everything(transport):
    """The new server PREPares every tag again and serves what the dead one held."""
    skip_without_batch_io(transport)
    dev = kill_and_recover_reissues_everything(transport, seed=16, batch_io=True)
    assert dev.flags & uapi.UBLK_F_BATCH_IO


def test_batch_io_quiesce_hands_over(transport):
    """quiesce() aborts the FETCH: the queues commit what they hold and exit; I/O issued
    meanwhile waits and is served after recover()."""
    skip_without_batch_io(transport)
    if not transport.features() & uapi.UBLK_F_QUIESCE:
        pytest.skip("the driver lacks QUIESCE")
    backend = Slow(delay=0)
    pats = _patterns(16, seed=17)
    with Device(backend, transport, depth=8, recovery="reissue", batch_io=True) as dev:
        with dev.open() as blk:
            for i, p in enumerate(pats[:8]):
                blk.pwrite(p, _at(i))
            dev.quiesce()
            assert not dev.serving
            assert dev.info().state == uapi.UBLK_S_DEV_QUIESCED
            dev.recover()
            for i, p in enumerate(pats[8:], 8):
                blk.pwrite(p, _at(i))
            assert [blk.pread(4096, _at(i)) for i in range(16)] == pats
