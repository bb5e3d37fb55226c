"""The Backend base class users subclass to make a block device.

Override what you support; the rest fails with EOPNOTSUPP. Each handler may be a
plain function or an ``async def``: each request then runs as its own task on its
queue's ring, awaiting ring I/O (``pyublk_fast.aio``) while the queue serves the
others. Capabilities are class attributes read once when the device starts.
"""
from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, NamedTuple, TypeVar

from . import uapi
from .errors import BackendError
from .transport.base import RequestLimits
from .util import PAGE_SIZE as PAGE

MIN_SEGMENT = uapi.UBLK_MIN_SEGMENT_SIZE

#: What a handler returns: None (done), or what completes the request once awaited (an
#: ``async def`` handler's coroutine, or one ``aio`` operation).
HandlerResult = Awaitable[object] | None


class Request(NamedTuple):
    """One block request, as handed to Backend.handle_batch."""
    op: int                    #: uapi.UBLK_IO_OP_* (READ 0, WRITE 1, FLUSH 2, DISCARD 3, WRITE_ZEROES 5)
    offset: int                #: bytes
    length: int                #: bytes
    buf: memoryview | None     #: the request's data (fill it for READ); None for FLUSH/DISCARD/WRITE_ZEROES
    fua: bool                  #: the write must be durable when it completes
    tag: int = -1              #: its tag on its queue (which request slot: logs, debugging)


class Backend:
    """A block device's contents. Offsets and lengths are in bytes, block aligned."""

    #: Size of the device in bytes (a multiple of block_size). Set it in __init__ or as a class attribute.
    size: int = 0
    #: Logical block size in bytes: 512, 1024, 2048 or 4096.
    block_size: int = 512
    # Capabilities (read once at start).
    #: The device refuses writes.
    read_only: bool = False
    #: The device has a volatile write cache: the kernel sends FLUSH (flush()).
    can_flush: bool = True
    #: The device takes DISCARD (discard()).
    can_discard: bool = False
    #: The device takes WRITE_ZEROES (write_zeroes()).
    can_write_zeroes: bool = False
    #: The device takes FUA writes (a Python backend's write() is then followed by flush()).
    can_fua: bool = False
    #: Data paths it serves besides the buffered ones (copy, need_get_data, user_copy, which
    #: every backend gets): "zero_copy", "splice_zc". A Python backend that declares them
    #: moves request data only with aio's pread_request/pwrite_request (its handlers get
    #: an unmapped buf whose len() is the request's: its pages are not in the server).
    data_paths: tuple[str, ...] = ()
    #: A pyublk_fast.aio.ExtentMap the backend keeps up to date (Python backends): reads
    #: and writes without FUA inside one extent it has published are served in C, without
    #: the handlers (docs/python-backends.md, "Serving from an extent map").
    extent_map: Any = None
    # Request limits (read once at start; 0 leaves the driver's): the block layer splits and
    # aligns I/O so that every request meets them, e.g. to match a backing device's own.
    #: Request buffers start at a multiple of this many bytes (a power of two, 2..4096);
    #: O_DIRECT users of the block device must then align their buffers to it too.
    dma_alignment: int = 0
    #: Segments (runs of contiguous memory) a request has at most, 1..65535.
    max_segments: int = 0
    #: Bytes a segment has at most (4096 or more).
    max_segment_size: int = 0
    #: No segment crosses a multiple of this many bytes (a power of two, 4096 or more).
    segment_boundary: int = 0
    #: How long (µs) each queue thread polls its ring before sleeping when the Device is
    #: not told (None: the Device's DEFAULT_POLL_US). A backend whose completions come
    #: from threads of its own (a library's callbacks, through an eventfd) sets 0: a
    #: polling queue thread only takes CPU from the threads it waits for.
    poll_us: float | None = None
    #: The format of the file its ``-f/--file`` option names, if it takes one: "raw" (any
    #: file or block device) or "qcow2". Tools that make scratch devices (the bench) create
    #: a file of that format and pass it as ``--file``.
    file_format: str | None = None

    # -- the command line (``python -m pyublk_fast add -t NAME ...``) ---------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this backend's own options to parser (the CLI's common options are taken:
        -n -q -d -z -u -g ...). Default: none."""

    @classmethod
    def summary(cls) -> str:
        """One line on the backend for listings (``add --help``, the bench): the first line
        of its docstring."""
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "Backend":
        """Build the backend from the options add_arguments declared (ns holds exactly
        those). Raise ValueError with a one-line message for a value it cannot use."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from command-line options: "
                                  "it defines no from_args() classmethod")

    def read(self, offset: int, buf: memoryview) -> HandlerResult:
        """Fill buf (len(buf) bytes) with the device's contents at offset."""
        raise BackendError(errno.EOPNOTSUPP)

    def write(self, offset: int, data: memoryview) -> HandlerResult:
        """Store data at offset. data is only valid during the call."""
        raise BackendError(errno.EOPNOTSUPP)

    def flush(self) -> HandlerResult:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> HandlerResult:
        """Release the blocks of [offset, offset + length) (declare ``can_discard``)."""
        raise BackendError(errno.EOPNOTSUPP)

    def write_zeroes(self, offset: int, length: int) -> HandlerResult:
        """Make [offset, offset + length) read as zeros (declare ``can_write_zeroes``)."""
        raise BackendError(errno.EOPNOTSUPP)

    def handle_batch(self, requests: list[Request]) -> list:
        """Optional: serve a whole reaped batch in one call (override to opt in).

        Return one result per request: None (success), the bytes done, or -errno;
        raise BackendError to fail them all with its errno.
        """
        raise NotImplementedError

    def resize(self, new_size: int) -> None:
        """Grow to ``new_size`` bytes (a larger multiple of block_size) and set ``size``:
        ``Device.resize`` calls it, then tells the driver. It runs while the queues serve
        requests, so it must be safe against the handlers running meanwhile. Default: the
        backend cannot change its size."""
        raise BackendError(errno.EOPNOTSUPP, f"{type(self).__name__} cannot change its size "
                           "(it defines no resize())")

    def native_target(self):
        """A NativeTarget serving this backend in C without the GIL, or None."""
        return None

    def close(self) -> None:
        """Release resources when the device is deleted."""

    def check(self) -> None:
        """Validate the declared geometry and limits; raises ValueError naming the problem."""
        name = type(self).__name__
        if self.block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"{name}.block_size={self.block_size}: must be 512, 1024, 2048 or 4096")
        if self.size <= 0 or self.size % self.block_size:
            raise ValueError(f"{name}.size={self.size}: must be a positive multiple of "
                             f"block_size={self.block_size}")
        a, b = self.dma_alignment, self.segment_boundary
        if a and (a & (a - 1) or not 2 <= a <= PAGE):
            # 1 would be a mask of 0, which the block layer takes as 512
            raise ValueError(f"{name}.dma_alignment={a}: must be a power of two from 2 to {PAGE}")
        if not 0 <= self.max_segments <= 0xFFFF:
            raise ValueError(f"{name}.max_segments={self.max_segments}: must be 1..65535")
        if self.max_segment_size and not MIN_SEGMENT <= self.max_segment_size <= 0xFFFFFFFF:
            raise ValueError(f"{name}.max_segment_size={self.max_segment_size}: must be at least "
                             f"{MIN_SEGMENT} (and fit 32 bits)")
        if b and (b & (b - 1) or not MIN_SEGMENT <= b <= 1 << 63):
            raise ValueError(f"{name}.segment_boundary={b}: must be a power of two, at least {MIN_SEGMENT}")

    def request_limits(self) -> RequestLimits | None:
        """The declared request limits as SET_PARAMS carries them (None: none declared)."""
        limits = RequestLimits(dma_alignment=self.dma_alignment - 1 if self.dma_alignment else None,
                               seg_boundary_mask=self.segment_boundary - 1 if self.segment_boundary else None,
                               max_segment_size=self.max_segment_size or None,
                               max_segments=self.max_segments or None)
        return limits if limits.types else None


#: Installed distributions add backends through entry points of this group: the name is the
#: backend's, the object a Backend subclass or a module whose import registers it.
ENTRY_POINT_GROUP = "pyublk_fast.backends"
_REGISTRY: dict[str, type] = {}


_B = TypeVar("_B", bound=type)


def register(name: str) -> Callable[[_B], _B]:
    """Class decorator: make a backend available by name (CLI ``add -t NAME``, bench)."""
    def deco(cls: _B) -> _B:
        _REGISTRY[name] = cls
        return cls
    return deco


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every backend by name, sorted: registered ones and those entry points declare."""
    from . import backends  # noqa: F401  (registers the shipped ones)
    return sorted(set(_REGISTRY) | set(_entry_points()))


def backend_class(name: str) -> type:
    """The backend registered as name, loading its entry point the first time it is asked."""
    from . import backends  # noqa: F401  (registers the shipped ones)
    if name not in _REGISTRY:
        ep = _entry_points().get(name)
        if ep is not None:
            _load(ep)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}") from None


def _load(ep: metadata.EntryPoint) -> None:
    where = f"backend {ep.name!r} (entry point {ep.value} in group {ENTRY_POINT_GROUP})"
    try:
        obj = ep.load()
    except Exception as exc:   # an installed plugin's bug: name it, never a traceback
        raise ValueError(f"{where}: cannot load it: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, type) and issubclass(obj, Backend) and ep.name not in _REGISTRY:
        register(ep.name)(obj)
    if ep.name not in _REGISTRY:
        raise ValueError(f"{where}: loading it registered no backend of that name (point it at "
                         "a Backend subclass, or at a module that uses @register)")


_UNITS = {"t": 1 << 40, "g": 1 << 30, "m": 1 << 20, "k": 1 << 10}


def parse_size(text: str) -> int:
    """'64M', '1G', '2KiB', '1.5k', '4096' -> bytes (units k, m, g, t: powers of 1024).

    Raises argparse.ArgumentTypeError (argparse prints its message as is)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in _UNITS:
            return int(float(t[:-1]) * _UNITS[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64M, 1G, 4096") from None


def format_size(n: int) -> str:
    """The inverse of parse_size in the largest exact unit: 4096 -> '4k', 250 << 30 -> '250g'."""
    for unit, mult in _UNITS.items():
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


class SizedBackend(Backend):
    """A backend whose one option is its size: ``-s/--size``, default DEFAULT_SIZE (the
    backend's own), built as cls(size)."""

    DEFAULT_SIZE: int = 0

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("-s", "--size", type=parse_size, default=cls.DEFAULT_SIZE, metavar="SIZE",
                            help=f"device size, e.g. 1G (default {format_size(cls.DEFAULT_SIZE)})")

    @classmethod
    def from_args(cls, ns):
        return cls(ns.size)


class FileBackend(Backend):
    """A backend serving one file: the required ``-f/--file`` (made absolute: a daemon serves
    from /), built as cls(path) once the file exists; else the error says how to make one
    (CREATE_HINT, a command with {file} in it)."""

    file_format = "raw"
    CREATE_HINT = "truncate -s 1G {file}"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("-f", "--file", required=True, type=os.path.abspath, metavar="FILE",
                            help=f"backing file, {cls.file_format} (required)")

    @classmethod
    def from_args(cls, ns):
        if not os.path.exists(ns.file):
            raise ValueError(f"{ns.file}: no such file (create it, e.g. "
                             f"`{cls.CREATE_HINT.format(file=ns.file)}`)")
        return cls(ns.file)
