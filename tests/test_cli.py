"""Host-side CLI checks: help, argument errors, backends from the registry (shipped, entry
points, --module), and a clear message without the ublk driver."""
from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyublk_fast import backend as backend_mod, cli, records
from pyublk_fast.backend import format_size, parse_size
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.backends.null import NullBackend
from pyublk_fast.device import Device

REPO = Path(__file__).resolve().parents[1]
NO_DRIVER = not os.path.exists("/dev/ublk-control")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYUBLK_FAST_RUN_DIR=kw.pop("run_dir", "/tmp/pyublk_fast-test-cli"),
               **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "pyublk_fast", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)


@pytest.mark.parametrize("sub", [[], ["add"], ["list"], ["del"], ["recover"], ["features"],
                                 ["quiesce"], ["upgrade"], ["resize"]])
def test_help_everywhere(sub):
    res = run(*sub, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m pyublk_fast")
    if sub == []:
        # help text is wrapped: compare with the line breaks as spaces
        assert "Targets for add -t: loop, memory, nbd, null, null-aio, qcow2, rbd" in " ".join(res.stdout.split())
    if sub == ["add"]:
        for opt in ("-t", "-n", "-q", "-d", "-z", "-u", "-g, --need-get-data", "--unprivileged",
                    "--recovery", "--foreground", "--module"):
            assert opt in res.stdout


@pytest.mark.parametrize("sub", ["add", "recover"])
def test_help_lists_each_targets_options(sub):
    """Like kublk's help: every target with its own options, defaults from the backend."""
    out = run(sub, "--help").stdout
    targets = out[out.index("targets (-t NAME, then its own options):"):]
    sections = {s.split(":", 1)[0]: s for s in targets.split("\n\n-t ")[1:]}
    assert list(sections) == ["loop", "memory", "nbd", "null", "null-aio", "qcow2", "rbd"]
    assert "--image POOL/IMAGE[@SNAP]" in sections["rbd"] and "--id NAME" in sections["rbd"]
    assert "-f FILE, --file FILE" in sections["loop"] and "(required)" in sections["loop"]
    assert "-f FILE, --file FILE" in sections["qcow2"]
    assert f"(default {format_size(NullBackend.DEFAULT_SIZE)})" in sections["null"]
    assert f"(default {format_size(MemoryBackend.DEFAULT_SIZE)})" in sections["memory"]
    assert "(default 64m)" in sections["memory"] and "(default 250g)" in sections["null"]


@pytest.mark.parametrize("args,needle", [
    ([], "required: COMMAND"),
    (["add"], "required: -t/--type"),
    (["add", "-t", "floppy"], "invalid choice: 'floppy'"),
    (["add", "-t", "loop"], "add -t loop: error: the following arguments are required: -f/--file"),
    (["add", "-t", "null", "-d", "x"], "invalid int value"),
    (["add", "-t", "null", "-s", "lots"], "bad size 'lots'"),
    (["add", "-t", "memory", "--max-io", "big"], "bad size 'big'"),
    (["list", "--nope"], "unrecognized arguments: --nope"),
    (["recover"], "required: -n/--number"),
    (["quiesce"], "required: -n/--number"),
    (["upgrade", "-n", "1", "-t", "loop"], "unrecognized arguments: -t loop"),
    (["resize", "-n", "1"], "required: -s/--size"),
    (["resize", "-n", "1", "-s", "huge"], "bad size 'huge'"),
])
def test_argument_errors(args, needle):
    res = run(*args)
    assert res.returncode == 2
    assert needle in res.stderr, res.stderr


@pytest.mark.parametrize("args,needles", [
    # Device's own range checks, passed through as one line
    (["add", "-t", "null", "-q", "0"], ["queues=0 must be >= 1"]),
    (["add", "-t", "null", "-d", "5000"], ["depth=5000 out of range 1..4096"]),
    (["add", "-t", "null", "--submit-chunk", "0"], ["submit_chunk=0 must be >= 1"]),
    (["add", "-t", "null", "--poll-us", "-5"], ["poll_us=-5.0 must be >= 0"]),
    (["add", "-t", "null", "--recovery", "sometimes"], ["recovery='sometimes': choose"]),
    (["add", "-t", "memory", "-z"], ["data_path='zero_copy' is not available",
                                     "MemoryBackend does not declare it"]),
    # the backends' own errors
    (["add", "-t", "loop", "-f", "/nonexistent/x.img"],
     ["/nonexistent/x.img: no such file", "truncate -s 1G /nonexistent/x.img"]),
    (["add", "-t", "qcow2", "-f", "/nonexistent/x.qcow2"], ["qemu-img create -f qcow2"]),
    (["add", "-t", "null", "-f", "/etc/hostname"], ["-t null takes no -f /etc/hostname"]),
    # data paths: one at a time; an unprivileged device's limits are the kernel transport's
    (["add", "-t", "null", "-z", "-u"], ["exclude each other"]),
    (["add", "-t", "null", "-u", "-g"], ["exclude each other"]),
    (["add", "-t", "null", "--unprivileged", "-u"],
     ["cannot use -z or -u", "USER_COPY (-u)", "/dev/ublkcN"]),
    (["add", "-t", "null", "--unprivileged", "-z"],
     ["cannot use -z or -u", "zero copy (-z)", "/dev/ublkcN"]),
    (["add", "-t", "null", "--unprivileged", "--recovery"],
     ["recovery (--recovery): the kernel drops USER_RECOVERY"]),
    (["add", "--module", "no_such_module_here", "-t", "null"],
     ["--module no_such_module_here: cannot import it: ModuleNotFoundError"]),
    (["del"], ["say which device"]),
    (["del", "-n", "3", "-a"], ["say which device"]),
])
def test_usage_errors_are_clear(args, needles):
    res = run(*args)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("pyublk_fast: ") and res.stderr.count("\n") == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.mark.skipif(not NO_DRIVER, reason="this host has /dev/ublk-control")
@pytest.mark.parametrize("args", [["features"], ["list"], ["del", "-a"],
                                  ["add", "-t", "null"], ["add", "-t", "null", "-g"],
                                  ["add", "-t", "memory", "--foreground"]])
def test_missing_driver_says_modprobe(args):
    res = run(*args)
    assert res.returncode == 1
    assert "modprobe ublk_drv" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_recover_without_record_asks_for_target(tmp_path):
    res = run("recover", "-n", "7", run_dir=str(tmp_path))
    assert res.returncode == 1 and "no record of device 7" in res.stderr, res.stderr


def test_add_defaults_are_devices():
    """The CLI restates no default: an `add` without options passes Device's own."""
    a, extra = cli.build_parser().parse_known_args(["add", "-t", "memory"])
    opts = cli.add_options(a, extra)
    sig = inspect.signature(Device).parameters
    assert opts["device"] == {k: sig[k].default for k in opts["device"]}
    assert set(opts["device"]) == {"dev_id", "queues", "depth", "max_io_bytes", "data_path",
                                   "recovery", "native", "poll_us", "submit_chunk", "batch_io",
                                   "threads_per_queue"}
    assert opts["backend_args"] == {"size": MemoryBackend.DEFAULT_SIZE}
    assert cli.make_backend(opts).size == MemoryBackend().size == 64 << 20


@pytest.mark.parametrize("argv,device", [
    (["-t", "null", "-g"], dict(data_path="need_get_data")),
    (["-t", "null", "-z", "-q", "2", "-d", "64"], dict(data_path="zero_copy", queues=2, depth=64)),
    (["-t", "null", "-u", "--python"], dict(data_path="user_copy", native=False)),
    (["-t", "null", "--recovery", "--poll-us", "0", "--max-io", "1M", "-n", "9"],
     dict(recovery="reissue", poll_us=0.0, max_io_bytes=1 << 20, dev_id=9)),
    (["-t", "null", "--recovery", "fail_io", "--submit-chunk", "8"],
     dict(recovery="fail_io", submit_chunk=8)),
    (["-t", "null", "--batch-io"], dict(batch_io=True)),
    (["-t", "null", "-u", "--no-batch-io"], dict(data_path="user_copy", batch_io=False)),
    (["-t", "null", "--threads", "2"], dict(threads_per_queue=2)),
])
def test_add_options_reach_device(argv, device):
    a, extra = cli.build_parser().parse_known_args(["add", *argv])
    opts = cli.add_options(a, extra)
    assert {k: opts["device"][k] for k in device} == device
    cli.check_options(opts)           # Device accepts them


def test_records_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path / "run"))
    records.write_record(5, {"target": "loop", "backend_args": {"file": "/x"}, "pid": 123})
    assert json.loads((tmp_path / "run" / "5.json").read_text())["pid"] == 123
    assert records.read_record(5)["backend_args"]["file"] == "/x"
    records.drop_record(5, pid=999)           # someone else's server: kept
    assert records.read_record(5) is not None
    records.drop_record(5, pid=123)
    assert records.read_record(5) is None


@pytest.mark.parametrize("text,want", [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
                                       ("2KiB", 2048), ("1.5k", 1536), ("250g", 250 << 30)])
def test_parse_size(text, want):
    assert parse_size(text) == want
    assert parse_size(format_size(want)) == want


# ---- backends from installed packages and --module ---------------------------------------------
PLUGIN = '''
from pyublk_fast.backend import Backend


class FillDisk(Backend):
    """Every block holds one byte (a test's plugin)."""

    def __init__(self, fill):
        self.fill = fill
        self.size = 1 << 20

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--fill", type=int, default=0x5A, help="the byte (default %(default)s)")

    @classmethod
    def from_args(cls, ns):
        return cls(ns.fill)

    def read(self, offset, buf):
        buf[:] = bytes([self.fill]) * len(buf)
'''
MODULE = '''
from pyublk_fast.backend import Backend, register


@register("zeros")
class Zeros(Backend):
    """Reads zeros (registered on import by --module)."""

    size = 1 << 20

    @classmethod
    def from_args(cls, ns):
        return cls()

    def read(self, offset, buf):
        buf[:] = bytes(len(buf))
'''


@pytest.fixture
def plugins(tmp_path) -> Path:
    """A directory for sys.path with an installed distribution declaring two backends by
    entry point (one that loads, one that does not) and a module for --module."""
    (tmp_path / "filldisk.py").write_text(PLUGIN)
    (tmp_path / "zeros_mod.py").write_text(MODULE)
    info = tmp_path / "filldisk-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: filldisk\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pyublk_fast.backends]\nfill = filldisk:FillDisk\nbroken = filldisk_gone:Nothing\n")
    return tmp_path


def test_entry_point_backends_in_help_and_errors(plugins):
    env = {"PYTHONPATH": str(plugins)}
    res = run("add", "--help", env=env)
    assert res.returncode == 0, res.stderr
    assert "-t fill:\n  Every block holds one byte" in res.stdout and "--fill FILL" in res.stdout
    assert "-t broken: unavailable: backend 'broken' (entry point filldisk_gone:Nothing" in res.stdout
    assert ("Targets for add -t: broken, fill, loop, memory, nbd, null, null-aio, qcow2, rbd"
            in " ".join(run("--help", env=env).stdout.split()))
    res = run("add", "-t", "fill", "--fill", "x", env=env)
    assert res.returncode == 2 and "argument --fill: invalid int value: 'x'" in res.stderr
    res = run("add", "-t", "fill", "-q", "0", env=env)        # built, then Device refuses -q 0
    assert res.returncode == 1 and res.stderr == "pyublk_fast: queues=0 must be >= 1\n"
    res = run("add", "-t", "broken", env=env)
    assert res.returncode == 1 and "cannot load it: ModuleNotFoundError" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


def test_module_option_registers_backends(plugins):
    env = {"PYTHONPATH": str(plugins)}
    res = run("add", "--module", "zeros_mod", "--help", env=env)
    assert res.returncode == 0 and "-t zeros:\n  Reads zeros" in res.stdout, res.stderr
    res = run("add", "-t", "zeros", env=env)
    assert res.returncode == 2 and "invalid choice: 'zeros'" in res.stderr
    res = run("add", "-t", "zeros", "--module", "zeros_mod", "-d", "0", env=env)
    assert res.returncode == 1 and res.stderr == "pyublk_fast: depth=0 out of range 1..4096\n"


@pytest.fixture
def sim_kernel(monkeypatch):
    """The CLI's servers on the simulated driver: KernelTransport's stand-in."""
    from pyublk_fast.transport.sim import SimTransport
    monkeypatch.setattr(cli, "KernelTransport", lambda unprivileged=False: SimTransport())


def test_entry_point_backend_serves_data(plugins, monkeypatch, sim_kernel):
    """From the command line to data: the registry loads the entry point, its options build
    it, -g reaches Device, and the device reads what the backend holds."""
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setattr(backend_mod, "_REGISTRY", dict(backend_mod._REGISTRY))
    a, extra = cli.build_parser().parse_known_args(["add", "-t", "fill", "--fill", "7", "-g"])
    opts = cli.add_options(a, extra)
    assert opts["backend_args"] == {"fill": 7}
    cli.check_options(opts)
    transport, dev = cli.start_server(opts)
    try:
        assert dev.data_path == "need_get_data" and type(dev.backend).__name__ == "FillDisk"
        with dev.open() as blk:
            assert blk.pread(8192, 4096) == b"\x07" * 8192
    finally:
        dev.stop()
        transport.close()


def test_backend_option_clashing_with_add_is_refused(monkeypatch):
    monkeypatch.setattr(backend_mod, "_REGISTRY", dict(backend_mod._REGISTRY))

    @backend_mod.register("clash")
    class Clash(MemoryBackend):
        @classmethod
        def add_arguments(cls, parser):
            parser.add_argument("-q", "--quiet", action="store_true")

    a, extra = cli.build_parser().parse_known_args(["add", "-t", "clash"])
    with pytest.raises(cli.CliError, match="backend 'clash' declares an option `add` already has: "
                       "argument -q/--quiet: conflicting option string: -q"):
        cli.add_options(a, extra)


def test_backend_without_from_args_is_told(monkeypatch):
    monkeypatch.setattr(backend_mod, "_REGISTRY", dict(backend_mod._REGISTRY))
    backend_mod.register("bare")(type("Bare", (backend_mod.Backend,), {}))
    a, extra = cli.build_parser().parse_known_args(["add", "-t", "bare"])
    with pytest.raises(NotImplementedError, match="Bare cannot be built from command-line "
                       "options: it defines no from_args"):
        cli.check_options(cli.add_options(a, extra))


# ---- del: open or mounted devices are left alone unless --force ---------------------------------
class _Driver:
    """A stand-in for KernelTransport in `del`: TRY_STOP_DEV answers ``errs[dev_id]``."""

    def __init__(self, errs: dict[int, int]):
        self.errs = errs
        self.stopped: list[int] = []
        self.deleted: list[int] = []

    def __call__(self, *args, **kwargs):           # KernelTransport(): this driver
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def block_path(self, dev_id):
        return f"/dev/ublkb{dev_id}"

    def list_devs(self):
        return sorted(self.errs)

    def try_stop_dev(self, dev_id):
        err = self.errs[dev_id]
        if err:
            raise OSError(err, os.strerror(err))
        self.stopped.append(dev_id)

    def stop_dev(self, dev_id):
        self.stopped.append(dev_id)

    def del_dev(self, dev_id, timeout=10.0):
        self.deleted.append(dev_id)
        self.errs.pop(dev_id)


def test_del_leaves_an_open_device_alone(tmp_path, monkeypatch, capsys):
    """del -a deletes what it may and says in one line which devices are open; --force
    deletes those too; a device without a block device (ENODEV) is no obstacle."""
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(cli, "BUSY_GRACE", 0.0)
    drv = _Driver({1: errno.EBUSY, 2: 0, 3: errno.ENODEV})
    monkeypatch.setattr(cli, "KernelTransport", drv)
    assert cli.main(["del", "-a"]) == 1
    assert capsys.readouterr().err == (
        "pyublk_fast: device 1 (/dev/ublkb1) is open: unmount or close it first, or delete it "
        "anyway with `del -n 1 --force`\n")
    assert drv.deleted == [2, 3] and drv.list_devs() == [1]
    assert cli.main(["del", "-n", "1", "--force"]) == 0
    assert drv.deleted == [2, 3, 1]


def test_del_before_safe_stop_sees_exclusive_holders(tmp_path, monkeypatch):
    """Without TRY_STOP_DEV (before 7.0) the check is an exclusive open of the block
    device: one that nothing holds so (here a plain file) is deleted."""
    monkeypatch.setattr(cli, "BUSY_GRACE", 0.0)
    drv = _Driver({5: errno.EOPNOTSUPP})
    plain = tmp_path / "ublkb5"
    plain.write_bytes(b"")
    monkeypatch.setattr(drv, "block_path", lambda dev_id: str(plain))
    cli.stop_unless_open(drv, 5)
    drv.errs[5] = errno.EPERM                       # any other error is the user's to see
    with pytest.raises(PermissionError):
        cli.stop_unless_open(drv, 5)


class ServerDeletesOnStop:
    """The kernel transport as `del` sees a device whose server it has no record of: the
    server deletes the device once stopped from outside, before `del`'s own DEL_DEV."""

    def __init__(self, del_errno: int) -> None:
        self.del_errno = del_errno

    def block_path(self, dev_id: int) -> str:
        return f"/dev/ublkb{dev_id}"

    def try_stop_dev(self, dev_id: int) -> None:
        pass

    def stop_dev(self, dev_id: int) -> None:
        pass

    def list_devs(self) -> list[int]:
        return [3]

    def del_dev(self, dev_id: int, timeout: float) -> None:
        raise OSError(self.del_errno, os.strerror(self.del_errno))


def test_del_of_a_device_its_server_deleted_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path))
    cli.delete_device(ServerDeletesOnStop(errno.ENODEV), 3, 1.0)     # gone: done
    with pytest.raises(PermissionError):                               # anything else: said
        cli.delete_device(ServerDeletesOnStop(errno.EACCES), 3, 1.0)
