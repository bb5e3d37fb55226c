"""Run test code as another user: fork, drop to the uid, send back the result or the error."""
from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback

import pytest


def as_user(uid: int, fn, *args, timeout: float = 120, cwd: str = "/tmp"):
    """fn(*args) in a forked child running as uid/gid ``uid`` with no groups (in ``cwd``);
    returns its result or re-raises its exception (type, errno and message kept)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.chdir(cwd)
            out = ("ok", fn(*args))
        except BaseException as exc:                      # noqa: BLE001 - sent to the parent
            err = getattr(exc, "errno", None)
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            out = ("err", type(exc).__name__, err, msg, traceback.format_exc())
        try:
            data = pickle.dumps(out)
        except Exception as exc:                          # noqa: BLE001
            data = pickle.dumps(("err", "PicklingError", None, str(exc), ""))
        with os.fdopen(w, "wb") as fh:         # length first: a daemon forked by fn
            fh.write(len(data).to_bytes(8, "little") + data)   # keeps the pipe open
        os._exit(0)
    os.close(w)
    got = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb", buffering=0) as fh:
        while len(got) < 8 or len(got) < 8 + int.from_bytes(got[:8], "little"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fh], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"{fn.__name__} as uid {uid} did not finish within {timeout} s")
            chunk = fh.read(1 << 16)
            if not chunk:
                pytest.fail(f"{fn.__name__} as uid {uid} died without an answer")
            got += chunk
    os.waitpid(pid, 0)
    out = pickle.loads(got[8:])
    if out[0] == "ok":
        return out[1]
    _, name, err, msg, tb = out
    cls = {"PermissionError": PermissionError, "ValueError": ValueError,
           "FileNotFoundError": FileNotFoundError}.get(name, OSError if err else RuntimeError)
    exc = cls(err, msg) if err is not None and issubclass(cls, OSError) else cls(msg)
    if cls is RuntimeError:
        exc = RuntimeError(f"{name}: {msg}\n{tb}")
    raise exc
