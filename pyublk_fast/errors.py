"""Exceptions: BackendError for backends, and one way to turn -errno into OSError."""
import errno as _errno
import os


class BackendError(Exception):
    """Raise from a backend handler to fail the request with this errno (no log)."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno


def oserror(err: int, what: str, hint: str = "") -> OSError:
    """The OSError subclass for a positive errno, naming the operation and the fix."""
    msg = f"{what}: {os.strerror(err)}"
    if hint:
        msg += f" ({hint})"
    return OSError(err, msg)


def raise_errno(res: int, what: str, hint: str = "") -> int:
    """Return res when >= 0, else raise the OSError for -res."""
    if res < 0:
        raise oserror(-res, what, hint)
    return res


ENOTSUP = _errno.EOPNOTSUPP
