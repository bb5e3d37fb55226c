"""Host-side tests of the VM runner's pure logic (tools/vm/ublkvm).

Nothing here boots qemu: argument parsing, apt source discovery, kernel
choice, cache decisions, the initramfs writer, console scanning and the
exit-code contract.  The real boots are in tests/kernel (run inside the VM).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VM_DIR = Path(__file__).resolve().parents[1] / "tools" / "vm"
sys.path.insert(0, str(VM_DIR))

import ublk_vm  # noqa: E402
from ublkvm import (EXIT_GUEST_FAILURE, EXIT_KERNEL_WARNING, EXIT_TIMEOUT,  # noqa: E402
                    LaneError)
from ublkvm.apt import (SourceEntry, host_debian_source, is_debian_archive,  # noqa: E402
                        parse_sources)
from ublkvm.config import Settings, parse_mem, parse_timeout  # noqa: E402
from ublkvm.console import (ConsoleWatch, classify, hang_report, scan_log,  # noqa: E402
                            summarize, trouble_context)
from ublkvm.initramfs import (CpioWriter, init_script, module_load_order,  # noqa: E402
                              module_name)
from ublkvm.kernel import choose_kernel, series_of, version_key  # noqa: E402
from ublkvm.prepare import cached_kernel  # noqa: E402
from ublkvm.qemu import (RunResult, guest_environment, job_script, qemu_argv,  # noqa: E402
                         watchdog_seconds)


# ---- command line -------------------------------------------------------------------
def test_run_args_keep_everything_after_double_dash():
    ns = ublk_vm.parse_args(["run", "-t", "15m", "-o", "/tmp/x", "--",
                             "python3", "-m", "pytest", "-x", "-t", "tests/kernel"])
    assert ns.timeout == 900.0
    assert ns.outdir == "/tmp/x"
    assert ns.cmd == ["python3", "-m", "pytest", "-x", "-t", "tests/kernel"]
    assert not ns.fail_on_warning


def test_run_without_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        ublk_vm.parse_args(["run", "-t", "5", "--"])
    assert exc.value.code == 2
    assert "run needs a command" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-3", "soon", "5d"])
def test_bad_timeouts_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        ublk_vm.parse_args(["run", "-t", text, "--", "true"])
    assert "timeout" in capsys.readouterr().err


def test_durations_and_sizes():
    assert parse_timeout("90") == 90 and parse_timeout("1.5m") == 90
    assert parse_timeout("1h") == 3600
    assert parse_mem("2G") == 2048 and parse_mem("1536M") == 1536
    with pytest.raises(LaneError, match="at least 256M"):
        parse_mem("64M")


def test_settings_from_env():
    s = Settings.from_env({"UBLK_VM_CACHE": "/x/c", "UBLK_VM_SUITE": "trixie",
                           "UBLK_VM_MEM": "3G", "UBLK_VM_CPUS": "4", "UBLK_VM_MODULES": "",
                           "UBLK_VM_TIMEOUT": "2m"})
    assert s.cache == Path("/x/c") and s.suites == ("trixie",)
    assert (s.mem_mib, s.cpus, s.modules, s.timeout) == (3072, 4, (), 120.0)
    default = Settings.from_env({})
    assert default.suites[0] == "sid" and "trixie" in default.suites
    assert default.cache == Path("/var/cache/pyublk-vm") and default.modules == ("ublk_drv",)
    with pytest.raises(LaneError, match="UBLK_VM_CPUS"):
        Settings.from_env({"UBLK_VM_CPUS": "many"})


# ---- apt sources ----------------------------------------------------------------------
DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_and_one_line_sources():
    entries = parse_sources(DEB822, deb822=True)
    assert entries[0] == SourceEntry("http://mirror.example/debian",
                                     ("bookworm", "bookworm-updates"), ("main",),
                                     "/usr/share/keyrings/debian-archive-keyring.gpg")
    assert is_debian_archive(entries[0]) and not is_debian_archive(entries[1])
    one = parse_sources("# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian sid main contrib\n"
                        "deb-src http://m/debian sid main\n"
                        "deb https://packages.example/apt cloud-sdk-bookworm main\n", False)
    assert one[0] == SourceEntry("http://m/debian", ("sid",), ("main", "contrib"), "/k.gpg")
    assert len(one) == 2 and not is_debian_archive(one[1])


def test_host_source_is_read_from_etc_apt(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "vendor.list").write_text(
        "deb https://packages.example/apt cloud-sdk-bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://x/debian sid main\n")
    assert host_debian_source(tmp_path).uri == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(LaneError, match="UBLK_VM_MIRROR"):
        host_debian_source(tmp_path)


# ---- kernel choice and cache ------------------------------------------------------------
SID_NAMES = [
    "linux-binary-7.2.9+deb14-amd64", "linux-modules-7.2.9+deb14-amd64",
    "linux-binary-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64",
    "linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-rt-amd64",
    "linux-binary-7.2.13+deb14-cloud-amd64", "linux-image-amd64",
    "linux-image-7.1.4+deb14-amd64", "linux-headers-7.3.0+deb14-amd64",
]


def test_newest_split_kernel_is_chosen():
    c = choose_kernel(SID_NAMES)
    assert c.kver == "7.2.13+deb14-amd64"
    assert c.packages == ("linux-binary-7.2.13+deb14-amd64",
                          "linux-modules-7.2.13+deb14-amd64", "linux-base-7.2.13+deb14-amd64")
    assert choose_kernel(SID_NAMES, "7.2.9+deb14-amd64").packages == (
        "linux-binary-7.2.9+deb14-amd64", "linux-modules-7.2.9+deb14-amd64")
    assert choose_kernel(SID_NAMES, "7.2.14+deb14-amd64") is None
    assert choose_kernel(["linux-image-amd64", "linux-headers-7.2.13+deb14-amd64"]) is None


def test_612_uses_linux_image():
    c = choose_kernel(["linux-image-6.12.117+deb13-amd64", "linux-image-6.12.9+deb13-amd64",
                       "linux-image-6.12.117+deb13-amd64-dbg",
                       "linux-image-6.12.117+deb13-amd64-unsigned"])
    assert c.kver == "6.12.117+deb13-amd64"
    assert c.packages == ("linux-image-6.12.117+deb13-amd64",)
    assert series_of(c.kver) == "6.12"


def test_version_order():
    assert version_key("7.2.13+deb14") > version_key("7.2.9+deb14")
    assert version_key("7.10.1") > version_key("7.9.30")
    assert version_key("7.3~rc1") < version_key("7.3")


def _fake_kernel(cache: Path, kver: str, suite: str) -> Path:
    kdir = cache / "kernels" / kver
    kdir.mkdir(parents=True)
    (kdir / ".ready").write_text(json.dumps({
        "kver": kver, "suite": suite, "packages": [], "vmlinuz": "root/vmlinuz",
        "moddir": f"root/usr/lib/modules/{kver}"}))
    (cache / f"kernel.{suite}").symlink_to(Path("kernels") / kver)
    return kdir


def test_cached_kernel_decisions(tmp_path):
    msgs: list[str] = []
    s = Settings(cache=tmp_path)
    assert cached_kernel(s, msgs.append) is None          # empty cache: go fetch
    _fake_kernel(tmp_path, "6.12.117+deb13-amd64", "trixie")
    k = cached_kernel(s, msgs.append)                     # only the fallback is cached
    assert k.kver == "6.12.117+deb13-amd64" and k.series == "6.12"
    assert "fallback" in msgs[-1] and "UBLK_VM_REFRESH=1" in msgs[-1]
    _fake_kernel(tmp_path, "7.2.13+deb14-amd64", "sid")
    assert cached_kernel(s, msgs.append).kver == "7.2.13+deb14-amd64"   # sid first
    assert cached_kernel(Settings(cache=tmp_path, refresh=True), msgs.append) is None
    pinned = Settings(cache=tmp_path, kver="6.12.117+deb13-amd64")
    assert cached_kernel(pinned, msgs.append).suite == "trixie"
    assert cached_kernel(Settings(cache=tmp_path, kver="7.9.1+deb14-amd64"), print) is None
    (tmp_path / "kernels" / "7.2.13+deb14-amd64" / ".ready").write_text("{broken")
    with pytest.raises(LaneError, match="incomplete"):
        cached_kernel(s, msgs.append)


# ---- initramfs --------------------------------------------------------------------------
MODULES_DEP = """\
kernel/fs/overlayfs/overlay.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/drivers/block/ublk_drv.ko.xz:
"""


def test_module_order_puts_dependencies_first():
    order = module_load_order(MODULES_DEP, "", ("9pnet_virtio", "9p", "overlay"))
    assert [module_name(p) for p in order] == ["netfs", "9pnet", "9pnet_virtio", "9p", "overlay"]
    assert module_load_order(MODULES_DEP, "kernel/drivers/virtio/virtio_pci.ko\n",
                             ("virtio-pci", "overlay")) == ["kernel/fs/overlayfs/overlay.ko.xz"]
    assert module_load_order(MODULES_DEP, "", ("overlay",), optional=("virtio_pci",)) == [
        "kernel/fs/overlayfs/overlay.ko.xz"]
    with pytest.raises(LaneError, match="virtio_pci"):
        module_load_order(MODULES_DEP, "", ("virtio_pci",))


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Independent newc reader: name -> (mode, data); checks magic and 4-byte padding."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode()
        assert data[name_end - 1] == 0
        start = (name_end + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (fields[1], data[start:start + size])
        pos = (start + size + 3) & ~3


def _sample_cpio() -> bytes:
    w = CpioWriter()
    w.dir("bin")
    w.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    w.file("odd", b"12345")                  # sizes that need padding
    w.symlink("bin/link", "tool")
    return w.finish()


def test_cpio_writer_round_trip():
    entries = _read_newc(_sample_cpio())
    assert entries["bin/tool"] == (0o100755, b"#!/bin/sh\necho hi\n")
    assert entries["odd"] == (0o100644, b"12345")
    assert entries["bin/link"] == (0o120777, b"tool") and entries["bin"][0] == 0o40755


def test_cpio_writer_output_extracts_with_busybox(tmp_path):
    """An independent extractor agrees: busybox's cpio, the one the guest's init uses."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed (apt install busybox-static; tools/dev.sh and "
                    "the VM lane do)")
    subprocess.run([busybox, "cpio", "-id"], input=_sample_cpio(), cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "odd").read_bytes() == b"12345"
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(tmp_path / "bin/link") == "tool"
    assert os.access(tmp_path / "bin/tool", os.X_OK)


def test_init_script_is_valid_shell(tmp_path):
    text = init_script()
    assert "@JOBDIR@" not in text and "/run/pyublk-vm/job.sh" in text
    path = tmp_path / "init"
    path.write_text(text)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---- the guest job --------------------------------------------------------------------
def test_guest_environment_filters_session_variables():
    env = guest_environment({"PATH": "/bin", "TERM": "xterm", "SSH_AUTH_SOCK": "/s",
                             "BASH_FUNC_f%%": "() { :; }", "PWD": "/x", "HOME": "/root"},
                            "/out", "7.2.13+deb14-amd64")
    assert env == {"PATH": "/bin", "HOME": "/root", "UBLK_VM": "1", "UBLK_VM_OUT": "/out",
                   "UBLK_VM_KVER": "7.2.13+deb14-amd64", "TERM": "dumb"}


def test_job_script_reproduces_env_cwd_and_argv(tmp_path):
    env = {"PATH": os.environ["PATH"], "ODD": "it's \"$HOME\" `x`\nline2 \\ ;|&",
           "EMPTY": ""}
    argv = [sys.executable, "-c",
            "import json, os, sys; print(json.dumps([dict(os.environ), os.getcwd(), sys.argv]))",
            "a b", "$PATH", "*"]
    script = tmp_path / "job.sh"
    script.write_text(job_script(env, str(tmp_path), argv, modules=()))
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={},
                         cwd="/")
    got_env, cwd, got_argv = json.loads(res.stdout)
    assert got_env["ODD"] == env["ODD"] and got_env["EMPTY"] == ""
    assert cwd == str(tmp_path)
    assert got_argv[1:] == ["a b", "$PATH", "*"]
    assert "modprobe ublk_drv ||" in job_script(env, "/", ["true"], ["ublk_drv"])


def test_job_script_reports_a_missing_cwd(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(job_script({}, str(tmp_path / "gone"), ["true"], ()))
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 125


def test_watchdog_fires_before_the_host_timeout():
    assert watchdog_seconds(900) == 870
    assert watchdog_seconds(20) == 12
    assert watchdog_seconds(10) == 0


def test_qemu_argv_shares_root_read_only(tmp_path):
    from ublkvm.kernel import Kernel
    k = Kernel("7.2.13+deb14-amd64", tmp_path, tmp_path / "vmlinuz", tmp_path / "mod", "sid",
               "7.2")
    s = Settings(append="foo=1")
    argv = qemu_argv(s, k, tmp_path / "initrd.gz", tmp_path / "job", "")
    joined = " ".join(argv)
    assert "path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined
    assert f"path={tmp_path / 'job'},mount_tag=job" in joined and "mount_tag=out" not in joined
    cmdline = argv[argv.index("-append") + 1]
    assert "oops=panic" in cmdline and "panic=-1" in cmdline and cmdline.endswith(" foo=1")
    assert "mount_tag=out" in " ".join(qemu_argv(s, k, tmp_path, tmp_path, "/o"))


# ---- console ----------------------------------------------------------------------------
def test_console_lines_tail_and_trouble():
    w = ConsoleWatch(tail_lines=3)
    assert w.feed(b"[    1.000000] BUG: kernel NULL pointer deref") == []
    got = w.feed(b"erence\r\nBUG: this is test output, not the kernel\r\nplain\n"
                 b"[    2.500000] UBSAN: array-index-out-of-bounds in x.c:1\nparti")
    assert got[0] == "[    1.000000] BUG: kernel NULL pointer dereference"
    assert len(got) == 4 and w.flush() == ["parti"] and w.flush() == []
    assert list(w.tail) == ["plain", "[    2.500000] UBSAN: array-index-out-of-bounds in x.c:1",
                            "parti"]
    assert [k for k, _ in w.trouble] == ["bug", "ubsan"]


@pytest.mark.parametrize("msg, kind", [
    ("WARNING: CPU: 1 PID: 130 at drivers/block/ublk_drv.c:123 ublk_foo+0x1/0x2", "warning"),
    ("kernel BUG at mm/slub.c:42!", "bug"),
    ("Oops: general protection fault, probably for non-canonical address", "oops"),
    ("Kernel panic - not syncing: Fatal exception", "panic"),
    ("INFO: task kworker/0:1:12 blocked for more than 120 seconds.", "hung task"),
    ("mtrr: your CPUs had inconsistent fixed MTRR settings", ""),
    ("ublk_drv: loaded", ""),
])
def test_classify(msg, kind):
    assert classify(msg) == kind


def test_trouble_context_and_hang_report():
    log = "\n".join([f"[ {i}.0] line {i}" for i in range(10)] +
                    ["[ 10.0] ------------[ cut here ]------------",
                     "[ 10.1] WARNING: CPU: 0 PID: 1 at a.c:1 f+0x0/0x1", "[ 10.2] Call Trace:"])
    assert scan_log(log) == [("warning", "[ 10.1] WARNING: CPU: 0 PID: 1 at a.c:1 f+0x0/0x1")]
    ctx = trouble_context(log, before=1, after=1)
    assert ctx == log.splitlines()[-3:]
    assert summarize([("warning", ""), ("ubsan", ""), ("warning", "")]) == "2 warning, 1 ubsan"
    hang = "[ 1.0] boot\n[ 15.0] sysrq: Show Blocked State\n[ 15.1] task:fio state:D\n"
    assert hang_report(hang) == ["[ 15.0] sysrq: Show Blocked State", "[ 15.1] task:fio state:D"]


# ---- exit-code contract -------------------------------------------------------------------
@pytest.mark.parametrize("res, fail_on_warning, code, words", [
    (RunResult(status=0), False, 0, ""),
    (RunResult(status=5), False, 5, ""),
    (RunResult(timed_out=True), False, EXIT_TIMEOUT, "timed out after 30s"),
    (RunResult(status=125, error="modprobe ublk_drv failed in the guest"), False,
     EXIT_GUEST_FAILURE, "modprobe ublk_drv failed"),
    (RunResult(qemu_rc=0, trouble=[("panic", "[ 4.7] Kernel panic - not syncing: x")]), False,
     EXIT_GUEST_FAILURE, "kernel crash: [ 4.7] Kernel panic"),
    (RunResult(qemu_rc=1), False, EXIT_GUEST_FAILURE, "boot failure"),
    (RunResult(status=0, trouble=[("ubsan", "u")]), False, 0, "1 ubsan"),
    (RunResult(status=0, trouble=[("ubsan", "u")]), True, EXIT_KERNEL_WARNING, "1 ubsan"),
    (RunResult(status=1, trouble=[("warning", "w")]), True, 1, "1 warning"),
    (RunResult(interrupted=15), False, 143, "signal 15"),
])
def test_exit_codes(res, fail_on_warning, code, words):
    got_code, verdict = ublk_vm.decide_exit(res, 30, fail_on_warning)
    assert got_code == code
    assert (words in verdict) if words else verdict == ""


def test_apt_failure_picks_the_reason():
    from ublkvm.apt import apt_failure
    out = ("Ign:1 http://m/debian sid InRelease\nErr:1 http://m/debian sid InRelease\n"
           "  Could not connect to m:80 - connect (111: Connection refused)\n"
           "Reading package lists...\nW: Failed to fetch http://m/debian/dists/sid/InRelease\n")
    assert apt_failure(out) == "Could not connect to m:80 - connect (111: Connection refused)"
    assert apt_failure("Reading...\nE: Unable to locate package linux-source-7.2\n") == \
        "E: Unable to locate package linux-source-7.2"
    assert apt_failure("") == "no output"


def test_pyenv_shims_are_resolved_on_the_host(tmp_path):
    from ublkvm.qemu import resolve_shim
    real = tmp_path / "python3.11"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    which = {"python3": "/root/.pyenv/shims/python3", "fio": "/usr/bin/fio"}.get
    assert resolve_shim(["python3", "-m", "pytest"], which, lambda n: str(real)) == [
        str(real), "-m", "pytest"]
    assert resolve_shim(["fio", "x"], which, lambda n: "/nope") == ["fio", "x"]
    assert resolve_shim(["python3"], which, lambda n: "") == ["python3"]   # pyenv failed


def test_boot_died_only_when_the_job_never_started(tmp_path):
    import ublk_vm
    from ublkvm.qemu import RunResult
    res = RunResult()
    res.status = None
    assert ublk_vm.boot_died(res, tmp_path)             # crashed during boot: retry
    (tmp_path / "started").write_text("")
    assert not ublk_vm.boot_died(res, tmp_path)         # CMD ran (and died): report it
    (tmp_path / "started").unlink()
    res.timed_out = True
    assert not ublk_vm.boot_died(res, tmp_path)         # a hang is reported, not retried
    res.timed_out = False
    res.status = 0
    assert not ublk_vm.boot_died(res, tmp_path)


def test_job_script_marks_the_start_first():
    from ublkvm.qemu import job_script
    from ublkvm.initramfs import GUEST_JOB_DIR
    lines = job_script({}, "/work", ["true"], ["ublk_drv"]).splitlines()
    assert lines[2].startswith(f": > {GUEST_JOB_DIR}/started")
    assert lines[-1] == "exec true"
