"""``python -m pyublk_fast``: add, list, delete and recover real ublk devices (like ublksrv's ``ublk``).

    python -m pyublk_fast add -t loop -f disk.img      # prints /dev/ublkbN once it is live
    python -m pyublk_fast list [--json]
    python -m pyublk_fast del -n N | -a
    python -m pyublk_fast recover -n N                 # after the server died (needs --recovery)
    python -m pyublk_fast features
    python -m pyublk_fast udev-rules                   # udev rules for --unprivileged devices

Backends declare themselves (pyublk_fast.backend: ``@register``, ``add_arguments``,
``from_args``): ``add -t NAME`` takes the common options and NAME's own, and ``add --help``
lists every target with its options, as kublk's help does. Installed packages add
backends through entry points (group ``pyublk_fast.backends``); ``--module MOD`` imports
a module that registers some. Device options default to Device's own defaults and are
checked by Device, before anything is opened. The server runs in pyublk_fast.daemon; its
records (for ``list`` and ``recover``) are pyublk_fast.records.
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
from .daemon import daemonize, describe, serve
from .device import PATH_FLAGS, DEFAULT_POLL_US, RECOVERY_MODES, Device
from .records import drop_record, read_record, state_dir
from .transport.kernel import UNPRIVILEGED_REFUSES, KernelTransport, pid_alive

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


def cmd_recover(a: argparse.Namespace, extra: list[str]) -> int:
    rec = read_record(a.number) or {}
    _import_modules(rec.get("modules", []))
    target = a.type or (rec.get("target") if "backend_args" in rec else None)
    if target is None:
        raise CliError(f"no record of device {a.number} in {state_dir()}: say what serves it "
                       "with -t TYPE and its options")
    if a.type or extra:
        args = backend_args(target, "recover", a.parser, extra)
    else:
        args = rec["backend_args"]
    old = rec.get("pid")
    if old and pid_alive(old):
        raise CliError(f"device {a.number}'s server (pid {old}) is still running: nothing to "
                       "recover")
    unprivileged = bool(rec.get("unprivileged"))
    with KernelTransport(unprivileged=unprivileged) as t:
        info = t.dev_info(a.number)
    if not info.flags & uapi.UBLK_F_USER_RECOVERY:
        raise CliError(f"device {a.number} was added without --recovery: it cannot be "
                       f"recovered (delete it with `del -n {a.number}`)")
    device = dict(rec.get("device") or {})
    device.update(dev_id=a.number, data_path=data_path_of(info.flags),
                  recovery=device.get("recovery") or "reissue")
    opts = dict(target=target, backend_args=args,
                modules=sorted(set(rec.get("modules", [])) | set(a.module or [])),
                unprivileged=unprivileged, device=device)
    return run_server(opts, a.foreground, recover=True)


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


def cmd_del(a: argparse.Namespace, extra: list[str]) -> int:
    if a.all == (a.number is not None):
        raise CliError("say which device: del -n ID, or del -a for all")
    with KernelTransport() as t:
        ids = t.list_devs() if a.all else [a.number]
        if not a.all and a.number not in ids:
            drop_record(a.number)
            raise CliError(f"there is no ublk device {a.number} (see `list`)")
        for dev_id in ids:
            delete_device(t, dev_id, a.timeout)
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
                   f"threads; 0 always sleeps; default {DEFAULT_POLL_US:g})")
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
