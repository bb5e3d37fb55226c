"""Errors: BackendError for backends, and the one way an errno becomes an OSError.

Hot code speaks bytes-or-``-errno``; at the edge :func:`os_error` turns an errno into
Python's OSError subclass for it (``PermissionError``, ``FileNotFoundError``, ...) whose
message says what failed, the strerror and, where there is one, a hint that names the
fix. Callers raise what it returns (``raise os_error(...) from None`` when the message
already says everything the caught exception did).
"""
from __future__ import annotations

import numbers
import os

from . import uapi
from .util import kernel_release


class BackendError(Exception):
    """Raise from a backend handler to fail the request with this errno (no log).

    ``errno`` is a positive errno number (``errno.ENOSPC``); the kernel-style negative
    form (``-errno.ENOSPC``) is accepted too. Anything else is a ValueError, so a slip
    can never turn a failed request into a success."""

    def __init__(self, errno: int, message: str = ""):
        if isinstance(errno, bool) or not isinstance(errno, int) or not 0 < abs(errno) < 4096:
            raise ValueError(f"BackendError({errno!r}): give an errno number such as errno.EIO (1..4095)")
        errno = abs(errno)
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno


def errno_message(err: int, what: str, hint: str | None = None) -> str:
    """``"<what>: <strerror>"``, then ``" (<hint>)"`` when there is a hint."""
    text = f"{what}: {os.strerror(abs(err))}"
    return f"{text} ({hint})" if hint else text


def os_error(err: int, what: str, hint: str | None = None,
             filename: str | None = None) -> OSError:
    """The OSError for errno ``err`` (positive, or the kernel's negative form).

    ``what`` names what failed (a command, "read at offset 0, 4096 bytes on /dev/ublkb0");
    ``hint`` what to do about it. Python picks the subclass from the errno (EACCES:
    PermissionError, ENOENT: FileNotFoundError, ETIMEDOUT: TimeoutError, ...)."""
    if isinstance(err, bool) or not isinstance(err, numbers.Integral) or err == 0:
        raise ValueError(f"os_error({err!r}): give a nonzero errno number")
    err = abs(int(err))
    msg = errno_message(err, what, hint)
    return OSError(err, msg) if filename is None else OSError(err, msg, filename)


def missing_features_message(missing: int, what: str = "", driver: str = "kernel") -> str:
    """``"kernel 6.12 lacks UBLK_F_QUIESCE (Linux 6.16+), ..."`` for the UBLK_F_* bits in
    ``missing``: each with the first kernel that has it, so the user knows what to run.
    ``driver`` names a driver that is not the running kernel (the simulated one)."""
    parts = []
    for bit in range(64):
        flag = 1 << bit
        if not missing & flag:
            continue
        if flag & uapi.SIM_FEATURE_MASK:
            parts.append("SPLICE_ZC (the seed's splice zero copy exists only "
                         "on the simulated driver: the RFC was never merged; use zero_copy "
                         "or user_copy)")
        else:
            ver = uapi.KERNEL_VERSION_OF_FEATURE.get(flag, "?")
            parts.append(f"UBLK_F_{uapi.feature_names(flag)[0]} (Linux {ver}+)")
    head = f"{what}: " if what else ""
    who = f"kernel {kernel_release()}" if driver == "kernel" else f"the {driver} driver"
    return f"{head}{who} lacks " + ", ".join(parts)
