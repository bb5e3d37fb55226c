"""A CLI server's control socket on the host: a server process (a fork of the test) serves a
device of the simulated driver, and is asked to resize and to quiesce it, by the protocol
(pyublk_fast.daemon.ask_server) and by the CLI's own commands."""
from __future__ import annotations

import json
import os
import socket

import pytest

from asuser import as_user
from pyublk_fast import cli, records
from pyublk_fast.daemon import ask_server, control_address, serve

MiB = 1 << 20


def _serve_in_child(w: int) -> None:
    from pyublk_fast.backends.memory import MemoryBackend
    from pyublk_fast.device import Device
    from pyublk_fast.transport.sim import SimTransport

    def start():
        t = SimTransport()
        return t, Device(MemoryBackend(4 * MiB), t, depth=8, recovery="reissue").start()

    def report(msg):
        os.write(w, json.dumps(msg).encode() + b"\n")
    code = 1
    try:
        code = serve(start, report, {"target": "memory", "backend_args": {"size": 4 * MiB}})
    finally:
        os._exit(code)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(dev_id, pid) of a server forked from the test; reaped (killed if still running)."""
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path / "run"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _serve_in_child(w)
    os.close(w)
    with os.fdopen(r) as fh:
        msg = json.loads(fh.readline())
    assert msg["ok"], msg
    state = {"status": None}
    yield msg["dev_id"], pid, state
    if state["status"] is None:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def _reap(pid: int, state: dict) -> int:
    state["status"] = os.waitpid(pid, 0)[1]
    return state["status"]


def test_resize_by_request_and_by_the_cli(server, capsys):
    dev_id, pid, _ = server
    reply = ask_server(dev_id, {"op": "resize", "size": 8 * MiB}, 10)
    assert reply == {"ok": True, "size": 8 * MiB}
    rec = records.read_record(dev_id)
    assert rec["pid"] == pid and rec["backend_args"]["size"] == 8 * MiB   # `recover` rebuilds it so
    assert cli.main(["resize", "-n", str(dev_id), "-s", "12M"]) == 0
    assert capsys.readouterr().out == f"sim:ublkb{dev_id}: 12m\n"
    assert records.read_record(dev_id)["backend_args"]["size"] == 12 * MiB
    assert cli.main(["resize", "-n", str(dev_id), "-s", "4M"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyublk_fast: device {dev_id}: resize device {dev_id} to 4194304 "
                          "bytes: shrinking is refused") and err.count("\n") == 1, err
    reply = ask_server(dev_id, {"op": "resize", "size": 12 * MiB + 100}, 10)
    assert not reply["ok"] and "multiple of the block size 512" in reply["error"]


def test_bad_requests_are_answered_and_the_server_goes_on(server):
    dev_id, pid, _ = server
    assert ask_server(dev_id, {"op": "format"}, 10) == {
        "ok": False, "error": "unknown request 'format' (this server knows quiesce and resize)"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:   # not JSON: no answer
        s.settimeout(10)
        s.connect(control_address(dev_id))
        s.sendall(b"quiesce please\n")
        assert s.recv(100) == b""
    assert ask_server(dev_id, {"op": "resize", "size": 4 * MiB}, 10)["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to ask as another user")
def test_other_users_are_refused(server):
    dev_id, _, _ = server
    reply = as_user(65534, ask_server, dev_id, {"op": "quiesce"}, 10)
    assert reply == {"ok": False, "error": "only root or the server's own user may ask"}
    assert ask_server(dev_id, {"op": "resize", "size": 4 * MiB}, 10)["ok"]   # still serving


def test_quiesce_leaves_the_record_and_ends_the_server(server, capsys):
    """The server quiesces its device, answers and exits: its record stays for `recover`
    (the simulated device dies with the process; on a kernel it waits, QUIESCED)."""
    dev_id, pid, state = server
    assert cli.main(["quiesce", "-n", str(dev_id)]) == 0
    assert f"device {dev_id} quiesced" in capsys.readouterr().out
    status = _reap(pid, state)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert records.read_record(dev_id)["pid"] == pid
    assert cli.main(["resize", "-n", str(dev_id), "-s", "8M"]) == 1
    assert "has no running server" in capsys.readouterr().err
    with pytest.raises(ConnectionRefusedError):
        ask_server(dev_id, {"op": "resize", "size": 8 * MiB}, 10)


def test_no_server_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    """No record, no server: the command says so in one line."""
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path / "run"))
    for cmd in (["quiesce", "-n", "3"], ["upgrade", "-n", "3"], ["resize", "-n", "3", "-s", "1G"]):
        assert cli.main(cmd) == 1
        err = capsys.readouterr().err
        assert err.startswith("pyublk_fast: device 3 has no running server") and \
            err.count("\n") == 1, err
