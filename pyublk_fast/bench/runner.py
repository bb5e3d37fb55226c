"""Run scenarios and their references; every result is a row dict (see ROW_KEYS).

Server rows on the simulated driver use its load generator (SimTransport.run_load); on the
kernel transport, fio against /dev/ublkbN. CPU time per I/O is the whole process's
time.process_time() delta over the measurement (driver, load generator and server threads
on sim), plus fio's own usr+sys where fio drives the load. References are measured once
per round, the first time a scenario needs them, and appear as rows of their own; with
several rounds, combine_rounds() folds each name's rows into medians.

A server row has a ratio to its reference (reference, reference_iops, ratio) and may have
a second one (reference2, reference2_iops, ratio2): for a qcow2 image, to qemu-img bench on
the same image, measured once the server has closed it; for a row with a mode, to the same
row without the mode measured earlier in the round (batch vs per-tag, shared vs copy).
"""
from __future__ import annotations

import mmap
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

import rich.progress
from rich.console import Console

from . import refs
from .scenarios import Scenario, make_backend, make_device
from .services import Services, ServiceUnavailable

ROW_KEYS = ("name", "kind", "transport", "backend", "native", "rw", "bs", "qd", "data_path", "queues", "mode",
            "status", "reason", "iops", "mbps", "lat_p50_us", "lat_p99_us", "lat_p999_us", "cpu_us_per_io",
            "ios", "errors", "seconds", "reference", "reference_iops", "ratio",
            "reference2", "reference2_iops", "ratio2", "note", "hist",
            "round", "rounds", "ratio_min", "ratio_max", "ratio2_min", "ratio2_max")
FIGURES = ("iops", "mbps", "lat_p50_us", "lat_p99_us", "lat_p999_us", "cpu_us_per_io", "ios", "errors", "seconds")


def make_row(name: str, kind: str, *, status: str = "ok", reason: str | None = None, figures: dict | None = None,
             **fields) -> dict:
    """A row with every key of ROW_KEYS (figures None unless measured)."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(name=name, kind=kind, status=status, reason=reason, **fields)
    if figures:
        cpu_s = figures.get("cpu_s")
        ios = figures.get("ios") or 0
        for k in FIGURES:
            if k in figures:
                row[k] = figures[k]
        if cpu_s is not None and ios:
            row["cpu_us_per_io"] = cpu_s / ios * 1e6
        row["hist"] = figures.get("hist")
        row["note"] = figures.get("note")
    return row


MEDIAN_FIGURES = ("iops", "mbps", "lat_p50_us", "lat_p99_us", "lat_p999_us", "cpu_us_per_io", "reference_iops",
                  "reference2_iops")
RATIOS = ("ratio", "ratio2")
SUMMED_FIGURES = ("ios", "errors", "seconds")


def combine_rounds(rows: list[dict]) -> list[dict]:
    """One row per name from several rounds: the median of each figure over the rounds that
    measured it, and each ratio as the median of the per-round ratios (each against that
    round's own reference) with its range; the latency histogram of the median-IOPS round."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for runs in groups.values():
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            out.append(dict(runs[0], round=None, rounds=0))
            continue
        row = dict(ok[0], round=None, rounds=len(ok))
        for k in MEDIAN_FIGURES:
            vals = [r[k] for r in ok if r[k] is not None]
            row[k] = statistics.median(vals) if vals else None
        for k in SUMMED_FIGURES:
            row[k] = sum(r[k] or 0 for r in ok)
        for key in RATIOS:
            ratios = [r[key] for r in ok if r[key] is not None]
            if ratios:
                row.update({key: statistics.median(ratios), f"{key}_min": min(ratios), f"{key}_max": max(ratios)})
        row["hist"] = sorted(ok, key=lambda r: r["iops"] or 0)[len(ok) // 2]["hist"]
        if len(ok) < len(runs):
            bad = next(r for r in runs if r["status"] != "ok")
            row["reason"] = f"{len(runs) - len(ok)} of {len(runs)} rounds {bad['status']}: {bad['reason']}"
        out.append(row)
    return out


def scenario_fields(sc: Scenario) -> dict:
    return dict(transport=sc.transport, backend=sc.backend, native=sc.native, rw=sc.rw, bs=sc.bs,
                qd=sc.qd, data_path=sc.path, queues=sc.queues, mode=sc.mode)


def compact_hist(hist) -> dict | None:
    """The simulated driver's latency histogram, nonzero buckets only: lower bounds (ns) and counts."""
    from ..transport.sim.loadgen import hist_bucket_lower_ns
    lower = hist_bucket_lower_ns()
    nz = [i for i, c in enumerate(hist.tolist()) if c]
    if not nz:
        return None
    return {"lower_ns": [float(lower[i]) for i in nz], "counts": [int(hist[i]) for i in nz]}


class Workdir:
    """Backing files in a temp dir under /var/tmp (ext4 there, so O_DIRECT works); removed on exit.

    The raw file and the qcow2 image hold the same bytes, every cluster of the image
    allocated and written (written through qcow2-lite: no tool needed, as fast as writing
    the raw file): reads hit data, not holes, and writes overwrite in place in both.
    """

    def __init__(self, size: int, base: str = "/var/tmp"):
        self.size = size
        self.base = base if os.path.isdir(base) else None
        self.path: str | None = None
        self._files: dict[str, str] = {}
        self._data = os.urandom(1 << 20)

    def __enter__(self) -> "Workdir":
        self.path = tempfile.mkdtemp(prefix="pyublk-bench-", dir=self.base)
        return self

    def __exit__(self, *exc):
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def _chunks(self):
        """(offset, bytes) covering the whole size, the same bytes for every file."""
        for off in range(0, self.size, len(self._data)):
            yield off, self._data[:min(len(self._data), self.size - off)]

    def file(self, kind: str) -> str:
        """The raw or qcow2 backing file, created on first use and filled with data (no holes);
        on every call, on disk and out of the page cache, so each scenario starts alike."""
        if kind not in self._files:
            if kind == "raw":
                path = os.path.join(self.path, "backing.img")
                with open(path, "wb") as f:
                    for _, chunk in self._chunks():
                        f.write(chunk)
            elif kind == "qcow2":
                from ..backends.qcow2 import Qcow2Image
                path = os.path.join(self.path, "backing.qcow2")
                img = Qcow2Image.create(path, self.size)
                try:
                    for off, chunk in self._chunks():
                        img.write(off, chunk)
                finally:
                    img.close()
            else:
                raise ValueError(f"backing file kind {kind!r}: choose raw or qcow2")
            self._files[kind] = path
        # no dirty pages for O_DIRECT I/O to wait on, and no head start from pages an earlier
        # scenario left cached for a server that reads through the cache
        fd = os.open(self._files[kind], os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return self._files[kind]


def shared_buffer(dev, nbytes: int) -> mmap.mmap:
    """Memory of at least nbytes (whole pages) the started device shares with its users:
    the load's buffer for a shared-buffer row."""
    buf = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)
    dev.register_shared_buffer(buf)
    return buf


def in_place_note(served: int, ios: int) -> str:
    """The note of a shared-buffer row; RuntimeError unless every request was served in place
    (the row would not measure what it says)."""
    if served < ios or not ios:
        raise RuntimeError(f"only {served} of {ios} requests were served in place from the shared buffer")
    return f"shared buffer: all {ios} requests served in place"


class TransportUnavailable(Exception):
    """The transport cannot run here; str() says why."""


def open_transport(name: str):
    """A transport by name, or TransportUnavailable with the reason."""
    if name == "sim":
        from ..transport.sim import SimTransport
        return SimTransport()
    ctl = "/dev/ublk-control"
    if not os.path.exists(ctl):
        raise TransportUnavailable(f"{ctl} missing: the ublk driver is not loaded (modprobe ublk_drv)")
    if not os.access(ctl, os.R_OK | os.W_OK):
        raise TransportUnavailable(f"no permission on {ctl}: run as root")
    try:
        from ..transport.kernel import KernelTransport
    except ImportError as e:
        raise TransportUnavailable(f"pyublk_fast.transport.kernel.KernelTransport is not available ({e})") from None
    try:
        return KernelTransport()
    except OSError as e:
        raise TransportUnavailable(f"KernelTransport(): {e}") from None


class Runner:
    """Runs scenarios in order, measuring references on demand; on_row sees every finished row.
    services: the servers nbd and rbd rows use (the caller closes them)."""

    def __init__(self, workdir: Workdir, runtime: float, on_row: Callable[[dict], None],
                 progress: Callable[[str], None] = lambda s: None, *, services: Services):
        self.wd = workdir
        self.runtime = runtime
        self.on_row = on_row
        self.progress = progress
        self.services = services
        self.rows: list[dict] = []
        self.round = 0
        self._refs: dict[str, dict] = {}
        self._served: dict[str, dict] = {}
        self._nop = refs.NopLoop(workdir.path)

    def start_round(self, number: int) -> None:
        """Rows from now on belong to round `number`; references are measured afresh."""
        self.round = number
        self._refs = {}
        self._served = {}

    def _emit(self, row: dict) -> dict:
        row["round"] = self.round
        self.rows.append(row)
        if row["kind"] == "server":
            self._served[row["name"]] = row
        self.on_row(row)
        return row

    # -- references ----------------------------------------------------------------------

    def reference(self, sc: Scenario) -> dict:
        """The reference row for a scenario, measured the first time it is needed."""
        rt = self.runtime
        if kind := self.services.kind(sc.backend):
            name = f"ref/fio-{kind}/{sc.workload}"
            fields = dict(transport="host", backend=f"fio-{kind}", rw=sc.rw, bs=sc.bs, qd=sc.qd)

            def measure():
                target, env = self.services.fio_target(sc.backend)
                return refs.fio(target, sc.rw, sc.bs, sc.qd, rt, env=env)
        elif sc.file_format:
            name = f"ref/fio-file/{sc.workload}"
            fields = dict(transport="host", backend="fio", rw=sc.rw, bs=sc.bs, qd=sc.qd)
            measure = lambda: refs.fio(self.wd.file("raw"), sc.rw, sc.bs, sc.qd, rt)  # noqa: E731
        elif sc.transport == "kernel" and refs.kublk_path():
            name = f"ref/kublk-null/{sc.workload}/q{sc.queues}"
            fields = dict(transport="kernel", backend="kublk-null", rw=sc.rw, bs=sc.bs, qd=sc.qd, queues=sc.queues)
            measure = lambda: refs.kublk_fio(["-t", "null"], sc.rw, sc.bs, sc.qd, rt, sc.queues)  # noqa: E731
        else:
            name = f"ref/nop/qd{sc.qd}"
            fields = dict(transport="host", backend="nop", rw="nop", bs=0, qd=sc.qd)
            measure = lambda: self._nop.run(sc.qd, rt)  # noqa: E731
        return self._reference(name, fields, measure)

    def reference2(self, sc: Scenario) -> dict | None:
        """The second reference row of a scenario, or None: for a mode's row, the row
        without the mode from this round (one not measured has no figures); for qcow2,
        qemu-img bench, qemu's own qcow2 driver, on the same image. Call it only while no
        server has the image open."""
        if sc.mode:
            return self._served.get(sc.base_name, dict(name=sc.base_name, status="not measured", iops=None))
        if sc.file_format != "qcow2":
            return None
        fields = dict(transport="host", backend="qemu-img", rw=sc.rw, bs=sc.bs, qd=sc.qd)
        return self._reference(f"ref/qemu-img/{sc.workload}", fields, lambda: refs.qemu_img_bench(
            self.wd.file("qcow2"), "qcow2", sc.rw, sc.bs, sc.qd, self.runtime, self.wd.size))

    def _reference(self, name: str, fields: dict, measure: Callable[[], dict]) -> dict:
        if name not in self._refs:
            self.progress(name)
            try:
                row = make_row(name, "reference", figures=measure(), **fields)
            except (refs.RefUnavailable, OSError, ValueError, TimeoutError) as e:
                row = make_row(name, "reference", status="skipped", reason=str(e), **fields)
            except Exception as e:  # a reference failing must not end the run
                row = make_row(name, "reference", status="failed", reason=f"{type(e).__name__}: {e}", **fields)
            self._refs[name] = self._emit(row)
        return self._refs[name]

    # -- servers -------------------------------------------------------------------------

    def _device(self, sc: Scenario, transport):
        """A Device for the scenario (not started), or why not (a str): the backend cannot be
        built from the bench's options or its server cannot run, or Device refuses the pair."""
        try:
            backend = make_backend(sc.backend, self.wd.file, self.services.backend_args)
        except (ValueError, OSError, ServiceUnavailable) as e:
            return str(e)
        dev = make_device(sc, backend, transport)
        if isinstance(dev, str):
            backend.close()
        return dev

    def _measure(self, sc: Scenario, transport, dev) -> dict:
        try:
            dev.start()
        except BaseException:
            dev.backend.close()
            raise
        try:
            if sc.transport == "sim":
                buffer = shared_buffer(dev, sc.qd * sc.bs) if sc.shared else None
                cpu0 = time.process_time()
                r = transport.run_load(dev.dev_id, rw=sc.rw, bs=sc.bs, qd=sc.qd, runtime=self.runtime,
                                       buffer=buffer)
                cpu = time.process_time() - cpu0
                fig = dict(iops=float(r["iops"]), mbps=float(r["mbps"]), lat_p50_us=float(r["lat_p50_us"]),
                           lat_p99_us=float(r["lat_p99_us"]), lat_p999_us=float(r["lat_p999_us"]),
                           ios=int(r["completed"]), errors=int(r["errors"]),
                           seconds=float(r["seconds"]), cpu_s=cpu, hist=compact_hist(r["hist"]))
                if buffer is not None:
                    fig["note"] = in_place_note(dev.shared_requests, fig["ios"])
                return fig
            blk = transport.block_path(dev.dev_id)
            end = time.monotonic() + 10
            while not os.path.exists(blk):
                if time.monotonic() > end:
                    raise TimeoutError(f"{blk} did not appear within 10 s (udev?)")
                time.sleep(0.02)
            cpu0 = time.process_time()
            r = refs.fio(blk, sc.rw, sc.bs, sc.qd, self.runtime)
            r["cpu_s"] += time.process_time() - cpu0   # fio's usr+sys plus our server threads
            return r
        finally:
            dev.stop()

    def run_scenario(self, sc: Scenario, transport) -> dict:
        """Measure one scenario (and its reference first); never raises but KeyboardInterrupt."""
        fields = scenario_fields(sc)
        if isinstance(transport, TransportUnavailable):
            return self._emit(make_row(sc.name, "server", status="skipped", reason=str(transport), **fields))
        try:
            dev = self._device(sc, transport)
            if isinstance(dev, str):
                return self._emit(make_row(sc.name, "server", status="skipped", reason=dev, **fields))
            try:
                ref = self.reference(sc)
            except BaseException:
                dev.backend.close()
                raise
            self.progress(sc.name)
            fig = self._measure(sc, transport, dev)
            ref2 = self.reference2(sc)      # the server has closed the image by now
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            return self._emit(make_row(sc.name, "server", status="failed", reason=f"{type(e).__name__}: {e}",
                                       **fields))
        row = make_row(sc.name, "server", figures=fig, **fields)
        for suffix, r in (("", ref), ("2", ref2)):
            if r is None:
                continue
            row[f"reference{suffix}"] = r["name"]
            if r["status"] == "ok" and r["iops"]:
                row[f"reference{suffix}_iops"] = r["iops"]
                row[f"ratio{suffix}"] = row["iops"] / r["iops"]
        return self._emit(row)

    def run(self, scenarios: list[Scenario]) -> bool:
        """Run them all, grouped by transport; False if interrupted by Ctrl-C (rows so far are kept)."""
        by_transport: dict[str, list[Scenario]] = {}
        for sc in scenarios:
            by_transport.setdefault(sc.transport, []).append(sc)
        try:
            for name, group in by_transport.items():
                try:
                    transport = open_transport(name)
                except TransportUnavailable as e:
                    transport = e
                except Exception as e:
                    transport = TransportUnavailable(f"{name} transport: {type(e).__name__}: {e}")
                try:
                    for sc in group:
                        self.run_scenario(sc, transport)
                finally:
                    if not isinstance(transport, Exception):
                        transport.close()
        except KeyboardInterrupt:
            return False
        return True


class Progress:
    """A progress bar (rich) below the rows while the console is a terminal; nothing when it
    is not (a pipe, a CI log), so that gets the rows alone. Rows printed on the same console
    while it runs appear above it. Call it with what is being measured."""

    def __init__(self, total: int, console: Console):
        self._bar = rich.progress.Progress(
            rich.progress.MofNCompleteColumn(), rich.progress.BarColumn(bar_width=20),
            rich.progress.TimeElapsedColumn(), rich.progress.TextColumn("{task.description}", markup=False),
            console=console, transient=True, disable=not console.is_terminal)
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> "Progress":
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def row_done(self, row: dict) -> None:
        if row["kind"] == "server":
            self._bar.advance(self._task)

    def __call__(self, what: str) -> None:
        self._bar.update(self._task, description=f"{what} ...", refresh=True)
