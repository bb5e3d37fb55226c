"""``python -m pyublk_fast``: add, list, delete and recover real ublk devices (like ublksrv's ``ublk``).

    python -m pyublk_fast add -t loop -f disk.img      # prints /dev/ublkbN once it is live
    python -m pyublk_fast list [--json]
    python -m pyublk_fast del -n N | -a [--force]      # not while open or mounted, unless --force
    python -m pyublk_fast recover -n N                 # after the server died (needs --recovery)
    python -m pyublk_fast quiesce -n N                 # the server hands the device over, exits
    python -m pyublk_fast upgrade -n N                 # a new server (this code) takes over
    python -m pyublk_fast resize -n N -s SIZE          # grow a live device
    python -m pyublk_fast features
    python -m pyublk_fast udev-rules                   # udev rules for --unprivileged devices

Backends declare themselves (pyublk_fast.backend: ``@register``, ``add_arguments``,
``from_args``): ``add -t NAME`` takes the common options and NAME's own, and ``add --help``
lists every target with its options, as kublk's help does. Installed packages add
backends through entry points (group ``pyublk_fast.backends``); ``--module MOD`` imports
a module that registers some. Device options default to Device's own defaults and are
checked by Device, before anything is opened. The server runs in pyublk_fast.daemon; its
records (for ``list`` and ``recover``) are pyublk_fast.records. ``quiesce``, ``upgrade``
and ``resize`` ask the server on its control socket (pyublk_fast.daemon.ask_server).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Sequence

from . import stats, uapi, udev
from .backend import backend_class, backend_names, format_size, parse_size
from .daemon import ask_server, daemonize, describe, serve
from .device import PATH_FLAGS, DEFAULT_BATCH_IO, DEFAULT_POLL_US, RECOVERY_MODES, Device
from .records import drop_record, read_record, state_dir
from .transport.kernel import UNPRIVILEGED_REFUSES, KernelTransport, pid_alive
from .util import wait_until

PROG = "python -m pyublk_fast"
log = logging.getLogger("pyublk_fast.cli")


class CliError(ValueError):
    """A user-facing error: printed as `pyublk_fast: <message>`, exit status 1."""


# ---- backends ----------------------------------------------------------------------------------
def _import_modules(modules: Sequence[str]) -> None:
    """--module MOD: import modules whose import registers backends."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:   # the user's module: one line, never a traceback
            raise CliError(f"--module {mod}: cannot import it: {type(exc).__name__}: {exc}") from exc


def backend_parser(name: str, command: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of backend NAME's own options (``COMMAND -t NAME ...``). ``common`` is the
    command's parser: an option of the backend that the command already has is refused."""
    cls = backend_class(name)
    p = argparse.ArgumentParser(prog=f"{PROG} {command} -t {name}", add_help=False,
                                allow_abbrev=False)
    cls.add_arguments(p.add_argument_group(f"-t {name}", cls.summary()))
    try:
        argparse.ArgumentParser(add_help=False, parents=[common, p])
    except argparse.ArgumentError as exc:
        raise CliError(f"backend {name!r} declares an option `{command}` already has: {exc}") from None
    return p


def targets_help(command: str, common: argparse.ArgumentParser) -> str:
    """Every target with its own options (kublk's help prints each target's usage)."""
    parts = ["targets (-t NAME, then its own options):"]
    for name in backend_names():
        try:
            p = backend_parser(name, command, common)
            p.usage = argparse.SUPPRESS
            parts.append(p.format_help().strip("\n"))
        except (ValueError, NotImplementedError) as exc:
            parts.append(f"-t {name}: unavailable: {describe(exc)}")
    return "\n\n".join(parts)


class _TargetsHelp(argparse.Action):
    """-h/--help of add and recover: the usual help, then every target's options."""

    def __init__(self, option_strings, dest):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="show this help with every target's options, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\n" + targets_help(parser.prog.split()[-1], parser))
        parser.exit()


def backend_args(name: str, command: str, common: argparse.ArgumentParser,
                 argv: list[str]) -> dict[str, Any]:
    """Backend NAME's options parsed from argv (what the command did not take)."""
    ns, rest = backend_parser(name, command, common).parse_known_args(argv)
    if rest:
        raise CliError(f"-t {name} takes no {' '.join(rest)} (`{command} --help` shows each "
                       "target's options)")
    return vars(ns)


def make_backend(opts: dict[str, Any]):
    """The backend of a server's options (its record): the registry builds it."""
    return backend_class(opts["target"]).from_args(argparse.Namespace(**opts["backend_args"]))


# ---- devices ------------------------------------------------------------------------------------
def device_defaults() -> dict[str, Any]:
    """Device's keyword defaults: the CLI's defaults are Device's (its signature)."""
    return {k: p.default for k, p in inspect.signature(Device).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_options(opts: dict[str, Any]) -> None:
    """Build the backend and the Device now: bad options fail in the command, in one line,
    before a server is started. The rules are the backend's, Device's and the kernel
    transport's own (UNPRIVILEGED_REFUSES)."""
    try:
        json.dumps(opts)
    except TypeError as exc:
        raise CliError(f"-t {opts['target']}: its options must be JSON values so that "
                       f"`recover` can rebuild the backend ({exc})") from None
    backend = make_backend(opts)
    try:
        flags = Device(backend, None, **opts["device"]).wanted_flags()
    finally:
        backend.close()
    refused = [why for flag, why in UNPRIVILEGED_REFUSES.items() if flags & flag]
    if opts["unprivileged"] and refused:
        raise CliError("--unprivileged devices cannot use -z or -u, nor --recovery: "
                       + "; ".join(refused))


def data_path_of(flags: int) -> str:
    """The data path a device was added with, from its UBLK_F_* flags (by Device's table)."""
    return next((path for path, flag in PATH_FLAGS.items() if flag and flags & flag), "copy")


def start_server(opts: dict[str, Any], recover: bool = False):
    """(transport, device) started, or recovered with the shape the kernel kept."""
    transport = KernelTransport(unprivileged=opts["unprivileged"])
    backend = None
    try:
        backend = make_backend(opts)
        dev = Device(backend, transport, **opts["device"])     # recover() takes the kept shape
        dev.recover() if recover else dev.start()
    except BaseException:
        if backend is not None:
            backend.close()
        transport.close()
        raise
    return transport, dev


def run_server(opts: dict[str, Any], foreground: bool, recover: bool = False) -> int:
    """Serve in the foreground, or start a daemon and print what it reported."""
    if foreground:
        return serve(lambda: start_server(opts, recover), _print_report, opts)
    msg = daemonize(lambda report: serve(lambda: start_server(opts, recover), report, opts))
    if not msg["ok"]:
        raise CliError(msg["error"])
    print(msg["path"])
    return 0


def _print_report(msg: dict[str, Any]) -> None:
    if msg["ok"]:
        print(msg["path"], flush=True)
    else:
        print(f"pyublk_fast: {msg['error']}", file=sys.stderr, flush=True)


# ---- commands ----------------------------------------------------------------------------------
def add_options(a: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """A server's options (its record) from `add`'s arguments: the backend's and Device's."""
    args = backend_args(a.type, "add", a.parser, extra)
    paths = sorted(set(a.data_paths or ()))
    if len(paths) > 1:
        raise CliError("-z (zero copy), -u (user copy) and -g (need get data) exclude each "
                       "other: each picks the data path")
    defaults = device_defaults()
    device = {k: v for k, v in vars(a).items() if k in defaults}
    device["data_path"] = paths[0] if paths else defaults["data_path"]
    return dict(target=a.type, backend_args=args, modules=a.module or [],
                unprivileged=a.unprivileged, device=device)


def cmd_add(a: argparse.Namespace, extra: list[str]) -> int:
    opts = add_options(a, extra)
    check_options(opts)
    return run_server(opts, a.foreground)


def recover_options(dev_id: int, rec: dict[str, Any], a: argparse.Namespace | None = None,
                    extra: Sequence[str] = ()) -> dict[str, Any]:
    """The options of a server recovering device dev_id: its record's, or what `recover`'s
    arguments ``a`` (-t TYPE, its options ``extra``, --module) say instead."""
    _import_modules(rec.get("modules", []))
    forced = a.type if a is not None else None
    target = forced or (rec.get("target") if "backend_args" in rec else None)
    if target is None:
        raise CliError(f"no record of device {dev_id} in {state_dir()}: say what serves it "
                       "with -t TYPE and its options")
    if forced or extra:
        args = backend_args(target, "recover", a.parser, list(extra))
    else:
        args = rec["backend_args"]
    unprivileged = bool(rec.get("unprivileged"))
    with KernelTransport(unprivileged=unprivileged) as t:
        info = t.dev_info(dev_id)
    if not info.flags & uapi.UBLK_F_USER_RECOVERY:
        raise CliError(f"device {dev_id} was added without --recovery: it cannot be "
                       f"recovered (delete it with `del -n {dev_id}`)")
    device = dict(rec.get("device") or {})
    device.update(dev_id=dev_id, data_path=data_path_of(info.flags),
                  recovery=device.get("recovery") or "reissue")
    modules = set(rec.get("modules", [])) | set((a.module if a is not None else None) or [])
    return dict(target=target, backend_args=args, modules=sorted(modules),
                unprivileged=unprivileged, device=device)


def cmd_recover(a: argparse.Namespace, extra: list[str]) -> int:
    rec = read_record(a.number) or {}
    old = rec.get("pid")
    if old and pid_alive(old):
        raise CliError(f"device {a.number}'s server (pid {old}) is still running: nothing to "
                       "recover")
    return run_server(recover_options(a.number, rec, a, extra), a.foreground, recover=True)


# ---- live operations: the running server is asked on its control socket ------------------------
def _server_of(dev_id: int) -> tuple[dict[str, Any], int]:
    """(record, pid) of device dev_id's running server, else a CliError saying so."""
    rec = read_record(dev_id)
    pid = (rec or {}).get("pid")
    if not pid or not pid_alive(pid):
        raise CliError(f"device {dev_id} has no running server in {state_dir()} (see `list`; "
                       f"a device whose server died is served again by `recover -n {dev_id}`)")
    return rec, pid


def _ask(dev_id: int, pid: int, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The server's successful reply to ``request``, else a CliError with its error."""
    try:
        reply = ask_server(dev_id, request, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise CliError(f"device {dev_id}'s server (pid {pid}) has no control socket (it may "
                       "predate quiesce/upgrade/resize, or could not make one: see its log in "
                       f"{state_dir()})") from None
    except TimeoutError:
        raise CliError(f"device {dev_id}'s server (pid {pid}) did not answer within "
                       f"{timeout:g} s (see its log in {state_dir()})") from None
    if not reply.get("ok"):
        raise CliError(f"device {dev_id}: {reply.get('error')}")
    return reply


def _quiesce(dev_id: int, pid: int, timeout: float) -> None:
    """Have the server quiesce the device and exit (Device.quiesce refuses what cannot be)."""
    _ask(dev_id, pid, {"op": "quiesce"}, timeout)
    if not wait_until(lambda: not pid_alive(pid), timeout, 0.01):
        raise CliError(f"device {dev_id} is quiesced but its server (pid {pid}) did not exit "
                       f"within {timeout:g} s")


def cmd_quiesce(a: argparse.Namespace, extra: list[str]) -> int:
    _rec, pid = _server_of(a.number)
    _quiesce(a.number, pid, a.timeout)
    print(f"device {a.number} quiesced: its I/O waits until `recover -n {a.number}`")
    return 0


def cmd_upgrade(a: argparse.Namespace, extra: list[str]) -> int:
    rec, pid = _server_of(a.number)
    if (rec.get("device") or {}).get("recovery") == "fail_io":
        raise CliError(f"device {a.number} recovers in fail_io mode: its I/O would fail while "
                       "the servers change (use quiesce and recover if that is acceptable)")
    opts = recover_options(a.number, rec)      # before the old server goes: errors stop here
    backend_class(opts["target"])
    _quiesce(a.number, pid, a.timeout)
    try:
        return run_server(opts, foreground=False, recover=True)
    except CliError as exc:
        raise CliError(f"{exc}; device {a.number} is quiesced: serve it with "
                       f"`recover -n {a.number}` once that is fixed") from None


def cmd_resize(a: argparse.Namespace, extra: list[str]) -> int:
    rec, pid = _server_of(a.number)
    reply = _ask(a.number, pid, {"op": "resize", "size": a.size}, a.timeout)
    print(f"{rec.get('block', f'device {a.number}')}: {format_size(reply['size'])}")
    return 0


def _mounts_of(dev_id: int) -> list[str]:
    """Where /dev/ublkbN is mounted (by its device number, in /proc/self/mountinfo)."""
    try:
        with open(f"/sys/block/ublkb{dev_id}/dev") as fh:
            devno = fh.read().strip()
        with open("/proc/self/mountinfo") as fh:
            return [f.split()[4] for f in fh if f.split()[2] == devno]
    except OSError:
        return []


def _held_exclusively(path: str) -> bool:
    """Whether something holds the block device exclusively (a mount, device mapper, md):
    an O_EXCL open is then refused with EBUSY. Plain openers are not seen."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False


#: How long `del` retries while the device is open: udev probes a block device briefly
#: after a writer (a file system being unmounted) closes it.
BUSY_GRACE = 1.0


def stop_unless_open(t, dev_id: int) -> None:
    """STOP_DEV the device unless its block device is open or mounted (TRY_STOP_DEV, Linux
    7.0+; before, only a mount or another exclusive holder is seen): else a CliError."""
    path = t.block_path(dev_id)
    deadline = time.monotonic() + BUSY_GRACE
    while True:
        try:
            t.try_stop_dev(dev_id)
            return
        except OSError as exc:
            if exc.errno == errno.ENODEV:        # no block device: nobody can hold it
                return
            if exc.errno == errno.EOPNOTSUPP:
                busy = _held_exclusively(path)
            elif exc.errno == errno.EBUSY:
                busy = True
            else:
                raise
        if not busy:
            return
        if time.monotonic() > deadline:
            mounts = _mounts_of(dev_id)
            where = f"mounted on {', '.join(mounts)}" if mounts else "open"
            raise CliError(f"device {dev_id} ({path}) is {where}: unmount or close it first, "
                           f"or delete it anyway with `del -n {dev_id} --force`")
        time.sleep(0.05)


def delete_device(t, dev_id: int, timeout: float, force: bool = False) -> None:
    """Stop the device (unless open or mounted, without ``force``), ask the server to stop
    (SIGTERM) and wait; else stop and delete via the control device."""
    if not force:
        stop_unless_open(t, dev_id)
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
        try:
            t.del_dev(dev_id, timeout=timeout)
        except OSError as exc:
            # a server this command did not know of (no record here) deletes its device
            # once stopped from outside: gone is what was asked for
            if exc.errno != errno.ENODEV:
                raise
    drop_record(dev_id)


def cmd_del(a: argparse.Namespace, extra: list[str]) -> int:
    if a.all == (a.number is not None):
        raise CliError("say which device: del -n ID, or del -a for all")
    busy = []
    with KernelTransport() as t:
        ids = t.list_devs() if a.all else [a.number]
        if not a.all and a.number not in ids:
            drop_record(a.number)
            raise CliError(f"there is no ublk device {a.number} (see `list`)")
        for dev_id in ids:
            try:
                delete_device(t, dev_id, a.timeout, a.force)
            except CliError as exc:      # del -a: the others are deleted all the same
                busy.append(str(exc))
    if busy:
        raise CliError("; ".join(busy))
    return 0


def cmd_list(a: argparse.Namespace, extra: list[str]) -> int:
    rows = []
    with KernelTransport() as t:
        for dev_id in t.list_devs():
            try:
                info = t.dev_info(dev_id).as_dict()
            except OSError as exc:
                info = {"dev_id": dev_id, "error": str(exc)}
            rec = read_record(dev_id) or {}
            args = rec.get("backend_args") or {}
            # "file": the backing file of a target that takes -f, which scripts look for
            info.update(target=rec.get("target"), backend_args=args, file=args.get("file"),
                        data_path=rec.get("data_path"), server_pid=rec.get("pid"))
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
        args = " ".join(f"{k}={v}" for k, v in r["backend_args"].items())
        print(f"dev {r['dev_id']}: {r['block_path']} {r['state_name']} queues {r['nr_hw_queues']} "
              f"depth {r['queue_depth']} size {r['size'] >> 20} MiB pid {r['pid']} "
              f"target {r['target'] or '?'} {args}".rstrip())
        print(f"    flags {r['flags']:#x} {' '.join(r['features'])}")
    return 0


def cmd_stats(a: argparse.Namespace, extra: list[str]) -> int:
    """Totals, then every --watch seconds (once, over --interval, without it) the rates."""
    def read():
        try:
            return stats.read_published(a.number)
        except OSError as exc:
            raise CliError(exc.strerror or str(exc)) from None

    def show(summary):
        print(json.dumps(dict(summary, dev_id=a.number)) if a.json
              else stats.format_summary(a.number, summary), flush=True)

    def export(snap):
        if a.prometheus:
            try:
                stats.write_prometheus(a.prometheus, a.number, snap)
            except ImportError:
                raise CliError("--prometheus needs the prometheus_client package "
                               "(pip install prometheus_client)") from None

    prev = read()
    export(prev)
    show(prev.summary())
    try:
        while True:
            time.sleep(a.watch or a.interval)
            cur = read()
            if cur.time <= prev.time:
                raise CliError(f"device {a.number}: its server published nothing for "
                               f"{a.watch or a.interval} s (stopped, or stuck)")
            export(cur)
            show(cur.summary(since=prev))
            if not a.watch:
                return 0
            prev = cur
    except KeyboardInterrupt:
        return 0


def cmd_features(a: argparse.Namespace, extra: list[str]) -> int:
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


def cmd_udev_owner(a: argparse.Namespace, extra: list[str]) -> int:
    print(udev.owner_of(a.dev_id), end="")
    return 0


def cmd_udev_rules(a: argparse.Namespace, extra: list[str]) -> int:
    print(udev.rules_text(), end="")
    return 0


# ---- argument parsing ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    names = backend_names()
    p = argparse.ArgumentParser(
        prog=PROG, description="Serve real ublk block devices (/dev/ublkbN) from Python.",
        epilog=f"Targets for add -t: {', '.join(names)} (`add --help` shows their options). "
        "Installed packages add more through entry points in the group pyublk_fast.backends; "
        "add/recover --module MOD imports a module that registers some.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add = sub.add_parser("add", help="add and serve a device; prints /dev/ublkbN once live",
                         add_help=False, allow_abbrev=False,
                         description="Add a ublk device served by a backend and print its block "
                         "device path once it serves I/O. The server runs as a daemon unless "
                         "--foreground. -t NAME also takes NAME's own options (listed below).")
    add.add_argument("-h", "--help", action=_TargetsHelp)
    add.add_argument("-t", "--type", required=True, choices=names, metavar="NAME",
                     help=f"the backend: {', '.join(names)}")
    _module_arg(add)
    _device_args(add)
    add.set_defaults(func=cmd_add, parser=add)

    rec = sub.add_parser("recover", help="serve a device again after its server died",
                         add_help=False, allow_abbrev=False,
                         description="Start a new server for a device whose server died (the "
                         "device must have been added with --recovery), with the backend of the "
                         "device's record; -t NAME and NAME's own options replace it.")
    rec.add_argument("-h", "--help", action=_TargetsHelp)
    rec.add_argument("-n", "--number", type=int, required=True, help="device id")
    rec.add_argument("-t", "--type", choices=names, metavar="NAME",
                     help="the backend (default: as recorded)")
    _module_arg(rec)
    rec.add_argument("--foreground", action="store_true", help="serve in the foreground")
    rec.set_defaults(func=cmd_recover, parser=rec)

    d = sub.add_parser("del", help="stop and delete devices",
                       description="Stop a device's server (SIGTERM) and delete the device. A "
                       "device whose block device is open or mounted is left alone unless "
                       "--force (Linux 7.0+ sees every opener; before, only mounts and other "
                       "exclusive holders).")
    d.add_argument("-n", "--number", type=int, help="device id")
    d.add_argument("-a", "--all", action="store_true", help="every ublk device")
    d.add_argument("--force", action="store_true",
                   help="delete it even while open or mounted (its users get I/O errors)")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    d.set_defaults(func=cmd_del)
    _live_commands(sub)

    ls = sub.add_parser("list", help="list ublk devices", description="List ublk devices.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    f = sub.add_parser("features", help="what the running kernel's ublk driver supports",
                       description="Print the ublk driver's feature flags (GET_FEATURES).")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_features)

    st = sub.add_parser("stats", help="a device's live statistics (requests, bytes, errors, latency)",
                        description="Print the statistics a CLI server publishes for its device: "
                        "totals since it started, then the rates (IOPS, MB/s, latency percentiles) "
                        "over an interval. Read from the state directory; the server is not asked.")
    st.add_argument("-n", "--number", type=int, required=True, metavar="ID", help="device id")
    st.add_argument("--json", action="store_true", help="one JSON object per line")
    st.add_argument("--interval", type=float, default=1.0, metavar="S",
                    help="seconds the rates are measured over (default 1)")
    st.add_argument("--watch", type=float, metavar="S", help="print the rates every S seconds until ^C")
    st.add_argument("--prometheus", metavar="FILE", help="also write the counters to FILE in "
                    "Prometheus' text format (for the node exporter's textfile collector), "
                    "again at every --watch")
    st.set_defaults(func=cmd_stats)

    r = sub.add_parser("udev-rules", help="print udev rules for --unprivileged devices",
                       description="Print the udev rules that let users add unprivileged "
                       "devices and give each device's nodes to its owner, with the helper "
                       f"started by this interpreter. Install: `{PROG} udev-rules | sudo tee "
                       f"/etc/udev/rules.d/{udev.RULES_NAME}`, then `sudo udevadm control "
                       "--reload`.")
    r.set_defaults(func=cmd_udev_rules)

    o = sub.add_parser("udev-owner", help="(run by the udev rules) print a device's owner",
                       description="Print UBLK_UNPRIVILEGED, UBLK_OWNER_UID and UBLK_OWNER_GID "
                       "of device N as KEY=value lines, for udev's IMPORT{program}.")
    o.add_argument("dev_id", type=int, metavar="N", help="device id (udev's %%n)")
    o.set_defaults(func=cmd_udev_owner)
    return p


def _live_commands(sub) -> None:
    """quiesce, upgrade and resize: requests to a running server."""
    q = sub.add_parser("quiesce", help="hand a device over: its server quiesces it and exits",
                       description="Ask the device's server to quiesce it (UBLK_F_QUIESCE, "
                       "Linux 6.16+; the device needs --recovery) and exit: new I/O waits "
                       "until `recover -n ID` starts a new server.")
    u = sub.add_parser("upgrade", help="replace a device's server by a new one, I/O waiting",
                       description="Quiesce the device (as `quiesce`) and recover it onto a "
                       "new server of the pyublk_fast this command runs, with the backend and "
                       "options of the device's record: I/O waits meanwhile and none is lost "
                       "(not in fail_io recovery mode, whose I/O would fail).")
    r = sub.add_parser("resize", help="grow a live device",
                       description="Grow a device while it serves (UBLK_F_UPDATE_SIZE, Linux "
                       "6.16+): its server grows the backend (loop: the file, unless already "
                       "that large; qcow2: the image's virtual size; memory), then the block "
                       "device. A file system on it can grow after (resize2fs). Shrinking is "
                       "refused.")
    for p, func in ((q, cmd_quiesce), (u, cmd_upgrade), (r, cmd_resize)):
        p.add_argument("-n", "--number", type=int, required=True, help="device id")
        if p is r:
            p.add_argument("-s", "--size", type=parse_size, required=True, metavar="SIZE",
                           help="the new size, e.g. 2G")
        p.add_argument("--timeout", type=float, default=30.0,
                       help="seconds to wait for the server (default 30)")
        p.set_defaults(func=func)


def _module_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", action="append", metavar="MOD",
                   help="import MOD first: the backends it registers can be named with -t "
                   "(repeatable)")


def _device_args(p: argparse.ArgumentParser) -> None:
    """The common options of add: each dest is a Device keyword, defaulting to Device's."""
    d = device_defaults()
    p.add_argument("-n", "--number", dest="dev_id", type=int, default=d["dev_id"], metavar="ID",
                   help="device id (default: next free)")
    p.add_argument("-q", "--queues", type=int, default=d["queues"],
                   help="hardware queues (default %(default)s)")
    p.add_argument("-d", "--depth", type=int, default=d["depth"],
                   help="queue depth (default %(default)s)")
    p.add_argument("--max-io", dest="max_io_bytes", type=parse_size, default=d["max_io_bytes"],
                   metavar="SIZE", help=f"largest request (default {format_size(d['max_io_bytes'])})")
    for flags, path, what in (
            (("-z", "--zero-copy"), "zero_copy",
             "zero copy (Linux 6.15+; AUTO_BUF_REG on 6.16+; native backends that declare it)"),
            (("-u", "--user-copy"), "user_copy", "USER_COPY data path (6.5+)"),
            (("-g", "--need-get-data"), "need_get_data",
             "NEED_GET_DATA data path: the server asks for WRITE data in a second step")):
        p.add_argument(*flags, dest="data_paths", action="append_const", const=path, help=what)
    p.add_argument("--batch-io", action=argparse.BooleanOptionalAction, default=d["batch_io"],
                   help="BATCH_IO (Linux 7.0): the queues prepare, fetch and commit many tags "
                   "per command (copy and -u paths); --no-batch-io: one command per tag "
                   "(default: " + ("on where the driver has it" if DEFAULT_BATCH_IO else "off") + ")")
    p.add_argument("--threads", dest="threads_per_queue", type=int,
                   default=d["threads_per_queue"], metavar="N",
                   help="serve each queue from N threads, each with its own ring and every "
                   "N-th tag (PER_IO_DAEMON, Linux 6.16+; 1..depth; default %(default)s)")
    p.add_argument("--unprivileged", action="store_true",
                   help="UNPRIVILEGED_DEV: a normal user's device, owned by it (needs udev "
                   "rules: /dev/ublk-control open to users, /dev/ublkcN and /dev/ublkbN "
                   "chowned to the owner; no -z, -u or --recovery; as root the kernel makes "
                   "a privileged device)")
    p.add_argument("--recovery", nargs="?", const="reissue", default=d["recovery"],
                   metavar="MODE",
                   help="allow `recover` after the server dies; MODE: what in-flight I/O does "
                   f"while no server runs: {', '.join(RECOVERY_MODES)} (default reissue)")
    p.add_argument("--python", dest="native", action="store_false", default=d["native"],
                   help="serve with the Python handlers even if the backend is native")
    p.add_argument("--poll-us", type=float, default=d["poll_us"], metavar="US",
                   help="poll each queue's ring up to this many microseconds before sleeping "
                   "(adaptive: an idle queue stops polling; it yields to other runnable "
                   f"threads; 0 always sleeps; default: the backend's, else {DEFAULT_POLL_US:g})")
    p.add_argument("--submit-chunk", type=int, default=d["submit_chunk"], metavar="N",
                   help="submit queued I/O every N requests while handling a batch (default "
                   "%(default)s; larger: fewer syscalls, smaller: the backing disk starts sooner)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in the foreground until SIGINT/SIGTERM")


def _modules_in(argv: Sequence[str]) -> list[str]:
    """The --module values, read before the parser is built (its -t choices need them)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--module", action="append", default=[])
    return pre.parse_known_args(argv)[0].module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _import_modules(_modules_in(argv))
        parser = build_parser()
        a, extra = parser.parse_known_args(argv)
        if extra and a.command not in ("add", "recover"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                            format="pyublk_fast: %(message)s")
        return a.func(a, extra)
    except (OSError, ValueError, NotImplementedError) as exc:
        print(f"pyublk_fast: {describe(exc)}", file=sys.stderr)
        return 1
