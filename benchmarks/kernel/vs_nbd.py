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

With --counts, the 4 KiB QD32 points are traced (perf) on both sides, per request: our
server's syscalls, io_uring_enter and sendmsg calls, SQEs (and of them sendmsg and recv;
and how many sendmsg waited for room in the socket's buffer), CQEs, context
switches and CPU time, and for every client qemu-nbd's syscalls, recvmsg and sendmsg
calls, context switches and CPU time, in a second table: load-robust measures of how
each client feeds the server (CPU times under TCG are inflated, and comparable only
within one run).

With --timeline, 4 KiB random read and write at QD1 run once more per client with tracefs
events on (block, io_uring, qemu-nbd's recvmsg/sendmsg, wake-ups, nbd.ko's own): the
median time from a request's issue to each step of its way (our queue thread woken, the
request's CQE, our sendmsg or nbd.ko's header sent, qemu-nbd's receive and reply, the
reply in, the commit, the block layer's completion, fio's). With --profile, the 4 KiB QD32
points run once more under `perf record -a`: CPU per request by process, and our
server's top symbols.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vs_kublk import (fio, hold_events, need_ublk, ours_add, requests_done, server_pid,  # noqa: E402
                      sh)   # the same fio runs, CLI server and perf counting as vs_kublk

from pyublk_fast._core.codec import decode_user_data  # noqa: E402
from pyublk_fast.bench.report import emit_paired, paired_cell  # noqa: E402
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

# --counts: (column, perf event, filter) per request; ours: our server's process, qemu: qemu-nbd's
IORING_OP_SENDMSG, IORING_OP_RECV = 9, 27
OURS_COUNTS = [("syscalls", "raw_syscalls:sys_enter", None),
               ("enter", "syscalls:sys_enter_io_uring_enter", None),
               # sends straight from the queue thread (the socket had room), then on the ring
               ("sendmsg_sys", "syscalls:sys_enter_sendmsg", None),
               ("sqes", "io_uring:io_uring_submit_req", None),
               ("sendmsg", "io_uring:io_uring_submit_req", f"opcode == {IORING_OP_SENDMSG}"),
               ("recv", "io_uring:io_uring_submit_req", f"opcode == {IORING_OP_RECV}"),
               # a sendmsg that found the socket's buffer full waits for room (poll)
               ("send_waits", "io_uring:io_uring_poll_arm", f"opcode == {IORING_OP_SENDMSG}"),
               ("cqes", "io_uring:io_uring_complete", None),
               ("csw", "context-switches", None),
               ("cpu_us", "task-clock", None)]
QEMU_COUNTS = [("syscalls", "raw_syscalls:sys_enter", None),
               ("recvmsg", "syscalls:sys_enter_recvmsg", None),
               ("sendmsg", "syscalls:sys_enter_sendmsg", None),
               ("csw", "context-switches", None),
               ("cpu_us", "task-clock", None)]


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


def per_request(path: str, run: callable, traced: dict[str, tuple[int, list]]) -> tuple[dict, dict]:
    """run()'s result, and each event of each traced process ({name: (pid, events)}) per
    request the device completed meanwhile, as {name_column: count}."""
    perfs = {}
    for name, (pid, events) in traced.items():
        out = f"/tmp/vs-nbd-perf-{name}-{pid}.txt"
        argv = ["perf", "stat", "-x,", "-o", out, "-p", str(pid)]
        for _, event, filt in events:
            argv += ["-e", event] + (["--filter", filt] if filt else [])
        perfs[name] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(0.5)                     # perf attaches to every thread first
    before = requests_done(path)
    res = run()
    n = max(requests_done(path) - before, 1)
    counts = {}
    for name, (perf, out) in perfs.items():
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=30)
        # one line per event, in the order given (value,unit,event,...; "<not counted>" too)
        lines = [ln.split(",") for ln in Path(out).read_text().splitlines()
                 if ln and not ln.startswith("#") and ln.count(",") >= 2]
        os.unlink(out)
        for (col, *_), f in zip(traced[name][1], lines):
            scale = 1000 if col.endswith("_us") else 1       # perf gives task-clock in ms
            counts[f"{name}_{col}"] = float(f[0]) * scale / n if f[0].replace(".", "").isdigit() else None
    return res, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every pair, alternating order")
    ap.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="the exported image")
    ap.add_argument("--ours-extra", action="append", default=[],
                    help="also run our server with these extra `add` options (repeatable)")
    ap.add_argument("--other", action="append", default=[], metavar="LABEL=PYTHON",
                    help="also run the server of another checkout: an interpreter that imports "
                    "it, shown as LABEL (before/after comparisons in one boot; repeatable)")
    ap.add_argument("--points", default="",
                    help="comma-separated subset of the points' keys (default: all)")
    ap.add_argument("--counts", action="store_true",
                    help="trace the 4k QD32 points on both sides (perf): per-request counts in "
                    "a second table (the IOPS are then those of the traced runs)")
    ap.add_argument("--timeline", action="store_true",
                    help="trace 4k random read and write at QD1 per client (tracefs): the median "
                    "time from a request's issue to each step of its way, in a third table (the "
                    "events stay on for the whole run: every point pays for them)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the CPUs (perf record -a) while 4k random read and write run at "
                    "QD32: CPU us per request by process, and our server's top symbols")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    points = [p for p in POINTS if not a.points or p[1] in a.points.split(",")]
    need_ublk("vs_nbd.py")
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
    for other in a.other:
        label, python = other.split("=", 1)
        clients.append((label, lambda p=python: ours_add(["-t", "nbd", "--uri", uri, "-q", "1",
                                                          "-d", "128"], python=p)))
    if a.timeline:
        trace_setup()
    holds = []
    if a.profile and not a.counts:
        holds = hold_events()
    if a.counts:     # every event on for the whole run (vs_kublk's hold_events says why)
        holds = [*hold_events(), subprocess.Popen(
            ["perf", "stat", "-a", "-o", "/dev/null", "-e", "io_uring:io_uring_poll_arm"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
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
                    for _, key, rw, bs, qd, field in points:
                        if a.counts and bs == "4k" and qd == 32:
                            traced = {"qemu": (server.pid, QEMU_COUNTS)}
                            if path.startswith("/dev/ublkb"):
                                traced["ours"] = (server_pid(path), OURS_COUNTS)
                            res, counts = per_request(path, lambda: fio(path, qd, a.runtime, rw, bs), traced)
                            row.update({f"{key}_{k}": v for k, v in counts.items()})
                        else:
                            res = fio(path, qd, a.runtime, rw, bs)
                        row[key] = res[field]
                        if qd == 1:
                            row["randread_4k_qd1_lat_p50_us"] = res["lat_p50_us"]
                    ours = tids(server_pid(path)) if path.startswith("/dev/ublkb") else set()
                    for rw in ("randread", "randwrite") if a.timeline and rnd == 0 else ():
                        res, trace = trace_run(lambda: fio(path, 1, min(a.runtime, 2), rw, "4k"))
                        row[f"timeline_{rw}"] = dict(timeline(trace, dev_numbers(path), ours),
                                                     lat_mean_us=res["lat_mean_us"])
                    for rw in ("randread", "randwrite") if a.profile and rnd == 0 else ():
                        keep = (os.path.join(a.out, f"perf-{name.replace(' ', '_')}-{rw}.txt")
                                if a.out else "")
                        res, prof = profiled(lambda: fio(path, 32, a.runtime, rw, "4k"), path,
                                             {"ours": ours}, keep)
                        row[f"profile_{rw}"] = dict(prof, iops=res["iops"])
                    rows.append(row)
                finally:
                    remove()
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
        for hold in holds:
            hold.terminate()
            hold.wait(30)
    lines = [f"kernel {kernel_release()}, qemu TCG, {os.cpu_count()} vCPUs, qemu-nbd on a {a.format} "
             f"image in tmpfs over a Unix socket, one connection each, {a.runtime:g} s per point, "
             f"{a.rounds} rounds (order alternating); medians, ratios ours / kernel nbd paired per "
             "round (min..max)", "",
             "| client | " + " | ".join(f"{c} | vs kernel" for c, *_ in points) + " |",
             "|---|" + "---|---|" * len(points)]
    ref = {r["round"]: r for r in rows if r["client"] == "kernel nbd" and "error" not in r}
    for name, _ in clients:
        mine = {r["round"]: r for r in rows if r["client"] == name}
        errs = [r["error"] for r in mine.values() if "error" in r]
        if errs:
            lines.append(f"| {name} | error: {errs[0]} |" + " |" * (2 * len(points) - 1))
            continue
        cells = [paired_cell(mine, ref, key) for _, key, *_ in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if a.counts:
        lines += count_table(rows, clients, points)
    if a.timeline:
        lines += timeline_table(rows, clients)
    if a.profile:
        lines += profile_table(rows, clients)
    emit_paired("\n".join(lines), rows, a.out, f"vs_nbd_{a.format}" if a.format != "raw" else "vs_nbd")
    return 0


def count_table(rows: list[dict], clients: list, points: list) -> list[str]:
    """The --counts table: per request, medians of the rounds."""
    cols = [f"ours_{c}" for c, *_ in OURS_COUNTS] + [f"qemu_{c}" for c, *_ in QEMU_COUNTS]
    out = ["", "Per request, medians of the rounds (perf while fio ran the point; ours_*: our "
           "server's process, qemu_*: qemu-nbd's; '-': not ours)", "",
           "| client | point | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, _ in clients:
        mine = [r for r in rows if r["client"] == name and "error" not in r]
        for _, key, rw, bs, qd, _ in points:
            if bs != "4k" or qd != 32 or not mine:
                continue
            vals = [[r.get(f"{key}_{c}") for r in mine] for c in cols]
            out.append(f"| {name} | {rw} | " + " | ".join(
                f"{statistics.median(v):.2f}" if None not in v else "-" for v in vals) + " |")
    return out


# --timeline: tracefs events, on from the start of the run to its end (each switch patches
# kernel text, which under TCG can oops a vCPU running it: vs_kublk's hold_events); a
# traced fio run only turns the ring buffer on and off
TRACEFS = "/sys/kernel/tracing"
TIMELINE_EVENTS = ["block/block_rq_issue", "block/block_rq_complete", "io_uring/io_uring_submit_req",
                   "io_uring/io_uring_complete", "syscalls/sys_exit_recvmsg",
                   "syscalls/sys_enter_sendmsg", "sched/sched_wakeup", "nbd/nbd_header_sent",
                   "nbd/nbd_header_received", "nbd/nbd_payload_received"]
# the steps of one QD1 request, each the first such event after the request's issue
STEPS = [("wake", "the server's queue thread woken (ours)"),
         ("req_cqe", "the request's CQE posted to our ring"),
         ("sent", "our sendmsg called or issued on the ring / nbd.ko's header sent"),
         ("qemu_recv", "qemu-nbd's recvmsg returned the request"),
         ("qemu_send", "qemu-nbd's sendmsg of the reply"),
         ("reply_in", "our receive's CQE / nbd.ko's reply header in"),
         ("commit", "our COMMIT_AND_FETCH issued / nbd.ko's payload in"),
         ("rq_done", "block:block_rq_complete"),
         ("fio_cqe", "fio's completion posted")]
TD_RECV = 2                 # the nbd target's tgt_data for its receive (_native_nbd.pyx)
# "comm-tid [cpu] flags ts: event: fields", where a syscall's entry prints as
# "sys_NAME(args)" and its exit as "sys_NAME -> 0xRET"
TRACE_RE = re.compile(r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+\[\d+\]\s+(?:\S+\s+)?(?P<ts>\d+\.\d+): "
                      r"(?:(?P<ev>\w+): (?P<rest>.*)|sys_(?P<sys>\w+)(?P<exit> -> )?(?P<args>.*))$")


def trace_setup() -> None:
    """Enable TIMELINE_EVENTS once, with tracing off until a traced run."""
    if not os.path.isdir(f"{TRACEFS}/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False)
    Path(f"{TRACEFS}/tracing_on").write_text("0")
    Path(f"{TRACEFS}/trace_clock").write_text("global")   # one clock over both vCPUs
    Path(f"{TRACEFS}/buffer_size_kb").write_text("16384")
    for ev in TIMELINE_EVENTS:
        enable = Path(f"{TRACEFS}/events/{ev}/enable")
        if enable.exists():           # nbd's only once the module is in
            enable.write_text("1")


def trace_run(run: callable) -> tuple[dict, list[str]]:
    """run()'s result and the trace lines it left."""
    Path(f"{TRACEFS}/trace").write_text("")
    Path(f"{TRACEFS}/tracing_on").write_text("1")
    try:
        res = run()
    finally:
        Path(f"{TRACEFS}/tracing_on").write_text("0")
    return res, Path(f"{TRACEFS}/trace").read_text().splitlines()


def timeline(lines: list[str], dev: str, ours: set[int]) -> dict:
    """Per QD1 request on block device dev (major,minor): the median time from its issue to
    each step of STEPS (us), how many requests had each, and per request the wake-ups of
    our server's threads (ours: their tids) and of qemu-nbd's (by name: its I/O threads
    come and go), and our ring's CQEs."""
    reqs, cur = [], None
    for ln in lines:
        m = TRACE_RE.match(ln)
        if not m:
            continue
        ev, rest, pid, t = m["ev"], m["rest"], int(m["pid"]), float(m["ts"]) * 1e6
        if m["sys"]:
            ev, rest = f"sys_{'exit' if m['exit'] else 'enter'}_{m['sys']}", m["args"]
        if ev == "block_rq_issue" and rest.split()[0] == dev:
            cur = {"issue": t, "wakes": 0, "qemu_wakes": 0, "cqes": 0}
            reqs.append(cur)
            continue
        if cur is None:
            continue
        step = None
        if ev == "block_rq_complete" and rest.split()[0] == dev:
            step = "rq_done"
        elif ev == "sched_wakeup":
            woken = int(re.search(r"pid=(\d+)", rest)[1])
            if woken in ours:
                cur["wakes"] += 1
                step = "wake"
            elif rest.startswith("comm=qemu-nbd "):
                cur["qemu_wakes"] += 1
        elif ev == "io_uring_complete" and pid in ours:
            cur["cqes"] += 1
            ud = int(re.search(r"user_data 0x([0-9a-f]+)", rest)[1], 16)
            _, _, tgt_data, target = decode_user_data(ud)
            res = int(re.search(r"result (-?\d+)", rest)[1])
            if not target:
                step = "req_cqe"
            elif tgt_data == TD_RECV and res > 0:
                step = "reply_in"
        elif ev == "io_uring_complete" and m["comm"] == "fio" and "rq_done" in cur:
            step = "fio_cqe"
        elif ev == "io_uring_submit_req" and pid in ours:
            op = re.search(r"opcode (\w+)", rest)[1]
            if op == "SENDMSG":
                step = "sent"
            elif op == "URING_CMD" and "reply_in" in cur:
                step = "commit"
        elif ev == "sys_exit_recvmsg" and m["comm"] == "qemu-nbd":
            if 0 < int(rest.split()[-1], 16) < 1 << 63:     # bytes, not -errno
                step = "qemu_recv"
        elif ev == "sys_enter_sendmsg" and m["comm"] == "qemu-nbd":
            step = "qemu_send"
        elif ev == "sys_enter_sendmsg" and pid in ours:     # a send made by the queue thread
            step = "sent"
        elif ev == "nbd_header_sent":
            step = "sent"
        elif ev == "nbd_header_received":
            step = "reply_in"
        elif ev == "nbd_payload_received":
            step = "commit"
        if step and step not in cur:
            cur[step] = t
    done = [r for r in reqs if "fio_cqe" in r]
    out = {"requests": len(done)}
    for step, _ in STEPS:
        vals = [r[step] - r["issue"] for r in done if step in r]
        out[step] = statistics.median(vals) if vals else None
        out[f"{step}_n"] = len(vals)
    for k in ("wakes", "qemu_wakes", "cqes"):
        out[k] = statistics.mean(r[k] for r in done) if done else None
    return out


def dev_numbers(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"


def tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def timeline_table(rows: list[dict], clients: list) -> list[str]:
    out = ["", "QD1 timeline (--timeline, tracefs, first round): median us from block:block_rq_issue "
           "to the first event of each step; 4k randread and randwrite QD1 in their own traced runs",
           ""]
    out += [f"- `{s}`: {what}" for s, what in STEPS]
    cols = [s for s, _ in STEPS]
    out += ["", "| client | rw | fio mean lat | requests | " + " | ".join(cols) + " | our wakes/req "
            "| qemu wakes/req | our CQEs/req |", "|---|---|---|---|" + "---|" * (len(cols) + 3)]
    for name, _ in clients:
        for rw in ("randread", "randwrite"):
            tl = [r[f"timeline_{rw}"] for r in rows if r["client"] == name and f"timeline_{rw}" in r]
            if not tl:
                continue
            def med(k):
                v = [t[k] for t in tl if t.get(k) is not None]
                return f"{statistics.median(v):.0f}" if v else "-"
            out.append(f"| {name} | {rw} | {med('lat_mean_us')} | {med('requests')} | "
                       + " | ".join(med(c) for c in cols)
                       + f" | {med('wakes')} | {med('qemu_wakes')} | {med('cqes')} |")
    return out


def profile_table(rows: list[dict], clients: list) -> list[str]:
    out = ["", f"CPU per request (--profile: perf record -a, cpu-clock every {PROFILE_NS // 1000} "
           "us), us, 4k QD32, first round; by thread group, then our server's top symbols", ""]
    for name, _ in clients:
        for rw in ("randread", "randwrite"):
            prof = next((r[f"profile_{rw}"] for r in rows if r["client"] == name
                         and f"profile_{rw}" in r), None)
            if prof is None:
                continue
            groups = sorted(prof["cpu_by_group"].items(), key=lambda kv: -kv[1])
            out.append(f"- **{name} {rw}** ({prof['iops']:.0f} IOPS): " + ", ".join(
                f"{g} {us:.1f}" for g, us in groups if us >= 1))
            if prof["ours_top"]:
                out.append("  - ours: " + ", ".join(f"{s} {us:.1f}" for s, us in prof["ours_top"].items()))
    return out


# --profile: where the CPU goes, system-wide, while fio runs a 4k QD32 point (cpu-clock
# samples every PROFILE_NS of CPU on each vCPU, idle included)
PROFILE_NS = 200000


def profiled(run: callable, path: str, who: dict[str, set[int]], keep: str = "") -> tuple[dict, dict]:
    """run()'s result and per request: CPU us by process group (who: name -> tids, the rest
    by thread name), and the top symbols of "ours"; keep: a file for perf's report."""
    data = f"/tmp/vs-nbd-{os.getpid()}.perf"
    perf = subprocess.Popen(["perf", "record", "-a", "-q", "-e", "cpu-clock", "-c", str(PROFILE_NS),
                             "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)                     # it first lists every process's maps (slow under TCG)
    before = requests_done(path)
    res = run()
    n = max(requests_done(path) - before, 1)
    perf.send_signal(signal.SIGINT)
    err = perf.communicate(timeout=120)[1]
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "-q", "-n", "--no-children",
                          "--sort", "pid,dso,sym", "-F", "sample,pid,dso,sym"],
                         capture_output=True, text=True, timeout=600)
    os.unlink(data)
    if keep:
        Path(keep).write_text(err + rep.stderr + rep.stdout)
    rep = rep.stdout
    by_group, ours_syms = {}, {}
    for ln in rep.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+):(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)$", ln)
        if not m:
            continue
        samples, pid, comm, sym = int(m[1]), int(m[2]), m[3], m[6].strip()
        us = samples * PROFILE_NS / 1000 / n
        group = next((g for g, pids in who.items() if pid in pids),
                     "idle" if not pid else comm.split("/")[0] if comm.startswith("kworker") else comm)
        by_group[group] = by_group.get(group, 0) + us
        if pid in who.get("ours", ()):
            ours_syms[sym] = ours_syms.get(sym, 0) + us
    top = dict(sorted(ours_syms.items(), key=lambda kv: -kv[1])[:25])
    return res, {"cpu_by_group": by_group, "ours_top": top}


if __name__ == "__main__":
    sys.exit(main())
