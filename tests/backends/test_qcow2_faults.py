"""qcow2-lite when the file I/O fails or the power goes: a failed pwrite, a failed
fsync, a cluster freed and taken again before a flush. (The crash-point tests, and the
leaks a crash leaves, are in test_qcow2_image.py.)

Faults are injected through the engine's file I/O seam (``fileio.pwrite_all``,
``fileio.sync``); ``qcow2_tools.record_io`` records the writes and fsyncs a power loss
is played from.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import struct

import numpy as np
import pytest

from pyublk_fast.backends.qcow2 import Qcow2Image, fileio
from qcow2_tools import (
    KiB, MiB, assert_check_clean, needs_qemu, qemu_check, qemu_img, record_io,
)

CS = 512  # cluster_bits 9: every few writes allocate an L2 table or a refcount block
BLOCK_SPAN = CS // 2  # clusters one 16-bit refcount block counts
TABLE_SPAN = (CS // 8) * BLOCK_SPAN  # clusters a one-cluster refcount table counts


def _prefilled(path: str, size: int, host_clusters: int) -> bytes:
    """A new image of ``size`` bytes whose file is written up to ``host_clusters``
    clusters (cluster_bits 9) with random data from virtual offset 0; returns the data."""
    rng = random.Random(host_clusters)
    data = bytearray()
    with Qcow2Image.create(path, size, cluster_bits=9) as img:
        while os.path.getsize(path) < host_clusters * CS:
            step = 64 * KiB if os.path.getsize(path) < (host_clusters - 300) * CS else CS
            chunk = rng.randbytes(step)
            img.write(len(data), chunk)
            data += chunk
    return bytes(data)


class Start:
    """An image file (``file``, its bytes) and what it reads (``model``), its first
    ``filled`` bytes written, to start cases from."""

    def __init__(self, path: str, size: int, host_clusters: int) -> None:
        data = _prefilled(path, size, host_clusters)
        with open(path, "rb") as f:
            self.file = f.read()
        self.model = data + bytes(size - len(data))
        self.filled = len(data)
        self.size = size
        self.reftable = struct.unpack_from(">QI", self.file, 48)  # offset, clusters


@pytest.fixture(scope="module")
def near_block_end(tmp_path_factory):
    """Appending a few clusters needs a new refcount block."""
    return Start(str(tmp_path_factory.mktemp("q") / "b.qcow2"), MiB, BLOCK_SPAN - 6)


@pytest.fixture(scope="module")
def near_table_end(tmp_path_factory):
    """Appending a few clusters moves the refcount table to a larger one."""
    return Start(str(tmp_path_factory.mktemp("q") / "t.qcow2"), 9 * MiB, TABLE_SPAN - 6)


def _ops(start: Start) -> list[tuple[str, int, bytes]]:
    """Requests that allocate data clusters, L2 tables, refcount blocks (or the larger
    refcount table), write in place, free clusters and take freed ones again."""
    rng = random.Random(7)
    top, filled = start.size - 40 * CS, start.filled
    return [("write", top, rng.randbytes(9 * CS + 100)),      # new clusters, an L2 table
            ("write", 100, rng.randbytes(CS)),                  # in place
            ("discard", 2 * CS, bytes(3 * CS)),                 # frees 3 clusters
            ("flush", 0, b""),
            ("write_zeroes", filled - 2 * CS, bytes(CS + 7)),   # zero flag, partial
            ("write", top + 20 * CS + 3, rng.randbytes(6 * CS)),  # takes the freed ones
            ("write", top - 70 * CS, rng.randbytes(CS))]         # another L2 table


def _apply(img: Qcow2Image, op: str, off: int, data: bytes) -> None:
    if op == "write":
        img.write(off, data)
    elif op == "discard":
        img.discard(off, len(data))
    elif op == "write_zeroes":
        img.write_zeroes(off, len(data))
    else:
        img.flush()


def _regions(start: Start) -> list[tuple[int, int]]:
    """The spans of the L2 tables that the requests of ``_ops`` touch: where a table
    entry in memory out of step with the file would show."""
    span = (CS // 8) * CS
    out: list[tuple[int, int]] = []
    for _, off, data in sorted(_ops(start), key=lambda op: op[1]):
        if data:
            lo, hi = off // span * span, min(start.size, -(-(off + len(data)) // span) * span)
            if out and lo <= out[-1][1]:
                lo = out.pop()[0]
            out.append((lo, hi))
    return out


def _read_regions(img: Qcow2Image, regions: list[tuple[int, int]]) -> bytes:
    return b"".join(img.read(lo, hi - lo) for lo, hi in regions)


def _pwrites_of(start: Start, path: str, monkeypatch) -> list[int]:
    """How many pwrites each request of ``_ops`` makes when nothing fails."""
    with open(path, "wb") as f:
        f.write(start.file)
    counts = []
    with monkeypatch.context() as m:
        log, _ = record_io(m)
        with Qcow2Image.open(path) as img:
            for op in _ops(start):
                before = len(log)
                _apply(img, *op)
                counts.append(len(log) - before)
    return counts


def _fail_one_pwrite(start: Start, path: str, k: int, err: int, monkeypatch) -> None:
    """Serve the requests of ``_ops`` with pwrite number ``k`` failing with ``err``
    (a long one after writing its first half, like a write that ran out of space) and
    check:

    - the request it belongs to fails with ``err`` and leaves each byte it covers as
      before or as after it; every other request works;
    - after the failure the image reads what a fresh open of its file reads: the
      engine's tables in memory are what the file holds;
    - after the last request: what the requests wrote reads back, then again after a
      flush and a reopen; qemu-img check finds no corruption, and after the reopen
      (which reclaims what a failed request leaked) no leak either, and qemu-img
      compare finds the whole image as written, what was there before included.
    """
    where = f"pwrite {k} failing with {errno.errorcode[err]}"
    with open(path, "wb") as f:
        f.write(start.file)
    model = bytearray(start.model)
    regions = _regions(start)
    calls = itertools.count()
    real = fileio.pwrite_all

    def failing(fd, data, offset):
        if next(calls) == k:
            mv = memoryview(data).cast("B")
            real(fd, mv[:len(mv) // 1024 * 512], offset)  # whole sectors only
            raise OSError(err, os.strerror(err))
        real(fd, data, offset)

    failed = None
    with Qcow2Image.open(path) as img:
        with monkeypatch.context() as m:
            m.setattr(fileio, "pwrite_all", failing)
            for j, (op, off, data) in enumerate(_ops(start)):
                try:
                    _apply(img, op, off, data)
                except OSError as e:
                    assert e.errno == err and failed is None, f"{where}: request {j}: {e}"
                    failed = j
                    got = img.read(off, len(data))
                    g = np.frombuffer(got, np.uint8)
                    ok = ((g == np.frombuffer(model, np.uint8, len(data), off))
                          | (g == np.frombuffer(data, np.uint8)))
                    assert ok.all(), (f"{where}: byte {off + int(np.flatnonzero(~ok)[0]):#x} "
                                      "of the failed request is neither as before nor after")
                    model[off:off + len(data)] = got
                    with Qcow2Image.open(path, readonly=True) as fresh:
                        assert _read_regions(fresh, regions) == _read_regions(img, regions), (
                            f"{where}: the image in memory and its file differ")
                else:
                    model[off:off + len(data)] = data
        assert failed is not None, f"{where}: no request failed"
        expect = b"".join(model[lo:hi] for lo, hi in regions)
        assert _read_regions(img, regions) == expect, f"{where}: data differs"
        img.flush()
    qemu_check(path, where)
    with Qcow2Image.open(path) as img:
        assert _read_regions(img, regions) == expect, f"{where}: data differs after reopening"
    assert_check_clean(path, f"{where}, reopened")
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.write(model)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", path, raw)


@needs_qemu
@pytest.mark.parametrize("start_at,requests", [("near_block_end", None),
                                               ("near_table_end", 1)])
def test_a_failed_pwrite_fails_its_request_and_nothing_else(tmp_path, monkeypatch, request,
                                                            start_at, requests):
    """Every pwrite the requests make fails once, in turn (ENOSPC and EIO alternately):
    data, L2 and L1 entries, refcounts, new L2 tables, a new refcount block; near the
    end of the refcount table, those of the first request, which moves the table to a
    larger one (see ``_fail_one_pwrite`` for what is checked)."""
    start = request.getfixturevalue(start_at)
    path = str(tmp_path / "f.qcow2")
    n = sum(_pwrites_of(start, path, monkeypatch)[:requests])
    assert n > 30, n
    for k in range(n):
        _fail_one_pwrite(start, path, k, (errno.ENOSPC, errno.EIO)[k % 2], monkeypatch)


def test_a_failed_flush_fails_every_later_flush_and_write(tmp_path, monkeypatch, caplog):
    """After a failed fsync the kernel may have dropped the pages it could not write, so
    a later fsync that works proves nothing about them: every later flush and write
    fails with EIO (saying why, logged once) until the image is reopened. Reads still
    work."""
    path = str(tmp_path / "s.qcow2")
    a, b, c = (random.Random(i).randbytes(8 * KiB) for i in range(3))

    def fsync_fails(fd):
        raise OSError(errno.EIO, "fsync of the image file failed: Input/output error")

    with Qcow2Image.create(path, MiB, cluster_bits=12) as img:
        img.write(0, a)
        img.flush()
        img.write(MiB // 2, b)
        with caplog.at_level(logging.ERROR, "pyublk_fast.backends.qcow2"):
            with monkeypatch.context() as m:
                m.setattr(fileio, "sync", fsync_fails)
                with pytest.raises(OSError) as first:
                    img.flush()
            assert first.value.errno == errno.EIO
            for call in (img.flush, lambda: img.write(0, c), lambda: img.discard(0, 4096),
                         lambda: img.write_zeroes(0, 4096)):
                with pytest.raises(OSError) as later:
                    call()
                assert later.value.errno == errno.EIO, later.value
                assert "an earlier flush of the image failed" in str(later.value), later.value
                assert "reopen" in str(later.value), later.value
        logged = [r for r in caplog.records if r.name == "pyublk_fast.backends.qcow2"]
        assert len(logged) == 1 and path in logged[0].getMessage(), caplog.records
        assert img.read(0, 8 * KiB) + img.read(MiB // 2, 8 * KiB) == a + b
    with Qcow2Image.open(path) as img:
        img.write(0, c)
        img.flush()
        assert img.read(0, 8 * KiB) + img.read(MiB // 2, 8 * KiB) == c + b


def _apply_writes(path: str, start: bytes, writes: list) -> None:
    with open(path, "wb") as f:
        f.write(start)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_a_cluster_freed_since_the_last_flush_is_not_reused(tmp_path, monkeypatch):
    """A discard frees a cluster whose L2 entry the last flush made durable. Until the
    next flush a power loss may keep that entry and lose its clearing, so the cluster
    must not take other data: for every subset of the writes made since the flush (what
    a power loss may keep of them), the discarded cluster reads as before the discard
    or as zeros, never as another cluster's data. After the next flush the freed
    cluster is taken again: the file does not grow."""
    path = str(tmp_path / "f.qcow2")
    cs = 4096
    x, y, z = (random.Random(i).randbytes(cs) for i in range(3))
    Qcow2Image.create(path, MiB, cluster_bits=12).close()
    with open(path, "rb") as f:
        start = f.read()
    log, syncs = record_io(monkeypatch)
    with Qcow2Image.open(path) as img:
        img.write(0, x)
        img.flush()
        img.discard(0, cs)
        img.write(cs, y)  # allocates a cluster
        grown = os.path.getsize(path)
        img.flush()
        img.write(2 * cs, z)  # takes the one the discard freed
        assert os.path.getsize(path) == grown
        assert img.read(0, 3 * cs) == bytes(cs) + y + z
    monkeypatch.undo()
    durable, since = log[:syncs[0]], log[syncs[0]:syncs[1]]
    assert 4 <= len(since) <= 10, since
    lost = str(tmp_path / "lost.qcow2")
    for keep in itertools.product((False, True), repeat=len(since)):
        _apply_writes(lost, start, durable + list(itertools.compress(since, keep)))
        with Qcow2Image.open(lost, readonly=True) as img:
            got = img.read(0, cs)
        assert got in (x, bytes(cs)), f"writes kept {keep}: the discarded cluster reads " \
                                      f"{'the data of the next write' if got == y else 'garbage'}"


@needs_qemu
def test_the_old_refcount_table_is_not_reused_before_a_flush(tmp_path, monkeypatch,
                                                             near_table_end):
    """Moving the refcount table frees the old one, but until a flush the header on
    disk may still point at it: no write lands in it before the next fsync. After it,
    its clusters are taken again."""
    start = near_table_end
    path = str(tmp_path / "t.qcow2")
    with open(path, "wb") as f:
        f.write(start.file)
    old_off, old_clusters = start.reftable
    old = range(old_off, old_off + old_clusters * CS)
    log, syncs = record_io(monkeypatch)
    rng = random.Random(3)
    with Qcow2Image.open(path) as img:
        top = start.size - 40 * CS
        data = rng.randbytes(20 * CS)
        img.write(top, data)  # the table moves
        moved = [i for i, (off, _) in enumerate(log) if off == 48]
        assert len(moved) == 1, "the refcount table did not move"
        img.flush()
        more = rng.randbytes(8 * CS)
        img.write(top + 20 * CS, more)
        assert img.read(top, 28 * CS) == data + more
    monkeypatch.undo()
    into_old = [i for i, (off, d) in enumerate(log) if off < old.stop and off + len(d) > old.start]
    assert all(i < moved[0] or i >= syncs[0] for i in into_old), (
        f"write {next(i for i in into_old if moved[0] < i < syncs[0])} lands in the old "
        f"refcount table before the flush")
    assert any(i >= syncs[0] for i in into_old), "the old table's clusters were not reused"
    qemu_check(path)
