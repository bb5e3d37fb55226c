"""Fuzz Qcow2Image with mutated and truncated images.

Every mutant must either open or raise Qcow2Error; every read/write on it must
either work or raise Qcow2Error, and finish: the cases run in a worker process that
this one watches, so a case that hangs or kills the worker fails with its number and
its mutation. Clusters whose metadata path (L1 entry, L2 entry, data cluster) the
mutation did not touch must read back correctly before the case's writes, after
them and after reopening the image, with the bytes of the writes that worked where
they landed; the file must not grow without bound, and writes never change the
header except the refcount-table fields.

Environment: PYUBLK_FUZZ_CASES=N runs N mutants (default 3000, what CI runs);
PYUBLK_FUZZ_CASE=I runs case I alone, in the test process (to debug it);
PYUBLK_FUZZ_CASE_TIMEOUT=S is one case's time limit in seconds (default 10).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import pytest

from pyublk_fast.backends.qcow2 import Qcow2Error, Qcow2Image

SEED = 20240611
MAX_FAILURES = 20       # reported in full; the run stops there
MEMORY_HEADROOM = 1 << 30  # a case allocating more than this is a failure (MemoryError)


def _env_number(name: str, default: float, kind: type = int) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={text!r}: expected a positive {kind.__name__}")
    return value


CASES = _env_number("PYUBLK_FUZZ_CASES", 3000)
QEMU_CASES = max(1, CASES // 5)  # qemu's image was one base in five when they were drawn together
CASE_TIMEOUT = _env_number("PYUBLK_FUZZ_CASE_TIMEOUT", 10.0, float)
ONLY = os.environ.get("PYUBLK_FUZZ_CASE")


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
                if l2e >> 62 & 1:       # compressed: the bytes of its data
                    shift = 62 - (cb - 8)
                    off = l2e & ((1 << shift) - 1)
                    end = (off & ~511) + ((l2e >> shift & ((1 << (cb - 8)) - 1)) + 1) * 512
                    dep.append((off, end))
                    self.regions.append((off, end))
                elif l2e & mask and not l2e & 1:
                    dep.append((l2e & mask, (l2e & mask) + self.cs))
                    self.regions.append((l2e & mask, (l2e & mask) + self.cs))
            self.deps.append(dep)
        for i in range(rt_clusters * self.cs // 8):
            (rte,) = struct.unpack_from(">Q", self.data, rt_off + 8 * i)
            if rte:
                self.regions.append((rte, rte + self.cs))
        self.regions.append((0, len(self.data)))


@dataclass
class Case:
    """One mutant of ``base``: bytes ``a``..``b`` changed, or the file cut at ``cut``."""

    base: Base
    data: bytes
    a: int
    b: int
    cut: int | None
    what: str               # the mutation, in words
    rng: random.Random      # draws the case's requests

    def untouched(self) -> list[int]:
        """Virtual clusters whose metadata path the mutation left alone (none if it hit
        the header cluster)."""
        if self.cut is None and self.a < self.base.cs:
            return []
        if self.cut is not None:
            return [vc for vc, dep in enumerate(self.base.deps)
                    if all(hi <= self.cut for _, hi in dep)]
        return [vc for vc, dep in enumerate(self.base.deps)
                if not any(lo < self.b and self.a < hi for lo, hi in dep)]


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
    return tmp, [_make_own(tmp, 9, 96 * 1024, 1), _make_own(tmp, 10, 200 * 1024, 2),
                 _make_own(tmp, 12, 512 * 1024, 3), _make_own(tmp, 9, 128 * 1024, 4, str(raw))]


@pytest.fixture(scope="module")
def qemu_base(bases):
    """An image qemu wrote (its own layout: allocation order, zero clusters)."""
    qimg, qio = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not (qimg and qio):
        pytest.skip("qemu-img/qemu-io not installed (apt install qemu-utils; tools/dev.sh does)")
    tmp, _ = bases
    path = str(tmp / "qemu.qcow2")
    subprocess.run([qimg, "create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", path,
                    "256k"], check=True)
    subprocess.run([qio, "-f", "qcow2", "-c", "write -P 0xa1 0 5k", "-c",
                    "write -P 0xb2 70k 9k", "-c", "write -z 90k 2k", "-c",
                    "write -P 0xc3 200k 1k", path], check=True, capture_output=True)
    model = bytearray(256 * 1024)
    model[0:5 * 1024] = b"\xa1" * (5 * 1024)
    model[70 * 1024:79 * 1024] = b"\xb2" * (9 * 1024)
    model[200 * 1024:201 * 1024] = b"\xc3" * 1024
    with Qcow2Image.open(path, readonly=True) as img:
        assert img.read(0, img.size) == model   # what qemu wrote, read by us
    return Base(path, bytes(model))


@pytest.fixture(scope="module")
def compressed_bases(bases):
    """Images qemu-img convert -c made (deflate; zstd too where zstandard is
    installed): compressed clusters sharing host clusters, some spanning two."""
    qimg = shutil.which("qemu-img")
    if not qimg:
        pytest.skip("qemu-img not installed (apt install qemu-utils; tools/dev.sh does)")
    tmp, _ = bases
    rng = random.Random(7)
    src = bytearray()
    while len(src) < 192 * 1024:     # compressible runs, incompressible ones, zeros
        n = rng.randrange(1, 9) * 1024
        src += rng.choice([rng.randbytes(n), rng.randbytes(7) * (n // 7) + bytes(n % 7),
                           bytes(n), bytes(rng.choice(b"ab c") for _ in range(n))])
    raw = tmp / "compress.raw"
    raw.write_bytes(src[:192 * 1024])
    out = []
    for ctype, cs in [("zlib", 1024), ("zstd", 4096)]:
        path = str(tmp / f"compressed-{ctype}.qcow2")
        subprocess.run([qimg, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                        f"cluster_size={cs},compression_type={ctype}", str(raw), path],
                       check=True)
        with Qcow2Image.open(path, readonly=True) as img:
            assert img.read(0, img.size) == src[:192 * 1024]
        out.append(Base(path, bytes(src[:192 * 1024])))
    return out


def _mutate(rng: random.Random, base: Base) -> tuple[bytes, int, int, int | None, str]:
    """(mutated bytes, first changed byte, end of change, cut or None, what was done)."""
    data = bytearray(base.data)
    if rng.random() < 0.1:
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), cut, len(data), cut, f"cut at byte {cut:#x}"
    lo, hi = rng.choice(base.regions)
    hi = min(hi, len(data))
    pos = rng.randrange(lo, max(hi, lo + 1)) if hi > lo else rng.randrange(len(data))
    kind = rng.randrange(5)
    if kind == 0:
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        return bytes(data), pos, pos + 1, None, f"bit {bit} of byte {pos:#x} flipped"
    if kind == 1:
        data[pos] = rng.randrange(256)
        return bytes(data), pos, pos + 1, None, f"byte {pos:#x} set to {data[pos]:#04x}"
    pos &= ~7
    pos = min(pos, len(data) - 8)
    interesting = [0, 1, rng.randrange(1 << 64), 1 << 63 | rng.randrange(len(data)) & ~511,
                   (rng.randrange(len(data)) & ~(base.cs - 1)) | 1 << 63,
                   1 << 62 | rng.randrange(1 << 40), 1 << 63 | 1 << 45, 0x200, base.cs]
    value = rng.choice(interesting) if kind < 4 else rng.randrange(1 << 64)
    data[pos:pos + 8] = struct.pack(">Q", value)
    return bytes(data), pos, pos + 8, None, f"u64 at {pos:#x} set to {value:#x}"


def mutant(base_list: list[Base], i: int) -> Case:
    """Case ``i`` of a run: its own seed, so it can be replayed alone."""
    rng = random.Random(SEED << 32 | i)
    base = rng.choice(base_list)
    return Case(base, *_mutate(rng, base), rng)


def truncation(base: Base, cut: int) -> Case:
    return Case(base, base.data[:cut], cut, len(base.data), cut, f"cut at byte {cut:#x}",
                random.Random(SEED + cut))


# ---------------------------------------------------------------- one case

@dataclass
class Tally:
    """What a run did, so that a run that checks nothing does not pass."""

    cases: int = 0
    opened: int = 0
    compared: int = 0       # untouched clusters compared with the model
    slowest: tuple[float, int] = (0.0, -1)

    def add(self, other: dict) -> None:
        self.cases += other["cases"]
        self.opened += other["opened"]
        self.compared += other["compared"]
        self.slowest = max(self.slowest, tuple(other["slowest"]))


class _Model:
    """What each untouched virtual cluster must read: the base's bytes with the case's
    writes on top; a cluster a failed request covered is no longer checked."""

    def __init__(self, case: Case, size: int) -> None:
        base = case.base
        self.case = case
        self.cb, self.cs = base.cb, base.cs
        # a mutated virtual size moves every cluster: nothing is checked
        self.keep = set(case.untouched()) if size == base.size else set()
        self.bytes = bytearray(base.model)

    def did(self, off: int, data: bytes | None, ln: int) -> None:
        """A request over ``ln`` bytes at ``off`` wrote ``data`` (None: it failed)."""
        if data is None:
            if ln:
                self.keep.difference_update(range(off >> self.cb, (off + ln - 1 >> self.cb) + 1))
        elif off + ln <= len(self.bytes):
            self.bytes[off:off + ln] = data

    def check(self, img: Qcow2Image, when: str) -> int:
        """Compare the kept clusters with what ``img`` reads; return how many."""
        size, cs, name = len(self.bytes), self.cs, self.case.base.name
        for first, last in _runs(sorted(self.keep)):   # one read per run of kept clusters
            lo, hi = first * cs, min(size, last * cs + cs)
            try:
                got = img.read(lo, hi - lo)
            except Qcow2Error as e:
                bad = next(vc for vc in range(first, last + 1) if not _readable(img, vc, cs, size))
                raise AssertionError(f"untouched cluster {bad} of {name} unreadable {when}: "
                                     f"{e}") from e
            if got != self.bytes[lo:hi]:
                k = next(k for k in range(hi - lo) if got[k] != self.bytes[lo + k])
                raise AssertionError(f"untouched cluster {(lo + k) // cs} of {name} reads wrong "
                                     f"{when} (first bad byte at virtual offset {lo + k:#x})")
        return len(self.keep)


def _runs(vcs: list[int]) -> list[tuple[int, int]]:
    """Sorted cluster numbers as (first, last) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for vc in vcs:
        if out and out[-1][1] == vc - 1:
            out[-1] = (out[-1][0], vc)
        else:
            out.append((vc, vc))
    return out


def _readable(img: Qcow2Image, vc: int, cs: int, size: int) -> bool:
    try:
        img.read(vc * cs, min(cs, size - vc * cs))
    except Qcow2Error:
        return False
    return True


def _open(path: str) -> Qcow2Image | None:
    """The mutant opened read-write, else read-only (its reads are exercised too), else
    None."""
    for readonly in (False, True):
        try:
            return Qcow2Image.open(path, readonly=readonly)
        except Qcow2Error:
            pass
    return None


def _exercise(path: str, case: Case, tally: Tally) -> None:
    img = _open(path)
    if img is None:
        return
    tally.opened += 1
    base, rng, readonly = case.base, case.rng, img.readonly
    with img:
        model = _Model(case, img.size)
        tally.compared += model.check(img, "before the case's requests")
        span = min(img.size, 2 * base.size)
        if span == 0:
            return
        for _ in range(4):
            off = rng.randrange(span)
            ln = rng.randrange(min(3 * base.cs, span - off) + 1)
            op = 3 if readonly else rng.randrange(4)
            data = b"\x5a" * ln if op == 0 else bytes(ln)
            try:
                if op == 0:
                    img.write(off, data)
                elif op == 1:
                    img.discard(off, ln)
                elif op == 2:
                    img.write_zeroes(off, ln)
                else:
                    img.read(off, ln)
                    continue
            except Qcow2Error:
                data = None
            model.did(off, data, ln)
        tally.compared += model.check(img, "after the case's requests")
    if readonly:
        return
    try:
        img = Qcow2Image.open(path)
    except Qcow2Error as e:
        raise AssertionError(f"{base.name} opened before the case's writes, not after: "
                             f"{e}") from e
    with img:
        tally.compared += model.check(img, "after reopening")


def run_case(case: Case, path: str, tally: Tally) -> None:
    """Write the mutant to ``path`` and exercise it; AssertionError on a finding."""
    with open(path, "wb") as f:
        f.write(case.data)
    _exercise(path, case, tally)
    with open(path, "rb") as f:
        after = f.read()
    data, cs = case.data, case.base.cs
    grown = len(after) - len(data)
    assert grown <= 64 * cs + 4 * 3 * cs, f"file grew by {grown} bytes"
    if len(data) >= cs and after[:48] + after[60:88] != data[:48] + data[60:88]:
        raise AssertionError("header overwritten")
    if after[96:cs] != data[96:cs]:
        raise AssertionError("header cluster overwritten")


# ---------------------------------------------------------------- the watchdog

Run = Callable[[int, Tally], None]


def _send(fd: int, msg: dict) -> None:
    data = json.dumps(msg).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def _limit_memory() -> None:
    with open("/proc/self/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = (vm_kib << 10) + MEMORY_HEADROOM
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _worker(first: int, n: int, run: Run, progress: mmap.mmap, fd: int) -> None:
    """Run cases first..n-1, publishing the current one in ``progress`` (no system call
    per case) and sending failures and the tally down ``fd``; never returns."""
    status = 1
    try:
        _limit_memory()
        tally = Tally()
        for i in range(first, n):
            struct.pack_into("q", progress, 0, i)
            t0 = time.monotonic()
            try:
                run(i, tally)
            except AssertionError as e:
                _send(fd, {"case": i, "failure": str(e)})
            except Exception as e:  # Qcow2Error is handled where it is allowed
                where = "".join(traceback.format_exception(e)[-3:]).strip()
                _send(fd, {"case": i, "failure": f"raised {type(e).__name__}: {e}\n{where}"})
            tally.cases += 1
            tally.slowest = max(tally.slowest, (time.monotonic() - t0, i))
        _send(fd, {"done": vars(tally)})
        status = 0
    except BaseException as e:  # noqa: BLE001 - the parent reports it with the case
        _send(fd, {"case": struct.unpack_from("q", progress)[0],
                   "failure": f"worker failed: {type(e).__name__}: {e}"})
    finally:
        os._exit(status)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def supervise(n: int, run: Run, describe: Callable[[int], str],
              timeout: float = CASE_TIMEOUT) -> tuple[list[str], Tally]:
    """Run cases 0..n-1 in forked workers; a case still running after ``timeout``
    seconds, or one that ends its worker, is a failure and the next worker resumes
    after it. Returns the failures (each naming its case) and the tally."""
    progress = mmap.mmap(-1, 8)     # shared with the worker
    failures: list[str] = []
    tally = Tally()
    first = 0
    while first < n and len(failures) < MAX_FAILURES:
        struct.pack_into("q", progress, 0, first)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _worker(first, n, run, progress, wfd)
        os.close(wfd)
        done, hung, buf = False, None, b""
        seen, since = first, time.monotonic()
        with os.fdopen(rfd, "rb", buffering=0) as pipe:
            while True:
                if select.select([pipe], [], [], min(0.25, timeout / 4))[0]:
                    chunk = pipe.read(1 << 16)
                    if not chunk:
                        break       # the worker is gone
                    *lines, buf = (buf + chunk).split(b"\n")
                    for line in lines:
                        msg = json.loads(line)
                        if "done" in msg:
                            tally.add(msg["done"])
                            done = True
                        else:
                            failures.append(f"case {msg['case']} ({describe(msg['case'])}): "
                                            f"{msg['failure']}")
                current, now = struct.unpack_from("q", progress)[0], time.monotonic()
                if current != seen:
                    seen, since = current, now
                elif now - since > timeout:
                    os.kill(pid, signal.SIGKILL)
                    hung = current
                    break
        _, status = os.waitpid(pid, 0)
        if done:
            break
        current = struct.unpack_from("q", progress)[0]
        if hung is not None:
            failures.append(f"case {hung} ({describe(hung)}): hung, still running after "
                            f"{timeout:g} s")
        elif not failures or not failures[-1].startswith(f"case {current} "):
            failures.append(f"case {current} ({describe(current)}): ended the worker "
                            f"({_status_text(status)})")
        tally.cases += current - first + 1   # the worker's own tally died with it
        first = current + 1
    return failures, tally


def run_all(n: int, case_of: Callable[[int], Case], path: str, test: str) -> Tally:
    """The cases of one test, watched, or just case PYUBLK_FUZZ_CASE in this process."""
    def describe(i: int) -> str:
        c = case_of(i)
        return (f"{c.base.name}, {c.what}; replay: PYUBLK_FUZZ_CASE={i} python -m pytest "
                f"tests/backends/test_qcow2_fuzz.py::{test}")

    if ONLY is not None:
        tally = Tally()
        run_case(case_of(int(ONLY)), path, tally)
        return tally
    t0 = time.monotonic()
    failures, tally = supervise(n, lambda i, tally: run_case(case_of(i), path, tally), describe)
    secs, case = tally.slowest
    print(f"{test}: {tally.cases} cases in {time.monotonic() - t0:.1f} s, {tally.opened} "
          f"opened, {tally.compared} untouched clusters compared, slowest case {case} "
          f"{secs * 1000:.0f} ms, {len(failures)} failures")
    assert not failures, "\n".join(failures)
    assert tally.cases == n
    return tally


def test_fuzz_mutated_images(bases):
    tmp, base_list = bases
    tally = run_all(CASES, lambda i: mutant(base_list, i), str(tmp / "mutant.qcow2"),
                    "test_fuzz_mutated_images")
    if ONLY is None:    # most mutants must open and get their clusters checked
        assert tally.opened >= CASES // 2 and tally.compared >= CASES * 50, vars(tally)


def test_fuzz_mutated_qemu_image(bases, qemu_base):
    tmp, _ = bases
    tally = run_all(QEMU_CASES, lambda i: mutant([qemu_base], i), str(tmp / "qmutant.qcow2"),
                    "test_fuzz_mutated_qemu_image")
    if ONLY is None:
        assert tally.opened >= QEMU_CASES // 2 and tally.compared >= QEMU_CASES * 50, vars(tally)


def test_fuzz_mutated_compressed_images(bases, compressed_bases):
    """Corrupt descriptors, compressed data, refcounts of shared host clusters: every
    request works or fails with Qcow2Error, and what the mutation left alone reads
    back (compressed clusters whose data it did not touch included)."""
    tmp, _ = bases
    tally = run_all(QEMU_CASES, lambda i: mutant(compressed_bases, i),
                    str(tmp / "cmutant.qcow2"), "test_fuzz_mutated_compressed_images")
    if ONLY is None:
        assert tally.opened >= QEMU_CASES // 2 and tally.compared >= QEMU_CASES * 50, vars(tally)


def test_fuzz_every_truncation_point_of_a_small_image(bases):
    """Each cut must open-or-fail cleanly; a cut never crashes reads or writes."""
    tmp, base_list = bases
    base = base_list[0]
    cuts = sorted({*range(0, 200), *range(0, len(base.data), 97)})
    run_all(len(cuts), lambda i: truncation(base, cuts[i]), str(tmp / "cut.qcow2"),
            "test_fuzz_every_truncation_point_of_a_small_image")


def test_watchdog_reports_each_way_a_case_can_go_wrong():
    """The fuzz tests' harness itself: a hang, a dead worker, a memory blow-up, a
    wrong result and an unexpected exception each fail their own case, by number,
    and the cases after them still run."""
    ran = mmap.mmap(-1, 16)         # which cases ran, seen from the workers

    def run(i: int, tally: Tally) -> None:
        ran[i] = 1
        if i == 1:
            time.sleep(3600)
        elif i == 3:
            os._exit(7)
        elif i == 5:
            bytearray(2 * MEMORY_HEADROOM)
        elif i == 7:
            raise AssertionError("reads wrong")
        elif i == 9:
            raise KeyError("oops")

    t0 = time.monotonic()
    failures, tally = supervise(12, run, lambda i: f"seed {i}", timeout=0.5)
    assert time.monotonic() - t0 < 30
    assert [f.split(":")[0] for f in failures] == [
        "case 1 (seed 1)", "case 3 (seed 3)", "case 5 (seed 5)", "case 7 (seed 7)",
        "case 9 (seed 9)"], failures
    assert "hung, still running after 0.5 s" in failures[0]
    assert "ended the worker (exit status 7)" in failures[1]
    assert "raised MemoryError" in failures[2]
    assert failures[3].endswith("reads wrong") and "raised KeyError: 'oops'" in failures[4]
    assert tally.cases == 12 and ran[:12] == b"\x01" * 12
