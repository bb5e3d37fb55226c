"""Our nbd backend against the kernel's own NBD client on the same qemu-nbd export, in one VM run.

    tools/vm/run -t 1500 -o /tmp/out -- python3 benchmarks/kernel/vs_nbd.py --out /tmp/out

One qemu-nbd serves one image (raw by default, or qcow2 fully allocated) in tmpfs on a
Unix socket; each round connects each client in turn to it, runs the same fio points
and disconnects: the kernel's client is `nbd-client -unix` with nbd.ko (/dev/nbd0), ours
is `python -m pyublk_fast add -t nbd` (/dev/ublkbN); both use one connection. Points:
4 KiB random read and write at QD32 (IOPS), 128 KiB sequential read and write at QD32
(MiB/s), 4 KiB random read at QD1 (mean and median latency). The order of the clients
alternates over rounds; the table shows medians and the per-round ratios ours / kernel
(for latency, lower is better). Prints a Markdown table and writes JSON next to it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vs_kublk import fio, ours_add, sh  # noqa: E402 - the same fio runs and CLI server as vs_kublk

from pyublk_fast.bench.report import emit_paired, paired_ratio  # noqa: E402
from pyublk_fast.util import kernel_release, wait_until  # noqa: E402
NBD_DEV = "/dev/nbd0"
EXPORT = "disk"

# (column, key, fio pattern, block size, queue depth, fio result field)
POINTS = [("4k randread QD32 IOPS", "randread_4k_qd32_iops", "randread", "4k", 32, "iops"),
          ("4k randwrite QD32 IOPS", "randwrite_4k_qd32_iops", "randwrite", "4k", 32, "iops"),
          ("128k read QD32 MiB/s", "read_128k_qd32_mib_s", "read", "128k", 32, "mib_s"),
          ("128k write QD32 MiB/s", "write_128k_qd32_mib_s", "write", "128k", 32, "mib_s"),
          ("4k randread QD1 mean lat (us)", "randread_4k_qd1_lat_mean_us", "randread", "4k", 1,
           "lat_mean_us")]


def serve_image(fmt: str, size: int, workdir: str) -> tuple[str, subprocess.Popen]:
    """qemu-nbd on an allocated image of `size` bytes: its Unix socket, and the process."""
    image = os.path.join(workdir, f"disk.{fmt}")
    if fmt == "raw":
        with open(image, "wb") as f:          # allocated, so neither client reads holes
            for _ in range(size >> 20):
                f.write(b"\x5a" * (1 << 20))
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", image, str(size))
    sock = os.path.join(workdir, "qemu-nbd.sock")
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "-t", "-e", "2", "-x", EXPORT, "-k", sock, image],
                            stderr=subprocess.PIPE)
    if not wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 30, 0.05) \
            or proc.poll() is not None:
        raise RuntimeError(f"qemu-nbd did not start: {proc.stderr.read().decode()}")
    return sock, proc


def kernel_add(sock: str) -> tuple[str, callable]:
    """nbd.ko's /dev/nbd0 connected to the export by nbd-client (netlink: it returns once
    the device is set up)."""
    sh("nbd-client", "-unix", sock, NBD_DEV, "-N", EXPORT, "-C", "1", timeout=60)
    size = "/sys/block/nbd0/size"
    if not wait_until(lambda: int(open(size).read()) > 0, 10):
        raise RuntimeError(f"{NBD_DEV} has no size after nbd-client connected it")

    def remove():
        sh("nbd-client", "-d", NBD_DEV, timeout=60)
        wait_until(lambda: int(open(size).read()) == 0, 10)
    return NBD_DEV, remove


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every pair, alternating order")
    ap.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="the exported image")
    ap.add_argument("--ours-extra", action="append", default=[],
                    help="also run our server with these extra `add` options (repeatable)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not os.path.exists("/dev/ublk-control"):
        sys.exit("no ublk driver here (/dev/ublk-control): run this in the VM, as the "
                 "docstring shows (tools/vm/run ... -- python3 benchmarks/kernel/vs_nbd.py)")
    for tool, pkg in (("qemu-nbd", "qemu-utils"), ("nbd-client", "nbd-client")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} missing: apt-get install {pkg} on the host (the VM uses its root)")
    subprocess.run(["modprobe", "nbd", "nbds_max=1"], check=False)
    if not os.path.exists(NBD_DEV):
        sys.exit(f"no {NBD_DEV}: the kernel {kernel_release()} has no nbd module (modprobe nbd)")
    os.chdir(REPO)
    size = 256 << 20                          # fio works on the first 128 MiB (--size)
    workdir = tempfile.mkdtemp(prefix="vs-nbd-")
    sock, server = serve_image(a.format, size, workdir)
    uri = f"nbd+unix:///{EXPORT}?socket={sock}"
    clients = [("kernel nbd", lambda: kernel_add(sock)),
               ("pyublk_fast", lambda: ours_add(["-t", "nbd", "--uri", uri, "-q", "1", "-d", "128"]))]
    for extra in a.ours_extra:
        clients.append((f"pyublk_fast {extra}",
                        lambda e=extra: ours_add(["-t", "nbd", "--uri", uri, "-q", "1", "-d", "128",
                                                  *e.split()])))
    rows = []
    try:
        for rnd in range(a.rounds):
            # alternate who goes first, so drift in a noisy VM hits both clients alike
            for name, add in (clients if rnd % 2 == 0 else clients[::-1]):
                row = dict(client=name, round=rnd)
                try:
                    path, remove = add()
                except Exception as exc:   # noqa: BLE001 - reported in the table
                    rows.append(dict(row, error=str(exc)[:200]))
                    continue
                try:
                    for _, key, rw, bs, qd, field in POINTS:
                        res = fio(path, qd, a.runtime, rw, bs)
                        row[key] = res[field]
                        if qd == 1:
                            row["randread_4k_qd1_lat_p50_us"] = res["lat_p50_us"]
                    rows.append(row)
                finally:
                    remove()
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [f"kernel {kernel_release()}, qemu TCG, {os.cpu_count()} vCPUs, qemu-nbd on a {a.format} "
             f"image in tmpfs over a Unix socket, one connection each, {a.runtime:g} s per point, "
             f"{a.rounds} rounds (order alternating); medians, ratios ours / kernel nbd paired per "
             "round (min..max)", "",
             "| client | " + " | ".join(f"{c} | vs kernel" for c, *_ in POINTS) + " |",
             "|---|" + "---|---|" * len(POINTS)]
    ref = {r["round"]: r for r in rows if r["client"] == "kernel nbd" and "error" not in r}
    for name, _ in clients:
        mine = {r["round"]: r for r in rows if r["client"] == name}
        errs = [r["error"] for r in mine.values() if "error" in r]
        if errs:
            lines.append(f"| {name} | error: {errs[0]} |" + " |" * (2 * len(POINTS) - 1))
            continue
        cells = []
        for _, key, *_ in POINTS:
            med = statistics.median(r[key] for r in mine.values())
            ratios = [mine[k][key] / ref[k][key] for k in mine if k in ref and ref[k][key]]
            cells.append(f"{med:.1f} | {paired_ratio(ratios)}" if key.endswith("_us")
                         else f"{med:.0f} | {paired_ratio(ratios)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    emit_paired("\n".join(lines), rows, a.out, f"vs_nbd_{a.format}" if a.format != "raw" else "vs_nbd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
