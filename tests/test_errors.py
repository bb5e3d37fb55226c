"""errors.os_error: an errno (either sign) plus what failed and a hint -> the right OSError."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pyublk_fast.errors import errno_message, os_error


@pytest.mark.parametrize("err, cls", [
    (errno.ENOENT, FileNotFoundError), (errno.EACCES, PermissionError),
    (errno.EPERM, PermissionError), (errno.EEXIST, FileExistsError),
    (errno.ETIMEDOUT, TimeoutError), (errno.EAGAIN, BlockingIOError), (errno.EIO, OSError),
])
def test_subclass_follows_the_errno_of_either_sign(err, cls):
    for e in (err, -err, np.int32(-err)):
        exc = os_error(e, "START_DEV", "retry later")
        assert type(exc) is cls and exc.errno == err
        assert exc.strerror == f"START_DEV: {os.strerror(err)} (retry later)"


def test_message_without_hint_and_with_filename():
    assert errno_message(-errno.EBUSY, "DEL_DEV") == f"DEL_DEV: {os.strerror(errno.EBUSY)}"
    exc = os_error(errno.ENOENT, "open /dev/x", "load the driver", "/dev/x")
    assert exc.filename == "/dev/x"
    assert str(exc) == (f"[Errno {errno.ENOENT}] open /dev/x: {os.strerror(errno.ENOENT)} "
                        "(load the driver): '/dev/x'")


@pytest.mark.parametrize("bad", [0, True, 1.0, "5", None])
def test_rejects_what_is_not_an_errno(bad):
    with pytest.raises(ValueError, match="nonzero errno"):
        os_error(bad, "x")
