"""python -m pyublk_fast.bench: arguments, scenario selection, output formats, a short real run."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import platform
import signal
import subprocess
import sys

import numpy
import pytest

from rich.console import Console

from pyublk_fast import backend as backend_mod
from pyublk_fast.backend import backend_names, register
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.bench import refs, report
from pyublk_fast.bench.__main__ import DEFAULT_RUNTIME, QUICK_RUNTIME, main, parse_args
from pyublk_fast.bench.runner import ROW_KEYS, Progress, Workdir, combine_rounds, make_row
from pyublk_fast.bench.scenarios import (MODES, NBD_PATTERN, PATHS, RBD_PATTERN, backend_axis, matrix, parse_bs,
                                         select)
from pyublk_fast.bench.services import NbdExport

from ceph_cluster import ceph  # noqa: F401  (the session's cluster, shared with tests/test_rbd.py)

NULL_QD32 = "sim/null/randread-4k-qd32/copy/q1"
LOOP_QD32 = "sim/loop/randread-4k-qd32/copy/q1"
PY_ZC = "sim/memory/randread-4k-qd32/zero_copy/q1"   # a pair Device refuses
QCOW2_RR = "sim/qcow2/randread-4k-qd32/copy/q1"
QCOW2_RW = "sim/qcow2/randwrite-4k-qd32/copy/q1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- arguments -------------------------------------------------------------------------------

def test_defaults_and_quick_runtime():
    a = parse_args([])
    assert a.runtime == DEFAULT_RUNTIME and a.transports == ("sim",)
    assert parse_args(["--quick"]).runtime == QUICK_RUNTIME
    assert parse_args(["--quick", "--runtime", "0.3"]).runtime == 0.3
    assert parse_args(["--transport", "all"]).transports == ("sim", "kernel")


@pytest.mark.parametrize("argv, words", [
    (["--bs", "3000"], "multiple of 512"),
    (["--bs", "4x"], "argument --bs: bad size '4x'"),
    (["--qd", "0"], "must be >= 1"),
    (["--backend", "nosuch"], "choose from loop, loop-py, memory, nbd, null, null-py, null-aio, qcow2, rbd, rbd-py"),
    (["--path", "dma"], "choose from copy"),
    (["--queues", "3"], "choose from 1, 2"),
    (["--runtime", "0"], "--runtime"),
    (["--transport", "usb"], "invalid choice"),
    (["--mode", "turbo"], "--mode 'turbo' matches nothing: choose from none, batch, shm, t2"),
    (["--rbd-conf", "/nonexistent/ceph.conf"], "--rbd-conf /nonexistent/ceph.conf: no such file"),
])
def test_bad_arguments_name_the_problem(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_parse_bs():
    assert [parse_bs(s) for s in ("4k", "128K", "512k", "4096", "64KiB")] == [4096, 131072, 1 << 19, 4096, 65536]
    with pytest.raises(ValueError, match="between 512 and 512k"):
        parse_bs("1m")


def test_backend_axis_is_the_registry():
    """Every registered backend; a native one also as NAME-py."""
    assert backend_names() == ["loop", "memory", "nbd", "null", "null-aio", "qcow2", "rbd"]
    assert backend_axis() == ["loop", "loop-py", "memory", "nbd", "null", "null-py", "null-aio", "qcow2",
                              "rbd", "rbd-py"]


# -- selection -------------------------------------------------------------------------------

def test_default_set_covers_the_brief_and_quick_is_a_subset():
    full = matrix()
    names = [s.name for s in full]
    assert len(names) == len(set(names)) == len(backend_axis()) * 8 * len(PATHS) * 2 * len(MODES)
    default = select()
    quick = select(quick=True)
    assert set(quick) < set(default) and 10 <= len(quick) < len(default) <= 70
    # rbd rows start a Ceph cluster: never by default
    assert {s.backend for s in quick} == {s.backend for s in default} == set(backend_axis()) - {"rbd", "rbd-py"}
    got = {(s.backend, s.rw, s.bs, s.qd, s.path, s.queues) for s in default if not s.mode}
    for qd in (1, 32, 128):
        assert ("null", "randread", 4096, qd, "copy", 1) in got
        assert ("loop", "randwrite", 4096, qd, "copy", 1) in got
    for path in PATHS:
        for be in ("null", "loop"):
            assert (be, "read", 131072, 32, path, 1) in got and (be, "write", 131072, 32, path, 1) in got
    assert ("null", "randread", 4096, 128, "copy", 2) in got
    assert {k[1:4] for k in got if k[0] == "nbd"} == {("randread", 4096, 32), ("randwrite", 4096, 32)}
    # each mode's row sits right after the same row without it, so the two are measured together
    modes = [s for s in default if s.mode]
    assert {(s.backend, s.mode) for s in modes} == {("null", "batch"), ("null", "shm"), ("loop", "shm"),
                                                    ("null", "t2"), ("loop", "t2")}
    assert {s.mode for s in quick} == {"", "batch"}
    for s in modes:
        assert default[default.index(s) - 1].name in (s.base_name, s.base_name + "/batch")
    # the default set never asks for a pair Device refuses
    assert not [s for s in default if not s.native and s.path in ("zero_copy", "splice_zc")]
    assert not [s for s in default if s.mode and s.path not in ("copy", "user_copy")]
    # the workloads of the issues, by pattern
    for pattern, be in ((NBD_PATTERN, "nbd"), (RBD_PATTERN, "rbd")):
        sel = select(patterns=[pattern])
        assert {(s.rw, s.bs, s.qd) for s in sel} >= {("randread", 4096, 32), ("randwrite", 4096, 32),
                                                     ("read", 131072, 32), ("write", 131072, 32),
                                                     ("randread", 4096, 1)}
        assert {(s.backend, s.path, s.queues, s.mode) for s in sel} == {(be, "copy", 1, "")}


def test_patterns_and_filters():
    sel = select(patterns=["sim/loop/*/zero_copy/q1"])
    assert sel and all(s.backend == "loop" and s.path == "zero_copy" and s.queues == 1 for s in sel)
    assert len(sel) == 8            # every workload of the matrix
    narrowed = select(patterns=["sim/loop/*/zero_copy/q1"], rws=["rand*"])
    assert {s.rw for s in narrowed} == {"randread", "randwrite"}
    assert select(patterns=["nothing*"]) == []
    assert {s.backend for s in select(backends=["loop*"])} == {"loop", "loop-py"}


def test_mode_names_keep_the_names_without_one():
    """A mode is a last name part of its own: names without one are as they always were,
    and patterns ending at the queues pick no mode's row."""
    sel = select(patterns=["sim/null/randread-4k-qd32/copy/q1*"])
    base = "sim/null/randread-4k-qd32/copy/q1"
    assert [s.name for s in sel] == [base, base + "/batch", base + "/shm", base + "/t2"]
    assert [s.base_name for s in sel] == [base] * 4
    assert [s.name for s in select(patterns=["sim/null/randread-4k-qd32/copy/q1"])] == [sel[0].name]
    # the brief's batch rows by axes: null and loop, 4 KiB reads at QD1/32/128, with and without
    batch = select(backends=["null", "loop"], rws=["randread"], bs=[4096], paths=["copy"], queues=[1],
                   modes=["none", "batch"], qd=[1, 32, 128])
    assert len(batch) == 12 and {s.mode for s in batch} == {"", "batch"}


def test_bs_and_qd_set_the_axes():
    sel = select(bs=[65536], qd=[8], backends=["null"], paths=["copy"], queues=[1], modes=["none"])
    assert [s.name for s in sel] == [f"sim/null/{rw}-64k-qd8/copy/q1" for rw in ("randread", "randwrite", "read", "write")]
    assert len(select(bs=[65536], qd=[8], backends=["null"], paths=["copy"], queues=[1])) == 4 * len(MODES)


def test_list_marks_and_skip_reasons(capsys):
    assert main(["--list", "--all", "--backend", "memory", "--rw", "randread", "--qd", "32", "--queues", "1",
                 "--mode", "none"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("4 scenarios")
    lines = {ln.split()[-1] if "[" not in ln else ln.split("   [")[0].split()[-1]: ln for ln in out[1:5]}
    assert lines["sim/memory/randread-4k-qd32/copy/q1"].startswith("q ")       # in --quick
    for path in ("zero_copy", "splice_zc"):
        line = lines[f"sim/memory/randread-4k-qd32/{path}/q1"]
        assert f"[skipped: data_path='{path}' is not available" in line and "does not declare it" in line
    assert "skipped" not in lines["sim/memory/randread-4k-qd32/copy/q1"]
    assert main(["--list", "--scenario", "sim/memory/randread-4k-qd32/*/q1/batch", "--scenario",
                 "kernel/memory/randread-4k-qd32/copy/q1/shm", "--transport", "all"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("5 scenarios")
    assert "  sim/memory/randread-4k-qd32/copy/q1/batch\n" in out
    assert "sim/memory/randread-4k-qd32/user_copy/q1/batch\n" in out
    assert ("sim/memory/randread-4k-qd32/zero_copy/q1/batch   [skipped: data_path='zero_copy' is not available"
            in out)
    assert "kernel/memory/randread-4k-qd32/copy/q1/shm   [skipped: " in out


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"), reason="the ublk driver is loaded here")
def test_kernel_rows_skipped_with_reason_without_driver(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["--transport", "kernel", "--runtime", "0.1", "--scenario", "kernel/null/randread-4k-qd1/copy/q1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("kernel/null/randread-4k-qd1/copy/q1", "skipped")]
    assert "modprobe ublk_drv" in rows[0]["reason"]
    assert "skipped: /dev/ublk-control missing" in capsys.readouterr().out


# -- formats ---------------------------------------------------------------------------------

def rendered(row: dict) -> str:
    """A row as the bench prints it when stdout is not a terminal."""
    out = report.console(io.StringIO())
    out.print(report.table([row], header=False))
    return out.file.getvalue()


def test_text_and_markdown_formats():
    ok = make_row("sim/x/randread-4k-qd1/copy/q1", "server", figures=dict(
        iops=1234.5, mbps=5.06, lat_p50_us=10.0, lat_p99_us=20.0, lat_p999_us=30.0, ios=2469, errors=0,
        seconds=2.0, cpu_s=0.02469), reference="ref/nop/qd1", reference_iops=2469.0, ratio=0.5)
    reason = "no | way [bold]not markup[/bold]" + " and long" * 30
    skipped = make_row("sim/y/read-128k-qd32/zero_copy/q1", "server", status="skipped", reason=reason)
    assert set(ok) == set(ROW_KEYS) and ok["cpu_us_per_io"] == pytest.approx(10.0)
    line = rendered(ok)
    assert line.split() == ["sim/x/randread-4k-qd1/copy/q1", "1,234", "5.1", "10.0", "20.0", "30.0", "10.00",
                            "0.500", "-", "ratio", "vs", "ref/nop/qd1"]
    # one line however long, nothing taken for markup, no escape codes: fit for logs and pipes
    assert rendered(skipped) == f"{skipped['name']:{report.NAME_W}}{' ' * (sum(report.WIDTHS) + len(report.WIDTHS) + 1)}" \
        f"skipped: {reason}\n"
    header = report.console(io.StringIO())
    header.print(report.table([]))
    head, rule = header.file.getvalue().splitlines()
    assert head.split()[:3] == ["scenario", "IOPS", "MB/s"] and head.endswith("reference / note")
    assert head.index("IOPS") + 4 == line.index("1,234") + 5 == report.NAME_W + 1 + report.WIDTHS[0]
    assert set(rule) == {"\u2500"} and len(rule) == len(head)
    md = report.markdown([ok, skipped]).splitlines()
    assert len(md) == 4 and md[0].startswith("| scenario | IOPS |") and md[1].startswith("| --- | ---: |")
    assert all(ln.count(" | ") == md[0].count(" | ") for ln in md[2:])   # the escaped | keeps columns
    assert "skipped: no \\| way" in md[3]


def test_two_references_each_ratio_names_its_own():
    fig = dict(iops=500.0, mbps=2.0, lat_p50_us=1.0, lat_p99_us=2.0, lat_p999_us=3.0, ios=500, errors=0,
               seconds=1.0, cpu_s=0.005)
    row = make_row("sim/qcow2/randread-4k-qd32/copy/q1", "server", figures=fig,
                   reference="ref/fio-file/randread-4k-qd32", reference_iops=1000.0, ratio=0.5,
                   reference2="ref/qemu-img/randread-4k-qd32", reference2_iops=400.0, ratio2=1.25)
    cells = rendered(row).split()
    assert cells[7:] == ["0.500", "1.250", "ratio", "vs", "ref/fio-file/randread-4k-qd32;", "ratio2", "vs",
                         "ref/qemu-img/randread-4k-qd32"]
    row.update(ratio2=None, reference2_iops=None)        # the second reference was skipped
    assert rendered(row).split()[8:] == ["-", "ratio", "vs", "ref/fio-file/randread-4k-qd32;", "ratio2", "vs",
                                         "ref/qemu-img/randread-4k-qd32", "(not", "measured)"]
    ref = make_row("ref/qemu-img/randread-4k-qd32", "reference", figures=dict(fig, note="strided, not random"))
    assert rendered(ref).rstrip().endswith("- reference; strided, not random")
    (md_row,) = report.markdown([row]).splitlines()[2:]
    assert md_row.split(" | ")[7:10] == ["0.500", "-", "ratio vs ref/fio-file/randread-4k-qd32; ratio2 vs "
                                         "ref/qemu-img/randread-4k-qd32 (not measured) |"]


def test_progress_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    quiet, tty = io.StringIO(), Tty()
    for stream in (quiet, tty):
        with Progress(3, Console(file=stream, width=100)) as p:
            p.row_done(make_row("sim/null/randread-4k-qd1/copy/q1", "server"))
            p.row_done(make_row("ref/nop/qd32", "reference"))        # references are not counted
            p("sim/null/randread-4k-qd32/copy/q1")
    assert quiet.getvalue() == ""
    assert "1/3" in tty.getvalue() and "sim/null/randread-4k-qd32/copy/q1 ..." in tty.getvalue()
    assert "2/3" not in tty.getvalue()


# -- a very short real run --------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    argv = ["--runtime", "0.2", "--size", "16", "--scenario", NULL_QD32, "--scenario", LOOP_QD32,
            "--scenario", PY_ZC, "--json", str(d / "r.json"), "--markdown", str(d / "r.md")]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(d / "plots")]
    except ImportError:
        pass
    rc = main(argv)
    return rc, d, json.loads((d / "r.json").read_text())


def test_short_run_json_schema(short_run):
    rc, _, doc = short_run
    assert rc == 0
    assert doc["schema"] == report.SCHEMA and doc["interrupted"] is False and doc["duration_s"] > 0
    assert doc["settings"]["runtime"] == 0.2 and doc["settings"]["selected"] == [LOOP_QD32, PY_ZC, NULL_QD32]
    assert doc["machine"]["kernel"] == platform.release() and doc["machine"]["cpus"] == os.cpu_count()
    v = doc["versions"]
    assert v["python"] == platform.python_version() and v["numpy"] == numpy.__version__
    assert v["cython"] and v["fio"].startswith("fio-") and v["liburing"]
    for row in doc["rows"]:
        assert set(row) == set(ROW_KEYS)
    names = [r["name"] for r in doc["rows"]]
    # each reference is measured right before the first scenario that needs it; none for a refused pair
    assert names == ["ref/fio-file/randread-4k-qd32", LOOP_QD32, PY_ZC, "ref/nop/qd32", NULL_QD32]


def test_short_run_figures_are_sane(short_run):
    _, _, doc = short_run
    rows = {r["name"]: r for r in doc["rows"]}
    for name in (NULL_QD32, LOOP_QD32):
        r = rows[name]
        assert r["status"] == "ok" and r["errors"] == 0
        for k in ("iops", "mbps", "lat_p50_us", "cpu_us_per_io", "seconds", "ios"):
            assert r[k] > 0, (name, k)
        assert r["lat_p50_us"] <= r["lat_p99_us"] <= r["lat_p999_us"]
        assert r["iops"] == pytest.approx(r["ios"] / r["seconds"], rel=1e-6)
        assert r["mbps"] == pytest.approx(r["iops"] * 4096 / 1e6, rel=1e-6)
        assert sum(r["hist"]["counts"]) == r["ios"]
        ref = rows[r["reference"]]
        assert ref["kind"] == "reference" and ref["status"] == "ok" and ref["iops"] > 0
        assert r["reference_iops"] == ref["iops"]
        assert r["ratio"] == pytest.approx(r["iops"] / ref["iops"], rel=1e-12)
    fio = rows["ref/fio-file/randread-4k-qd32"]
    assert fio["cpu_us_per_io"] > 0 and fio["lat_p50_us"] <= fio["lat_p999_us"] and fio["mbps"] > 0
    assert rows["ref/nop/qd32"]["iops"] > rows[NULL_QD32]["iops"]     # the ring's ceiling


def test_short_run_skips_unsupported_pair_with_reason(short_run):
    _, d, doc = short_run
    r = next(r for r in doc["rows"] if r["name"] == PY_ZC)
    assert r["status"] == "skipped" and "zero_copy" in r["reason"] and r["iops"] is None and r["ratio"] is None
    text = (d / "r.md").read_text()
    assert text.startswith("# pyublk_fast bench results") and platform.release() in text
    md = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(md) == 2 + len(doc["rows"])
    assert any(f"`{PY_ZC}`" in ln and "skipped: data_path='zero_copy'" in ln for ln in md)
    assert any("*ref/nop/qd32*" in ln for ln in md)


def test_short_run_plots(short_run):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: --plot is not available")
    _, d, _ = short_run
    for name in ("iops.png", "latency.png"):
        data = (d / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- qcow2: fio on the raw file, qemu-img bench on the image ---------------------------------------

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img not installed (tools/dev.sh installs qemu-utils)")


@needs_qemu_img
def test_qcow2_image_is_fully_allocated_with_the_raw_files_data():
    with Workdir(4 << 20) as wd:
        raw, img = wd.file("raw"), wd.file("qcow2")
        extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", img],
                                            capture_output=True, text=True, check=True).stdout)
        assert sum(e["length"] for e in extents) == 4 << 20
        assert all(e["data"] and not e["zero"] and "offset" in e for e in extents)
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img],
                              capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
        with open(raw, "rb") as f:
            data = f.read()
        assert len(set(data[i:i + 4096] for i in range(0, 1 << 20, 4096))) == 256   # data, not a fill


@pytest.mark.parametrize("blocks", [2, 3, 4, 255, 256, 1000, 4096, 65536, 65537])
def test_stride_visits_every_block_under_both_wrap_rules(blocks):
    """qemu-img wraps the offset modulo the image size (or, in later qemu, the size less one
    request): either way a pass of `blocks` requests must visit every block once."""
    k = refs.stride_blocks(blocks)
    assert 1 <= k < blocks and math.gcd(k, blocks) == 1 and math.gcd(k, blocks - 1) == 1
    assert sorted(i * k % blocks for i in range(blocks)) == list(range(blocks))
    assert sorted(i * k % (blocks - 1) for i in range(blocks - 1)) == list(range(blocks - 1))
    if blocks >= 256:
        assert blocks // 4 < k < blocks // 2      # consecutive requests far apart


def test_qemu_img_bench_args():
    rr = refs.qemu_img_bench_args("i.qcow2", "qcow2", "randwrite", 4096, 32, 1000, 256 << 20, "io_uring")
    assert rr == ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", "32", "-s", "4096",
                  "-c", "1000", "-S", str(refs.stride_blocks(65536) * 4096), "-w", "i.qcow2"]
    seq = refs.qemu_img_bench_args("i.qcow2", "qcow2", "read", 131072, 32, 10, 256 << 20, "native")
    assert seq == ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "native", "-d", "32", "-s", "131072",
                   "-c", "10", "i.qcow2"]


def _stub_qemu_img(tmp_path, monkeypatch, refuse: str) -> None:
    """A qemu-img first on PATH that fails `bench` runs whose arguments match the shell
    pattern `refuse`, and runs the real one otherwise."""
    real = shutil.which("qemu-img")
    stub = tmp_path / "bin" / "qemu-img"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\ncase " $* " in {refuse}) echo "qemu-img: stub refuses: $*" >&2; exit 1;; esac\n'
                    f'exec {real} "$@"\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")


@needs_qemu_img
def test_qemu_img_bench_falls_back_to_native_aio_and_says_why(tmp_path, monkeypatch):
    _stub_qemu_img(tmp_path, monkeypatch, '*" -i io_uring "*')
    with Workdir(4 << 20) as wd:
        img = wd.file("qcow2")
        r = refs.qemu_img_bench(img, "qcow2", "randread", 4096, 8, 0.1, wd.size)
    assert r["iops"] == pytest.approx(r["ios"] / r["seconds"]) and r["ios"] >= refs.FIRST_COUNT
    assert r["note"].startswith("qemu-img bench -t none -i native; strided, not random: a step of "
                                f"{refs.stride_blocks(1024)} of 1024 blocks")
    assert r["note"].endswith("; -i io_uring failed: qemu-img: stub refuses: bench -f qcow2 -t none -i io_uring "
                              f"-d 8 -s 4096 -c {refs.FIRST_COUNT} -S {refs.stride_blocks(1024) * 4096} "
                              f"{img}")


@needs_qemu_img
def test_qemu_img_bench_unavailable_says_why(tmp_path, monkeypatch):
    with Workdir(4 << 20) as wd:
        img = wd.file("qcow2")
        with pytest.raises(refs.RefUnavailable, match=r"image size \(4194304\) must be a multiple of the block "
                                                      r"size \(3072\)"):
            refs.qemu_img_bench(img, "qcow2", "read", 3072, 8, 0.1, wd.size)
        _stub_qemu_img(tmp_path, monkeypatch, "*bench*")
        with pytest.raises(refs.RefUnavailable) as e:
            refs.qemu_img_bench(img, "qcow2", "read", 4096, 8, 0.1, wd.size)
        assert str(e.value).startswith("qemu-img bench: -i io_uring failed: qemu-img: stub refuses: ")
        assert "; -i native failed: qemu-img: stub refuses: bench -f qcow2 -t none -i native" in str(e.value)
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        with pytest.raises(refs.RefUnavailable, match=r"qemu-img not installed \(apt-get install qemu-utils\)"):
            refs.qemu_img_bench(img, "qcow2", "read", 4096, 8, 0.1, wd.size)


@needs_qemu_img
def test_qcow2_rows_have_fio_and_qemu_img_references(tmp_path, monkeypatch, capsys):
    """fio on the raw file stays the reference; qemu-img bench on the same image is the
    second, run while no server has the image open."""
    real, open_at_bench = refs.qemu_img_bench, []

    def spy(image, *args):
        fds = os.listdir("/proc/self/fd")
        open_at_bench.append(any(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(image)
                                 for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")))
        return real(image, *args)

    monkeypatch.setattr(refs, "qemu_img_bench", spy)
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.2", "--size", "16", "--scenario", QCOW2_RR, "--scenario", QCOW2_RW,
                 "--json", str(out)]) == 0
    assert open_at_bench == [False, False]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["ref/fio-file/randread-4k-qd32", "ref/qemu-img/randread-4k-qd32", QCOW2_RR,
                                         "ref/fio-file/randwrite-4k-qd32", "ref/qemu-img/randwrite-4k-qd32", QCOW2_RW]
    by = {r["name"]: r for r in rows}
    text = capsys.readouterr().out
    for rw, name in (("randread", QCOW2_RR), ("randwrite", QCOW2_RW)):
        fio, qi, row = by[f"ref/fio-file/{rw}-4k-qd32"], by[f"ref/qemu-img/{rw}-4k-qd32"], by[name]
        assert fio["status"] == qi["status"] == row["status"] == "ok" and row["errors"] == 0
        assert (qi["backend"], qi["rw"], qi["bs"], qi["qd"]) == ("qemu-img", rw, 4096, 32)
        assert qi["iops"] == pytest.approx(qi["ios"] / qi["seconds"]) and qi["cpu_us_per_io"] > 0
        assert qi["mbps"] == pytest.approx(qi["iops"] * 4096 / 1e6) and qi["lat_p50_us"] is None
        assert "qemu-img bench -t none -i io_uring; strided, not random: a step of" in qi["note"]
        assert row["reference"] == fio["name"] and row["ratio"] == pytest.approx(row["iops"] / fio["iops"])
        assert row["reference2"] == qi["name"] and row["reference2_iops"] == qi["iops"]
        assert row["ratio2"] == pytest.approx(row["iops"] / qi["iops"])
        assert f"ratio vs {fio['name']}; ratio2 vs {qi['name']}" in text


# -- several rounds ----------------------------------------------------------------------------

def test_combine_rounds_takes_medians_and_paired_ratio_range():
    def server(rnd, iops, ref_iops, status="ok"):
        if status != "ok":
            row = make_row("s", "server", status=status, reason="boom", reference="r")
            row["round"] = rnd
            return row
        fig = dict(iops=iops, mbps=iops * 4096 / 1e6, lat_p50_us=1e6 / iops, lat_p99_us=2e6 / iops,
                   lat_p999_us=3e6 / iops, ios=iops, errors=0, seconds=1.0, cpu_s=iops * 1e-6,
                   hist={"lower_ns": [0.0], "counts": [iops]})
        row = make_row("s", "server", figures=fig, reference="r", reference2="r2")
        row.update(reference_iops=ref_iops, ratio=iops / ref_iops, reference2_iops=ref_iops * 2,
                   ratio2=iops / ref_iops / 2)
        row["round"] = rnd
        return row

    rows = [server(0, 80, 100), server(1, 120, 100), server(2, 90, 200), server(3, 0, 0, "failed")]
    (row,) = combine_rounds(rows)
    assert row["rounds"] == 3 and row["round"] is None and row["status"] == "ok"
    assert row["iops"] == 90 and row["reference_iops"] == 100          # medians, each on its own
    assert (row["ratio_min"], row["ratio"], row["ratio_max"]) == (0.45, 0.8, 1.2)
    assert row["reference2_iops"] == 200 and (row["ratio2_min"], row["ratio2"], row["ratio2_max"]) == (0.225, 0.4, 0.6)
    assert row["ios"] == 290 and row["seconds"] == 3.0 and row["errors"] == 0
    assert row["hist"]["counts"] == [90]                                # the median-IOPS round's
    assert row["reason"] == "1 of 4 rounds failed: boom"
    assert "median of 3 rounds, ratio 0.450..1.200, ratio2 0.225..0.600" in rendered(row)
    (gone,) = combine_rounds([server(0, 0, 0, "skipped"), server(1, 0, 0, "skipped")])
    assert gone["status"] == "skipped" and gone["rounds"] == 0 and gone["iops"] is None


def test_repeat_pairs_each_round_with_its_own_reference(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.1", "--size", "16", "--repeat", "2", "--scenario", NULL_QD32,
                 "--json", str(out), "--markdown", str(tmp_path / "r.md")]) == 0
    doc = json.loads(out.read_text())
    raw, rows = doc["raw_rows"], {r["name"]: r for r in doc["rows"]}
    assert [(r["name"], r["round"]) for r in raw] == [("ref/nop/qd32", 0), (NULL_QD32, 0),
                                                      ("ref/nop/qd32", 1), (NULL_QD32, 1)]
    refs = {r["round"]: r["iops"] for r in raw if r["kind"] == "reference"}
    per_round = [r["iops"] / refs[r["round"]] for r in raw if r["kind"] == "server"]
    for r in raw:
        if r["kind"] == "server":
            assert r["ratio"] == pytest.approx(r["iops"] / refs[r["round"]], rel=1e-12)
    row = rows[NULL_QD32]
    assert row["rounds"] == 2 and doc["settings"]["repeat"] == 2
    assert row["ratio"] == pytest.approx(sum(per_round) / 2, rel=1e-12)
    assert row["ratio_min"] == pytest.approx(min(per_round)) and row["ratio_max"] == pytest.approx(max(per_round))
    text = capsys.readouterr().out
    assert "-- round 2 of 2" in text and "medians over 2 rounds" in text
    assert "2 rounds (medians)" in (tmp_path / "r.md").read_text()


def test_paired_ratio_and_emit_paired(tmp_path, capsys):
    assert report.paired_ratio([0.8, 1.2, 0.45]) == "0.80x (0.45..1.20)"
    assert report.paired_ratio([]) == ""
    rows = [dict(round=0, iops=1.5)]
    report.emit_paired("| t |", rows, str(tmp_path / "out"), "pair")
    assert capsys.readouterr().out == "| t |\n"
    assert (tmp_path / "out" / "pair.md").read_text() == "| t |\n"
    assert json.loads((tmp_path / "out" / "pair.json").read_text()) == rows


def test_repeat_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    assert "--repeat" in capsys.readouterr().err


def _bench_cmd(*args: str, prelude: str = "") -> list[str]:
    code = f"{prelude}import sys; from pyublk_fast.bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def test_plot_without_matplotlib_says_to_install_it(tmp_path):
    p = subprocess.run(_bench_cmd("--scenario", NULL_QD32, "--plot", str(tmp_path),
                                  prelude="import sys; sys.modules['matplotlib'] = None; "),
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "pip install matplotlib" in p.stderr and "Traceback" not in p.stderr


def test_ctrl_c_keeps_what_finished(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen(_bench_cmd("--runtime", "0.5", "--size", "16", "--scenario", "sim/null/randread-4k-qd*/copy/q1",
                                       "--json", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("sim/null/"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err and "\033[K" not in err
    doc = json.loads(out.read_text())
    server = [r for r in doc["rows"] if r["kind"] == "server"]
    assert doc["interrupted"] is True and 1 <= len(server) < 3 and all(r["status"] == "ok" for r in server)


def test_any_registered_backend_is_benchmarked(monkeypatch, tmp_path):
    """The bench has no table of its own: a backend registered anywhere is on its axis and
    is built from its own options (a Python-only one has no -py twin); one the bench cannot
    build is skipped with the reason."""
    monkeypatch.setattr(backend_mod, "_REGISTRY", dict(backend_mod._REGISTRY))

    class Picky(MemoryBackend):
        @classmethod
        def add_arguments(cls, parser):
            parser.add_argument("--colour", required=True)

    register("ram")(MemoryBackend)
    register("picky")(Picky)
    assert backend_axis() == ["loop", "loop-py", "memory", "nbd", "null", "null-py", "null-aio", "picky",
                              "qcow2", "ram", "rbd", "rbd-py"]
    out = tmp_path / "r.json"
    ram, picky = "sim/ram/randread-4k-qd1/copy/q1", "sim/picky/randread-4k-qd1/copy/q1"
    assert main(["--runtime", "0.1", "--scenario", ram, "--scenario", picky, "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    row = rows[ram]
    assert row["status"] == "ok" and row["native"] is False and row["errors"] == 0 and row["iops"] > 0
    assert row["reference"] == "ref/nop/qd1" and rows["ref/nop/qd1"]["status"] == "ok"
    assert rows[picky]["status"] == "skipped"
    assert rows[picky]["reason"] == "the following arguments are required: --colour"


# -- modes: batch I/O and shared buffers next to the rows without them ---------------------------

NULL_SEQ = "sim/null/read-128k-qd32/copy/q1"
LOOP_SEQ = "sim/loop/read-128k-qd32/copy/q1"


def test_mode_rows_run_next_to_the_rows_without_a_mode(tmp_path):
    """batch and shm rows: measured, against the same reference as the row without the
    mode, and (ratio2) against that row of the same round; every request of a shm row
    was served in place from the shared buffer."""
    out = tmp_path / "r.json"
    names = [NULL_QD32, NULL_QD32 + "/batch", NULL_SEQ, NULL_SEQ + "/shm", LOOP_SEQ, LOOP_SEQ + "/shm"]
    argv = ["--runtime", "0.2", "--size", "16", "--json", str(out)]
    for n in names:
        argv += ["--scenario", n]
    assert main(argv) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for base, mode in ((NULL_QD32, "batch"), (NULL_SEQ, "shm"), (LOOP_SEQ, "shm")):
        row, plain = rows[f"{base}/{mode}"], rows[base]
        assert row["status"] == plain["status"] == "ok" and row["errors"] == 0 and row["ios"] > 0
        assert (row["mode"], plain["mode"]) == (mode, "")
        ref = rows[row["reference"]]
        assert row["reference"] == plain["reference"] and ref["status"] == "ok" and ref["iops"] > 0
        assert row["ratio"] == pytest.approx(row["iops"] / ref["iops"])
        assert row["reference2"] == base and row["reference2_iops"] == plain["iops"]
        assert row["ratio2"] == pytest.approx(row["iops"] / plain["iops"])
        if mode == "shm":
            assert row["note"] == f"shared buffer: all {row['ios']} requests served in place"
        assert plain["note"] is None and plain["reference2"] is None


def test_mode_row_alone_says_its_partner_was_not_measured(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.1", "--size", "16", "--scenario", NULL_QD32 + "/batch", "--json", str(out)]) == 0
    (row,) = [r for r in json.loads(out.read_text())["rows"] if r["kind"] == "server"]
    assert row["status"] == "ok" and row["reference2"] == NULL_QD32 and row["ratio2"] is None
    assert f"ratio2 vs {NULL_QD32} (not measured)" in rendered(row)


def test_shared_mode_runs_on_the_simulated_driver_only():
    (k,) = select(transports=("kernel",), patterns=["kernel/null/read-128k-qd32/copy/q1/shm"])
    assert "simulated driver only" in k.refusal()
    (s,) = select(patterns=["sim/null/read-128k-qd32/copy/q1/shm"])
    assert s.refusal() is None and s.device_options == {"shared_buffers": True}


def test_load_from_a_shared_buffer_reads_back_what_it_wrote(sim):
    """The load generator's I/O from a buffer the device shares: verified data, every
    request served in place; a buffer too small for qd * bs is refused in one line."""
    from pyublk_fast.bench.runner import shared_buffer
    from pyublk_fast.device import Device
    with Device(MemoryBackend(4 << 20), sim, depth=32, shared_buffers=True) as dev:
        buf = shared_buffer(dev, 16 * 8192)
        r = sim.run_load(dev.dev_id, rw="randrw", bs=8192, qd=16, count=2000, verify=True, buffer=buf)
        assert r["errors"] == r["verify_errors"] == 0 and r["completed"] == 2000
        # the prefill wrote the whole device from the buffer too
        assert dev.shared_requests == 2000 + (4 << 20) // 8192
        with pytest.raises(ValueError, match=r"buffer: need 262144 bytes \(qd \* bs\) at a page-aligned address, "
                                             r"got 131072 bytes"):
            sim.run_load(dev.dev_id, rw="randread", bs=8192, qd=32, count=10, buffer=buf)
        r = sim.run_load(dev.dev_id, rw="randread", bs=8192, qd=16, count=100)    # its own buffers again
        assert r["completed"] == 100 and dev.shared_requests == 2000 + (4 << 20) // 8192


# -- nbd: the bench's own NBD server, fio's nbd engine as the reference ------------------------------

needs_nbd_server = pytest.mark.skipif(NbdExport.missing() is not None,
                                      reason="no NBD server program (tools/dev.sh installs nbdkit)")
NBD_RR = "sim/nbd/randread-4k-qd32/copy/q1"
NBD_RW = "sim/nbd/randwrite-4k-qd32/copy/q1"


def _children(*names: str) -> list[str]:
    """Processes of these names whose parent is this process."""
    out = []
    for st in os.listdir("/proc"):
        try:
            with open(f"/proc/{st}/stat") as f:
                fields = f.read().rsplit(")", 1)
        except OSError:
            continue
        comm = fields[0].split("(", 1)[1]
        if comm in names and int(fields[1].split()[1]) == os.getpid() and fields[1].split()[0] != "Z":
            out.append(comm)
    return out


@needs_nbd_server
def test_nbd_rows_against_fio_nbd_engine_on_the_same_export(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.2", "--size", "16", "--scenario", NBD_RR, "--scenario", NBD_RW,
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["ref/fio-nbd/randread-4k-qd32", NBD_RR, "ref/fio-nbd/randwrite-4k-qd32", NBD_RW]
    for ref, row in (rows[0:2], rows[2:4]):
        assert ref["status"] == row["status"] == "ok" and ref["errors"] == row["errors"] == 0
        assert ref["kind"] == "reference" and ref["backend"] == "fio-nbd" and ref["iops"] > 0 and ref["ios"] > 0
        assert row["reference"] == ref["name"] and row["ratio"] == pytest.approx(row["iops"] / ref["iops"])
        assert row["native"] is True and row["iops"] > 0
    assert _children("nbdkit", "qemu-nbd") == []          # the bench stopped its server


@pytest.mark.parametrize("program", ["nbdkit", "qemu-nbd"])
def test_nbd_export_keeps_data_between_connections(tmp_path, sim, monkeypatch, program):
    """The export the bench starts (nbdkit's, or qemu-nbd's where nbdkit is missing) is one
    store that every connection (each row's backend, fio) sees: data written through one
    device reads back through another."""
    from pyublk_fast.backends.nbd import NbdBackend
    from pyublk_fast.device import Device
    exe = shutil.which(program)
    if exe is None:
        pytest.skip(f"{program} not installed (tools/dev.sh installs nbdkit and qemu-utils)")
    only = tmp_path / "bin"
    only.mkdir()
    (only / program).symlink_to(exe)
    monkeypatch.setenv("PATH", str(only))
    with Workdir(4 << 20, str(tmp_path)) as wd:
        export = NbdExport(wd.path, wd.size, wd.file)
        try:
            uri = export.start()
            assert export.start() == uri and export.fio_target() == ["--ioengine=nbd", f"--uri={uri}"]
            data = os.urandom(1 << 20)
            with Device(NbdBackend(uri), sim, depth=8) as dev, dev.open() as blk:
                blk.pwrite(data, 1 << 20)
            with Device(NbdBackend(uri), sim, depth=8) as dev, dev.open() as blk:
                assert blk.pread(1 << 20, 1 << 20) == data
            assert _children("nbdkit", "qemu-nbd") == [program]
        finally:
            export.close()
        assert _children("nbdkit", "qemu-nbd") == []
        with pytest.raises(refs.RefUnavailable, match="the NBD server is not running"):
            export.fio_target()


@needs_nbd_server
def test_nbd_server_that_cannot_start_says_why(tmp_path):
    """A server that exits at once (its socket path taken) is not waited for: its last words."""
    (tmp_path / "nbd.sock").mkdir()
    export = NbdExport(str(tmp_path), 1 << 20, lambda kind: str(tmp_path / "no-such-file"))
    with pytest.raises(refs.RefUnavailable, match=r"^(nbdkit|qemu-nbd) failed to start: .+") as e:
        export.start()
    assert "\n" not in str(e.value) and "did not listen" not in str(e.value)
    assert _children("nbdkit", "qemu-nbd") == []


def test_missing_server_programs_skip_rows_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.1", "--size", "16", "--scenario", NBD_RR, "--scenario",
                 "sim/rbd/randread-4k-qd32/copy/q1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [(NBD_RR, "skipped"), ("sim/rbd/randread-4k-qd32/copy/q1",
                                                                                "skipped")]
    assert rows[0]["reason"] == "neither nbdkit nor qemu-nbd is installed (apt-get install nbdkit)"
    assert rows[1]["reason"] == "rbd is not installed (apt-get install ceph-mon ceph-osd)"


# -- rbd: fio's rbd engine on the same image, in the tests' cluster ---------------------------------

RBD_RR = "sim/rbd/randread-4k-qd32/copy/q1"
RBD_SW = "sim/rbd/write-128k-qd32/copy/q1"


def test_rbd_rows_against_fio_rbd_engine_on_the_same_image(ceph, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    assert main(["--runtime", "0.2", "--size", "16", "--scenario", RBD_RR, "--scenario", RBD_SW,
                 "--rbd-conf", ceph.conf, "--rbd-pool", ceph.pool, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["ref/fio-rbd/randread-4k-qd32", RBD_RR, "ref/fio-rbd/write-128k-qd32", RBD_SW]
    for ref, row in (rows[0:2], rows[2:4]):
        assert ref["status"] == row["status"] == "ok" and ref["errors"] == row["errors"] == 0
        assert ref["backend"] == "fio-rbd" and ref["iops"] > 0 and ref["ios"] > 0
        assert row["reference"] == ref["name"] and row["ratio"] == pytest.approx(row["iops"] / ref["iops"])
    # each measurement had an image of its own, imported afresh; in a cluster of someone
    # else's they are all gone again
    assert not [i for i in ceph.cli("ls", ceph.pool).split() if i.startswith(f"pyublk-bench-{os.getpid()}-")]


def test_fio_rbd_reference_runs_with_the_backends_librbd_settings(ceph, tmp_path):  # noqa: F811
    """fio's engine gets the backend's librbd settings: no librbd cache (Ceph's default
    would give fio a cache that acknowledges writes before the OSDs have them). librbd's
    log says whether it set its cache up; the control, fio on Ceph's defaults, does."""
    from pyublk_fast.bench.services import RbdImage
    raw = tmp_path / "raw"
    raw.write_bytes(os.urandom(4 << 20))
    image = RbdImage(str(tmp_path), lambda kind: str(raw), ceph.conf, ceph.pool)
    try:
        image.start()
        target, env = image.fio_target()
        assert "--rbd_cache=false" in env["CEPH_ARGS"].split()
        logs = {}
        for name, args in (("bench", env["CEPH_ARGS"]), ("defaults", "")):
            logs[name] = tmp_path / f"{name}.log"
            run = subprocess.run(
                ["fio", "--name=x", *target, "--rw=randwrite", "--bs=4k", "--iodepth=4",
                 "--io_size=64k", "--output-format=terse"], capture_output=True, text=True, timeout=120,
                env=dict(env, CEPH_ARGS=f"{args} --debug_rbd=5 --log_file={logs[name]}"))
            assert run.returncode == 0, run.stderr
        assert "librbd::cache::" in logs["defaults"].read_text()
        assert "librbd::cache::" not in logs["bench"].read_text()
    finally:
        image.close()


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks", "kernel"))
                                           if f.endswith(".py")))
def test_kernel_benchmark_scripts_load(script):
    """The VM benchmarks run only in the VM lane: their imports (of each other too) and
    options are checked here, on every run."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel", script), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-2000:]
