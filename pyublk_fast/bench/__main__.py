"""Benchmark ublk servers: python -m pyublk_fast.bench [--quick] [--list] [selectors] [--json F] [--plot DIR].

Runs servers (null, loop, qcow2, nbd, rbd, pure-Python) on the simulated driver (and the kernel's,
with --transport kernel|all) next to references measured in the same run: fio with io_uring and
O_DIRECT on a raw file of the same data, the C io_uring NOP loop (the ring's ceiling), on real
kernels kublk, for qcow2 also qemu-img bench (O_DIRECT) on the same image, and for nbd and rbd
fio's own nbd and rbd engines on the same export or image (the bench starts an NBD server, and
a throwaway Ceph cluster for rbd rows). Every server row carries its ratio to its reference
(qcow2: ratio to fio, ratio2 to qemu-img; a row with a mode: ratio2 to the row without it).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from . import report, scenarios as sc_mod
from .runner import Progress, Runner, TransportUnavailable, Workdir, combine_rounds, open_transport
from .services import Services

QUICK_RUNTIME = 1.0
DEFAULT_RUNTIME = 3.0


def _csv(conv):
    def parse(text: str):
        try:
            return [conv(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{text}: must be >= 1")
    return n


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pyublk_fast.bench", description=__doc__.split("\n", 2)[2].strip(),
        epilog="Selection: without selectors the default set runs (--quick: a smaller one). --scenario "
               "patterns (fnmatch on names like sim/loop/randread-4k-qd32/zero_copy/q1) and --all pick from "
               "the full matrix; --bs/--qd set those axes (and so also pick from it); --backend/--rw/--path/"
               "--queues/--mode narrow any selection. Pairs a backend cannot serve are skipped with the reason. "
               "rbd rows start a Ceph cluster and are in no set: --scenario 'sim/rbd/*/copy/q1'. docs/bench.md "
               "has the details.")
    ap.add_argument("--quick", action="store_true", help=f"smaller set, {QUICK_RUNTIME:g} s each (~30 s)")
    ap.add_argument("--runtime", type=float, metavar="S",
                    help=f"seconds per scenario and reference (default {DEFAULT_RUNTIME:g}, --quick {QUICK_RUNTIME:g})")
    ap.add_argument("--size", type=int, default=256, metavar="MIB", help="backing file size in MiB (default 256)")
    ap.add_argument("--transport", choices=("sim", "kernel", "all"), default="sim",
                    help="simulated driver (default), the kernel's (/dev/ublk-control), or both")
    ap.add_argument("--list", action="store_true", help="list the selected scenarios (marks: * default, q quick) "
                    "with the reason for any that would be skipped, and exit")
    ap.add_argument("--all", action="store_true", help="start from the full matrix instead of the default set")
    ap.add_argument("--scenario", action="append", metavar="PATTERN", help="fnmatch pattern on the name (repeatable)")
    ap.add_argument("--backend", type=_csv(str), action="extend",
                    help=f"backends (patterns, comma separated): {', '.join(sc_mod.backend_axis())}")
    ap.add_argument("--rw", type=_csv(str), action="extend", help=f"workloads: {', '.join(sc_mod.RWS)}")
    ap.add_argument("--bs", type=_csv(sc_mod.parse_bs), action="extend", help="block sizes, e.g. 4k,64k,128k")
    ap.add_argument("--qd", type=_csv(_positive_int), action="extend", help="queue depths, e.g. 1,32")
    ap.add_argument("--path", type=_csv(str), action="extend", help=f"data paths: {', '.join(sc_mod.PATHS)}")
    ap.add_argument("--queues", type=_csv(_positive_int), action="extend", help="queue counts: 1,2")
    ap.add_argument("--mode", type=_csv(str), action="extend",
                    help=f"modes: {', '.join(sc_mod.mode_label(m) for m in sc_mod.MODES)} (batch: BATCH_IO; "
                    "shm: the load's buffer shared with the server, SHMEM_ZC)")
    ap.add_argument("--rbd-conf", metavar="PATH", help="rbd rows: use the Ceph cluster of this ceph.conf (an "
                    "image is created and removed in --rbd-pool) instead of starting a throwaway one")
    ap.add_argument("--rbd-pool", default="rbd", metavar="POOL", help="the pool for rbd rows (default rbd)")
    ap.add_argument("--repeat", type=_positive_int, default=1, metavar="N",
                    help="run everything N times, each round with fresh references, and report medians "
                    "(ratio: the median of per-round ratios, with its range); for noisy machines")
    ap.add_argument("--json", metavar="FILE", help="write every figure, machine and versions to FILE")
    ap.add_argument("--markdown", metavar="FILE", help="write the results as a Markdown table to FILE")
    ap.add_argument("--plot", metavar="DIR", help="write PNG charts to DIR (needs matplotlib)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if args.runtime is None:
        args.runtime = QUICK_RUNTIME if args.quick else DEFAULT_RUNTIME
    if not 0.05 <= args.runtime <= 3600:
        ap.error(f"--runtime {args.runtime:g}: choose 0.05 .. 3600 seconds")
    if args.size < 1:
        ap.error(f"--size {args.size}: must be >= 1 MiB")
    if any(q > 4096 for q in args.qd or ()):
        ap.error("--qd: at most 4096 (UBLK_MAX_QUEUE_DEPTH)")
    if args.rbd_conf and not os.path.isfile(args.rbd_conf):
        ap.error(f"--rbd-conf {args.rbd_conf}: no such file (the cluster's ceph.conf)")
    args.transports = ("sim", "kernel") if args.transport == "all" else (args.transport,)
    try:
        args.selected = sc_mod.select(
            transports=args.transports, patterns=args.scenario, backends=args.backend, rws=args.rw,
            bs=args.bs, qd=args.qd, paths=args.path, queues=args.queues, modes=args.mode, everything=args.all,
            quick=args.quick)
    except ValueError as e:
        ap.error(str(e))
    return args


def skip_reasons(selected: list) -> dict[str, str]:
    """name -> why it would be skipped (transport missing, or Device refusing the pair). A
    backend the bench starts a server for is only checked for the server's programs."""
    reasons: dict[str, str] = {}
    transports = {}
    for t in {s.transport for s in selected}:
        try:
            transports[t] = open_transport(t)
        except TransportUnavailable as e:
            transports[t] = e
    try:
        with Workdir(1 << 20) as wd:      # tiny backing files, enough to build every backend
            services = Services(wd.path, wd.size, wd.file)
            for s in selected:
                tr = transports[s.transport]
                if isinstance(tr, Exception):
                    reasons[s.name] = str(tr)
                    continue
                if services.kind(s.backend):
                    if why := services.missing(s.backend) or s.refusal():
                        reasons[s.name] = why
                    continue
                try:
                    backend = sc_mod.make_backend(s.backend, wd.file)
                except ValueError as e:
                    reasons[s.name] = str(e)
                    continue
                try:
                    why = sc_mod.unsupported(s, backend, tr)
                finally:
                    backend.close()
                if why:
                    reasons[s.name] = why
    finally:
        for tr in transports.values():
            if hasattr(tr, "close"):
                tr.close()
    return reasons


def _check_matplotlib() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install matplotlib (or run without --plot)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = args.selected
    if args.list:
        print("\n".join(sc_mod.describe(selected, skip_reasons(selected))))
        return 0
    if not selected:
        print("no scenario matches the selection (see --list --all)", file=sys.stderr)
        return 2
    if args.plot and (msg := _check_matplotlib()):
        print(msg, file=sys.stderr)
        return 2
    u = platform.uname()
    out = report.console()
    out.print(f"pyublk_fast bench: {len(selected)} scenarios on {'+'.join(args.transports)}, {args.runtime:g} s "
              f"each, {args.size} MiB backing files ({u.node}, Linux {u.release}, {os.cpu_count()} cpus)")
    out.print("CPU us/IO: whole-process CPU (+ the tool's usr+sys for fio and qemu-img rows) per I/O; "
              "ratio, ratio2: IOPS / the IOPS of the reference the note names\n")
    out.print(report.table([]))
    started = time.time()
    with Workdir(args.size << 20) as wd, Progress(len(selected) * args.repeat, out) as progress:
        def on_row(row: dict) -> None:
            progress.row_done(row)
            out.print(report.table([row], header=False))

        services = Services(wd.path, wd.size, wd.file, args.rbd_conf, args.rbd_pool)
        runner = Runner(wd, args.runtime, on_row, progress, services=services)
        try:
            for number in range(args.repeat):
                if args.repeat > 1:
                    out.print(f"-- round {number + 1} of {args.repeat}")
                runner.start_round(number)
                finished = runner.run(selected)
                if not finished:
                    break
        finally:
            services.close()
    raw = runner.rows
    rows = combine_rounds(raw) if args.repeat > 1 else raw
    if args.repeat > 1:
        out.print(f"\nmedians over {args.repeat} rounds:")
        out.print(report.table([]))
        for row in rows:
            out.print(report.table([row], header=False))
    out.print(f"\n{report.summary(rows)} in {time.time() - started:.0f} s")
    if not finished:
        print(f"interrupted (Ctrl-C): the {sum(r['kind'] == 'server' for r in rows)} finished scenarios are above",
              file=sys.stderr)
    settings = dict(argv=list(sys.argv[1:] if argv is None else argv), runtime=args.runtime,
                    repeat=args.repeat, size_mib=args.size, transports=list(args.transports), quick=args.quick,
                    selected=[s.name for s in selected])
    doc = report.document(rows, settings=settings, started=started, finished=time.time(),
                          interrupted=not finished, raw_rows=raw if args.repeat > 1 else None)
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown_document(doc))
        print(f"wrote {args.markdown}")
    if args.plot:
        from .plots import write_all
        for path in write_all(doc, args.plot):
            print(f"wrote {path}")
    if not finished:
        return 130
    return 1 if any(r["status"] == "failed" for r in raw if r["kind"] == "server") else 0


if __name__ == "__main__":
    sys.exit(main())
