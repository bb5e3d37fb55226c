"""Output: the terminal table (rich), the Markdown table and the JSON document (figures + machine)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
from importlib import metadata

from rich import box
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

#: 2: a second reference per row (reference2, reference2_iops, ratio2, ratio2_min/max) and a
#: note on how a row was measured. 3: a row's mode ("" or a name of scenarios.MODES).
SCHEMA = 3
NAME_W = 44
COLUMNS = ("IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "CPU us/IO", "ratio", "ratio2")
WIDTHS = (11, 8, 8, 8, 9, 9, 6, 6)
#: Output that is not a terminal (a pipe, a CI log) is as wide as a row needs: one line each.
UNWRAPPED = 1 << 20


def console(file=None) -> Console:
    """Where the bench prints: on a terminal, rich at the terminal's width (wrapping long
    notes) under a progress bar; elsewhere plain lines, no colours, no bar."""
    c = Console(file=file, highlight=False, markup=False, emoji=False)
    if not c.is_terminal:
        c.width = UNWRAPPED
    return c


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cells(row: dict) -> list[str]:
    return [_num(row["iops"], ",.0f"), _num(row["mbps"], ".1f"), _num(row["lat_p50_us"], ".1f"),
            _num(row["lat_p99_us"], ".1f"), _num(row["lat_p999_us"], ".1f"), _num(row["cpu_us_per_io"], ".2f"),
            _num(row["ratio"], ".3f"), _num(row["ratio2"], ".3f")]


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    parts = []
    if row["kind"] == "reference":
        parts.append("reference")
    else:
        for ratio, ref in (("ratio", "reference"), ("ratio2", "reference2")):
            if row[ref]:
                parts.append(f"{ratio} vs {row[ref]}" + ("" if row[ratio] is not None else " (not measured)"))
    if row["note"]:
        parts.append(row["note"])
    if row.get("rounds") and row["rounds"] > 1:
        spread = "".join(f", {key} {row[key + '_min']:.3f}..{row[key + '_max']:.3f}"
                         for key in ("ratio", "ratio2") if row.get(key + "_min") is not None)
        parts.append(f"median of {row['rounds']} rounds{spread}")
    if row.get("rounds") is not None and row["reason"]:
        parts.append(row["reason"])
    if row["errors"]:
        parts.append(f"ERRORS: {row['errors']}")
    return "; ".join(parts)


def table(rows: list[dict], header: bool = True) -> Table:
    """The terminal table; skipped rows carry their reason instead of figures. Every column
    but the note has a fixed width, so tables of one row each line up under one header
    (the rows are printed as they finish)."""
    t = Table(Column("scenario", width=NAME_W, no_wrap=True, overflow="ellipsis"),
              *(Column(c, justify="right", width=w, no_wrap=True) for c, w in zip(COLUMNS, WIDTHS)),
              Column("reference / note", overflow="fold"),
              box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False, padding=0)
    for r in rows:
        cells = _cells(r) if r["status"] == "ok" else [""] * len(COLUMNS)
        t.add_row(Text(r["name"]), *cells, Text(_note(r)))
    return t


def markdown(rows: list[dict]) -> str:
    """A GitHub Markdown table of every row (references included, skipped rows with reason)."""
    out = ["| scenario | " + " | ".join(COLUMNS) + " | reference / note |",
           "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | --- |"]
    for r in rows:
        note = _note(r).replace("|", "\\|")
        cells = _cells(r) if r["status"] == "ok" else ["-"] * len(COLUMNS)
        name = f"*{r['name']}*" if r["kind"] == "reference" else f"`{r['name']}`"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(out) + "\n"


def markdown_document(doc: dict) -> str:
    """results.md: what ran where, then the table."""
    m, v, st = doc["machine"], doc["versions"], doc["settings"]
    cmd = " ".join(["python -m pyublk_fast.bench", *st["argv"]])
    lines = ["# pyublk_fast bench results", "",
             f"`{cmd}` on {m['node']}: Linux {m['kernel']} "
             f"({m['arch']}, {m['cpus']} cpus, {m['cpu_model']}), {st['runtime']:g} s per scenario, "
             + (f"{st['repeat']} rounds (medians), " if st.get("repeat", 1) > 1 else "") +
             f"{st['size_mib']} MiB backing files; {doc['started']}, {doc['duration_s']:.0f} s"
             + (" (interrupted)" if doc["interrupted"] else "") + ".",
             "",
             f"python {v['python']}, numpy {v['numpy']}, cython {v['cython']}, liburing {v['liburing']}, "
             f"{v['fio']}, pyublk_fast {v['pyublk_fast']} ({(v['git_commit'] or '?')[:12]}).",
             "",
             "Latency in microseconds; CPU us/IO is the whole process's CPU time (plus the tool's usr+sys "
             "for fio and qemu-img rows) per I/O; ratio and ratio2 are IOPS / the IOPS of the reference each "
             "row's note names, measured in the same run (ref/nop: the C io_uring NOP loop at that depth; "
             "ref/fio-file: fio, io_uring, O_DIRECT on a raw backing file holding the same data; "
             "ref/qemu-img: qemu-img bench, O_DIRECT, on the same qcow2 image, strided rather than random "
             "for rand* workloads).", "", markdown(doc["rows"])]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    server = [r for r in rows if r["kind"] == "server"]
    ok = sum(r["status"] == "ok" for r in server)
    refs = sum(r["kind"] == "reference" for r in rows)
    return (f"{ok} of {len(server)} scenarios measured, {len(server) - ok} skipped/failed, "
            f"{refs} references")


def paired_ratio(ratios: list[float]) -> str:
    """'1.05x (0.91..2.25)': the median of per-round ratios and their range ('' for none)."""
    if not ratios:
        return ""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"


def paired_cell(mine: dict, ref: dict, key: str) -> str:
    """'MEDIAN | RATIO' for one point of a paired-rounds table: the median over mine's rounds
    (round -> row) and paired_ratio against ref's row of the same round; a latency (a key
    ending in _us) with one decimal."""
    med = statistics.median(r[key] for r in mine.values())
    ratios = [mine[k][key] / ref[k][key] for k in mine if k in ref and ref[k][key]]
    return f"{med:.1f} | {paired_ratio(ratios)}" if key.endswith("_us") else f"{med:.0f} | {paired_ratio(ratios)}"


def emit_paired(text: str, rows: list[dict], out_dir: str, stem: str) -> None:
    """Print a paired-rounds table; with out_dir, keep it as STEM.md and the rounds as STEM.json."""
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(rows, f, indent=1)


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Host, kernel, CPU and memory."""
    u = platform.uname()
    cpu = mem = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return dict(node=u.node, system=u.system, kernel=u.release, kernel_version=u.version, arch=u.machine,
                cpus=os.cpu_count(), cpu_model=cpu, mem_bytes=mem,
                ublk_control=os.path.exists("/dev/ublk-control"))


def versions() -> dict:
    """Versions of everything the figures depend on (None when not installed)."""
    import numpy

    from .. import __version__
    try:
        import Cython
        cython = Cython.__version__
    except ImportError:
        cython = _version("cython")
    here = os.path.dirname(os.path.abspath(__file__))
    return dict(pyublk_fast=__version__, git_commit=_run(["git", "-C", here, "rev-parse", "HEAD"]),
                python=platform.python_version(), numpy=numpy.__version__, cython=cython,
                liburing=_run(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"]),
                liburing_runtime=_run(["dpkg-query", "-W", "-f=${Version}", "liburing2"]),
                fio=_run(["fio", "--version"]), gcc=_run(["gcc", "--version"]),
                matplotlib=_version("matplotlib"))


def document(rows: list[dict], *, settings: dict, started: float, finished: float, interrupted: bool,
             raw_rows: list[dict] | None = None) -> dict:
    """The JSON document: every row's figures plus machine, versions and run settings
    (and, for several rounds, each round's own rows under raw_rows)."""
    doc = dict(schema=SCHEMA, tool="python -m pyublk_fast.bench",
               started=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
               duration_s=round(finished - started, 3), interrupted=interrupted, settings=settings,
               machine=machine(), versions=versions(), rows=rows)
    if raw_rows is not None:
        doc["raw_rows"] = raw_rows
    return doc


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
