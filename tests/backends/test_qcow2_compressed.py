"""Compressed clusters, as distribution cloud images have them: images made by
'qemu-img convert -c' (deflate and zstd) read back like 'qemu-img convert -O raw' by
the engine and on the ring (every data path); writes, discards and zeroing over them
copy on write and leave qemu-img check clean (refcounts of shared and spanning host
clusters dropped exactly) and qemu-img compare equal to a model; corrupt descriptors
and data fail their requests with one clear line."""
from __future__ import annotations

import errno
import json
import os
import random
import struct
import subprocess

import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.qcow2 import Qcow2Error, Qcow2Image
from pyublk_fast.backends.qcow2.compress import Descriptors
from pyublk_fast.backends.qcow2.l2 import COMPRESSED
from pyublk_fast.backends.qcow2_backend import Qcow2Backend
from pyublk_fast.device import Device
from qcow2_tools import KiB, MiB, QEMU_IMG, assert_check_clean, needs_qemu, qemu_img
from test_qcow2_ring import _run_batch

pytestmark = needs_qemu

SIZE = 2 * MiB
READ, WRITE, DISCARD, ZEROES = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE,
                                uapi.UBLK_IO_OP_DISCARD, uapi.UBLK_IO_OP_WRITE_ZEROES)
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _source(rng: random.Random, size: int = SIZE) -> bytes:
    """Disk contents like an OS image: runs of random bytes (stored uncompressed),
    repeated text (compressing well), zeros (left unallocated) and mixtures."""
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(4)
        n = rng.randrange(1, 48) * 1024
        if kind == 0:
            n *= 3
            out += rng.randbytes(n)
        elif kind == 1:
            word = rng.randbytes(rng.randrange(3, 40))
            out += (word * (n // len(word) + 1))[:n]
        elif kind == 2:
            out += bytes(n)
        else:
            out += bytes(rng.choice(b"abcdefgh ") for _ in range(n))
    return bytes(out[:size])


def _compressed(tmp_path, ctype: str, cluster_size: int, seed: int = 1,
                size: int = SIZE) -> tuple[str, bytes]:
    """A qcow2 image made by 'qemu-img convert -c', and its contents as qemu reads them
    ('qemu-img convert -O raw')."""
    src = tmp_path / "src.raw"
    src.write_bytes(_source(random.Random(seed), size))
    img = str(tmp_path / f"c-{ctype}-{cluster_size}.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cluster_size},compression_type={ctype}", str(src), img)
    raw = tmp_path / "qemu.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, str(raw))
    return img, raw.read_bytes()


def _l2_entries(path: str) -> tuple[int, list[tuple[int, int, int]]]:
    """(cluster_bits, [(virtual cluster, L2 entry, its file offset)]) of an image."""
    with open(path, "rb") as f:
        data = f.read()
    (cb,) = struct.unpack_from(">I", data, 20)
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    out = []
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & OFFSET_MASK
        if not l2:
            continue
        for j in range((1 << cb) // 8):
            (e,) = struct.unpack_from(">Q", data, l2 + 8 * j)
            if e:
                out.append(((i << (cb - 3)) + j, e, l2 + 8 * j))
    return cb, out


def _packed(path: str) -> list[tuple[int, int, int]]:
    return [t for t in _l2_entries(path)[1] if t[1] >> 62 & 1]


def _qemu_refcount(path: str, host_cluster: int) -> int:
    """A host cluster's refcount, as the image stores it (qemu-img check reports
    a mismatch; this reads the number itself)."""
    with open(path, "rb") as f:
        data = f.read()
    (cb,) = struct.unpack_from(">I", data, 20)
    (rt_off,) = struct.unpack_from(">Q", data, 48)
    per = 1 << (cb - 1)
    (block,) = struct.unpack_from(">Q", data, rt_off + 8 * (host_cluster // per))
    return struct.unpack_from(">H", data, block + 2 * (host_cluster % per))[0] if block else 0


def _assert_same_as_raw(path: str, model: bytes, tmp_path) -> None:
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", path, str(raw)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


KINDS = [("zlib", 4096), ("zlib", 65536), ("zstd", 4096), ("zstd", 65536), ("zlib", 512)]
IDS = [f"{t}-{cs // 1024 or 0.5}k" for t, cs in KINDS]


@pytest.mark.parametrize("ctype,cluster_size", KINDS, ids=IDS)
def test_engine_reads_compressed_images_like_qemu(tmp_path, ctype, cluster_size):
    img, want = _compressed(tmp_path, ctype, cluster_size)
    packed = _packed(img)
    assert len(packed) > 10, "qemu-img convert -c made no compressed clusters"
    desc = Descriptors(cluster_size.bit_length() - 1)
    hosts = [c for _, e, _ in packed for c in desc.clusters(e)]
    assert len(hosts) > len(set(hosts)), "no host cluster holds two compressed clusters"
    with Qcow2Image.open(img, readonly=True) as q:
        assert q._map.lookup(packed[0][0])[0] == COMPRESSED
        assert q.read(0, SIZE) == want
        rng = random.Random(5)
        for _ in range(200):             # unaligned pieces, across cluster boundaries
            off = rng.randrange(SIZE)
            n = rng.randrange(min(3 * cluster_size, SIZE - off) + 1)
            assert q.read(off, n) == want[off:off + n], f"{n}@{off:#x}"


def test_the_cache_keeps_recent_clusters_and_stays_small(tmp_path, monkeypatch):
    from pyublk_fast.backends.qcow2 import compress
    monkeypatch.setattr(compress, "_CACHE_BYTES", 64 * KiB)   # 16 clusters of 4 KiB
    img, want = _compressed(tmp_path, "zlib", 4096)
    packed = _packed(img)
    with Qcow2Image.open(img, readonly=True) as q:
        vc = packed[0][0]
        q.read(vc * 4096, 100)
        cache = q._unpacked
        assert cache.loads == 1
        q.read(vc * 4096 + 100, 4096 - 100)      # the rest of it: from the cache
        assert cache.loads == 1
        q.read(0, SIZE)                          # every compressed cluster once
        assert cache.loads == len(packed)        # the first one was still cached
        slots = os.fstat(cache.fd).st_size // 4096
        assert cache._max == 16 and slots <= 17 < len(packed), (slots, len(packed))
        last = packed[-1][0]
        before = cache.loads
        assert q.read(last * 4096, 4096) == want[last * 4096:last * 4096 + 4096]
        assert cache.loads == before             # the most recent one is still there
        assert q.read(vc * 4096, 4096) == want[vc * 4096:vc * 4096 + 4096]
        assert cache.loads == before + 1         # the first one was evicted


def test_a_zstd_image_needs_the_zstandard_package(tmp_path, monkeypatch):
    import builtins
    img, _ = _compressed(tmp_path, "zstd", 4096, size=64 * KiB)
    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    with pytest.raises(Qcow2Error) as ei:
        Qcow2Image.open(img, readonly=True)
    assert ei.value.strerror.startswith("unsupported qcow2 feature: compression type zstd "
                                        "needs the Python package zstandard"), ei.value
    assert ei.value.errno == errno.ENOTSUP and "\n" not in str(ei.value)


def _writes_over(q: Qcow2Image, model: bytearray, rng: random.Random, cs: int,
                 packed_vcs: list[int], count: int) -> None:
    """Writes (partial, whole, spanning two clusters), discards and zeroing, mostly on
    compressed clusters, on ``q`` and the model."""
    for _ in range(count):
        vc = rng.choice(packed_vcs)
        shape = rng.randrange(4)
        if shape == 0:                       # inside one cluster
            o = rng.randrange(cs // 512) * 512
            off, n = vc * cs + o, rng.randrange(1, (cs - o) // 512 + 1) * 512
        elif shape == 1:                     # the whole cluster
            off, n = vc * cs, cs
        else:                                # across into the next (or previous) one
            off = vc * cs + cs - rng.randrange(1, cs // 512 + 1) * 512
            n = min(rng.randrange(1, 2 * cs // 512) * 512 + 512, len(model) - off)
        op = rng.choices(["write", "discard", "zeroes"], [6, 1, 1])[0]
        if op == "write":
            data = rng.randbytes(n)
            q.write(off, data)
            model[off:off + n] = data
        elif op == "discard":
            q.discard(off, n)
            model[off:off + n] = bytes(n)
        else:
            q.write_zeroes(off, n)
            model[off:off + n] = bytes(n)


@pytest.mark.parametrize("ctype,cluster_size", KINDS[:4], ids=IDS[:4])
def test_engine_writes_over_compressed_clusters(tmp_path, ctype, cluster_size):
    img, want = _compressed(tmp_path, ctype, cluster_size)
    model = bytearray(want)
    packed_vcs = [vc for vc, _, _ in _packed(img)]
    rng = random.Random(f"{ctype}{cluster_size}")
    with Qcow2Image.open(img) as q:
        _writes_over(q, model, rng, cluster_size, packed_vcs, 60)
        assert q.read(0, SIZE) == model
        q.flush()
    assert_check_clean(img, "after writes over compressed clusters")
    _assert_same_as_raw(img, bytes(model), tmp_path)
    with Qcow2Image.open(img) as q:                    # reopened: still there, more writes
        assert q.read(0, SIZE) == model
        _writes_over(q, model, rng, cluster_size, packed_vcs, 20)
    assert_check_clean(img, "after reopening and writing")
    _assert_same_as_raw(img, bytes(model), tmp_path)


def test_refcounts_of_shared_and_spanning_host_clusters(tmp_path):
    """Each compressed cluster counts once in each host cluster it touches: rewriting
    one drops exactly its counts; the host cluster is free once none is left, and
    taken again only after a flush."""
    img, want = _compressed(tmp_path, "zlib", 4096)
    desc = Descriptors(12)
    packed = _packed(img)
    users: dict[int, list[int]] = {}
    for vc, e, _ in packed:
        for c in desc.clusters(e):
            users.setdefault(c, []).append(vc)
    span = next(vc for vc, e, _ in packed if len(desc.clusters(e)) == 2)
    shared = next(c for c, vcs in users.items() if len(vcs) >= 3 and span not in vcs)
    e_span = next(e for vc, e, _ in packed if vc == span)
    before = {c: _qemu_refcount(img, c) for c in [*desc.clusters(e_span), shared]}
    assert all(before[c] == len(users[c]) for c in before), (before, users)
    model = bytearray(want)
    with Qcow2Image.open(img) as q:
        q.write(span * 4096 + 512, b"s" * 512)        # partial: copy on write
        model[span * 4096 + 512:span * 4096 + 1024] = b"s" * 512
        for c in desc.clusters(e_span):
            assert _qemu_refcount(img, c) == before[c] - 1, c
        assert q._map.lookup(span)[0] != COMPRESSED
        for i, vc in enumerate(users[shared]):       # each user of `shared` in turn
            if i % 2:
                q.discard(vc * 4096, 4096)
                model[vc * 4096:vc * 4096 + 4096] = bytes(4096)
            else:
                q.write(vc * 4096, b"w" * 4096)
                model[vc * 4096:vc * 4096 + 4096] = b"w" * 4096
            assert _qemu_refcount(img, shared) == before[shared] - i - 1
        assert shared in q._refs._pending               # free, not yet reusable
        q.write(SIZE - 4096, b"n" * 4096)
        model[SIZE - 4096:] = b"n" * 4096
        assert _qemu_refcount(img, shared) == 0
        assert q.read(0, SIZE) == model
    assert_check_clean(img)
    _assert_same_as_raw(img, bytes(model), tmp_path)


# ---------------------------------------------------------------- on the ring

RING_CASES = [("copy", "zlib", 65536), ("user_copy", "zstd", 4096),
              ("zero_copy", "zlib", 4096), ("splice_zc", "zstd", 65536),
              ("need_get_data", "zlib", 4096)]


@pytest.mark.parametrize("path,ctype,cluster_size", RING_CASES,
                         ids=[f"{p}-{t}-{cs // 1024}k" for p, t, cs in RING_CASES])
def test_ring_reads_and_writes_compressed_images(sim, tmp_path, path, ctype, cluster_size):
    """The backend on the simulated driver: the whole disk and random pieces read
    like qemu; batches of writes, discards and zeroing over compressed clusters, many
    in flight; then qemu-img check and compare, and a reopen."""
    img, want = _compressed(tmp_path, ctype, cluster_size)
    model = bytearray(want)
    packed_vcs = [vc for vc, _, _ in _packed(img)]
    rng = random.Random(f"{path}{ctype}")
    cs = cluster_size
    with Device(Qcow2Backend(img), sim, depth=32, data_path=path) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == want
        for i in range(12):
            batch, taken = [], []
            for _ in range(rng.randrange(2, 12)):
                vc = rng.choice(packed_vcs)
                off = max(0, vc * cs + rng.randrange(cs // 512) * 512 - rng.choice([0, 0, 512]))
                n = min(rng.randrange(1, 2 * cs // 512 + 1) * 512, SIZE - off)
                if not any(lo < off + n and off < hi for lo, hi in taken):
                    taken.append((off, off + n))
                    batch.append((rng.choices([WRITE, READ, DISCARD, ZEROES], [4, 3, 1, 1])[0],
                                  off, n))
            _run_batch(blk, model, rng, batch, f"batch {i}")
        assert blk.pread(SIZE, 0) == bytes(model)
        blk.flush()
    assert_check_clean(img, path)
    _assert_same_as_raw(img, bytes(model), tmp_path)
    with Qcow2Image.open(img, readonly=True) as q:
        assert q.read(0, SIZE) == model


def test_ring_compressed_backing_file(sim, tmp_path):
    """A compressed image as the backing file of an overlay: reads show through, partial
    writes copy on write from it; the backing file is left as it was."""
    base, want = _compressed(tmp_path, "zlib", 4096)
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2",
             top, str(SIZE))
    with open(base, "rb") as f:
        base_bytes = f.read()
    model = bytearray(want)
    packed_vcs = [vc for vc, _, _ in _packed(base)]
    with Device(Qcow2Backend(top), sim, depth=16, data_path="user_copy") as dev, \
            dev.open() as blk:
        assert blk.pread(SIZE, 0) == want
        for vc in packed_vcs[:20]:
            off = vc * 4096 + 1024
            blk.pwrite(b"t" * 1024, off)
            model[off:off + 1024] = b"t" * 1024
        assert blk.pread(SIZE, 0) == bytes(model)
    with open(base, "rb") as f:
        assert f.read() == base_bytes
    assert_check_clean(top)
    _assert_same_as_raw(top, bytes(model), tmp_path)


# ---------------------------------------------------------------- corrupt ones

def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_compressed_data_fails_its_reads_only(sim, tmp_path):
    img, want = _compressed(tmp_path, "zlib", 4096)
    desc = Descriptors(12)
    packed = _packed(img)
    # a compressed cluster alone in its host cluster's first sector: garbage over it
    vc, e, _ = packed[len(packed) // 2]
    off, n = desc.span(e)
    _patch(img, off, b"\xff" * min(n, 64))
    victims = {v for v, e2, _ in packed if desc.span(e2)[0] < off + 64 and
               off < sum(desc.span(e2))}
    with Qcow2Image.open(img, readonly=True) as q:
        with pytest.raises(Qcow2Error) as ei:
            q.read(vc * 4096 + 1024, 512)          # the message names the cluster
        assert ei.value.strerror.startswith(
            f"corrupt qcow2 image: compressed cluster at virtual offset {vc * 4096:#x} (host "
            f"offset {off:#x}, {n} bytes) does not decompress: "), ei.value
        assert ei.value.errno == errno.EIO and "\n" not in str(ei.value)
        for v in range(SIZE // 4096):                # every other cluster still reads
            if v not in victims:
                assert q.read(v * 4096, 4096) == want[v * 4096:v * 4096 + 4096], v
    with Device(Qcow2Backend(img), sim, depth=8, data_path="user_copy") as dev, \
            dev.open() as blk:
        res = blk.submit([(READ, vc * 4096, 4096, bytearray(4096)),
                          (WRITE, vc * 4096 + 512, 512, b"x" * 512),
                          (READ, 0, 4096, bytearray(4096))])
        assert res[:2] == [-errno.EIO, -errno.EIO] and res[2] == 4096, res
        blk.pwrite(b"y" * 4096, vc * 4096)            # a whole write needs no old data
        assert blk.pread(4096, vc * 4096) == b"y" * 4096


@pytest.mark.parametrize("how,words", [
    ("past-the-end", r"beyond the end of the file"),
    ("copied-flag", r"is compressed and has the copied flag set"),
    ("short-data", r"decompresses to \d+ bytes, not 4096|does not decompress"),
])
def test_corrupt_descriptor_fails_its_reads(tmp_path, how, words):
    img, want = _compressed(tmp_path, "zlib", 4096)
    desc = Descriptors(12)
    vc, e, where = _packed(img)[3]
    size = os.path.getsize(img)
    bad = {"past-the-end": (e & ~desc.offset_mask) | (size + 8192),
           "copied-flag": e | 1 << 63,
           # one sector, from 7 bytes into the data: not a deflate stream from there
           "short-data": (1 << 62) | (desc.span(e)[0] + 7)}[how]
    _patch(img, where, struct.pack(">Q", bad))
    with Qcow2Image.open(img, readonly=True) as q:
        with pytest.raises(Qcow2Error, match=words) as ei:
            q.read(vc * 4096, 4096)
        assert ei.value.errno == errno.EIO and "\n" not in str(ei.value)
        assert q.read(0, vc * 4096) == want[:vc * 4096]


@pytest.mark.parametrize("how,words", [
    ("past-the-end", r"beyond the end of the file"),
    ("into-metadata", r"which holds metadata"),
    ("low-refcount", r"whose refcount \d+ is less than the \d+ compressed clusters in it"),
    ("data-over-it", r"which holds compressed data"),
])
def test_compressed_cluster_not_its_own_allows_readonly_only(tmp_path, how, words):
    img, want = _compressed(tmp_path, "zlib", 4096)
    desc = Descriptors(12)
    packed = _packed(img)
    vc, e, where = packed[3]
    _, entries = _l2_entries(img)
    with open(img, "rb") as f:
        (l1_off,) = struct.unpack_from(">Q", f.read(48), 40)
    if how == "past-the-end":
        _patch(img, where, struct.pack(">Q", (1 << 62) | os.path.getsize(img) + 4096))
    elif how == "into-metadata":
        _patch(img, where, struct.pack(">Q", (1 << 62) | l1_off))
    elif how == "low-refcount":
        host = desc.clusters(e)[0]
        with open(img, "rb") as f:
            data = f.read()
        (rt_off,) = struct.unpack_from(">Q", data, 48)
        (block,) = struct.unpack_from(">Q", data, rt_off)
        _patch(img, block + 2 * host, struct.pack(">H", _qemu_refcount(img, host) - 1))
    else:                        # a normal entry pointed at a compressed cluster's host cluster
        nvc, ne, nwhere = next(t for t in entries if not t[1] >> 62 & 1)
        _patch(img, nwhere, struct.pack(">Q", (1 << 63) | desc.clusters(e)[0] << 12))
    with pytest.raises(Qcow2Error, match=words) as ei:
        Qcow2Image.open(img)
    assert ei.value.errno == errno.EIO and "open it read-only" in str(ei.value)
    with Qcow2Image.open(img, readonly=True) as q:      # what is intact still reads
        assert q.read(0, 3 * 4096) == want[:3 * 4096]


def test_qemu_map_agrees_that_the_images_are_compressed(tmp_path):
    """The images these tests use have what cloud images have: compressed clusters
    (qemu says so), uncompressed ones for incompressible data, and holes."""
    img, _ = _compressed(tmp_path, "zlib", 65536)
    out = json.loads(subprocess.run([QEMU_IMG, "map", "--output=json", img],
                                    capture_output=True, text=True, check=True).stdout)
    assert any("offset" not in m and m["data"] for m in out)      # compressed: no offset
    assert any("offset" in m and m["data"] for m in out)          # stored as is
    assert any(not m["data"] for m in out)                        # holes


def test_crash_at_any_write_over_compressed_clusters(tmp_path, monkeypatch):
    """Writes, discards and zeroing over compressed clusters (shared and spanning host
    clusters), cut after every write the engine makes: each cut image is clean for
    qemu-img check (leaks aside, which reopening reclaims), reads every byte as before
    or after the operation in progress, and takes writes again."""
    from qcow2_tools import record_io
    from test_qcow2_image import _replay_and_check
    img, want = _compressed(tmp_path, "zlib", 4096, size=256 * KiB)
    with open(img, "rb") as f:
        start = f.read()
    packed_vcs = [vc for vc, _, _ in _packed(img)]
    log, _ = record_io(monkeypatch)
    rng = random.Random(44)
    model = bytearray(want)
    bounds, states = [0], [bytes(model)]
    with Qcow2Image.open(img) as q:
        for i in range(12):
            _writes_over(q, model, rng, 4096, packed_vcs, 1)
            if i % 4 == 3:
                q.flush()
            bounds.append(len(log))
            states.append(bytes(model))
    monkeypatch.undo()
    assert len(log) >= 30, log
    leaky = _replay_and_check(tmp_path, start, log, bounds, states, list(range(1, len(log) + 1)))
    assert leaky >= 3, f"only {leaky} crash points leaked: the uncounting is barely tested"


@pytest.mark.parametrize("path", ["copy", "zero_copy"])
def test_ring_reads_decompress_off_the_queue_thread(sim, tmp_path, monkeypatch, path):
    """On the ring, a compressed cluster not in the cache is read by a ring read and
    decompressed in a worker thread: never by the engine's own pread and decompression
    on the queue's thread (under the image's lock), which would stall the queue."""
    import threading
    from pyublk_fast.backends.qcow2 import compress
    img, want = _compressed(tmp_path, "zlib", 4096)
    unpacking, mapping = set(), set()
    real_unpack, real_map = compress.Decompressed.unpack, Qcow2Image.map_data

    def unpack(self, raw, e, voff):
        unpacking.add(threading.get_ident())
        return real_unpack(self, raw, e, voff)

    def map_data(self, *args):
        mapping.add(threading.get_ident())
        return real_map(self, *args)

    def no_pin(self, e, voff):
        raise AssertionError("the engine's own load ran on the queue's thread")

    monkeypatch.setattr(compress.Decompressed, "unpack", unpack)
    monkeypatch.setattr(compress.Decompressed, "pin", no_pin)
    monkeypatch.setattr(Qcow2Image, "map_data", map_data)
    backend = Qcow2Backend(img)
    with Device(backend, sim, depth=16, data_path=path) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == want
        assert blk.pread(SIZE, 0) == want              # the cache's clusters, and more
        res = blk.submit([(READ, off, 64 * KiB, bytearray(64 * KiB))
                          for off in range(0, SIZE, 64 * KiB)])
        assert res == [64 * KiB] * (SIZE // (64 * KiB))
        assert backend.image._unpacked.loads >= len(_packed(img))
    assert unpacking and mapping and not unpacking & mapping, (unpacking, mapping)


def test_a_failed_pwrite_over_compressed_clusters_fails_that_request_only(tmp_path,
                                                                          monkeypatch):
    """Each pwrite that requests over compressed clusters make fails once, in turn (the
    new cluster's data or refcount, the L2 entry, the uncounting of the compressed one):
    that request fails with the errno, the others work; every byte reads as the model
    (the failed request's, per cluster, as before or after it); qemu-img check finds no corruption,
    and none is left, leaks either, once the image is opened again."""
    from qcow2_tools import qemu_check
    from pyublk_fast.backends.qcow2 import fileio
    img, want = _compressed(tmp_path, "zlib", 4096, size=256 * KiB)
    with open(img, "rb") as f:
        start = f.read()
    vcs = [vc for vc, _, _ in _packed(img)]
    ops = [("write", vcs[1] * 4096 + 512, b"p" * 1024), ("write", vcs[2] * 4096, b"w" * 4096),
           ("discard", vcs[3] * 4096, 4096), ("zeroes", vcs[4] * 4096 + 1024, 2048),
           ("write", vcs[5] * 4096 + 3584, b"s" * 1024)]

    def apply(q: Qcow2Image, model: bytearray, op: str, off: int, arg) -> tuple[int, int]:
        n = len(arg) if op == "write" else arg
        {"write": lambda: q.write(off, arg), "discard": lambda: q.discard(off, arg),
         "zeroes": lambda: q.write_zeroes(off, arg)}[op]()
        model[off:off + n] = arg if op == "write" else bytes(n)
        return off, n

    real = fileio.pwrite_all
    calls = [0]

    def counting(fd, data, offset):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(errno.EIO, "injected")
        real(fd, data, offset)

    fail_at = 0
    with open(img, "r+b") as f:
        f.write(start)
    monkeypatch.setattr(fileio, "pwrite_all", counting)
    with Qcow2Image.open(img) as q:
        calls[0] = 0
        for op in ops:
            apply(q, bytearray(want), *op)
        total = calls[0]
    assert total >= 12, total
    for fail_at in range(1, total + 1):
        with open(img, "wb") as f:
            f.write(start)
        model = bytearray(want)
        with Qcow2Image.open(img) as q:
            calls[0], failed = 0, []
            for op, off, arg in ops:
                before = bytes(model)
                try:
                    apply(q, model, op, off, arg)
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    n = len(arg) if op == "write" else arg
                    after = bytearray(before)
                    after[off:off + n] = arg if op == "write" else bytes(n)
                    failed.append((off, n, bytes(after)))
            assert len(failed) == 1, (fail_at, failed)
            got = q.read(0, len(model))
            off, n, after = failed[0]
            assert got[:off] == model[:off] and got[off + n:] == model[off + n:], fail_at
            for lo in range(off // 4096 * 4096, off + n, 4096):    # each cluster: one or other
                assert got[lo:lo + 4096] in (model[lo:lo + 4096], after[lo:lo + 4096]), fail_at
        qemu_check(img, f"pwrite {fail_at} of {total} failed")
        with Qcow2Image.open(img) as q:            # reclaims what the failure leaked
            assert q.read(0, len(model)) == got
        assert_check_clean(img, f"pwrite {fail_at} of {total} failed, then reopened")
