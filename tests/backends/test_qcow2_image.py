"""Qcow2Image against an in-memory model and against qemu-img/qemu-io as peers."""

from __future__ import annotations

import bisect
import errno
import json
import os
import random
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from pyublk_fast.backends.qcow2 import Qcow2Error, Qcow2Image
from qcow2_tools import (
    GiB, KiB, MiB, QEMU_IMG, QEMU_IO, assert_check_clean, needs_qemu, qemu_check, qemu_img,
    record_io,
)


def qemu_io(path: str, *cmds: str, fmt: str = "qcow2") -> None:
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [path], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def assert_same_as_raw(path: str, raw: str) -> None:
    r = subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", path, raw],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def random_ops(img: Qcow2Image, model: bytearray, rng: random.Random, count: int,
               max_len: int) -> None:
    """Apply random writes/discards/write_zeroes/reads to img and model, checking reads."""
    size = len(model)
    for _ in range(count):
        off = rng.randrange(size)
        if rng.random() < 0.5:  # sector-aligned like the block layer, else arbitrary
            off &= ~511
        ln = rng.randrange(min(max_len, size - off) + 1)
        op = rng.random()
        if op < 0.5:
            data = rng.randbytes(ln)
            img.write(off, data)
            model[off:off + ln] = data
        elif op < 0.62:
            img.discard(off, ln)
            model[off:off + ln] = bytes(ln)
        elif op < 0.74:
            img.write_zeroes(off, ln)
            model[off:off + ln] = bytes(ln)
        else:
            buf = bytearray(ln)
            img.readinto(off, memoryview(buf))
            assert buf == model[off:off + ln], f"read mismatch at {off}+{ln}"


# ------------------------------------------------------------------ own images

@pytest.mark.parametrize("cluster_bits", [9, 12, 16])
def test_random_io_matches_model_and_survives_reopen(tmp_path, cluster_bits):
    path = str(tmp_path / "a.qcow2")
    size = 4 * MiB + 1234  # not a multiple of the cluster size
    model = bytearray(size)
    rng = random.Random(cluster_bits)
    with Qcow2Image.create(path, size, cluster_bits=cluster_bits) as img:
        assert (img.size, img.cluster_size, img.readonly) == (size, 1 << cluster_bits, False)
        random_ops(img, model, rng, 400, 3 << cluster_bits)
        assert img.read(0, size) == model
        img.flush()
    with Qcow2Image.open(path) as img:
        assert img.read(0, size) == model
        random_ops(img, model, rng, 100, 200 * KiB)
    with Qcow2Image.open(path, readonly=True) as img:
        assert img.readonly
        assert img.read(0, size) == model
    assert_check_clean(path)
    raw = tmp_path / "a.raw"
    raw.write_bytes(model)
    assert_same_as_raw(path, str(raw))


def test_bad_ranges_and_readonly(tmp_path):
    path = str(tmp_path / "r.qcow2")
    Qcow2Image.create(path, 1 * MiB).close()
    with Qcow2Image.open(path) as img:
        for off, ln in [(-1, 1), (MiB, 1), (MiB - 1, 2), (0, MiB + 1)]:
            with pytest.raises(ValueError, match="outside the image"):
                img.read(off, ln)
            with pytest.raises(ValueError, match="outside the image"):
                img.write(off, b"x" * max(ln, 0))
            with pytest.raises(ValueError, match="outside the image"):
                img.discard(off, ln)
        assert img.read(MiB, 0) == b""
        img.write(MiB - 3, b"end")
        assert img.read(MiB - 4, 4) == b"\0end"
    with Qcow2Image.open(path, readonly=True) as img:
        for call in (lambda: img.write(0, b"x"), lambda: img.discard(0, 512),
                     lambda: img.write_zeroes(0, 512)):
            with pytest.raises(Qcow2Error) as ei:
                call()
            assert ei.value.errno == errno.EROFS
        assert img.read(MiB - 3, 3) == b"end"
        with pytest.raises(TypeError, match="writable"):
            img.readinto(0, b"immutable")
    with pytest.raises(ValueError, match="closed"):
        img.read(0, 1)
    with pytest.raises(ValueError, match="cluster_bits"):
        Qcow2Image.create(path, MiB, cluster_bits=22)
    with pytest.raises(ValueError, match="size"):
        Qcow2Image.create(path, -1)


def test_threads_share_one_image(tmp_path):
    import threading
    path = str(tmp_path / "t.qcow2")
    chunk = 256 * KiB
    datas = [random.Random(i).randbytes(chunk) for i in range(4)]
    with Qcow2Image.create(path, 4 * chunk, cluster_bits=12) as img:
        def worker(i: int) -> None:
            for off in range(0, chunk, 4096):  # interleaved allocations from 4 threads
                img.write(i * chunk + off, datas[i][off:off + 4096])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert img.read(0, 4 * chunk) == b"".join(datas)
    assert_check_clean(path)


def test_refcount_table_grows(tmp_path):
    """cluster_bits=9: one refcount table cluster covers 8 MiB of file; write 20 MiB."""
    path = str(tmp_path / "g.qcow2")
    data = random.Random(5).randbytes(20 * MiB)
    with Qcow2Image.create(path, 64 * MiB, cluster_bits=9) as img:
        with open(path, "rb") as f:
            rt_before = struct.unpack(">QI", f.read(60)[48:60])
        img.write(0, data)
        img.discard(MiB, 4 * MiB)  # freed clusters (and the old table) are reused
        img.write(MiB + 512, data[:MiB])
        expect = bytearray(data)
        expect[MiB:5 * MiB] = bytes(4 * MiB)
        expect[MiB + 512:2 * MiB + 512] = data[:MiB]
        assert img.read(0, 20 * MiB) == expect
    with open(path, "rb") as f:
        rt_after = struct.unpack(">QI", f.read(60)[48:60])
    assert rt_after[0] != rt_before[0] and rt_after[1] > rt_before[1]
    with Qcow2Image.open(path) as img:
        assert img.read(0, 20 * MiB) == expect
    assert_check_clean(path)


@pytest.mark.parametrize("cluster_bits", [9, 16])
def test_large_virtual_size_far_offsets(tmp_path, cluster_bits):
    path = str(tmp_path / "big.qcow2")
    size = 64 * GiB
    spots = {0: b"a", 1 * GiB + 7: b"b", 33 * GiB: b"c", size - 4096: b"d"}
    with Qcow2Image.create(path, size, cluster_bits=cluster_bits) as img:
        for off, ch in spots.items():
            img.write(off, ch * 4096)
        img.discard(33 * GiB, 1 << cluster_bits)
    with Qcow2Image.open(path) as img:
        cut = min(4096, 1 << cluster_bits)  # the discarded head of the "c" spot
        for off, ch in spots.items():
            want = bytes(cut) + ch * (4096 - cut) if off == 33 * GiB else ch * 4096
            assert img.read(off, 4096) == want
        assert img.read(2 * GiB, 8192) == bytes(8192)
    assert_check_clean(path)
    assert os.path.getsize(path) < 20 * MiB


@needs_qemu
def test_zero_flag_and_discard_free_clusters(tmp_path):
    path = str(tmp_path / "z.qcow2")
    cs = 64 * KiB
    with Qcow2Image.create(path, 4 * MiB) as img:
        img.write(0, b"\x11" * (4 * cs))
        grown = os.path.getsize(path)
        img.write_zeroes(cs, cs)            # whole cluster -> zero flag, host cluster freed
        img.discard(2 * cs, cs + 100)       # whole cluster unmapped + partial zeroed
        assert img.read(0, 4 * cs) == (b"\x11" * cs + bytes(2 * cs + 100)
                                       + b"\x11" * (cs - 100))
        img.flush()                         # the frees are durable: clusters reusable
        img.write(MiB, b"\x22" * (2 * cs))  # reuses the two freed clusters
        assert os.path.getsize(path) == grown
    mapping = json.loads(qemu_img("map", "--output=json", path))
    zero_at = [m for m in mapping if m["start"] <= cs < m["start"] + m["length"]][0]
    assert zero_at["zero"] and not zero_at["data"]
    assert_check_clean(path)


# ------------------------------------------------------------------ qemu peers

@needs_qemu
@pytest.mark.parametrize("cluster_size", ["512", "4k", "64k", "2M"])
def test_read_and_extend_qemu_images(tmp_path, cluster_size):
    path, raw = str(tmp_path / "q.qcow2"), str(tmp_path / "q.raw")
    size = 8 * MiB
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path,
             str(size))
    qemu_io(path, "write -P 0xab 0 64k", "write -P 0x5c 100k 3k", "write -P 0x77 4M 1M",
            "write -z 4352k 64k", "discard 4608k 128k", "write -P 0x33 8380416 8192")
    qemu_img("convert", "-O", "raw", path, raw)
    with open(raw, "rb") as f:
        model = bytearray(f.read())
    with Qcow2Image.open(path) as img:
        assert img.read(0, size) == model
        random_ops(img, model, random.Random(7), 200, 300 * KiB)
        assert img.read(0, size) == model
    assert_check_clean(path)
    with open(raw, "wb") as f:
        f.write(model)
    assert_same_as_raw(path, raw)
    qemu_io(path, "write -P 0x99 1M 64k")  # qemu can keep using what we wrote
    model[MiB:MiB + 64 * KiB] = b"\x99" * (64 * KiB)
    with Qcow2Image.open(path, readonly=True) as img:
        assert img.read(0, size) == model


@needs_qemu
@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_preallocated_qemu_images(tmp_path, prealloc):
    path = str(tmp_path / "p.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"preallocation={prealloc}", path, "4M")
    model = bytearray(4 * MiB)
    with Qcow2Image.open(path) as img:
        assert img.read(0, img.size) == model
        random_ops(img, model, random.Random(4), 150, 200 * KiB)
        assert img.read(0, img.size) == model
    assert_check_clean(path)


@needs_qemu
@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("made_by", ["us", "qemu"])
def test_backing_file_chain(tmp_path, backing_fmt, made_by):
    size, bsize = 4 * MiB, 3 * MiB + 4096  # backing smaller than the overlay
    rng = random.Random(11)
    base_data = rng.randbytes(bsize)
    base = str(tmp_path / f"base.{backing_fmt}")
    if backing_fmt == "raw":
        with open(base, "wb") as f:
            f.write(base_data)
    else:
        with Qcow2Image.create(base, bsize, cluster_bits=12) as b:
            b.write(0, base_data)
    top = str(tmp_path / "top.qcow2")
    if made_by == "us":
        Qcow2Image.create(top, size, backing_file=os.path.basename(base),
                          backing_format=backing_fmt).close()
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", backing_fmt, top, str(size))
    model = bytearray(base_data + bytes(size - bsize))
    with Qcow2Image.open(top) as img:
        assert img.read(0, size) == model
        img.write(1000, b"cow")          # copy-on-write of a partial cluster
        model[1000:1003] = b"cow"
        img.discard(128 * KiB, 128 * KiB)  # backing must not show through
        model[128 * KiB:256 * KiB] = bytes(128 * KiB)
        img.write_zeroes(300 * KiB, 70 * KiB)
        model[300 * KiB:370 * KiB] = bytes(70 * KiB)
        img.write(bsize - 10, b"z" * 100)  # straddles the end of the backing file
        model[bsize - 10:bsize + 90] = b"z" * 100
        random_ops(img, model, rng, 150, 200 * KiB)
        assert img.read(0, size) == model
    with Qcow2Image.open(top, readonly=True) as img:
        assert img.read(0, size) == model
    with open(base, "rb") as f:  # the backing file was never written
        got = f.read()
    if backing_fmt == "raw":
        assert got == base_data
    assert_check_clean(top)
    raw = str(tmp_path / "expect.raw")
    with open(raw, "wb") as f:
        f.write(model)
    assert_same_as_raw(top, raw)


@needs_qemu
def test_missing_backing_file(tmp_path):
    top = str(tmp_path / "top.qcow2")
    base = tmp_path / "base.raw"
    base.write_bytes(b"x" * 4096)
    Qcow2Image.create(top, MiB, backing_file=str(base)).close()
    base.unlink()
    with pytest.raises(Qcow2Error, match="backing file"):
        Qcow2Image.open(top)


def test_failed_requests_say_what_failed(tmp_path, monkeypatch):
    """A failed request keeps its errno and its message names the problem (the server
    logs it): the failed call, length and file offset, or which backing file."""
    def fail(err: int):
        def call(*args):
            raise OSError(err, os.strerror(err))
        return call

    raw = tmp_path / "base.raw"
    raw.write_bytes(b"r" * 8192)
    top = str(tmp_path / "top.qcow2")
    with Qcow2Image.create(top, MiB, cluster_bits=12, backing_file=str(raw)) as img:
        img.write(0, b"t" * 4096)
        for name, err, call, words in [
                ("pwrite", errno.ENOSPC, lambda: img.write(MiB // 2, b"x" * 4096),
                 r"^cannot write \d+ bytes at file offset 0x[0-9a-f]+: No space left on "),
                ("fsync", errno.EIO, img.flush,
                 r"^fsync of the image file failed: Input/output error; writes since"),
                ("preadv", errno.EIO, lambda: img.read(4096, 4096),
                 rf"^backing file {re.escape(repr(str(raw)))}: cannot read 4096 bytes at "
                 "file offset 0x1000: Input/output error$")]:
            with monkeypatch.context() as m:
                m.setattr(os, name, fail(err))
                with pytest.raises(OSError) as ei:
                    call()
            assert ei.value.errno == err and re.search(words, ei.value.strerror), ei.value
        assert img.read(0, 8192) == b"t" * 4096 + b"r" * 4096  # nothing else broke

    base = str(tmp_path / "base.qcow2")
    with Qcow2Image.create(base, MiB, cluster_bits=12) as b:
        b.write(0, b"b" * 4096)
    with open(base, "r+b") as f:  # set a reserved bit in the L2 entry of cluster 0
        (l1_off,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1_off)
        f.seek(struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack(">Q", entry | 2))
    Qcow2Image.create(top, MiB, cluster_bits=12, backing_file=base).close()
    with Qcow2Image.open(top) as img:
        with pytest.raises(Qcow2Error) as ei:
            img.read(0, 512)
    assert ei.value.errno == errno.EIO
    assert re.search(rf"^backing file {re.escape(repr(base))}: corrupt qcow2 image: L2 "
                     "entry .* reserved bits", ei.value.strerror), ei.value


# ------------------------------------------------------------------ refused features

def _patch(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _expect_refused(path: str, words: str, err: int = errno.ENOTSUP,
                    readonly: bool = False) -> None:
    with pytest.raises(Qcow2Error) as ei:
        Qcow2Image.open(path, readonly=readonly).close()
    assert re.search(words, ei.value.strerror) and "\n" not in ei.value.strerror, ei.value
    assert ei.value.errno == err


@needs_qemu
@pytest.mark.parametrize("opts,words", [
    ("extended_l2=on", "extended L2"),
    ("refcount_bits=8", "refcount_order 3"),
    ("data_file={dir}/ext.raw", "external data file"),
    ("encrypt.format=aes,encrypt.key-secret=sec0", r"encryption \(crypt_method 1\)"),
])
def test_qemu_options_we_refuse(tmp_path, opts, words):
    """Refused at open, read-only too, in one line naming the feature."""
    path = str(tmp_path / "f.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
             "-o", opts.format(dir=tmp_path), path, "1M")
    _expect_refused(path, "^unsupported qcow2 feature: " + words, readonly=True)


def test_unknown_compression_type_refused(tmp_path):
    path = str(tmp_path / "z.qcow2")
    with Qcow2Image.create(path, MiB) as img:
        img.write(0, b"keep")
    _patch(path, 72, ">Q", 1 << 3)          # incompatible bit 3: the type byte counts
    _patch(path, 104, ">B", 7)
    _expect_refused(path, r"^unsupported qcow2 feature: compression type 7 \(zlib and zstd "
                    r"are understood\)$", readonly=True)
    _patch(path, 104, ">B", 0)              # zlib, named explicitly: opens
    with Qcow2Image.open(path) as img:
        assert img.read(0, 4) == b"keep"


@pytest.mark.parametrize("offset,fmt,value,words,err", [
    (32, ">I", 1, "encryption", errno.ENOTSUP),              # crypt_method AES
    (72, ">Q", 1 << 10, "bit 10", errno.ENOTSUP),            # unknown incompatible bit
    (20, ">I", 22, "cluster_bits 22", errno.ENOTSUP),
    (20, ">I", 8, "cluster_bits 8", errno.ENOTSUP),
    (4, ">I", 4, "version 4", errno.ENOTSUP),
    (0, ">I", 0x12345678, "bad magic", errno.EINVAL),
    (40, ">Q", 0x10200, "L1 table offset", errno.EIO),       # misaligned
    (40, ">Q", 1 << 40, "beyond the end", errno.EIO),
    (36, ">I", 1 << 30, "L1 table of", errno.EIO),           # 8 GiB L1: memory cap
    (40, ">Q", 0x20000, "overlap", errno.EIO),               # L1 on the refcount block
    (56, ">I", 0, "refcount table of 0", errno.EIO),
    (100, ">I", 1 << 20, "header_length", errno.EIO),
])
def test_patched_headers_refused(tmp_path, offset, fmt, value, words, err):
    path = str(tmp_path / "p.qcow2")
    with Qcow2Image.create(path, 2 * MiB) as img:
        img.write(0, b"x" * 70000)
    _patch(path, offset, fmt, value)
    _expect_refused(path, words, err, readonly=True)


def test_dirty_and_corrupt_bits_allow_readonly_only(tmp_path):
    path = str(tmp_path / "d.qcow2")
    with Qcow2Image.create(path, MiB) as img:
        img.write(0, b"keep")
    for bit, words in [(1, "dirty"), (2, "corrupt")]:
        _patch(path, 72, ">Q", bit)
        _expect_refused(path, words)
        with Qcow2Image.open(path, readonly=True) as img:
            assert img.read(0, 4) == b"keep"


@pytest.mark.parametrize("points_at,words", [
    ("cluster 0's data", r"virtual offset 0x0 points at host cluster 0x\w+, also mapped at "
                         r"virtual offset 0x1000"),
    ("the L1 table", r"virtual offset 0x1000 points at host cluster 0x1000, which holds metadata"),
    ("past the end", r"virtual offset 0x1000 points at host cluster 0x\w+, beyond the end"),
], ids=["cross-linked", "into-metadata", "past-the-end"])
def test_entry_whose_cluster_is_not_its_own_allows_readonly_only(tmp_path, points_at, words):
    """A write through such an L2 entry would change another cluster (cross-linked data,
    metadata) or, once the file grows, a cluster allocated for someone else."""
    path = str(tmp_path / "x.qcow2")
    with Qcow2Image.create(path, MiB, cluster_bits=12) as img:
        img.write(0, b"a" * 4096 + b"b" * 4096)
    with open(path, "rb") as f:
        raw = f.read()
    (l1_off,) = struct.unpack_from(">Q", raw, 40)
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    e0, e1 = struct.unpack_from(">QQ", raw, l2_off)
    host = {"cluster 0's data": e0 & 0x00FFFFFFFFFFFE00, "the L1 table": l1_off,
            "past the end": len(raw) + 5 * 4096}[points_at]
    _patch(path, l2_off + 8, ">Q", 1 << 63 | host)
    with pytest.raises(Qcow2Error, match=words) as ei:
        Qcow2Image.open(path)
    assert ei.value.errno == errno.EIO and "open it read-only" in str(ei.value)
    with Qcow2Image.open(path, readonly=True) as img:
        assert img.read(0, 4096) == b"a" * 4096       # the rest of the image still reads
        if points_at == "cluster 0's data":
            assert img.read(4096, 4096) == b"a" * 4096
    _patch(path, l2_off + 8, ">Q", e1)                 # repaired: read-write again
    with Qcow2Image.open(path) as img:
        assert img.read(0, 8192) == b"a" * 4096 + b"b" * 4096


@needs_qemu
def test_version2_snapshots_and_compressed_clusters(tmp_path):
    v2 = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    qemu_io(v2, "write -P 0x42 0 4k")
    _expect_refused(v2, "version 2")
    with Qcow2Image.open(v2, readonly=True) as img:
        assert img.read(0, 8192) == b"\x42" * 4096 + bytes(4096)

    snap = str(tmp_path / "s.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", snap, "1M")
    qemu_io(snap, "write -P 0x43 0 4k")
    qemu_img("snapshot", "-c", "s1", snap)
    _expect_refused(snap, "snapshot")
    with Qcow2Image.open(snap, readonly=True) as img:
        assert img.read(0, 4096) == b"\x43" * 4096

    src, comp = str(tmp_path / "src.raw"), str(tmp_path / "c.qcow2")
    with open(src, "wb") as f:
        f.write(b"\x44" * 65536 + bytes(65536))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, comp)
    for readonly in (False, True):       # compressed clusters read, and take writes
        with Qcow2Image.open(comp, readonly=readonly) as img:
            assert img.read(0, 131072) == b"\x44" * 65536 + bytes(65536)


def test_truncated_image(tmp_path):
    path = str(tmp_path / "t.qcow2")
    with Qcow2Image.create(path, 2 * MiB, cluster_bits=12) as img:
        img.write(0, b"y" * 100000)
    for cut in (0, 50, 100, 4096, 3 * 4096):
        with open(path, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(Qcow2Error) as ei:
            Qcow2Image.open(path).close()
        assert ei.value.errno in (errno.EIO, errno.EINVAL)


# ------------------------------------------------------------------ crash consistency

TAIL = 64 * KiB  # the end of the virtual disk: no write before a crash touches it


def _serve_after_crash(path: str, expect: bytearray, where: str,
                       rng: random.Random) -> None:
    """What ``recover`` does next: open the crashed image read-write and write again.

    ``expect`` holds what the crashed image reads. The writes allocate (data clusters
    and the L2 tables of the untouched TAIL, partial clusters, a cluster freed by a
    discard and taken again after a flush) and overwrite in place; each reads back at
    once. After flush and close, qemu-img check finds no corruption and no leak (opening
    the image reclaimed what the crash leaked) and the whole image reads as before the
    crash with these writes on top.
    """
    size = len(expect)
    tail = size - TAIL
    steps = [("write", tail + 700, 9000),            # new data clusters, a new L2 table
             ("write", tail + TAIL // 2 - 300, 600),  # into a second new L2 table
             ("write", rng.randrange(tail - 1500), 1500),  # where the crash left data or not
             ("write", size - 512, 512),
             ("discard", tail + 1024, 2048),          # frees clusters that, after
             ("flush", 0, 0),                         # the flush made that durable,
             ("write", tail + TAIL // 2 + 4096, 1024)]  # this write takes again
    with Qcow2Image.open(path) as img:
        for op, off, ln in steps:
            data = rng.randbytes(ln) if op == "write" else bytes(ln)
            try:
                if op == "write":
                    img.write(off, data)
                elif op == "discard":
                    img.discard(off, ln)
                else:
                    img.flush()
            except Qcow2Error as e:
                raise AssertionError(f"{where}: {op} of {ln} bytes at {off:#x} after the "
                                     f"crash failed: {e}") from None
            assert img.read(off, ln) == data, f"{where}: {op} at {off:#x} reads back wrong"
            expect[off:off + ln] = data
        img.flush()
    assert_check_clean(path, f"{where}, then written again")
    with Qcow2Image.open(path, readonly=True) as img:
        assert img.read(0, size) == expect, f"{where}, then written again: data differs"


def _replay_and_check(tmp_path, start: bytes, log: list, bounds: list, states: list,
                      cuts: list) -> int:
    """Rebuild the file after each prefix ``cut`` of the write log (a crash of the
    process: every pwrite it made is kept, the next one never happens), check it and
    serve it again (``_serve_after_crash``); return at how many cuts the crash leaked
    clusters.

    ``states[k]`` is what the image reads after its first k operations, whose pwrites
    end at ``log[bounds[k]]``. A crash between two operations must leave exactly that
    (flushed or not: a killed process loses nothing the page cache holds), a crash
    inside operation k each byte as before or after it; qemu-img check must find no
    corruption (leaks are fine until the image is opened for writing again).
    """
    crash = str(tmp_path / "crash.qcow2")
    again = str(tmp_path / "again.qcow2")
    with open(crash, "wb") as f:
        f.write(start)
    fd = os.open(crash, os.O_RDWR)
    leaky = 0
    try:
        done = 0
        for cut in sorted(cuts):
            for offset, data in log[done:cut]:
                os.pwrite(fd, data, offset)
            done = cut
            where = f"crash after write {cut} of {len(log)}"
            leaky += qemu_check(crash, where).get("leaks", 0) > 0
            with Qcow2Image.open(crash, readonly=True) as img:
                got = img.read(0, img.size)
            k = bisect.bisect_right(bounds, cut) - 1  # operations completed
            if bounds[k] == cut:
                assert got == states[k], f"{where}: data differs"
            else:
                g = np.frombuffer(got, np.uint8)
                ok = ((g == np.frombuffer(states[k], np.uint8))
                      | (g == np.frombuffer(states[k + 1], np.uint8)))
                assert ok.all(), (f"{where}: byte {int(np.flatnonzero(~ok)[0]):#x} is "
                                  f"neither as before nor as after operation {k}")
            shutil.copyfile(crash, again)
            _serve_after_crash(again, bytearray(got), where, random.Random(cut))
    finally:
        os.close(fd)
    return leaky


@needs_qemu
def test_crash_at_any_write_leaves_no_corruption(tmp_path, monkeypatch):
    """Small clusters, so L2 tables and refcount blocks get allocated all the time;
    after each of >= 200 crash points the image is checked and written again. Many
    crash points leak clusters, which opening the image again reclaims."""
    path = str(tmp_path / "c.qcow2")
    size = MiB
    Qcow2Image.create(path, size, cluster_bits=9).close()
    with open(path, "rb") as f:
        start = f.read()
    log, _ = record_io(monkeypatch)
    rng = random.Random(21)
    model = bytearray(size)
    bounds, states = [0], [bytes(model)]
    with Qcow2Image.open(path) as img:
        for _ in range(25):
            off = rng.randrange(size - TAIL - 70000)
            ln = rng.randrange(1, 70000)
            op = rng.random()
            if op < 0.7:
                data = rng.randbytes(ln)
                img.write(off, data)
                model[off:off + ln] = data
            elif op < 0.85:
                img.discard(off, ln)
                model[off:off + ln] = bytes(ln)
            else:
                img.write_zeroes(off, ln)
                model[off:off + ln] = bytes(ln)
            if rng.random() < 0.2:
                img.flush()
            bounds.append(len(log))
            states.append(bytes(model))
    monkeypatch.undo()
    inside = sorted(set(range(1, len(log))) - set(bounds))
    cuts = set(bounds) | set(rng.sample(inside, 200 - len(set(bounds))))
    leaky = _replay_and_check(tmp_path, start, log, bounds, states, sorted(cuts))
    assert leaky >= 10, f"only {leaky} crash points leaked: the reclaiming is barely tested"


@needs_qemu
def test_crash_during_refcount_table_growth(tmp_path, monkeypatch):
    path = str(tmp_path / "g.qcow2")
    size = 10 * MiB
    Qcow2Image.create(path, size, cluster_bits=9).close()
    with open(path, "rb") as f:
        start = f.read()
    log, _ = record_io(monkeypatch)
    data = random.Random(8).randbytes(9 * MiB)  # > 8 MiB of host clusters: table grows
    with Qcow2Image.open(path) as img:
        img.write(0, data)
    monkeypatch.undo()
    header_writes = [i for i, (off, _) in enumerate(log) if off == 48]
    assert header_writes, "refcount table did not grow"
    cuts = {len(log)}
    for i in header_writes:
        cuts.update(range(max(1, i - 8), min(len(log), i + 8)))
    _replay_and_check(tmp_path, start, log, [0, len(log)],
                      [bytes(size), data + bytes(size - len(data))], sorted(cuts))


class _Killed(BaseException):
    """The process died here (raised in place of a pwrite)."""


@needs_qemu
@pytest.mark.parametrize("dies_after", ["refcount", "l2_clear"])
def test_a_leak_left_by_a_crash_is_reclaimed_at_open(tmp_path, monkeypatch, dies_after):
    """Killed after a new cluster's refcount was set, before the write that extends the
    file (a counted cluster past the end, which qemu-img check does not look at but
    would count once the file grows), or in a discard after the L2 entry let go of its
    cluster, before its refcount dropped (a counted cluster inside the file, a leak for
    qemu-img check). Opened for writing again, the image reclaims it: the next
    allocation takes it, everything reads back and qemu-img check finds nothing."""
    from pyublk_fast.backends.qcow2 import fileio
    path = str(tmp_path / "k.qcow2")
    a, b, c = (random.Random(i).randbytes(4096) for i in range(3))
    with Qcow2Image.create(path, 256 * MiB, cluster_bits=12) as img:
        img.write(0, a)
        img.write(4096, b)
    real = fileio.pwrite_all

    def first_then_die(fd, data, offset):
        real(fd, data, offset)  # the first pwrite: the refcount, or the cleared L2 entry
        raise _Killed

    img = Qcow2Image.open(path)
    monkeypatch.setattr(fileio, "pwrite_all", first_then_die)
    with pytest.raises(_Killed):
        img.write(MiB, c) if dies_after == "refcount" else img.discard(4096, 4096)
    monkeypatch.undo()
    img.close()
    expect = a + (b if dies_after == "refcount" else bytes(4096))
    assert qemu_check(path).get("leaks", 0) == (dies_after == "l2_clear")
    size = os.path.getsize(path)
    with Qcow2Image.open(path) as img:
        img.write(8192, c)  # takes the leaked cluster
        if dies_after == "refcount":
            size += 4096  # which lay right past the end of the file
        assert os.path.getsize(path) == size
        assert img.read(0, 12288) == expect + c
    assert_check_clean(path)
    with Qcow2Image.open(path) as img:
        assert img.read(0, 12288) == expect + c
        img.write(100 * MiB, a)  # a new L2 table and a data cluster, appended
        assert os.path.getsize(path) == size + 8192
    assert_check_clean(path)
