"""BackendError: what a backend raises to fail one request with a chosen errno."""
import os


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
