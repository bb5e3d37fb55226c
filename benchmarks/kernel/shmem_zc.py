"""Shared-memory zero copy (UBLK_F_SHMEM_ZC) against the copy path, in one VM run.

    tools/vm/run -t 900 -o /tmp/out -- python3 benchmarks/kernel/shmem_zc.py --out /tmp/out

One device per backend (native null; native loop on a brd RAM disk, O_DIRECT) made with
shared_buffers=True and served in this process, whose buffer is a hugetlbfs file fio maps
too (``--mem=mmaphuge:FILE`` maps it MAP_SHARED; fio's ``mmap:FILE`` is a private
mapping, whose pages are not the file's once written): the same fio job runs with its
buffers in that file (the device registered it: requests arrive UBLK_IO_F_SHMEM_ZC and
the driver copies nothing) and with private buffers (``--mem=malloc``: the driver copies
each request to or from the server's tag buffer), alternately, for --rounds rounds. Prints a Markdown
table of IOPS and MiB/s per block size and pattern with the ratio shared / copy, and
checks from the device's counter that the shared runs were served in place.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pyublk_fast.backends.loop import LoopBackend  # noqa: E402
from pyublk_fast.backends.null import NullBackend  # noqa: E402
from pyublk_fast.device import Device  # noqa: E402
from pyublk_fast.transport.kernel import KernelTransport  # noqa: E402
from pyublk_fast.util import kernel_release  # noqa: E402

RAM = "/dev/ram0"
HTLB_DIR = "/run/pyublk-htlb"
SHM_FILE = f"{HTLB_DIR}/buf"
HUGE = 2 << 20
SIZE = 256 << 20


def fio(path: str, bs: int, qd: int, rw: str, runtime: float, mem: str) -> dict:
    cmd = ["fio", "--output-format=json", "--name=b", f"--filename={path}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1",
           "--time_based", f"--runtime={runtime}", "--ramp_time=0.5", f"--size={SIZE}",
           f"--mem={mem}", "--iomem_align=4096"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stdout}{res.stderr}")
    job = json.loads(res.stdout)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    if job["error"]:
        raise RuntimeError(f"fio error {job['error']}")
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--targets", default="null,loop")
    a = ap.parse_args()
    bss, rws = (4096, 128 << 10), ("randread", "randwrite")
    # fio's buffer: bs * iodepth, from the start of the file; the device shares all of it
    shm_len = -(-(max(bss) * a.qd + (1 << 20)) // HUGE) * HUGE
    with open("/proc/sys/vm/nr_hugepages", "w") as fh:
        fh.write(str(2 * shm_len // HUGE))
    os.makedirs(HTLB_DIR, exist_ok=True)
    if not os.path.ismount(HTLB_DIR):
        subprocess.run(["mount", "-t", "hugetlbfs", "none", HTLB_DIR], check=True)
    fd = os.open(SHM_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, shm_len)
    os.close(fd)
    if "loop" in a.targets:
        subprocess.run(["modprobe", "brd", "rd_nr=1", f"rd_size={SIZE >> 10}"], check=False)
    rows, raw = [], []
    with KernelTransport() as t:
        for target in a.targets.split(","):
            backend = NullBackend(SIZE) if target == "null" else LoopBackend(RAM, direct=True)
            dev = Device(backend, t, depth=a.qd * 2, max_io_bytes=1 << 20, shared_buffers=True)
            with dev:
                fd = os.open(SHM_FILE, os.O_RDWR)
                index = dev.register_shared_buffer(fd)
                os.close(fd)
                path = t.block_path(dev.dev_id)
                for bs in bss:
                    for rw in rws:
                        got: dict[str, list] = {"copy": [], "shared": []}
                        for _ in range(a.rounds):
                            for mode, mem in (("copy", "malloc"), ("shared", f"mmaphuge:{SHM_FILE}")):
                                before = dev.shared_requests
                                r = fio(path, bs, a.qd, rw, a.runtime, mem)
                                r["in_place"] = dev.shared_requests - before
                                got[mode].append(r)
                                raw.append(dict(target=target, bs=bs, rw=rw, mode=mode, **r))
                        assert all(r["in_place"] == 0 for r in got["copy"]), got
                        assert all(r["in_place"] > 0 for r in got["shared"]), got
                        c = statistics.median(r["iops"] for r in got["copy"])
                        s = statistics.median(r["iops"] for r in got["shared"])
                        rows.append((target, bs, rw, c, s, c * bs / (1 << 20), s * bs / (1 << 20)))
                dev.unregister_shared_buffer(index)
    os.unlink(SHM_FILE)
    lines = [f"Kernel {kernel_release()}, QD{a.qd}, fio io_uring O_DIRECT, median of "
             f"{a.rounds} alternating rounds of {a.runtime:g} s", "",
             "| target | bs | pattern | copy IOPS | shared IOPS | copy MiB/s | shared MiB/s | shared vs copy |",
             "|---|---|---|---|---|---|---|---|"]
    for target, bs, rw, c, s, cm, sm in rows:
        lines.append(f"| {target} | {bs // 1024}k | {rw} | {c:,.0f} | {s:,.0f} | {cm:,.0f} | "
                     f"{sm:,.0f} | {s / c:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out, "shmem_zc.md").write_text(text + "\n")
        Path(a.out, "shmem_zc.json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
