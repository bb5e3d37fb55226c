"""A device server's process: serve until told to stop, in the foreground or as a daemon.

``serve`` starts (or recovers) a device, records it (pyublk_fast.records) and serves until
SIGTERM/SIGINT or until the device is stopped from outside; then it stops and deletes the
device. ``daemonize`` runs a server in a double-forked daemon and returns what the server
reported through a pipe: its device once it serves I/O, or why it could not start, so the
command that started it exits only then, with the right status.

While it serves, a server answers requests on its control socket (``ask_server``): a
Unix socket in the abstract namespace named after the state directory and the device,
one JSON line each way, from root or the server's own user only. ``quiesce`` hands the
device over (the server quiesces it, closes the backend, answers and exits, leaving the
device QUIESCED and its record for ``recover``); ``resize`` grows it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
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
    rec = dict(record, dev_id=dev.dev_id, pid=os.getpid(), block=block,
               data_path=dev.data_path, flags=dev.flags, started=time.time())
    write_record(dev.dev_id, rec)
    control = _listen(dev.dev_id)
    report({"ok": True, "dev_id": dev.dev_id, "path": block, "pid": os.getpid(),
            "data_path": dev.data_path})
    published = StatsFile(stats_path(dev.dev_id), dev.nr_queues)
    quiesced = False
    try:
        while not stop and not quiesced:
            published.publish(dev.stats())
            if not dev.serving:
                log.info("device %d was stopped from outside; exiting", dev.dev_id)
                break
            if select.select([control] if control else [], [], [], 0.2)[0]:
                quiesced = _answer(control, dev, rec)
    finally:
        published.remove()
        if control is not None:
            control.close()
    if quiesced:             # the device waits for `recover`, which needs its record
        log.info("device %d quiesced: exiting for a new server to recover it", dev.dev_id)
        transport.close()
        return 0
    try:
        dev.stop()
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            log.error("stopping device %d: %s", dev.dev_id, exc)
    finally:
        drop_record(dev.dev_id, os.getpid())
        transport.close()
    return 0


# ---- the control socket ---------------------------------------------------------------
#: Longest request or reply line.
_MAX_LINE = 1 << 16


def control_address(dev_id: int) -> str:
    """The abstract socket name of device dev_id's server: one per state directory, so a
    command with another PYUBLK_FAST_RUN_DIR never reaches it (nothing on disk to clean up
    after a kill -9)."""
    tag = hashlib.sha256(os.path.realpath(state_dir()).encode()).hexdigest()[:16]
    return f"\0pyublk_fast-{tag}-{dev_id}"


def _listen(dev_id: int) -> socket.socket | None:
    """The server's control socket, or None (logged) if it cannot have one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(control_address(dev_id))
        sock.listen(4)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.error("device %d: no control socket (%s): quiesce, upgrade and resize cannot "
                  "reach this server", dev_id, exc)
        return None
    return sock


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk or len(buf) + len(chunk) > _MAX_LINE:
            raise ValueError("no complete request line")
        buf += chunk
    return buf


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


def _answer(control: socket.socket, dev, rec: dict[str, Any]) -> bool:
    """Answer one request on the control socket; True once the device is quiesced (the
    server then exits without deleting it)."""
    try:
        conn, _ = control.accept()
    except BlockingIOError:
        return False
    quiesced = False
    with conn:
        conn.settimeout(5.0)
        try:
            line = _read_line(conn)
            if _peer_uid(conn) not in (0, os.geteuid()):
                reply = {"ok": False, "error": "only root or the server's own user may ask"}
            else:
                reply, quiesced = _run_request(json.loads(line), dev, rec)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError) as exc:    # the asker went away or sent nonsense
            log.warning("device %d: control request: %s", dev.dev_id, describe(exc))
    return quiesced


def _run_request(req: dict[str, Any], dev, rec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(reply, quiesced) for one request."""
    op = req.get("op") if isinstance(req, dict) else None
    log.info("device %d: control request %s", dev.dev_id, req)
    try:
        if op == "quiesce":
            dev.quiesce()
            dev.backend.close()
            return {"ok": True}, True
        if op == "resize":
            dev.resize(req.get("size"))
            size = dev.info().size
            # a backend whose size is an option is rebuilt by `recover` with the new one
            if "size" in rec.get("backend_args", {}):
                rec["backend_args"]["size"] = size
                write_record(dev.dev_id, rec)
            return {"ok": True, "size": size}, False
    except Exception as exc:                     # noqa: BLE001 - told to the asker
        log.error("device %d: %s failed: %s", dev.dev_id, op, describe(exc))
        return {"ok": False, "error": describe(exc)}, False
    return {"ok": False, "error": f"unknown request {op!r} (this server knows quiesce and "
                                  "resize)"}, False


def ask_server(dev_id: int, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``request`` to device dev_id's server and return its reply ({"ok": ...}).
    OSError (ConnectionRefusedError: no server listens) or TimeoutError if it cannot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(control_address(dev_id))
        sock.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(_read_line(sock))


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
