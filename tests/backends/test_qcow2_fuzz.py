"""Fuzz Qcow2Image with mutated and truncated images.

Every mutant must either open or raise Qcow2Error; every read/write on it must
either work or raise Qcow2Error. Clusters whose metadata path (L1 entry, L2 entry,
data cluster) was not touched by the mutation must still read back correctly, the
file must not grow without bound, and writes never change the header except the
refcount-table fields.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import time

import pytest

from pyublk_fast.backends.qcow2 import Qcow2Error, Qcow2Image

SEED = 20240611
MUTANTS = 5000
TIME_BUDGET = 25.0  # seconds; the loop stops early (but after MIN_MUTANTS) on slow hosts
MIN_MUTANTS = 2000  # "thousands" even on a slow host (all 5000 take ~7 s here)


class Base:
    """A valid image plus what every virtual cluster depends on in the file."""

    def __init__(self, path: str, model: bytes, backing: str | None = None) -> None:
        with open(path, "rb") as f:
            self.data = f.read()
        self.model = model
        self.name = os.path.basename(path)
        self.backing = backing
        (cb,) = struct.unpack_from(">I", self.data, 20)
        (self.size,) = struct.unpack_from(">Q", self.data, 24)
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", self.data, 36)
        self.cb, self.cs = cb, 1 << cb
        self.regions = [(0, 200), (l1_off, l1_off + 8 * l1_size),
                        (rt_off, rt_off + rt_clusters * self.cs)]
        self.deps: list[list[tuple[int, int]]] = []  # per virtual cluster: byte ranges
        mask = 0x00FFFFFFFFFFFE00
        n_l2 = self.cs // 8
        for vc in range(-(-self.size // self.cs)):
            l1i, l2i = divmod(vc, n_l2)
            dep = [(l1_off + 8 * l1i, l1_off + 8 * l1i + 8)]
            (l1e,) = struct.unpack_from(">Q", self.data, l1_off + 8 * l1i)
            if l1e & mask:
                l2 = l1e & mask
                dep.append((l2 + 8 * l2i, l2 + 8 * l2i + 8))
                self.regions.append((l2, l2 + self.cs))
                (l2e,) = struct.unpack_from(">Q", self.data, l2 + 8 * l2i)
                if l2e & mask and not l2e & 1:
                    dep.append((l2e & mask, (l2e & mask) + self.cs))
                    self.regions.append((l2e & mask, (l2e & mask) + self.cs))
            self.deps.append(dep)
        for i in range(rt_clusters * self.cs // 8):
            (rte,) = struct.unpack_from(">Q", self.data, rt_off + 8 * i)
            if rte:
                self.regions.append((rte, rte + self.cs))
        self.regions.append((0, len(self.data)))


def _make_own(tmp, cb: int, size: int, seed: int, backing: str | None = None) -> Base:
    rng = random.Random(seed)
    path = str(tmp / f"own{cb}_{seed}.qcow2")
    if backing:
        with open(backing, "rb") as f:
            model = bytearray(f.read()[:size].ljust(size, b"\0"))
    else:
        model = bytearray(size)
    with Qcow2Image.create(path, size, cluster_bits=cb,
                           backing_file=os.path.basename(backing) if backing else None,
                           backing_format="raw" if backing else None) as img:
        for _ in range(40):
            off = rng.randrange(size)
            ln = rng.randrange(1, min(3 * (1 << cb), size - off) + 1)
            if rng.random() < 0.8:
                d = rng.randbytes(ln)
                img.write(off, d)
                model[off:off + ln] = d
            else:
                img.write_zeroes(off, ln)
                model[off:off + ln] = bytes(ln)
    return Base(path, bytes(model), backing)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qcow2fuzz")
    raw = tmp / "base.raw"
    raw.write_bytes(random.Random(3).randbytes(100_000))
    out = [_make_own(tmp, 9, 96 * 1024, 1), _make_own(tmp, 10, 200 * 1024, 2),
           _make_own(tmp, 12, 512 * 1024, 3), _make_own(tmp, 9, 128 * 1024, 4, str(raw))]
    qimg, qio = shutil.which("qemu-img"), shutil.which("qemu-io")
    if qimg and qio:
        path = str(tmp / "qemu.qcow2")
        subprocess.run([qimg, "create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", path,
                        "256k"], check=True)
        subprocess.run([qio, "-f", "qcow2", "-c", "write -P 0xa1 0 5k", "-c",
                        "write -P 0xb2 70k 9k", "-c", "write -z 90k 2k", "-c",
                        "write -P 0xc3 200k 1k", path], check=True, capture_output=True)
        with Qcow2Image.open(path, readonly=True) as img:
            model = img.read(0, img.size)
        out.append(Base(path, model))
    return tmp, out


def _mutate(rng: random.Random, base: Base) -> tuple[bytes, int, int, int | None]:
    """Return (mutated bytes, first changed byte, end of change, cut or None)."""
    data = bytearray(base.data)
    if rng.random() < 0.1:
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), cut, len(data), cut
    lo, hi = rng.choice(base.regions)
    hi = min(hi, len(data))
    pos = rng.randrange(lo, max(hi, lo + 1)) if hi > lo else rng.randrange(len(data))
    kind = rng.randrange(5)
    if kind == 0:
        data[pos] ^= 1 << rng.randrange(8)
        return bytes(data), pos, pos + 1, None
    if kind == 1:
        data[pos] = rng.randrange(256)
        return bytes(data), pos, pos + 1, None
    pos &= ~7
    pos = min(pos, len(data) - 8)
    interesting = [0, 1, rng.randrange(1 << 64), 1 << 63 | rng.randrange(len(data)) & ~511,
                   (rng.randrange(len(data)) & ~(base.cs - 1)) | 1 << 63,
                   1 << 62 | rng.randrange(1 << 40), 1 << 63 | 1 << 45, 0x200, base.cs]
    value = rng.choice(interesting) if kind < 4 else rng.randrange(1 << 64)
    data[pos:pos + 8] = struct.pack(">Q", value)
    return bytes(data), pos, pos + 8, None


def _touched(base: Base, vc: int, a: int, b: int, cut: int | None) -> bool:
    for lo, hi in base.deps[vc]:
        if cut is not None and hi > cut:
            return True
        if cut is None and lo < b and a < hi:
            return True
    return False


def _check_reads(img: Qcow2Image, base: Base, a: int, b: int, cut: int | None) -> None:
    size, cs = base.size, base.cs
    if img.size != size:
        return
    header_hit = cut is None and a < cs
    try:
        whole = img.read(0, size)
    except Qcow2Error:
        whole = None
    for vc in range(len(base.deps)):
        if header_hit or _touched(base, vc, a, b, cut):
            continue
        lo, hi = vc * cs, min(size, vc * cs + cs)
        if whole is None:            # the mutation broke some cluster: this one must still read
            try:
                got = img.read(lo, hi - lo)
            except Qcow2Error as e:
                raise AssertionError(f"untouched cluster {vc} of {base.name} unreadable: {e}") from e
        else:
            got = whole[lo:hi]
        assert got == base.model[lo:hi], f"untouched cluster {vc} of {base.name} changed"


def _exercise(path: str, base: Base, a: int, b: int, cut: int | None,
              rng: random.Random) -> None:
    try:
        img = Qcow2Image.open(path)
    except Qcow2Error:
        return
    with img:
        _check_reads(img, base, a, b, cut)
        span = min(img.size, 2 * base.size)
        if span == 0:
            return
        for _ in range(4):
            off = rng.randrange(span)
            ln = rng.randrange(min(3 * base.cs, span - off) + 1)
            op = rng.randrange(4)
            try:
                if op == 0:
                    img.write(off, b"\x5a" * ln)
                elif op == 1:
                    img.discard(off, ln)
                elif op == 2:
                    img.write_zeroes(off, ln)
                else:
                    img.read(off, ln)
            except Qcow2Error:
                pass


def test_fuzz_mutated_images(bases):
    tmp, base_list = bases
    rng = random.Random(SEED)
    path = str(tmp / "mutant.qcow2")
    deadline = time.monotonic() + TIME_BUDGET
    done = 0
    for done in range(1, MUTANTS + 1):
        base = rng.choice(base_list)
        data, a, b, cut = _mutate(rng, base)
        with open(path, "wb") as f:
            f.write(data)
        if base.backing:
            link = tmp / os.path.basename(base.backing)
            assert link.exists()
        try:
            _exercise(path, base, a, b, cut, rng)
        except Qcow2Error:
            pass
        except Exception as e:  # anything else is a bug: report how to reproduce it
            raise AssertionError(f"mutant {done} of {base.name} (bytes {a}..{b}, cut={cut}) "
                                 f"raised {type(e).__name__}: {e}") from e
        with open(path, "rb") as f:
            after = f.read()
        grown = len(after) - len(data)
        assert grown <= 64 * base.cs + 4 * 3 * base.cs, f"file grew by {grown} bytes"
        if len(data) >= base.cs and after[:48] + after[60:88] != data[:48] + data[60:88]:
            raise AssertionError(f"mutant {done} of {base.name}: header overwritten")
        if after[96:base.cs] != data[96:base.cs]:
            raise AssertionError(f"mutant {done} of {base.name}: header cluster overwritten")
        if done >= MIN_MUTANTS and time.monotonic() > deadline:
            break
    assert done >= MIN_MUTANTS


def test_fuzz_every_truncation_point_of_a_small_image(bases):
    """Each cut must open-or-fail cleanly; a cut never crashes reads or writes."""
    tmp, base_list = bases
    base = base_list[0]
    path = str(tmp / "cut.qcow2")
    rng = random.Random(SEED + 1)
    for cut in sorted({*range(0, 200), *range(0, len(base.data), 97)}):
        with open(path, "wb") as f:
            f.write(base.data[:cut])
        _exercise(path, base, cut, len(base.data), cut, rng)
