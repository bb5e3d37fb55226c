"""BackendError: what a backend raises to fail one request with a chosen errno."""
import os


class BackendError(Exception):
    """Raise from a backend handler to fail the request with this errno (no log)."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno
