"""A device server's process: serve until told to stop, in the foreground or as a daemon.

``serve`` starts (or recovers) a device, records it (pyublk_fast.records) and serves until
SIGTERM/SIGINT or until the device is stopped from outside; then it stops and deletes the
device. ``daemonize`` runs a server in a double-forked daemon and returns what the server
reported through a pipe: its device once it serves I/O, or why it could not start, so the
command that started it exits only then, with the right status.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
from typing import Any, Callable

from .records import drop_record, state_dir, write_record
from .stats import StatsFile, stats_path

log = logging.getLogger("pyublk_fast.daemon")
Report = Callable[[dict[str, Any]], None]


def describe(exc: BaseException) -> str:
    """One line for the user: an OSError's own message, the text of an error that is the
    user's to fix (ValueError, OSError, NotImplementedError), else type and text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, (ValueError, OSError, NotImplementedError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def serve(start: Callable[[], tuple[Any, Any]], report: Report, record: dict[str, Any]) -> int:
    """Run a server: ``start()`` returns (transport, device) with the device started or
    recovered (cleaning up after itself if it fails). report(message) is told once: ok with
    dev_id/path/pid/data_path, or not ok with the error. The device's record is ``record``
    plus what the server knows (dev_id, pid, block path, data path, flags)."""
    stop: list[int] = []              # the signals received
    for sig in (signal.SIGTERM, signal.SIGINT):
        # only note it: a handler that takes a lock (threading.Event.set) deadlocks when the
        # signal lands while this thread holds that same lock (inside Event.wait)
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    try:
        transport, dev = start()
    except BaseException as exc:   # noqa: BLE001 - reported to whoever started the server
        report({"ok": False, "error": describe(exc)})
        return 1
    block = transport.block_path(dev.dev_id)
    write_record(dev.dev_id, dict(record, dev_id=dev.dev_id, pid=os.getpid(), block=block,
                                  data_path=dev.data_path, flags=dev.flags, started=time.time()))
    report({"ok": True, "dev_id": dev.dev_id, "path": block, "pid": os.getpid(),
            "data_path": dev.data_path})
    published = StatsFile(stats_path(dev.dev_id), dev.nr_queues)
    while not stop:
        published.publish(dev.stats())
        if not dev.serving:
            log.info("device %d was stopped from outside; exiting", dev.dev_id)
            break
        time.sleep(0.2)
    published.remove()
    try:
        dev.stop()
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            log.error("stopping device %d: %s", dev.dev_id, exc)
    finally:
        drop_record(dev.dev_id, os.getpid())
        transport.close()
    return 0


def daemonize(run: Callable[[Report], int]) -> dict[str, Any]:
    """Double-fork a daemon that calls run(report) and exits with its status; returns the
    message it reported (ok + dev_id/path, or the error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # intermediate
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _become_daemon()
            out = os.fdopen(w, "w")

            def report(msg: dict[str, Any]) -> None:
                out.write(json.dumps(msg) + "\n")
                out.flush()
                out.close()
            code = run(report)
        except BaseException as exc:                   # noqa: BLE001
            try:
                os.write(w, (json.dumps({"ok": False, "error": describe(exc)}) + "\n").encode())
            except OSError:
                pass
            code = 1
        os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as fh:
        line = fh.readline()
    if not line:
        return {"ok": False, "error": "the server exited without reporting (see its log in "
                f"{state_dir()})"}
    return json.loads(line)


def _become_daemon() -> None:
    """No terminal, cwd /, stdout and stderr to a log in the state directory."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.makedirs(state_dir(), exist_ok=True)
    logf = os.open(os.path.join(state_dir(), f"server-{os.getpid()}.log"),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    os.close(null)
    os.close(logf)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
