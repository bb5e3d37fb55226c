"""``python -m pyublk_fast``: add, list, delete and recover real ublk devices (like ublksrv's ``ublk``).

    python -m pyublk_fast add -t loop -f disk.img      # prints /dev/ublkbN once it is live
    python -m pyublk_fast list [--json]
    python -m pyublk_fast del -n N | -a
    python -m pyublk_fast recover -n N                 # after the server died (needs --recovery)
    python -m pyublk_fast features

``add`` daemonizes (double fork); the server reports the device id or its
failure through a pipe, so ``add`` returns only once /dev/ublkbN serves I/O.
Each server keeps a JSON record under the state directory (/run/pyublk_fast,
or $PYUBLK_FAST_RUN_DIR) for ``list`` and ``recover``.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from .transport.kernel import pid_alive

TARGETS = ("null", "loop", "qcow2", "memory")
RECOVERY_MODES = ("fail", "reissue", "fail_io")
log = logging.getLogger("pyublk_fast.cli")


class CliError(Exception):
    """A user-facing error: printed as `pyublk_fast: <message>`, exit status 1."""


# ---- state records ---------------------------------------------------------------------------
def state_dir() -> str:
    """Where per-device JSON records live."""
    env = os.environ.get("PYUBLK_FAST_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/pyublk_fast"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pyublk_fast-{os.geteuid()}"
    return os.path.join(base, "pyublk_fast")


def _record_path(dev_id: int) -> str:
    return os.path.join(state_dir(), f"{dev_id}.json")


def read_record(dev_id: int) -> dict[str, Any] | None:
    """The JSON record of device dev_id, or None."""
    try:
        with open(_record_path(dev_id)) as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(dev_id: int, rec: dict[str, Any]) -> None:
    os.makedirs(state_dir(), exist_ok=True)
    tmp = _record_path(dev_id) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1)
    os.replace(tmp, _record_path(dev_id))


def drop_record(dev_id: int, pid: int | None = None) -> None:
    """Remove the record (only if it still names ``pid``, when given)."""
    rec = read_record(dev_id)
    if rec is not None and pid is not None and rec.get("pid") != pid:
        return
    try:
        os.unlink(_record_path(dev_id))
    except FileNotFoundError:
        pass


# ---- building the server -----------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64M, 1G, 4096") from None


def make_backend(target: str, file: str | None, size: int | None):
    """The backend for ``-t target [-f file] [--size]``."""
    import pyublk_fast.backends  # noqa: F401  (registers the shipped backends)
    from pyublk_fast.backend import backend_class
    if target in ("loop", "qcow2"):
        if not file:
            raise CliError(f"-t {target} needs a backing file: -f FILE")
        if not os.path.exists(file):
            raise CliError(f"{file}: no such file (create it, e.g. `truncate -s 1G {file}`"
                           + (" or `qemu-img create -f qcow2 FILE 1G`" if target == "qcow2" else "")
                           + ")")
        return backend_class(target)(file)
    if file:
        raise CliError(f"-t {target} takes no backing file (-f is for loop and qcow2)")
    if target == "null":
        return backend_class("null")(size or 250 << 30)
    return backend_class("memory")(size or 256 << 20)


def data_path_of(opts: dict[str, Any]) -> str:
    if opts.get("zero_copy"):
        return "zero_copy"
    if opts.get("user_copy"):
        return "user_copy"
    return "copy"


def build_device(opts: dict[str, Any], transport, recover_info: dict[str, Any] | None = None):
    """A Device for the record/options ``opts`` (shape fixed by the kernel when recovering)."""
    from pyublk_fast.device import Device
    backend = make_backend(opts["target"], opts.get("file"), opts.get("size"))
    queues, depth = opts["queues"], opts["depth"]
    max_io = opts.get("max_io_bytes", 512 << 10)
    if recover_info is not None:
        queues, depth = recover_info.nr_hw_queues, recover_info.queue_depth
        max_io = recover_info.max_io_buf_bytes
    return Device(backend, transport, queues=queues, depth=depth, max_io_bytes=max_io,
                  data_path=data_path_of(opts), recovery=opts.get("recovery"),
                  dev_id=opts.get("dev_id", -1), native=not opts.get("python", False),
                  poll_us=opts.get("poll_us"), submit_chunk=opts.get("submit_chunk", 4))


def _transport(opts: dict[str, Any]):
    from pyublk_fast.transport.kernel import KernelTransport
    return KernelTransport(unprivileged=bool(opts.get("unprivileged")))


# ---- the server process ----------------------------------------------------------------------------
def serve(opts: dict[str, Any], report, recover: bool = False) -> int:
    """Start (or recover) the device, call report(message dict), serve until SIGTERM/SIGINT
    or until the device is stopped from outside; then stop and delete it cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    transport = dev = None
    try:
        transport = _transport(opts)
        if recover:
            info = transport.dev_info(opts["dev_id"])
            dev = build_device(opts, transport, info)
            dev.recover()
        else:
            dev = build_device(opts, transport)
            dev.start()
    except BaseException as exc:   # noqa: BLE001 - reported to the parent
        if dev is not None and not recover:
            try:
                dev.stop()
            except Exception:
                pass
        if transport is not None:
            transport.close()
        report({"ok": False, "error": _describe(exc)})
        return 1
    rec = dict(opts, dev_id=dev.dev_id, pid=os.getpid(), block=transport.block_path(dev.dev_id),
               data_path=dev.data_path, flags=dev.flags, started=time.time())
    write_record(dev.dev_id, rec)
    report({"ok": True, "dev_id": dev.dev_id, "path": rec["block"], "pid": os.getpid(),
            "data_path": dev.data_path})
    while not stop.wait(0.2):
        if not dev.serving:
            log.info("device %d was stopped from outside; exiting", dev.dev_id)
            break
    try:
        dev.stop()
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            log.error("stopping device %d: %s", dev.dev_id, exc)
    finally:
        drop_record(dev.dev_id, os.getpid())
        transport.close()
    return 0


def _describe(exc: BaseException) -> str:
    """One line for the user: the OSError's own message, else the exception text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, (CliError, ValueError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def daemonize_and_serve(opts: dict[str, Any], recover: bool = False) -> dict[str, Any]:
    """Double-fork a server; returns what it reported (ok + dev_id/path, or error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # intermediate
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _become_daemon(opts)
            out = os.fdopen(w, "w")

            def report(msg: dict[str, Any]) -> None:
                out.write(json.dumps(msg) + "\n")
                out.flush()
                out.close()
            code = serve(opts, report, recover=recover)
        except BaseException as exc:                   # noqa: BLE001
            try:
                os.write(w, (json.dumps({"ok": False, "error": _describe(exc)}) + "\n").encode())
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


def _become_daemon(opts: dict[str, Any]) -> None:
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


# ---- commands ----------------------------------------------------------------------------------
def _opts_from_args(a: argparse.Namespace) -> dict[str, Any]:
    file = os.path.abspath(a.file) if getattr(a, "file", None) else None
    return dict(target=a.type, file=file, size=a.size, dev_id=a.number, queues=a.queues,
                depth=a.depth, zero_copy=a.zero_copy, user_copy=a.user_copy,
                unprivileged=a.unprivileged, recovery=a.recovery, python=a.python,
                max_io_bytes=a.max_io, poll_us=a.poll_us, submit_chunk=a.submit_chunk)


def cmd_add(a: argparse.Namespace) -> int:
    if a.zero_copy and a.user_copy:
        raise CliError("-z (zero copy) and -u (user copy) exclude each other")
    if a.unprivileged and (a.zero_copy or a.user_copy):
        raise CliError("--unprivileged devices cannot use -z or -u (the kernel refuses them): "
                       "with USER_COPY or zero copy the server reads and writes request pages "
                       "through /dev/ublkcN, which the kernel trusts only a privileged server "
                       "with; drop -z/-u to use the copy data path")
    if a.unprivileged and a.recovery:
        raise CliError("--unprivileged devices cannot use --recovery: the kernel drops "
                       "USER_RECOVERY for them (an untrusted server could stall error handling)")
    opts = _opts_from_args(a)
    make_backend(opts["target"], opts["file"], opts["size"]).close()   # early, clear errors
    if a.foreground:
        def report(msg: dict[str, Any]) -> None:
            if msg["ok"]:
                print(msg["path"], flush=True)
            else:
                print(f"pyublk_fast: {msg['error']}", file=sys.stderr, flush=True)
        return serve(opts, report)
    msg = daemonize_and_serve(opts)
    if not msg["ok"]:
        raise CliError(msg["error"])
    print(msg["path"])
    return 0


def cmd_recover(a: argparse.Namespace) -> int:
    rec = read_record(a.number) or {}
    opts = dict(rec)
    if a.type:
        opts["target"] = a.type
    if a.file:
        opts["file"] = os.path.abspath(a.file)
    if "target" not in opts:
        raise CliError(f"no record of device {a.number} in {state_dir()}: say what serves it "
                       "with -t TYPE [-f FILE]")
    opts["dev_id"] = a.number
    old = rec.get("pid")
    if old and pid_alive(old):
        raise CliError(f"device {a.number}'s server (pid {old}) is still running: nothing to "
                       "recover")
    with _transport(opts) as t:
        info = t.dev_info(a.number)
    from pyublk_fast import uapi
    if not info.flags & uapi.UBLK_F_USER_RECOVERY:
        raise CliError(f"device {a.number} was added without --recovery: it cannot be "
                       "recovered (delete it with `del -n {a.number}`)")
    opts["recovery"] = opts.get("recovery") or "reissue"
    opts["zero_copy"] = bool(info.flags & uapi.UBLK_F_SUPPORT_ZERO_COPY)
    opts["user_copy"] = bool(info.flags & uapi.UBLK_F_USER_COPY)
    opts.setdefault("queues", info.nr_hw_queues)
    opts.setdefault("depth", info.queue_depth)
    if a.foreground:
        return serve(opts, lambda m: print(m.get("path") or m.get("error"), flush=True),
                     recover=True)
    msg = daemonize_and_serve(opts, recover=True)
    if not msg["ok"]:
        raise CliError(msg["error"])
    print(msg["path"])
    return 0


def delete_device(t, dev_id: int, timeout: float) -> None:
    """Ask the server to stop (SIGTERM) and wait; else stop and delete via the control device."""
    rec = read_record(dev_id) or {}
    pid = rec.get("pid")
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if dev_id in t.list_devs():
        try:
            t.stop_dev(dev_id)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                log.debug("STOP_DEV %d: %s", dev_id, exc)
        t.del_dev(dev_id, timeout=timeout)
    drop_record(dev_id)


def cmd_del(a: argparse.Namespace) -> int:
    if a.all == (a.number is not None):
        raise CliError("say which device: del -n ID, or del -a for all")
    with _transport({}) as t:
        ids = t.list_devs() if a.all else [a.number]
        if not a.all and a.number not in ids:
            drop_record(a.number)
            raise CliError(f"there is no ublk device {a.number} (see `list`)")
        for dev_id in ids:
            delete_device(t, dev_id, a.timeout)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    rows = []
    with _transport({}) as t:
        for dev_id in t.list_devs():
            try:
                info = t.dev_info(dev_id).as_dict()
            except OSError as exc:
                info = {"dev_id": dev_id, "error": str(exc)}
            rec = read_record(dev_id) or {}
            info.update({k: rec.get(k) for k in ("target", "file", "data_path")})
            info["server_pid"] = rec.get("pid")
            rows.append(info)
    if a.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if not rows:
        print("no ublk devices")
    for r in rows:
        if "error" in r:
            print(f"dev {r['dev_id']}: {r['error']}")
            continue
        print(f"dev {r['dev_id']}: {r['block_path']} {r['state_name']} queues {r['nr_hw_queues']} "
              f"depth {r['queue_depth']} size {r['size'] >> 20} MiB pid {r['pid']} "
              f"target {r.get('target') or '?'} {r.get('file') or ''}".rstrip())
        print(f"    flags {r['flags']:#x} {' '.join(r['features'])}")
    return 0


def cmd_features(a: argparse.Namespace) -> int:
    from pyublk_fast import uapi
    from pyublk_fast.transport.kernel import KernelTransport
    with KernelTransport() as t:
        feats = t.features()
    if a.json:
        print(json.dumps({"features": feats, "names": uapi.feature_names(feats),
                          "kernel": os.uname().release}))
        return 0
    print(f"{feats:#x} (kernel {os.uname().release})")
    for name in uapi.feature_names(feats):
        print(f"    {name}")
    return 0


# ---- argument parsing ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyublk_fast",
                                description="Serve real ublk block devices (/dev/ublkbN) from Python.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add = sub.add_parser("add", help="add and serve a device; prints /dev/ublkbN once live",
                         description="Add a ublk device served by a backend and print its block "
                         "device path once it serves I/O. The server runs as a daemon unless "
                         "--foreground.")
    add.add_argument("-t", "--type", required=True, choices=TARGETS, help="backend")
    add.add_argument("-f", "--file", help="backing file (loop, qcow2)")
    add.add_argument("-s", "--size", type=parse_size, help="size for null/memory (e.g. 1G)")
    _shape_args(add)
    add.set_defaults(func=cmd_add)

    rec = sub.add_parser("recover", help="serve a device again after its server died",
                         description="Start a new server for a device whose server died (the "
                         "device must have been added with --recovery). Backend from the "
                         "device's record unless -t/-f are given.")
    rec.add_argument("-n", "--number", type=int, required=True, help="device id")
    rec.add_argument("-t", "--type", choices=TARGETS, help="backend (default: as recorded)")
    rec.add_argument("-f", "--file", help="backing file (default: as recorded)")
    rec.add_argument("--foreground", action="store_true", help="serve in the foreground")
    rec.set_defaults(func=cmd_recover)

    d = sub.add_parser("del", help="stop and delete devices",
                       description="Stop a device's server (SIGTERM) and delete the device.")
    d.add_argument("-n", "--number", type=int, help="device id")
    d.add_argument("-a", "--all", action="store_true", help="every ublk device")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    d.set_defaults(func=cmd_del)

    ls = sub.add_parser("list", help="list ublk devices", description="List ublk devices.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    f = sub.add_parser("features", help="what the running kernel's ublk driver supports",
                       description="Print the ublk driver's feature flags (GET_FEATURES).")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_features)
    return p


def _shape_args(p: argparse.ArgumentParser) -> None:
    from pyublk_fast.device import DEFAULT_POLL_US
    p.add_argument("-n", "--number", type=int, default=-1, help="device id (default: next free)")
    p.add_argument("-q", "--queues", type=int, default=1, help="hardware queues (default 1)")
    p.add_argument("-d", "--depth", type=int, default=128, help="queue depth (default 128)")
    p.add_argument("--max-io", type=parse_size, default=512 << 10,
                   help="largest request in bytes (default 512K)")
    p.add_argument("-z", "--zero-copy", action="store_true",
                   help="zero copy (Linux 6.15+; AUTO_BUF_REG on 6.16+; native backends: null, loop)")
    p.add_argument("-u", "--user-copy", action="store_true", help="USER_COPY data path (6.5+)")
    p.add_argument("--unprivileged", action="store_true",
                   help="UNPRIVILEGED_DEV: a normal user's device, owned by it (needs udev "
                   "rules: /dev/ublk-control open to users, /dev/ublkcN and /dev/ublkbN "
                   "chowned to the owner; no -z, -u or --recovery; as root the kernel makes "
                   "a privileged device)")
    p.add_argument("--recovery", nargs="?", const="reissue", choices=RECOVERY_MODES,
                   help="allow `recover` after the server dies (default mode: reissue)")
    p.add_argument("--python", action="store_true",
                   help="serve with the Python handlers even if the backend is native")
    p.add_argument("--poll-us", type=float, default=DEFAULT_POLL_US,
                   help="poll each queue's ring up to this many microseconds before sleeping "
                   "(adaptive: an idle queue stops polling; it yields to other runnable "
                   f"threads; 0 always sleeps; default {DEFAULT_POLL_US:g})")
    p.add_argument("--submit-chunk", type=int, default=4,
                   help="submit queued I/O every N requests while handling a batch (default 4; "
                   "larger: fewer syscalls, smaller: the backing disk starts sooner)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in the foreground until SIGINT/SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="pyublk_fast: %(message)s")
    for name in ("queues", "depth", "submit_chunk"):
        v = getattr(a, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
    if (getattr(a, "poll_us", None) or 0) < 0:
        parser.error(f"--poll-us must be >= 0 (got {a.poll_us})")
    try:
        return a.func(a)
    except CliError as exc:
        print(f"pyublk_fast: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"pyublk_fast: {_describe(exc)}", file=sys.stderr)
        return 1
