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
    # the formats of the 7.2 guest
    ("WARNING: drivers/block/ublk_drv.c:2071 at ublk_ch_release+0x1f/0x80 [ublk_drv], "
     "CPU#0: kublk/310", "warning"),
    ("WARNING: at ublk_ch_release+0x1f/0x80 [ublk_drv], CPU#0: kublk/310", "warning"),
    ("INFO: task fio:230 blocked in I/O wait for more than 122 seconds.", "hung task"),
    ("WARNING: suspicious RCU usage", "lockdep"),
    ("WARNING: kublk/203 still has locks held!", "lockdep"),
    ("WARNING: possible circular locking dependency detected", "lockdep"),
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
    ctx = trouble_context(log, {line for _, line in scan_log(log)}, before=1, after=1)
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



# ---- whole runs with a stand-in qemu ------------------------------------------------------
FAKE_QEMU = r"""#!/bin/sh
# stand-in qemu: dies at once like an unusable accelerator, or with FAKE_GUEST_DMESG set
# plays a guest whose CMD started, printed that kernel log and exited FAKE_GUEST_STATUS
echo "$*" >> "$FAKE_QEMU_CALLS"
[ -n "$FAKE_GUEST_DMESG" ] || { echo "qemu-system-x86_64: error: failed to set MSR 0x10a"; exit 1; }
job=$(echo "$*" | sed -n 's/.*path=\([^,]*\),mount_tag=job.*/\1/p')
: > "$job/started"
cat "$FAKE_GUEST_DMESG"
cp "$FAKE_GUEST_DMESG" "$job/dmesg.txt"
echo "${FAKE_GUEST_STATUS:-0}" > "$job/status"
"""


@pytest.fixture
def fake_vm(tmp_path, monkeypatch):
    """``boot(args, dmesg=None, kver=...)`` runs ublk_vm.main against FAKE_QEMU (no
    kernel needed) and returns its exit status; the qemu command lines land in ``calls``."""
    from ublkvm.kernel import Kernel
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "qemu-system-x86_64").write_text(FAKE_QEMU)
    (fake_bin / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("UBLK_VM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_QEMU_CALLS", str(tmp_path / "calls"))
    monkeypatch.delenv("FAKE_GUEST_DMESG", raising=False)
    monkeypatch.setattr(ublk_vm, "install_handlers", lambda: None)

    def boot(args, dmesg=None, kver="7.2.13+deb14-amd64"):
        kernel = Kernel(kver, tmp_path, tmp_path / "vmlinuz", tmp_path / "mod", "sid", "7.2")
        monkeypatch.setattr(ublk_vm, "prepare", lambda s, log: (kernel, tmp_path / "initrd"))
        if dmesg is not None:
            (tmp_path / "dmesg.txt").write_text(dmesg)
            monkeypatch.setenv("FAKE_GUEST_DMESG", str(tmp_path / "dmesg.txt"))
        return ublk_vm.main(["run", *args, "--", "true"])

    boot.calls = tmp_path / "calls"
    boot.runs = tmp_path / "cache" / "runs"
    return boot


def test_each_boot_attempt_gets_its_own_run_dir(fake_vm, monkeypatch, capsys):
    """A qemu that dies at once (e.g. UBLK_VM_ACCEL=kvm where KVM is unusable) is booted
    again; every attempt, all within one second, needs a fresh run dir of its own."""
    import re
    import time
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260101-000000")   # one second
    assert fake_vm(["-t", "60"]) == EXIT_GUEST_FAILURE
    jobdirs = [re.search(r"path=([^,]+),mount_tag=job", line).group(1)
               for line in fake_vm.calls.read_text().splitlines()]
    assert len(jobdirs) == ublk_vm.BOOT_ATTEMPTS == len(set(jobdirs))
    runs = sorted(fake_vm.runs.iterdir())                      # failed runs are kept
    assert sorted(str(r / "job") for r in runs) == sorted(jobdirs)
    for run in runs:
        assert "failed to set MSR" in (run / "console.log").read_text()
        assert (run / "job" / "job.sh").read_text().endswith("exec true\n")
    err = capsys.readouterr().err
    assert f"booting again ({ublk_vm.BOOT_ATTEMPTS}/{ublk_vm.BOOT_ATTEMPTS})" in err
    assert "exit status 125" in err


# ---- known upstream kernel reports (strict lane) ------------------------------------------
from ublkvm import allowlist  # noqa: E402

BOOT_LOG = """\
[    0.000000] Linux version 7.2.13+deb14-amd64 (debian-kernel@lists.debian.org)
[    2.101000] ublk_drv: loaded
"""
KNOWN_UBSAN = """\
[  135.467620] ------------[ cut here ]------------
[  135.467823] UBSAN: array-index-out-of-bounds in /build/reproducible-path/linux-7.2.13/io_uring/rsrc.c:1070:12
[  135.467991] index 0 is out of range for type 'bio_vec [*]'
[  135.468426] CPU: 1 UID: 0 PID: 202 Comm: python3.11 Not tainted 7.2.13+deb14-amd64 #1 PREEMPT(lazy)  Debian 7.2.13-1
[  135.468750] Call Trace:
[  135.469229]  <TASK>
[  135.469537]  ubsan_epilogue+0x5/0x2b
[  135.469569]  io_buffer_register_bvec+0x269/0x2e0
[  135.469605]  ublk_dispatch_req+0x161/0x230 [ublk_drv]
[  135.470674]  </TASK>
[  135.474711] ---[ end trace ]---
"""
"""The report a 7.2.13 guest printed during a zero-copy test (trimmed)."""
NEW_WARN = """\
[  140.100000] ------------[ cut here ]------------
[  140.100100] WARNING: drivers/block/ublk_drv.c:2071 at ublk_ch_release+0x1f/0x80 [ublk_drv], CPU#0: kublk/310
[  140.100200] Modules linked in: ublk_drv
[  140.100300] Call Trace:
[  140.100400]  ublk_ch_release+0x1f/0x80 [ublk_drv]
[  140.100500] ---[ end trace 0000000000000000 ]---
"""
RSRC = "UBSAN: array-index-out-of-bounds in io_uring/rsrc.c:1070:12"


def test_the_shipped_list_loads_and_knows_the_rsrc_report():
    entries = allowlist.load()
    assert entries and all(e.kernels and e.code and e.why for e in entries)
    new, known = allowlist.triage(scan_log(BOOT_LOG + KNOWN_UBSAN), entries, "7.2.13+deb14-amd64")
    assert new == [] and [e.report for e, _ in known] == [RSRC]
    assert allowlist.known_summary(known) == f"1x {RSRC}"


@pytest.mark.parametrize("message", [
    "UBSAN: array-index-out-of-bounds in io_uring/rsrc.c:1071:12",      # another line
    "UBSAN: array-index-out-of-bounds in io_uring/rsrc.c:107:12",       # a prefix of it
    "UBSAN: array-index-out-of-bounds in io_uring/rsrc.c:1070:123",
    "UBSAN: array-index-out-of-bounds in io_uring/rsrc.c:1070:5",       # another column
    "UBSAN: shift-out-of-bounds in io_uring/rsrc.c:1070:12",            # another check
    "UBSAN: array-index-out-of-bounds in io_uring/rsrc2.c:1070:12",
    "UBSAN: array-index-out-of-bounds in drivers/block/ublk_drv.c:1070:12",
    "WARNING: io_uring/rsrc.c:1070 at io_buffer_register_bvec+0x269/0x2e0, CPU#1: python3/202",
    "BUG: KASAN: slab-out-of-bounds in io_buffer_register_bvec+0x813/0xb80",
])
def test_an_entry_hides_no_other_report_from_its_file(message):
    line = f"[  135.467823] {message}"
    new, known = allowlist.triage(scan_log(line), allowlist.load(), "7.2.13+deb14-amd64")
    assert known == [] and [kind for kind, _ in new] == [classify(message)] != [""]


@pytest.mark.parametrize("kver, covered", [
    ("7.2.13+deb14-amd64", True), ("7.2.13", True), ("7.2.13-1-amd64", True),
    ("7.2.14+deb14-amd64", False), ("7.2.130+deb14-amd64", False), ("7.2.1+deb14-amd64", False),
    ("6.12.117+deb13-amd64", False),
])
def test_entries_cover_only_the_kernel_versions_they_name(kver, covered):
    entry = allowlist.KnownReport(RSRC, ("7.2.13",), "code", "why")
    assert entry.covers(kver) is covered
    assert allowlist.KnownReport(RSRC, ("7.2",), "c", "w").covers(kver) is kver.startswith("7.2.")


def test_signatures_drop_only_what_changes_between_runs():
    a = allowlist.signature("[ 12.1] WARNING: drivers/block/ublk_drv.c:2071 at "
                            "ublk_ch_release+0x1f/0x80 [ublk_drv], CPU#0: kublk/310")
    b = allowlist.signature("[ 99.9] WARNING: drivers/block/ublk_drv.c:2071 at "
                            "ublk_ch_release+0x2f/0x90 [ublk_drv], CPU#1: fio/77")
    assert a == b == "WARNING: drivers/block/ublk_drv.c:2071 at ublk_ch_release [ublk_drv]"
    old_format = "[ 1.0] WARNING: CPU: 1 PID: 130 at drivers/block/ublk_drv.c:123 ublk_foo+0x1/0x2"
    assert allowlist.signature(old_format) == "WARNING: at drivers/block/ublk_drv.c:123 ublk_foo"
    assert allowlist.signature(KNOWN_UBSAN.splitlines()[1]) == RSRC


def test_a_crash_is_never_a_known_report():
    entry = allowlist.KnownReport(RSRC, ("7.2.13",), "code", "why")
    new, known = allowlist.triage([("oops", f"[ 1.0] {RSRC}")], [entry], "7.2.13")
    assert known == [] and len(new) == 1


GOOD_ENTRY = f'report = "{RSRC}"\nkernels = ["7.2.13"]\ncode = "x[i] = y;"\nwhy = "upstream"\n'


@pytest.mark.parametrize("body, error", [
    ("[[known]]\n" + GOOD_ENTRY.replace('why = "upstream"\n', ""), r"missing \['why'\]"),
    ("[[known]]\n" + GOOD_ENTRY + 'reason = "typo"\n', r"unknown \['reason'\]"),
    ("[[known]]\n" + GOOD_ENTRY.replace(":1070:12", ""), "names no source line"),
    ("[[known]]\n" + GOOD_ENTRY.replace("io_uring/", "/build/x/linux-7.2.13/io_uring/"),
     "without run-specific parts"),
    ("[[known]]\n" + GOOD_ENTRY.replace(RSRC, "Oops: general protection fault in a.c:1"),
     "not a kernel warning header"),
    ("[[known]]\n" + GOOD_ENTRY.replace(RSRC, "ublk_drv: loaded from a.c:1"),
     "not a kernel warning header"),
    ("[[known]]\n" + GOOD_ENTRY.replace('["7.2.13"]', "[]"), "kernels must be"),
    ("[[known]]\n" + GOOD_ENTRY.replace('["7.2.13"]', '["latest"]'), "kernels must be"),
    ("[[known]]\n" + GOOD_ENTRY.replace('"x[i] = y;"', '""'), "code must be a non-empty"),
    ("[[known]]\n" + GOOD_ENTRY + "[[known]]\n" + GOOD_ENTRY, "listed twice"),
    ("[[known]]\nreport = \n", "cannot read"),
    ("[[known]]\n" + GOOD_ENTRY + "[other]\nx = 1\n", "only \\[\\[known\\]\\] entries"),
])
def test_a_bad_list_is_refused_in_one_line(tmp_path, body, error):
    path = tmp_path / "known.toml"
    path.write_text(body)
    with pytest.raises(LaneError, match=error) as exc:
        allowlist.load(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    path.write_text("# nothing known\n")
    assert allowlist.load(path) == []
    path.write_text("[[known]]\n" + GOOD_ENTRY)
    assert allowlist.load(path)[0].kernels == ("7.2.13",)


def test_strict_run_passes_with_only_known_reports(fake_vm, capsys):
    assert fake_vm(["--fail-on-warning"], BOOT_LOG + KNOWN_UBSAN) == 0
    err = capsys.readouterr().err
    assert "known upstream kernel reports, allowed by " in err and f"1x {RSRC}" in err
    assert "kernel trouble" not in err
    assert list(fake_vm.runs.iterdir()) == []              # a clean run leaves nothing


def test_strict_run_fails_on_a_new_warning_and_quotes_it(fake_vm, capsys):
    warn = NEW_WARN.splitlines()[1]
    assert fake_vm(["--fail-on-warning"], BOOT_LOG + KNOWN_UBSAN + NEW_WARN) == \
        EXIT_KERNEL_WARNING
    err = capsys.readouterr().err
    verdict = next(line for line in err.splitlines() if "kernel trouble" in line)
    assert f'1 warning, first "{warn.split("] ", 1)[1]}": not a known upstream report' in verdict
    assert f"  {warn}\n" in err and f"1x {RSRC}" in err
    assert 'as report = "WARNING: drivers/block/ublk_drv.c:2071 at ublk_ch_release ' \
           '[ublk_drv]"' in err
    around = err[err.index("kernel log around them"):err.index("guest console tail")]
    assert "Modules linked in: ublk_drv" in around and "index 0 is out of range" not in around
    assert len(list(fake_vm.runs.iterdir())) == 1          # kept for a look


def test_without_strict_mode_a_new_warning_is_reported_but_passes(fake_vm, capsys):
    assert fake_vm([], BOOT_LOG + NEW_WARN) == 0
    assert "kernel trouble during the run: 1 warning" in capsys.readouterr().err


def test_a_known_report_on_another_kernel_passes_with_a_note_to_recheck(fake_vm, capsys):
    assert fake_vm(["--fail-on-warning"], BOOT_LOG + KNOWN_UBSAN, kver="7.2.14+deb14-amd64") == 0
    err = capsys.readouterr().err
    assert "allowed by" in err and "for kernels 7.2.13, not 7.2.14+deb14-amd64" in err
    assert "check the code at that line is unchanged" in err


def test_a_broken_list_stops_the_run_before_booting(fake_vm, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[known]]\nreport = 'UBSAN: x'\n")
    monkeypatch.setattr(allowlist, "KNOWN_REPORTS", bad)
    assert fake_vm([], BOOT_LOG) == 126
    assert f"error: {bad}: entry 1: missing" in capsys.readouterr().err
    assert not fake_vm.calls.exists()
