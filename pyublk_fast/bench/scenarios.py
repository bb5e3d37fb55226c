"""The scenario matrix: transport x backend x workload x data path x queues x mode, and selection.

A scenario's name is ``transport/backend/rw-bs-qdN/path/qN[/mode]``, e.g.
``sim/loop/randread-4k-qd32/zero_copy/q1``; ``--scenario`` patterns match it with fnmatch.
The mode (see MODES) is a further setting of the device or of the load, such as batch
I/O; a row without one (the device's defaults) has no mode part, so ``.../q1`` never
matches a mode's row and ``.../q1/*`` matches only those.
The full matrix is reachable with ``--all`` or patterns; without selectors a curated
default set runs (``--quick``: a smaller one). Pairs a backend cannot serve stay in the
matrix: Device refuses them (ValueError/OSError) and the row is skipped with its reason.
"""
from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..backend import Backend, backend_class, backend_names, format_size, parse_size

TRANSPORTS = ("sim", "kernel")
PATHS = ("copy", "user_copy", "zero_copy", "splice_zc")
RWS = ("randread", "randwrite", "read", "write")
QUEUES = (1, 2)
#: Default axes: random I/O at 4 KiB and three depths, sequential at 128 KiB, QD32.
RAND_BS, SEQ_BS = (4096,), (131072,)
RAND_QD, SEQ_QD = (1, 32, 128), (32,)


#: The mode axis: "" (none: Device's defaults) or a setting the row is measured with, as
#: Device keywords. "batch": BATCH_IO, commands for many tags at once, against the command
#: per tag of the row without a mode. "shm": SHMEM_ZC, the load does its I/O from a buffer
#: the device shares (registered with register_shared_buffer), so the driver copies
#: nothing, against the copying row without a mode. "t2": two threads serve the queue
#: (PER_IO_DAEMON, tags split between them), against one. A setting that combines with
#: another gets a name of its own joined by "+" (e.g. "shm+t2").
MODES: dict[str, dict] = {
    "": {},
    "batch": dict(batch_io=True),
    "shm": dict(shared_buffers=True),
    "t2": dict(threads_per_queue=2),
}
#: Modes whose load must run from the device's shared buffer.
SHARED_MODES = ("shm",)


#: A native backend served by its Python handlers instead (Device(native=False)) is on the
#: backend axis as NAME-py: the cost of one Python call per request.
PY = "-py"


def backend_axis() -> list[str]:
    """The backend axis: every registered backend (pyublk_fast.backend), each native one
    that also has Python handlers followed by its NAME-py variant."""
    out = []
    for name in backend_names():
        out += [name, name + PY] if _has_native(name) and _has_python(name) else [name]
    return out


def _has_native(name: str) -> bool:
    """Whether backend NAME has a native target (not one that fails to load: its rows say why)."""
    try:
        return backend_class(name).native_target is not Backend.native_target
    except ValueError:
        return False


def _has_python(name: str) -> bool:
    """Whether backend NAME serves requests in Python too (handlers of its own)."""
    cls = backend_class(name)
    return cls.read is not Backend.read or cls.handle_batch is not Backend.handle_batch


class _BenchArgs(argparse.ArgumentParser):
    """A backend's own option parser, raising instead of exiting: a backend the bench cannot
    build is a skipped row with the reason."""

    def error(self, message):
        raise ValueError(message)


def make_backend(name: str, file: Callable[[str], str], server_args: Callable[[str], list[str]] = lambda n: []
                 ) -> Backend:
    """Build a backend of the axis as `add -t NAME` does, from its own options: --file, a
    scratch file of its file_format from file(format), when it serves one; else the options
    server_args(name) gives (the server the bench started for it: nbd's --uri)."""
    cls = backend_class(name.removesuffix(PY))
    parser = _BenchArgs(prog=f"-t {name}", add_help=False)
    cls.add_arguments(parser)
    argv = ["--file", file(cls.file_format)] if cls.file_format else server_args(name)
    return cls.from_args(parser.parse_args(argv))


def parse_bs(text: str) -> int:
    """A block size: parse_size's units, a multiple of 512 up to the devices' max I/O."""
    n = parse_size(text)
    if n < 512 or n % 512 or n > 512 * 1024:
        raise ValueError(f"block size {text!r}: must be a multiple of 512 between 512 and 512k "
                         f"(the devices' max I/O)")
    return n


@dataclass(frozen=True)
class Scenario:
    """One measured server configuration."""

    transport: str
    backend: str
    rw: str
    bs: int
    qd: int
    path: str
    queues: int
    mode: str = ""
    default: bool = field(default=False, compare=False)
    quick: bool = field(default=False, compare=False)

    @property
    def workload(self) -> str:
        return f"{self.rw}-{format_size(self.bs)}-qd{self.qd}"

    @property
    def name(self) -> str:
        base = f"{self.transport}/{self.backend}/{self.workload}/{self.path}/q{self.queues}"
        return f"{base}/{self.mode}" if self.mode else base

    @property
    def base_name(self) -> str:
        """The name of the same row without its mode (what a mode's row is compared with)."""
        return self.name.removesuffix(f"/{self.mode}")

    @property
    def device_options(self) -> dict:
        """Device keywords beyond the axes: the mode's."""
        return MODES[self.mode]

    @property
    def shared(self) -> bool:
        """Whether the load runs from a buffer the device shares."""
        return self.mode in SHARED_MODES

    def refusal(self) -> str | None:
        """Why the bench cannot measure this mode here (Device's own refusals aside)."""
        if self.shared and self.transport != "sim":
            return (f"mode {self.mode!r} runs on the simulated driver only: on a kernel the load (fio) "
                    "would need its buffers in the shared memory")
        return None

    @property
    def native(self) -> bool:
        """Served by its native target: not a NAME-py variant nor a backend without one."""
        return not self.backend.endswith(PY) and _has_native(self.backend)

    @property
    def file_format(self) -> str | None:
        """The format of the backend's backing file, if it serves one."""
        return backend_class(self.backend.removesuffix(PY)).file_format


def _default_marks() -> dict[tuple, str]:
    """(backend, rw, bs, qd, path, queues, mode) -> 'd' (default) or 'q' (default and quick)."""
    marks: dict[tuple, str] = {}

    def add(backend, rw, bs, qd, path="copy", queues=1, quick=False, mode=""):
        marks[(backend, rw, bs, qd, path, queues, mode)] = "q" if quick else "d"

    k4, k128 = 4096, 131072
    for be in ("null", "loop"):
        for qd in RAND_QD:
            add(be, "randread", k4, qd, quick=be == "null" or qd == 32)
        add(be, "read", k128, 32, quick=True)
        add(be, "write", k128, 32)
        add(be, "randread", k4, 128, queues=2, quick=be == "null")
        for path in PATHS[1:]:
            add(be, "randread", k4, 32, path)
            add(be, "read", k128, 32, path, quick=path == "zero_copy" or (be, path) == ("null", "splice_zc"))
            add(be, "write", k128, 32, path)
    add("null", "randwrite", k4, 32)
    for qd in RAND_QD:
        add("loop", "randwrite", k4, qd, quick=qd == 32)
    for qd in RAND_QD:
        add("null-py", "randread", k4, qd, quick=qd == 32)
    add("null-py", "randwrite", k4, 32)
    add("null-py", "randread", k4, 32, "user_copy")
    add("null-aio", "randread", k4, 32, quick=True)
    add("loop-py", "randread", k4, 32, quick=True)
    add("loop-py", "randwrite", k4, 32)
    add("loop-py", "read", k128, 32)
    add("loop-py", "randread", k4, 32, "user_copy")
    add("qcow2", "randread", k4, 32, quick=True)
    add("qcow2", "randwrite", k4, 32)
    add("qcow2", "read", k128, 32)
    add("memory", "randread", k4, 32, quick=True)
    add("memory", "randwrite", k4, 32)
    # each against fio's nbd engine on the same export (the server starts in milliseconds);
    # the other workloads: NBD_PATTERN
    add("nbd", "randread", k4, 32, quick=True)
    add("nbd", "randwrite", k4, 32)
    # batch I/O and shared buffers next to the rows without a mode (above); the rest of the
    # modes' rows by --mode (docs/bench.md), to keep the default set's time
    add("null", "randread", k4, 32, quick=True, mode="batch")
    add("null", "read", k128, 32, mode="shm")
    add("loop", "read", k128, 32, mode="shm")
    for be in ("null", "loop"):
        add(be, "randread", k4, 128, mode="t2")
    # rbd rows start a Ceph cluster (10-30 s): in neither set, see RBD_PATTERN
    return marks


#: Every workload of nbd and rbd, one queue, copy (4 KiB random I/O at QD1/32/128, 128 KiB
#: sequential at QD32): `--scenario PATTERN`.
NBD_PATTERN = "sim/nbd/*/copy/q1"
RBD_PATTERN = "sim/rbd/*/copy/q1"


DEFAULT_MARKS = _default_marks()


def matrix(transports: Iterable[str] = ("sim",), bs: Iterable[int] | None = None,
           qd: Iterable[int] | None = None) -> list[Scenario]:
    """Every scenario; bs/qd replace the default axes (for both random and sequential I/O)."""
    out = []
    axis = backend_axis()
    for tr in transports:
        for be in axis:
            for rw in RWS:
                rand = rw.startswith("rand")
                for b in (tuple(bs) if bs else RAND_BS if rand else SEQ_BS):
                    for d in (tuple(qd) if qd else RAND_QD if rand else SEQ_QD):
                        for path in PATHS:
                            for nq in QUEUES:
                                for mode in MODES:
                                    mark = DEFAULT_MARKS.get((be, rw, b, d, path, nq, mode), "")
                                    out.append(Scenario(tr, be, rw, b, d, path, nq, mode,
                                                        default=bool(mark), quick=mark == "q"))
    return out


def _match(value: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


#: --mode's name for the rows without a mode.
NO_MODE = "none"


def mode_label(mode: str) -> str:
    """A mode as --mode names it: NO_MODE for the rows without one."""
    return mode or NO_MODE


def select(*, transports=("sim",), patterns=None, backends=None, rws=None, bs=None, qd=None,
           paths=None, queues=None, modes=None, everything=False, quick=False) -> list[Scenario]:
    """The scenarios to run, in run order.

    patterns (fnmatch on the name) pick from the full matrix; so do everything=True and
    bs/qd (which set those axes). Otherwise the default set (quick: its quick subset).
    backends/rws/paths/modes are fnmatch patterns too (modes: NO_MODE for rows without
    one); queues a list of ints.
    """
    mode_names = [mode_label(m) for m in MODES]
    for name, allowed in (("backend", backend_axis()), ("rw", RWS), ("path", PATHS), ("mode", mode_names)):
        pats = {"backend": backends, "rw": rws, "path": paths, "mode": modes}[name]
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(a, p) for a in allowed):
                raise ValueError(f"--{name} {p!r} matches nothing: choose from {', '.join(allowed)}")
    for n in queues or ():
        if n not in QUEUES:
            raise ValueError(f"--queues {n}: choose from {', '.join(map(str, QUEUES))}")
    for t in transports:
        if t not in TRANSPORTS:
            raise ValueError(f"transport {t!r}: choose sim, kernel or all")
    full = matrix(transports, bs, qd)
    if patterns:
        base = [s for s in full if _match(s.name, patterns)]
    elif everything or bs or qd:
        base = full
    else:
        base = [s for s in full if (s.quick if quick else s.default)]
    return [s for s in base
            if _match(s.backend, backends) and _match(s.rw, rws) and _match(s.path, paths)
            and _match(mode_label(s.mode), modes) and (not queues or s.queues in queues)]


def make_device(sc: Scenario, backend: Backend, transport):
    """The scenario's Device (not started), or why not (a str): the bench cannot measure the
    mode here, or Device refuses the backend/path/mode/transport combination."""
    from ..device import Device
    if why := sc.refusal():
        return why
    try:
        return Device(backend, transport, queues=sc.queues, depth=max(128, sc.qd), data_path=sc.path,
                      native=sc.native, **sc.device_options)
    except (ValueError, OSError) as e:
        return str(e)


def unsupported(sc: Scenario, backend: Backend, transport) -> str | None:
    """Why the scenario cannot run (see make_device), or None if it can."""
    dev = make_device(sc, backend, transport)
    return dev if isinstance(dev, str) else None


def describe(scenarios: list[Scenario], reasons: dict[str, str]) -> list[str]:
    """Lines for --list: marks (* default, q quick), name, and why a pair is unsupported."""
    lines = [f"{len(scenarios)} scenarios  (* in the default set, q also in --quick; "
             f"'--all' lists the full matrix)"]
    for s in scenarios:
        mark = "q" if s.quick else "*" if s.default else " "
        why = reasons.get(s.name)
        lines.append(f"{mark} {s.name}" + (f"   [skipped: {why}]" if why else ""))
    lines.append("backends: " + "; ".join(f"{name} = {about(name)}" for name in backend_axis()))
    return lines


def about(name: str) -> str:
    """One line on a backend of the axis: its class's summary (NAME-py: its Python handlers)."""
    if name.endswith(PY):
        return f"{name.removesuffix(PY)} served by its Python handlers (native=False)"
    try:
        return backend_class(name).summary().rstrip(".")
    except ValueError as e:
        return str(e)

