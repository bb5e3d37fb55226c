"""The Backend base class users subclass to make a block device.

Override what you support; the rest fails with EOPNOTSUPP. Each handler may be a
plain function or an ``async def`` (the awaitables of one batch run concurrently on
the queue thread's own event loop). Capabilities are class attributes read once
when the device starts.
"""
from __future__ import annotations

import errno
from typing import NamedTuple

from .errors import BackendError


class Request(NamedTuple):
    """One block request, as handed to Backend.handle_batch."""
    op: int                    #: uapi.UBLK_IO_OP_* (READ 0, WRITE 1, FLUSH 2, DISCARD 3, WRITE_ZEROES 5)
    offset: int                #: bytes
    length: int                #: bytes
    buf: memoryview | None     #: the request's data (fill it for READ); None for FLUSH/DISCARD/WRITE_ZEROES
    fua: bool                  #: the write must be durable when it completes


class Backend:
    """A block device's contents. Offsets and lengths are in bytes, block aligned."""

    #: Size of the device in bytes (a multiple of block_size). Set it in __init__ or as a class attribute.
    size: int = 0
    #: Logical block size in bytes: 512, 1024, 2048 or 4096.
    block_size: int = 512
    #: Capabilities (read once at start).
    read_only: bool = False
    can_flush: bool = True
    can_discard: bool = False
    can_write_zeroes: bool = False
    can_fua: bool = False
    #: Data paths its native target can serve besides the buffered ones (copy, need_get_data,
    #: user_copy, which every backend gets): "zero_copy", "splice_zc".
    data_paths: tuple[str, ...] = ()

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill buf (len(buf) bytes) with the device's contents at offset."""
        raise BackendError(errno.EOPNOTSUPP)

    def write(self, offset: int, data: memoryview) -> None:
        """Store data at offset. data is only valid during the call."""
        raise BackendError(errno.EOPNOTSUPP)

    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        raise BackendError(errno.EOPNOTSUPP)

    def write_zeroes(self, offset: int, length: int) -> None:
        raise BackendError(errno.EOPNOTSUPP)

    def handle_batch(self, requests: list[Request]) -> list:
        """Optional: serve a whole reaped batch in one call (override to opt in).

        Return one result per request: None (success), the bytes done, or -errno;
        raise BackendError to fail them all with its errno.
        """
        raise NotImplementedError

    def native_target(self):
        """A NativeTarget serving this backend in C without the GIL, or None."""
        return None

    def close(self) -> None:
        """Release resources when the device is deleted."""

    def check(self) -> None:
        """Validate the declared geometry; raises ValueError naming the problem."""
        if self.block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"{type(self).__name__}.block_size={self.block_size}: must be 512, 1024, 2048 or 4096")
        if self.size <= 0 or self.size % self.block_size:
            raise ValueError(f"{type(self).__name__}.size={self.size}: must be a positive multiple of "
                             f"block_size={self.block_size}")


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a backend available by name (CLI, bench)."""
    def deco(cls):
        _REGISTRY[name] = cls
        return cls
    return deco


def backend_class(name: str) -> type:
    from . import backends  # noqa: F401  (registers the shipped ones)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(_REGISTRY)}") from None
