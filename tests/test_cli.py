"""Host-side CLI checks: help, argument errors, and a clear message without the ublk driver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyublk_fast import cli

REPO = Path(__file__).resolve().parents[1]
NO_DRIVER = not os.path.exists("/dev/ublk-control")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYUBLK_FAST_RUN_DIR=kw.pop("run_dir", "/tmp/pyublk_fast-test-cli"))
    return subprocess.run([sys.executable, "-m", "pyublk_fast", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)


@pytest.mark.parametrize("sub", [[], ["add"], ["list"], ["del"], ["recover"], ["features"]])
def test_help_everywhere(sub):
    res = run(*sub, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m pyublk_fast")
    if sub == ["add"]:
        for opt in ("-t", "-f", "-n", "-q", "-d", "-z", "-u", "--unprivileged", "--recovery",
                    "--foreground"):
            assert opt in res.stdout


@pytest.mark.parametrize("args,needle", [
    ([], "required: COMMAND"),
    (["add"], "required: -t/--type"),
    (["add", "-t", "floppy"], "invalid choice: 'floppy'"),
    (["add", "-t", "null", "-q", "0"], "--queues must be >= 1"),
    (["add", "-t", "null", "--submit-chunk", "0"], "--submit-chunk must be >= 1"),
    (["add", "-t", "null", "--poll-us", "-5"], "--poll-us must be >= 0"),
    (["add", "-t", "null", "-d", "x"], "invalid int value"),
    (["add", "-t", "null", "-s", "lots"], "bad size 'lots'"),
    (["recover"], "required: -n/--number"),
])
def test_argument_errors(args, needle):
    res = run(*args)
    assert res.returncode == 2
    assert needle in res.stderr, res.stderr


@pytest.mark.parametrize("args,needle", [
    (["add", "-t", "loop"], "-t loop needs a backing file: -f FILE"),
    (["add", "-t", "qcow2", "-f", "/nonexistent/x.qcow2"], "qemu-img create"),
    (["add", "-t", "null", "-f", "/etc/hostname"], "-t null takes no backing file"),
    (["add", "-t", "null", "-z", "-u"], "exclude each other"),
    (["add", "-t", "null", "--unprivileged", "-u"], "cannot use -z or -u"),
    (["del"], "say which device"),
    (["del", "-n", "3", "-a"], "say which device"),
])
def test_usage_errors_are_clear(args, needle):
    res = run(*args)
    assert res.returncode == 1
    assert res.stderr.startswith("pyublk_fast: ") and needle in res.stderr, res.stderr


@pytest.mark.skipif(not NO_DRIVER, reason="this host has /dev/ublk-control")
@pytest.mark.parametrize("args", [["features"], ["list"], ["del", "-a"],
                                  ["add", "-t", "null"], ["add", "-t", "memory", "--foreground"]])
def test_missing_driver_says_modprobe(args):
    res = run(*args)
    assert res.returncode == 1
    assert "modprobe ublk_drv" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_recover_without_record_asks_for_target(tmp_path):
    res = run("recover", "-n", "7", run_dir=str(tmp_path))
    assert res.returncode == 1 and "no record of device 7" in res.stderr, res.stderr


def test_records_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path / "run"))
    cli.write_record(5, {"target": "loop", "file": "/x", "pid": 123})
    assert json.loads((tmp_path / "run" / "5.json").read_text())["pid"] == 123
    assert cli.read_record(5)["file"] == "/x"
    cli.drop_record(5, pid=999)           # someone else's server: kept
    assert cli.read_record(5) is not None
    cli.drop_record(5, pid=123)
    assert cli.read_record(5) is None


@pytest.mark.parametrize("text,want", [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
                                       ("2KiB", 2048), ("1.5k", 1536)])
def test_parse_size(text, want):
    assert cli.parse_size(text) == want
