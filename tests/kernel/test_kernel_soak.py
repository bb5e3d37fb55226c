"""Soak on a real kernel: CLI add/del cycles leave no device, server, fd or thread behind,
and a server's fds and memory stay flat through a minute of verified random I/O."""
from __future__ import annotations

import glob
import os

from kernel_fixtures import (MiB, added, cli, cli_add, cli_env, cli_start, cli_wait,  # noqa: F401
                             fio, server_pid)
from procstat import usage
from pyublk_fast.transport.kernel import pid_alive
from pyublk_fast.util import wait_for_path, wait_until

ADD_DEL_CYCLES = 25
FIO_SECONDS = 60
#: Time for a deleted device's nodes to vanish and its server to exit.
GONE_S = 10.0
#: The fio soak's device: one queue as deep as fio's queue, so the warm-up puts every
#: tag to work (a tag's buffer pages are resident from its first request on).
DEPTH = 32
#: Allowed growth of the server's RSS over the timed run. The server serves from C with
#: no Python call and no allocation per request, and the warm-up has put every tag
#: buffer to work, so only Python's own housekeeping moves it (its check every 0.2 s
#: that the device still serves): +20 KiB measured. 1 MiB is about 4 bytes for each of
#: the run's requests (~250,000 under TCG), so a leak of anything per request shows.
SERVER_RSS_SLACK_KIB = 1024


def ublk_nodes() -> set[str]:
    return set(glob.glob("/dev/ublkc*") + glob.glob("/dev/ublkb*"))


def servers_of(env: dict) -> list[int]:
    """Live processes started with this environment's state directory: its servers."""
    mark = f"PYUBLK_FAST_RUN_DIR={env['PYUBLK_FAST_RUN_DIR']}".encode()
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if mark in fh.read().split(b"\0") and pid_alive(pid):
                    found.append(pid)
        except OSError:               # exited meanwhile
            pass
    return found


def why_alive(env: dict, pid: int) -> str:
    """What a server that should have exited is doing: its threads' states and kernel
    stacks, and the end of its log."""
    lines = [f"server {pid} still runs"]
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                comm, rest = fh.read().split("(", 1)[1].rsplit(")", 1)
            state = rest.split()[0]
            with open(f"/proc/{pid}/task/{tid}/stack") as fh:
                stack = " <- ".join(line.split()[-1] for line in fh.read().splitlines()[:6])
        except OSError as exc:             # the thread exited meanwhile
            lines.append(f"  thread {tid}: {exc}")
            continue
        lines.append(f"  thread {tid} {comm} {state}: {stack}")
    try:
        with open(os.path.join(env["PYUBLK_FAST_RUN_DIR"], f"server-{pid}.log")) as fh:
            lines.append("log:\n" + fh.read()[-3000:])
    except OSError as exc:
        lines.append(f"no log: {exc}")
    return "\n".join(lines)


def free_ids(n: int) -> list[int]:
    """The n lowest device ids no device has."""
    taken = {int(p[len("/dev/ublkc"):]) for p in glob.glob("/dev/ublkc*")}
    return [i for i in range(len(taken) + n) if i not in taken][:n]


def test_cli_add_del_cycles_leave_nothing_behind(cli_env):
    """25 x `add -t null` (read from it) then `del -n N`: the nodes and the server go each
    time, and the test process holds no more fds or threads than before."""
    nodes = ublk_nodes()
    ids = free_ids(2)
    start = usage()
    # every server from a new interpreter (not a fork of this test): servers_of() finds
    # them by the state directory in the environment they were started with
    dev_id, path = added(cli_wait(cli_start("add", "-t", "null", "-n", str(ids[0]), env=cli_env)))
    for cycle in range(1, ADD_DEL_CYCLES + 1):
        pid = server_pid(cli_env, dev_id)
        assert servers_of(cli_env) == [pid]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096
        finally:
            os.close(fd)
        # The next cycle's add starts while this device is deleted, under the other id
        # (so it never takes this one's): each command spends seconds importing under
        # the VM's TCG, and two at once use both CPUs.
        dele = cli_start("del", "-n", str(dev_id), env=cli_env)
        add = cli_start("add", "-t", "null", "-n", str(ids[cycle % 2]), env=cli_env) \
            if cycle < ADD_DEL_CYCLES else None
        res = cli_wait(dele)
        assert res.returncode == 0, res.stdout + res.stderr
        assert wait_for_path(f"/dev/ublkc{dev_id}", False, GONE_S), f"/dev/ublkc{dev_id} left"
        assert wait_for_path(path, False, GONE_S), f"{path} left"
        assert wait_until(lambda: not pid_alive(pid), GONE_S), why_alive(cli_env, pid)
        if add is not None:
            dev_id, path = added(cli_wait(add))
    assert ublk_nodes() <= nodes, f"left behind: {sorted(ublk_nodes() - nodes)}"
    assert servers_of(cli_env) == []
    end = usage()
    assert end.fds <= start.fds and end.threads <= start.threads, f"{start} before, {end} after"


def test_server_fds_and_memory_flat_through_a_minute_of_fio(cli_env, tmp_path):
    """A loop server under 60 s of verified randrw: same fds, RSS within a few bytes a request."""
    img = tmp_path / "soak.img"
    with open(img, "wb") as fh:
        fh.truncate(64 * MiB)
    dev_id, path = cli_add(cli_env, "-t", "loop", "-f", str(img), "-d", str(DEPTH))
    pid = server_pid(cli_env, dev_id)
    job = ["--name=soak", f"--filename={path}", "--rw=randrw", "--bs=4k", f"--iodepth={DEPTH}",
           "--ioengine=io_uring", "--direct=1", "--size=32M", "--verify=crc32c",
           "--verify_fatal=1", "--verify_backlog=4096", "--time_based"]
    fio(*job, "--runtime=5")                                    # warm-up
    before = usage(pid)
    out = fio(*job, f"--runtime={FIO_SECONDS}", timeout=FIO_SECONDS + 120)
    after = usage(pid)
    ios = sum(j[d]["total_ios"] for j in out["jobs"] for d in ("read", "write"))
    print(f"server {pid}: {before} before, {after} after {FIO_SECONDS} s, {ios} requests")
    assert ios > 0 and out["jobs"][0]["elapsed"] >= FIO_SECONDS
    assert after.fds == before.fds, f"server fds: {before} before, {after} after"
    grown = after.rss_kib - before.rss_kib
    assert grown <= SERVER_RSS_SLACK_KIB, f"server RSS grew by {grown} KiB over {ios} requests"
    res = cli("del", "-n", str(dev_id), env=cli_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert wait_until(lambda: not pid_alive(pid), GONE_S), why_alive(cli_env, pid)
