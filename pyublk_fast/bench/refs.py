"""Reference programs measured in the same run: fio (io_uring, O_DIRECT), the C NOP loop, kublk,
and qemu-img bench (qemu's own qcow2 driver, O_DIRECT).

Each returns a figures dict (iops, mbps, lat_p50/p99/p999_us, cpu_us_per_io, ios, errors,
seconds; optionally a note on how it was measured) or raises RefUnavailable with the reason
(missing tool, failed run).
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

from ..util import kublk_path, wait_for_path

NOP_SOURCE = Path(__file__).with_name("nop_qd.c")


class RefUnavailable(Exception):
    """A reference cannot be measured here; str() says why and how to fix it."""


def children_cpu() -> float:
    """usr+sys seconds of this process's ended (and waited-for) children, every thread of
    theirs: taken before and after a tool's run, what the tool used."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def fio_args(target: str | list[str], rw: str, bs: int, qd: int, runtime: float) -> list[str]:
    """fio's command line for one job: time based, latency percentiles; target a file or
    block device (io_uring, O_DIRECT), or an engine's own options (e.g. ``--ioengine=nbd``,
    ``--uri=...``)."""
    where = [f"--filename={target}", "--ioengine=io_uring", "--direct=1"] if isinstance(target, str) else target
    return ["fio", "--name=ref", *where, f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
            f"--runtime={max(1, round(runtime * 1000))}ms",
            "--time_based", "--numjobs=1", "--randrepeat=0", "--norandommap", "--lat_percentiles=1",
            "--percentile_list=50:99:99.9", "--output-format=json"]


def parse_fio(out: str) -> dict:
    """Figures from fio's JSON output (read + write directions summed)."""
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise RefUnavailable(f"fio printed no usable JSON ({e})") from None
    ios = iops = bw = 0.0
    pcts: dict[str, float] = {}
    for d in ("read", "write"):
        side = job[d]
        if not side["total_ios"]:
            continue
        ios += side["total_ios"]
        iops += side["iops"]
        bw += side["bw_bytes"]
        lat = side.get("lat_ns", {}).get("percentile") or side.get("clat_ns", {}).get("percentile") or {}
        for key, val in lat.items():
            pcts[key] = max(pcts.get(key, 0.0), val / 1000.0)
    seconds = job["job_runtime"] / 1000.0
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * seconds
    pick = {p: next((v for k, v in pcts.items() if abs(float(k) - p) < 1e-6), None) for p in (50, 99, 99.9)}
    return dict(iops=iops, mbps=bw / 1e6, lat_p50_us=pick[50], lat_p99_us=pick[99], lat_p999_us=pick[99.9],
                cpu_s=cpu, ios=int(ios), errors=int(job["error"] != 0), seconds=seconds)


def fio(target: str | list[str], rw: str, bs: int, qd: int, runtime: float, timeout: float | None = None,
        env: dict | None = None) -> dict:
    """fio on a file or block device, or through an engine (see fio_args); cpu_s is the
    usr+sys of fio's processes, every thread: fio's own figure counts only its job's
    thread, not the threads an engine's library runs (librbd's messenger and completion
    threads do most of an rbd request's client work, as they do in the rbd backend's
    process, whose CPU the rows count whole)."""
    if shutil.which("fio") is None:
        raise RefUnavailable("fio not installed (apt-get install fio)")
    cpu0 = children_cpu()
    proc = subprocess.run(fio_args(target, rw, bs, qd, runtime), capture_output=True, text=True,
                          timeout=timeout or runtime * 5 + 60, check=False, env=env)
    if proc.returncode:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RefUnavailable(f"fio failed: {msg[-1] if msg else 'exit ' + str(proc.returncode)}")
    return dict(parse_fio(proc.stdout), cpu_s=children_cpu() - cpu0)


class NopLoop:
    """The C io_uring NOP loop (QD NOPs in flight), compiled once into workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._exe: str | None = None
        self._error: str | None = None

    def exe(self) -> str:
        if self._exe is None and self._error is None:
            gcc = shutil.which("gcc") or shutil.which("cc")
            if gcc is None:
                self._error = "no C compiler (apt-get install build-essential)"
            elif not NOP_SOURCE.exists():
                self._error = f"{NOP_SOURCE} is missing from this install"
            else:
                exe = os.path.join(self.workdir, "nop_qd")
                p = subprocess.run([gcc, "-O2", "-o", exe, str(NOP_SOURCE), "-luring"],
                                   capture_output=True, text=True, check=False)
                if p.returncode:
                    last = p.stderr.strip().splitlines()[-1:] or ["?"]
                    self._error = f"compiling nop_qd.c failed (is liburing-dev installed?): {last[0]}"
                else:
                    self._exe = exe
        if self._error:
            raise RefUnavailable(self._error)
        return self._exe

    def run(self, qd: int, runtime: float) -> dict:
        exe = self.exe()
        cpu0 = children_cpu()
        p = subprocess.run([exe, str(qd), f"{runtime:g}"], capture_output=True, text=True,
                           timeout=runtime * 5 + 30, check=False)
        cpu = children_cpu() - cpu0
        if p.returncode:
            raise RefUnavailable(f"nop_qd failed: {p.stderr.strip() or p.returncode}")
        r = json.loads(p.stdout)
        secs = r["seconds"] or 1e-9
        return dict(iops=r["ops"] / secs, mbps=None, lat_p50_us=r["p50_ns"] / 1000.0,
                    lat_p99_us=r["p99_ns"] / 1000.0, lat_p999_us=r["p999_ns"] / 1000.0,
                    cpu_s=cpu, ios=r["ops"], errors=0, seconds=secs)


def kublk_fio(target_args: list[str], rw: str, bs: int, qd: int, runtime: float, queues: int = 1) -> dict:
    """fio against a kublk device (`kublk add -t null ...`), deleted afterwards."""
    exe = kublk_path()
    if exe is None:
        raise RefUnavailable("kublk not installed (tools/vm/build-kublk, or set KUBLK=path)")
    used = {int(p.name[5:]) for p in Path("/sys/class/ublk-char").glob("ublkc*")}
    dev_id = next(i for i in range(1024) if i not in used)
    add = subprocess.run([exe, "add", "-n", str(dev_id), "-q", str(queues), "-d", str(max(qd, 128)),
                          *target_args], capture_output=True, text=True, timeout=30, check=False)
    if add.returncode:
        raise RefUnavailable(f"kublk add failed: {(add.stderr or add.stdout).strip()[-200:]}")
    try:
        path = f"/dev/ublkb{dev_id}"
        if not wait_for_path(path, True, timeout=10.0, interval=0.02):
            raise RefUnavailable(f"kublk: {path} did not appear")
        r = fio(path, rw, bs, qd, runtime)
    finally:
        subprocess.run([exe, "del", "-n", str(dev_id)], capture_output=True, timeout=30, check=False)
    return r  # kublk daemonizes, so only fio's own CPU is counted


def stride_blocks(blocks: int) -> int:
    """qemu-img bench's step, in blocks, standing in for random I/O: it has no random mode,
    only a fixed step from one request to the next, wrapping at the image end (modulo the
    image size, or in later qemu modulo the size less one request). A step coprime with
    both block counts visits every block once per pass under either rule, and one near the
    golden section of the image puts consecutive requests far apart."""
    k = max(1, round(blocks * 0.382))
    while math.gcd(k, blocks) != 1 or math.gcd(k, blocks - 1) != 1:
        k -= 1          # ends at 1 at the latest, which is coprime with everything
    return k


def qemu_img_bench_args(image: str, fmt: str, rw: str, bs: int, qd: int, count: int, size: int,
                        aio: str) -> list[str]:
    """qemu-img bench's command line: O_DIRECT (-t none), AIO engine aio, COUNT requests of
    bs at depth qd; rand* workloads stride through the image (see stride_blocks)."""
    args = ["qemu-img", "bench", "-f", fmt, "-t", "none", "-i", aio, "-d", str(qd), "-s", str(bs),
            "-c", str(count)]
    if rw.startswith("rand"):
        args += ["-S", str(stride_blocks(size // bs) * bs)]
    if rw.endswith("write"):
        args.append("-w")
    return [*args, image]


_ELAPSED = re.compile(r"Run completed in ([0-9.]+) seconds")
#: qemu-img bench takes a request count, not a time: runs start at this count and grow, each
#: sized from the rate seen so far, until one lasts at least half the runtime.
FIRST_COUNT = 1024
COUNT_MAX = (1 << 31) - 1


def _qemu_img_run(args: list[str], timeout: float) -> tuple[float, float]:
    """One qemu-img bench run: its elapsed seconds and its usr+sys, or RuntimeError with its
    last words."""
    cpu0 = children_cpu()
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    cpu = children_cpu() - cpu0
    m = _ELAPSED.search(p.stdout)
    if p.returncode or not m:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise RuntimeError(msg[-1] if msg else f"exit {p.returncode}")
    return max(float(m.group(1)), 1e-6), cpu


def qemu_img_bench(image: str, fmt: str, rw: str, bs: int, qd: int, runtime: float, size: int) -> dict:
    """qemu-img bench on an image of virtual size `size` that nothing else has open, for
    about `runtime` seconds: io_uring AIO, native AIO where io_uring fails. IOPS is requests
    / qemu-img's own elapsed time (the I/O loop alone, as fio's runtime); cpu_s its usr+sys
    (opening the image included). No latency figures: qemu-img bench reports none."""
    if shutil.which("qemu-img") is None:
        raise RefUnavailable("qemu-img not installed (apt-get install qemu-utils)")
    if size % bs:
        raise RefUnavailable(f"qemu-img bench wraps at the image end: the image size ({size}) must be "
                             f"a multiple of the block size ({bs})")
    failed: list[str] = []
    for aio in ("io_uring", "native"):
        count = FIRST_COUNT
        try:
            while True:
                secs, cpu = _qemu_img_run(qemu_img_bench_args(image, fmt, rw, bs, qd, count, size, aio),
                                          timeout=runtime * 5 + 60)
                if secs >= runtime / 2 or count == COUNT_MAX:
                    break
                count = min(COUNT_MAX, round(count * min(runtime / secs, 64)))
        except RuntimeError as e:
            failed.append(f"-i {aio} failed: {e}")
            continue
        if rw.startswith("rand"):
            blocks = size // bs
            how = f"strided, not random: a step of {stride_blocks(blocks)} of {blocks} blocks, wrapping at the end"
        else:
            how = "sequential, wrapping at the end"
        note = "; ".join([f"qemu-img bench -t none -i {aio}", how, *failed])
        iops = count / secs
        return dict(iops=iops, mbps=iops * bs / 1e6, lat_p50_us=None, lat_p99_us=None, lat_p999_us=None,
                    cpu_s=cpu, ios=count, errors=0, seconds=secs, note=note)
    raise RefUnavailable("qemu-img bench: " + "; ".join(failed))
