"""The nbd backend over the simulated driver, against real NBD servers started here
(nbdkit's memory plugin, qemu-nbd on a qcow2 image; Unix socket and loopback TCP) and
a fake server for the protocol faults. Data is checked against a model."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from pyublk_fast.device import Device
from pyublk_fast.backends.nbd import NbdBackend, NbdError, parse_uri
from pyublk_fast.backends import nbd as proto
from pyublk_fast.util import wait_until

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
TIMEOUT = 20.0

need_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                 reason="nbdkit not installed (tools/dev.sh installs it)")
need_qemu = pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
                               reason="qemu-utils not installed (tools/dev.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, kind: str, addr) -> None:
    """Until the server accepts connections (or died: its stderr in the failure)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
        fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
        with socket.socket(fam) as s:
            try:
                s.connect(addr)
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"server not listening on {addr} after {TIMEOUT} s")


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.01)


class Server:
    """A server process listening on a Unix socket or 127.0.0.1; stop() ends it."""

    def __init__(self, argv_of, kind: str, tmp_path, export: str = ""):
        if kind == "unix":
            path = str(tmp_path / "nbd.sock")
            self.addr, self.uri = path, f"nbd+unix:///{export}?socket={path}"
        else:
            port = free_port()
            self.addr, self.uri = ("127.0.0.1", port), f"nbd://127.0.0.1:{port}/{export}"
        self.proc = subprocess.Popen(argv_of(kind, self.addr), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL)
        wait_listening(self.proc, kind, self.addr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(TIMEOUT)
        self.proc.stderr.close()


def nbdkit_argv(*extra: str, params: tuple[str, ...] = (), size: int = SIZE):
    """nbdkit's memory plugin; extra: options (filters), params: the filters' parameters."""
    def argv(kind, addr):
        where = ["-U", addr] if kind == "unix" else ["-i", "127.0.0.1", "-p", str(addr[1])]
        return ["nbdkit", "-f", *where, *extra, "memory", str(size), *params]
    return argv


def qemu_nbd_argv(image: str, export: str = "disk", shared: int = 4, fmt: str = "qcow2",
                  holes_log: str | None = None):
    """qemu-nbd; holes_log: a file its trace writes a line to for each hole chunk it sends."""
    trace = ["--trace", f"enable=nbd_co_send_structured_read_hole,file={holes_log}"] if holes_log else []

    def argv(kind, addr):
        where = ["-k", addr] if kind == "unix" else ["-b", "127.0.0.1", "-p", str(addr[1])]
        return ["qemu-nbd", "-f", fmt, "-t", "-e", str(shared), "-x", export,
                *where, *trace, image]
    return argv


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(argv_of, kind, export=""):
        s = Server(argv_of, kind, tmp_path, export)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def random_io(blk, model: bytearray, rng: random.Random, steps: int, size: int,
              discards: bool = True) -> None:
    """Writes, discards, write-zeroes, flushes and reads (checked), all against model.
    discards=False for servers where a trimmed range need not read back as zeros (NBD
    lets a server ignore TRIM: qemu-nbd does by default)."""
    for i in range(steps):
        off = rng.randrange(0, size // 512) * 512
        n = min(rng.randrange(1, 256) * 512, size - off)
        r = rng.random()
        if r < 0.45:
            data = rng.randbytes(n)
            assert blk.pwrite(data, off) == n
            model[off:off + n] = data
        elif r < 0.55 and discards:
            blk.discard(off, n)
            model[off:off + n] = bytes(n)
        elif r < 0.65:
            blk.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        elif r < 0.7:
            blk.flush()
        else:
            assert blk.pread(n, off) == bytes(model[off:off + n]), f"step {i}: read {n}@{off}"


# -- URIs -----------------------------------------------------------------------------------

def test_uris_as_libnbd_and_qemu_write_them():
    assert parse_uri("nbd://localhost/disk") == ("tcp", ("localhost", 10809), "disk")
    assert parse_uri("nbd://127.0.0.1:10810") == ("tcp", ("127.0.0.1", 10810), "")
    assert parse_uri("nbd://[::1]:5000/a%20b") == ("tcp", ("::1", 5000), "a b")
    assert parse_uri("nbd+unix:///disk?socket=/run/nbd.sock") == ("unix", "/run/nbd.sock", "disk")
    assert parse_uri("nbd+unix://?socket=/s") == ("unix", "/s", "")
    for bad, why in [("nbd+unix:///disk", "no socket"), ("nbd:///disk", "no host"),
                     ("nbds://h/e", "TLS"), ("http://h/e", "not an NBD URI"),
                     ("nbd://h:99999/e", "bad port"), ("nbd+unix://host/e?socket=/s", "has no host")]:
        with pytest.raises(NbdError, match=why):
            parse_uri(bad)


# -- real servers ---------------------------------------------------------------------------

# each transport once, and each reply kind once (nbdkit and qemu-nbd offer structured replies)
KIND_REPLIES = [("unix", "structured"), ("tcp", "simple")]


@need_nbdkit
@pytest.mark.parametrize("kind,replies", KIND_REPLIES)
def test_nbdkit_memory_data_matches_model(sim, servers, kind, replies):
    srv = servers(nbdkit_argv(), kind)
    backend = NbdBackend(srv.uri, structured_replies=replies == "structured")
    assert (backend.size, backend.read_only, backend.can_flush, backend.can_fua,
            backend.can_discard, backend.can_write_zeroes, backend.structured) == \
        (SIZE, False, True, True, True, True, replies == "structured")
    model = bytearray(SIZE)
    with Device(backend, sim, queues=2, depth=32) as dev, dev.open() as blk:
        random_io(blk, model, random.Random(kind), 150, SIZE)
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=32, count=4000, verify=True,
                         region=2 * MiB)
        assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 4000)
        # the load generator's region is its pattern now: keep checking the rest
        blk.pwrite(bytes(model[:2 * MiB]), 0)
        reqs = [(1, off, 64 * KiB, os.urandom(64 * KiB), 1 << 13) for off in range(0, 2 * MiB, 64 * KiB)]
        assert blk.submit(reqs) == [64 * KiB] * len(reqs)       # FUA writes, 32 at once
        for op, off, n, data, _ in reqs:
            model[off:off + n] = data
        assert blk.pread(SIZE, 0) == bytes(model)
    # what the server holds, through a second client of the same export
    with Device(NbdBackend(srv.uri), sim) as dev, dev.open() as blk:
        assert blk.pread(SIZE, 0) == bytes(model)


@need_nbdkit
@pytest.mark.parametrize("path", ["need_get_data", "user_copy"])
def test_buffered_data_paths(sim, servers, path):
    """The other buffered paths (copy is above): a verified load, then a device read of
    what another connection wrote."""
    srv = servers(nbdkit_argv(), "unix")
    with Device(NbdBackend(srv.uri), sim, depth=16, data_path=path) as dev:
        r = sim.run_load(dev.dev_id, rw="randrw", bs=8192, qd=16, count=2000, verify=True,
                         region=1 * MiB)
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 2000)
    with Device(NbdBackend(srv.uri), sim, depth=4) as dev, dev.open() as blk:
        blk.pwrite(b"\x77" * 12288, 1 * MiB)
    with Device(NbdBackend(srv.uri), sim, depth=4, data_path=path) as dev, dev.open() as blk:
        assert blk.pread(16384, 1 * MiB) == b"\x77" * 12288 + bytes(4096)


@need_nbdkit
def test_queues_poll_only_when_told(sim, servers):
    """The queues sleep until replies come (the server needs the CPUs); a caller's poll_us
    still makes them poll, serving the same data."""
    srv = servers(nbdkit_argv(), "unix")
    backend = NbdBackend(srv.uri)
    try:
        assert Device(backend, sim).poll_us == 0
    finally:
        backend.close()
    with Device(NbdBackend(srv.uri), sim, depth=16, poll_us=200) as dev:
        assert dev.poll_us == 200
        r = sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=16, count=2000, verify=True,
                         region=1 * MiB)
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 2000)


def test_zero_copy_is_not_offered(sim, fake):
    f = fake(on_request=good)
    backend = NbdBackend(f.uri)
    try:
        with pytest.raises(ValueError, match="data_path='zero_copy' is not available"):
            Device(backend, sim, data_path="zero_copy")
    finally:
        backend.close()


@need_nbdkit
def test_discard_and_write_zeroes_read_back_zeros(sim, servers):
    srv = servers(nbdkit_argv(), "unix")
    with Device(NbdBackend(srv.uri), sim, depth=8) as dev, dev.open() as blk:
        blk.pwrite(b"\xa5" * (256 * KiB), 0)
        blk.discard(64 * KiB - 1024, 64 * KiB + 2048)
        blk.write_zeroes(200 * KiB + 512, 3 * 512)
        blk.flush()
        got = blk.pread(256 * KiB, 0)
    want = bytearray(b"\xa5" * (256 * KiB))
    want[64 * KiB - 1024:128 * KiB + 1024] = bytes(64 * KiB + 2048)
    want[200 * KiB + 512:200 * KiB + 2048] = bytes(1536)
    assert got == bytes(want)


@need_nbdkit
def test_export_capabilities_become_the_devices(sim, servers):
    """Read-only, no write zeroes, no multi-conn: as the export says."""
    srv = servers(nbdkit_argv("-r", "--filter=nozero", "--filter=multi-conn",
                              params=("zeromode=none", "multi-conn-mode=disable")), "unix")
    backend = NbdBackend(srv.uri)
    assert (backend.read_only, backend.can_write_zeroes, backend.multi_conn) == (True, False, False)
    with Device(backend, sim) as dev, dev.open() as blk:
        assert blk.pread(4096, 0) == bytes(4096)
        res = blk.submit([(1, 0, 4096, bytes(4096))])
        assert res[0] < 0, "a write to a read-only export's device must fail"
    backend = NbdBackend(srv.uri)
    try:
        with pytest.raises(NbdError, match=r"does not allow several connections \(no multi-conn\): "
                                            r"serve it with one queue \(-q 1\)"):
            with Device(backend, sim, queues=2):
                pass
    finally:
        backend.close()


@need_nbdkit
def test_recovered_queue_opens_a_new_connection(sim, servers):
    """A server killed and recovered in the same process: the queue set up again replaces
    its connection (one per queue: no multi-conn needed) and serves the same data."""
    srv = servers(nbdkit_argv("--filter=multi-conn", params=("multi-conn-mode=disable",)), "unix")
    with Device(NbdBackend(srv.uri), sim, depth=8, recovery="reissue") as dev:
        with dev.open() as blk:
            blk.pwrite(b"\x31" * 8192, 4096)
        dev.kill()
        dev.recover()
        with dev.open() as blk:
            assert blk.pread(16384, 0) == bytes(4096) + b"\x31" * 8192 + bytes(4096)
            blk.pwrite(b"\x32" * 4096, 0)
            assert blk.pread(4096, 0) == b"\x32" * 4096


@need_qemu
@pytest.mark.parametrize("kind,replies", KIND_REPLIES)
def test_qemu_nbd_qcow2_holds_what_was_written(sim, servers, tmp_path, kind, replies):
    """Random I/O read back against a model; the image holds what was written. With
    structured replies, qemu-nbd sends the qcow2's unallocated clusters as hole chunks
    (its trace counts them), which read back as zeros."""
    image = str(tmp_path / "disk.qcow2")
    holes = tmp_path / "holes.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True)
    srv = servers(qemu_nbd_argv(image, holes_log=str(holes)), kind, export="disk")
    model = bytearray(SIZE)
    backend = NbdBackend(srv.uri, structured_replies=replies == "structured")
    assert backend.structured == (replies == "structured")
    with Device(backend, sim, depth=32) as dev, dev.open() as blk:
        random_io(blk, model, random.Random(kind), 150, SIZE, discards=False)
        blk.flush()
        assert blk.pread(SIZE, 0) == bytes(model)
    srv.stop()
    sent = holes.read_text().count("read hole") if holes.exists() else 0
    assert (sent > 0) == (replies == "structured"), f"{sent} hole chunks sent"
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), image],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


# -- connection and handshake errors --------------------------------------------------------

def test_unreachable_server_is_one_clear_line(tmp_path):
    with pytest.raises(NbdError, match=r"cannot connect to .*nope.sock: No such file"):
        NbdBackend(f"nbd+unix:///?socket={tmp_path}/nope.sock")
    port = free_port()
    with pytest.raises(NbdError, match=rf"cannot connect to 127.0.0.1:{port}: Connection refused"):
        NbdBackend(f"nbd://127.0.0.1:{port}/")


@need_qemu
def test_missing_export_is_named(servers, tmp_path):
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
    srv = servers(qemu_nbd_argv(image, export="disk"), "unix", export="other")
    with pytest.raises(NbdError, match="refused NBD_OPT_GO: no export named 'other'"):
        NbdBackend(srv.uri)


class FakeServer:
    """One NBD server connection in a thread: a handshake (or a broken one), then
    ``on_request(conn, header fields, data)`` for each request until it returns False.
    It agrees to structured replies only if ``structured`` (it refuses them as
    unsupported otherwise); ``options`` lists the options the client sent."""

    def __init__(self, tmp_path, on_request=None, greeting=None, go_reply=None,
                 size=1 * MiB, flags=proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH,
                 structured=False):
        self.path = str(tmp_path / "fake.sock")
        self.uri = f"nbd+unix:///?socket={self.path}"
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(self.path)
        self.lsock.listen(4)
        self.on_request = on_request
        self.greeting = greeting
        self.go_reply = go_reply
        self.size, self.flags = size, flags
        self.structured = structured
        self.structured_reply = 0           # a reply type to the option in place of the usual
        self.options: list[int] = []
        self.conns: list[socket.socket] = []
        self.seen: list[tuple[int, int]] = []     # (command, its flags) of each request
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def recv(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def serve(self):
        """Each connection in turn, until the listening socket is closed."""
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.serve_one(conn)

    def serve_one(self, conn):
        try:
            if self.greeting is not None:
                conn.sendall(self.greeting)
                self.recv(conn, 1)
                return
            conn.sendall(struct.pack(">QQH", proto.NBD_MAGIC, proto.IHAVEOPT,
                                     proto.NBD_FLAG_FIXED_NEWSTYLE | proto.NBD_FLAG_NO_ZEROES))
            self.recv(conn, 4)

            def reply(rtype, body=b""):
                conn.sendall(struct.pack(">QIII", proto.NBD_REP_MAGIC, opt, rtype, len(body)) + body)
            while True:
                _, opt, length = struct.unpack(">QII", self.recv(conn, 16))
                self.recv(conn, length)
                self.options.append(opt)
                if opt != proto.NBD_OPT_STRUCTURED_REPLY:
                    break
                reply(self.structured_reply or
                      (proto.NBD_REP_ACK if self.structured else proto.NBD_REP_ERR | 1))
            if self.go_reply is not None:
                reply(*self.go_reply)
                self.recv(conn, 1)
                return
            reply(proto.NBD_REP_INFO, struct.pack(">HQH", proto.NBD_INFO_EXPORT, self.size, self.flags))
            reply(proto.NBD_REP_ACK)
            while True:
                magic, flags, cmd, cookie, off, n = struct.unpack(">IHHQQI", self.recv(conn, 28))
                assert magic == 0x25609513
                data = self.recv(conn, n) if cmd == 1 else b""
                self.seen.append((cmd, flags))
                if cmd == 2:                # NBD_CMD_DISC: the client is done
                    return
                if not self.on_request(conn, cmd, cookie, off, n, data):
                    self.recv(conn, 1)      # wait for the client to hang up
                    return
        except (EOFError, OSError):
            return

    def close(self):
        for s in [self.lsock, *self.conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)    # wakes the thread in accept() or recv()
            except OSError:
                pass
            s.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(**kw):
        f = FakeServer(tmp_path, **kw)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize("greeting,why", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
    (struct.pack(">QQ", proto.NBD_MAGIC, 0x420281861253) + bytes(8), "old-style"),
])
def test_bad_greeting_is_one_clear_line(fake, greeting, why):
    f = fake(greeting=greeting)
    with pytest.raises(NbdError, match=why):
        NbdBackend(f.uri)


def test_server_refusing_go_is_one_clear_line(fake):
    f = fake(go_reply=(proto.NBD_REP_ERR | 2, b"go away"))
    with pytest.raises(NbdError, match=r"refused NBD_OPT_GO: refused by the server's policy \(go away\)"):
        NbdBackend(f.uri)


def simple_reply(conn, cookie, err=0, data=b"", magic=0x67446698):
    conn.sendall(struct.pack(">IIQ", magic, err, cookie) + data)


def good(conn, cmd, cookie, off, n, data):
    simple_reply(conn, cookie, data=bytes(n) if cmd == 0 else b"")
    return True


def chunk(cookie, rtype, payload=b"", done=False, magic=0x668e33ef) -> bytes:
    """A structured reply chunk."""
    return struct.pack(">IHHQI", magic, 1 if done else 0, rtype, cookie, len(payload)) + payload


def data_chunk(cookie, off, data, done=False) -> bytes:
    return chunk(cookie, 1, struct.pack(">Q", off) + data, done)


def hole_chunk(cookie, off, n, done=False) -> bytes:
    return chunk(cookie, 2, struct.pack(">QI", off, n), done)


def error_chunk(cookie, err, msg=b"", offset=None, done=True, rtype=None) -> bytes:
    body = struct.pack(">IH", err, len(msg)) + msg
    if offset is not None:
        body += struct.pack(">Q", offset)
    return chunk(cookie, rtype or (0x8002 if offset is not None else 0x8001), body, done)


def none_chunk(cookie) -> bytes:
    return chunk(cookie, 0, done=True)


FAULTS = {
    "bad magic": (lambda conn, cmd, cookie, off, n, data: simple_reply(conn, cookie, magic=0x12345678),
                  "bad reply magic 0x12345678"),
    "structured": (lambda conn, cmd, cookie, off, n, data: simple_reply(conn, cookie, magic=0x668e33ef),
                   "structured reply, which was not negotiated"),
    "unknown cookie": (lambda conn, cmd, cookie, off, n, data: simple_reply(conn, cookie ^ 0x5a5a0000,
                                                                            data=bytes(n)),
                       "replied to unknown cookie"),
    "eof mid reply": (lambda conn, cmd, cookie, off, n, data: (
        simple_reply(conn, cookie, data=bytes(n // 2)), conn.shutdown(socket.SHUT_WR)),
        "closed the connection"),
    "eof mid header": (lambda conn, cmd, cookie, off, n, data: (
        conn.sendall(struct.pack(">I", 0x67446698)), conn.shutdown(socket.SHUT_WR)),
        r"closed the connection in the middle of a reply \(4 bytes in\)"),
}



def bad_read(*chunks):
    """A fault: the chunks of a READ's reply, made of its (cookie, off, n)."""
    return lambda conn, cmd, cookie, off, n, data: conn.sendall(b"".join(c(cookie, off, n) for c in chunks))


STRUCTURED_FAULTS = {
    "bad magic": (FAULTS["bad magic"][0], "bad reply magic 0x12345678"),
    "unknown cookie": (bad_read(lambda k, off, n: data_chunk(k ^ 0x5a5a0000, off, bytes(n), True)),
                       "replied to unknown cookie"),
    "simple reply to a read": (lambda conn, cmd, cookie, off, n, data: simple_reply(conn, cookie, data=bytes(n)),
                               "simple reply to READ cookie 0x2000000.., where structured replies"),
    "data after the end": (bad_read(lambda k, off, n: data_chunk(k, off + n - 512, bytes(1024), True)),
                           r"bytes 11776..12800 \(or an error offset there\), outside the request"),
    "hole before the start": (bad_read(lambda k, off, n: hole_chunk(k, off - 512, n, True)),
                              "bytes 3584..11776 .*outside the request"),
    "error offset outside": (bad_read(lambda k, off, n: error_chunk(k, 5, b"x", offset=off + n)),
                             "bytes 12288..12288 .*outside the request"),
    "overlap": (bad_read(lambda k, off, n: data_chunk(k, off + 4096, bytes(4096)),
                         lambda k, off, n: hole_chunk(k, off, 4097, True)),
                "bytes 4096..8193 of cookie 0x.*, overlapping an earlier chunk"),
    "short": (bad_read(lambda k, off, n: data_chunk(k, off, bytes(4096)), lambda k, off, n: none_chunk(k)),
              "ended the reply to READ cookie 0x.* with 4096 of its 8192 bytes sent"),
    "scattered": (bad_read(*(lambda k, off, n, i=i: data_chunk(k, off + 512 * i, bytes(256))
                             for i in range(9))),
                  "reply to cookie 0x.* in more than 8 separate pieces out of order"),
    "unexpected type": (bad_read(lambda k, off, n: chunk(k, 5, bytes(12), True)),
                        "reply chunk of unexpected type 5"),
    "data chunk too short": (bad_read(lambda k, off, n: chunk(k, 1, struct.pack(">Q", off), True)),
                             "reply chunk of type 1 with a bad length 8"),
    "none without done": (bad_read(lambda k, off, n: chunk(k, 0)), "NONE chunk without the DONE flag"),
    "error message too long": (bad_read(lambda k, off, n: chunk(k, 0x8001, struct.pack(">IH", 5, 9) + b"x", True)),
                               r"malformed error chunk \(type 32769, length 7\)"),
    "eof in chunk data": (lambda conn, cmd, cookie, off, n, data: (
        conn.sendall(data_chunk(cookie, off, bytes(n))[:-100]), conn.shutdown(socket.SHUT_WR)),
        "closed the connection in the middle of a reply's data"),
}


def good_structured(conn, cmd, cookie, off, n, data):
    conn.sendall(data_chunk(cookie, off, bytes(n), True) if cmd == 0 else none_chunk(cookie))
    return True


@pytest.mark.parametrize("structured,fault", [(False, k) for k in FAULTS] +
                         [(True, k) for k in STRUCTURED_FAULTS])
def test_protocol_violation_fails_requests_with_eio(sim, fake, caplog, structured, fault):
    """The first read gets a good reply; the second a broken one: it fails with EIO, the
    log names why, later requests fail at once, and the device stops (no hang)."""
    act, why = (STRUCTURED_FAULTS if structured else FAULTS)[fault]
    calls = []

    def on_request(conn, cmd, cookie, off, n, data):
        calls.append(cmd)
        if len(calls) == 1:
            return (good_structured if structured else good)(conn, cmd, cookie, off, n, data)
        act(conn, cmd, cookie, off, n, data)
        return False
    f = fake(on_request=on_request, structured=structured)
    caplog.set_level(logging.ERROR, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri), sim, depth=4) as dev, dev.open() as blk:
        assert dev.backend.structured == structured
        assert blk.pread(4096, 0) == bytes(4096)
        assert blk.submit([(0, 4096, 8192, bytearray(8192))]) == [-errno.EIO]
        assert blk.submit([(0, 0, 4096, bytearray(4096))]) == [-errno.EIO]
    assert len(calls) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(lines) == 1 and "with EIO" in lines[0], lines
    assert re.search(why, lines[0]), lines[0]


def test_silent_server_times_out(sim, fake, caplog):
    """A server that takes requests and never answers: they fail after the timeout."""
    f = fake(on_request=lambda *a: False)
    caplog.set_level(logging.ERROR, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri, timeout=0.5), sim, depth=4) as dev, dev.open() as blk:
        t0 = time.monotonic()
        assert blk.submit([(1, 0, 4096, bytes(4096)), (2, 0, 0, None)], timeout=TIMEOUT) == \
            [-errno.EIO, -errno.EIO]
        assert 0.4 < time.monotonic() - t0 < 5
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(lines) == 1 and "no progress from the server for" in lines[0], lines
    assert "failing 2 in-flight requests" in lines[0]


def test_server_errors_reach_the_request(sim, fake, caplog):
    """An NBD error reply fails that request with its errno, an error value the protocol
    does not define with EINVAL (as it asks of a client); the connection lives on. The
    export has no FUA: a FUA write goes without the flag."""
    seen = []
    # by the offset of a write: the server's error value
    errs = {0: errno.ENOSPC, 4096: errno.ENOENT, 8192: 0x7fff1234}

    def on_request(conn, cmd, cookie, off, n, data):
        seen.append(cmd)
        simple_reply(conn, cookie, err=errs[off] if cmd == 1 else 0, data=bytes(n) if cmd == 0 else b"")
        return True
    f = fake(on_request=on_request)
    backend = NbdBackend(f.uri)
    assert (backend.can_fua, backend.can_flush, backend.can_discard) == (False, True, False)
    with Device(backend, sim, depth=4) as dev, dev.open() as blk:
        assert blk.submit([(1, 0, 4096, bytes(4096), 1 << 13)]) == [-errno.ENOSPC]
        got = blk.submit([(1, 4096, 4096, bytes(4096)), (1, 8192, 4096, bytes(4096))])
        assert len(got) == 2 and max(got) < 0, got
        # what the queue committed (a recent kernel's block layer passes EINVAL on; the
        # simulated one, as older kernels, makes it EIO)
        assert dev.stats().summary()["errors"] == {"ENOSPC": 1, "EINVAL": 2}
        assert blk.pread(4096, 0) == bytes(4096)
    wait_for(lambda: len(f.seen) == 5, "NBD_CMD_DISC")     # sent as the device closed
    assert f.seen == [(1, 0), (1, 0), (1, 0), (0, 0), (2, 0)]
    assert seen == [1, 1, 1, 0]
    lines = [m for m in (r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd")
             if "the server failed" in m]
    assert len(lines) == 3 and lines[0].endswith("at 0: No space left on device"), lines
    assert sorted(ln.rsplit(": ", 1)[1] for ln in lines[1:]) == [
        "Invalid argument (error value 2, which NBD does not define)",
        f"Invalid argument (error value {0x7fff1234}, which NBD does not define)"]


def unread(conn: socket.socket) -> int:
    """Bytes sent on a Unix stream socket that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, bytes(4)))[0]


def waiting(conn: socket.socket) -> int:
    """Bytes the peer sent on a Unix stream socket that conn has not read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, bytes(4)))[0]


def pattern(off: int, n: int) -> bytes:
    """Bytes that differ with the offset: a reply delivered to the wrong request shows."""
    return (off.to_bytes(8, "big") * (n // 8 + 1))[:n]


def structured_read(cookie, off, n, rng) -> tuple[list[bytes], bytes]:
    """A READ's reply as chunks: [0, n) cut at up to 3 random (unaligned) points, each
    piece data or a hole, in a shuffled order, DONE on the last one or on a NONE chunk
    after them; and the bytes the client must end up with."""
    cuts = sorted(rng.sample(range(1, n), min(3, n - 1)))
    want = bytearray(pattern(off, n))
    chunks = []
    for a, b in zip([0, *cuts], [*cuts, n]):
        if rng.random() < 0.3:
            want[a:b] = bytes(b - a)
            chunks.append(lambda done, a=a, b=b: hole_chunk(cookie, off + a, b - a, done))
        else:
            chunks.append(lambda done, a=a, b=b: data_chunk(cookie, off + a, want[a:b], done))
    rng.shuffle(chunks)
    if rng.random() < 0.5:
        return [c(False) for c in chunks] + [none_chunk(cookie)], bytes(want)
    return [c(False) for c in chunks[:-1]] + [chunks[-1](True)], bytes(want)


@pytest.mark.parametrize("replies", ["simple", "structured"])
def test_replies_together_reversed_and_cut_anywhere(sim, fake, replies):
    """The fake server holds its replies until eight requests are in, then sends them in
    reverse order as one byte stream cut into uneven pieces (headers and read data split
    anywhere; reads larger than the client's staging buffer): every request gets its
    own data and result. Structured: each READ's reply is data and hole chunks in any
    order, interleaved with the other replies' chunks (a WRITE's is a NONE chunk or a
    simple reply, which the protocol allows for replies without payload)."""
    reqs = [(0, 0, 512), (1, 4096, 4096), (0, 8192, 40960), (0, 65536, 102400),
            (1, 200704, 8192), (0, 262144, 4096), (0, 266240, 24576), (1, 524288, 4096)]
    structured = replies == "structured"
    rng = random.Random(7)
    held, want = [], {}

    def on_request(conn, cmd, cookie, off, n, data):
        assert cmd != 1 or data == pattern(off, n)
        if not structured:
            held.append([struct.pack(">IIQ", 0x67446698, 0, cookie) + (pattern(off, n) if cmd == 0 else b"")])
        elif cmd == 0:
            chunks, want[off] = structured_read(cookie, off, n, rng)
            held.append(chunks)
        else:
            held.append([none_chunk(cookie) if len(held) % 2 else
                         struct.pack(">IIQ", 0x67446698, 0, cookie)])
        if len(held) == len(reqs):
            held.reverse()
            # the replies' chunks interleaved, each reply's in its own order (DONE last)
            order = [i for i, r in enumerate(held) for _ in r]
            rng.shuffle(order)
            pieces = [held[i].pop(0) for i in order]
            stream = b"".join(pieces)
            # cut in each header and at random; each piece goes once the client has read
            # the one before (nothing unread in the socket), so the cuts are what it sees
            starts = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
            cuts = sorted({*(s + rng.randrange(1, 16) for s in starts[1:]),
                           *rng.sample(range(1, len(stream)), 24)})
            for a, b in zip([0, *cuts], [*cuts, len(stream)]):
                wait_for(lambda: unread(conn) == 0, "the client reading what was sent")
                conn.sendall(stream[a:b])
        return True
    f = fake(on_request=on_request, structured=structured)
    backend = NbdBackend(f.uri)
    assert backend.structured == structured and f.options == [proto.NBD_OPT_STRUCTURED_REPLY, proto.NBD_OPT_GO]
    with Device(backend, sim, depth=16) as dev, dev.open() as blk:
        bufs = [bytearray(n) if op == 0 else pattern(off, n) for op, off, n in reqs]
        got = blk.submit([(op, off, n, buf) for (op, off, n), buf in zip(reqs, bufs)])
        assert got == [n for _, _, n in reqs]
        for (op, off, n), buf in zip(reqs, bufs):
            assert op == 1 or buf == want.get(off, pattern(off, n)), (off, n)
    assert not structured or any(b"\0" * 64 in w for w in want.values()), "no hole was sent"


def test_a_batch_of_writes_fits_the_socket(sim, fake):
    """The queue sizes its socket's send buffer for what it may have in flight: 16 WRITEs
    of 64 KiB queued together all wait in the socket while the server holds the first
    (with the system's default buffer, about 200 KiB, most waited in the queue)."""
    n, count = 64 * KiB, 16
    held = []

    def on_request(conn, cmd, cookie, off, n, data):
        if not held:     # the first request: are all the others in the socket already?
            held.append(wait_until(lambda: waiting(conn) >= (count - 1) * (28 + n), TIMEOUT))
        simple_reply(conn, cookie)
        return True
    f = fake(on_request=on_request)
    with Device(NbdBackend(f.uri), sim, depth=count) as dev, dev.open() as blk:
        writes = [(1, i * n, n, pattern(i * n, n)) for i in range(count)]
        assert blk.submit(writes, timeout=2 * TIMEOUT) == [n] * count
    assert held == [True]


def test_writes_beyond_the_socket_buffer_arrive_whole(sim, fake):
    """Writes queued together while the server reads nothing, on a socket whose buffer
    is kept small: the socket takes only part of them, so the queue's send is cut short
    (or finds the socket full) and the rest goes on its ring; every byte arrives once
    and in order, and reads back."""
    n, count = 64 * KiB, 16
    store = bytearray(count * n)
    inq = []

    def on_request(conn, cmd, cookie, off, n, data):
        if not inq:      # hold the first request until the client has filled the socket
            wait_for(lambda: waiting(conn) >= 96 * KiB, "the client filling the socket")
            inq.append(waiting(conn))
        if cmd == 1:
            store[off:off + n] = data
        simple_reply(conn, cookie, data=bytes(store[off:off + n]) if cmd == 0 else b"")
        return True
    f = fake(on_request=on_request)
    backend = NbdBackend(f.uri)
    backend.send_buffer = 128 * KiB
    with Device(backend, sim, depth=count) as dev, dev.open() as blk:
        writes = [(1, i * n, n, pattern(i * n, n)) for i in range(count)]
        assert blk.submit(writes, timeout=TIMEOUT) == [n] * count
        # while the server held, the socket had room for less than what was queued
        assert inq and inq[0] < (count - 1) * n, inq
        assert bytes(store) == b"".join(w[3] for w in writes)
        bufs = [bytearray(n) for _ in range(count)]
        reads = [(0, i * n, n, bufs[i]) for i in range(count)]
        assert blk.submit(reads, timeout=TIMEOUT) == [n] * count
        assert b"".join(bufs) == bytes(store)


def test_structured_hole_zeroes_what_the_buffer_held(sim, fake):
    """One tag: the first READ fills its buffer with data; the second gets data chunks
    around a hole, out of order: the hole reads as zeros, not as what the buffer held."""
    def on_request(conn, cmd, cookie, off, n, data):
        if len(f.seen) == 1:
            conn.sendall(data_chunk(cookie, off, b"\xee" * n, done=True))
        else:
            conn.sendall(data_chunk(cookie, off + 12288, b"\x33" * (n - 12288)) +
                         hole_chunk(cookie, off + 1024, 11264) +
                         data_chunk(cookie, off, b"\x11" * 1024, done=True))
        return True
    f = fake(on_request=on_request, structured=True)
    with Device(NbdBackend(f.uri), sim, depth=1) as dev, dev.open() as blk:
        assert blk.pread(32768, 0) == b"\xee" * 32768
        assert blk.pread(32768, 65536) == b"\x11" * 1024 + bytes(11264) + b"\x33" * 20480


def test_structured_error_chunks_fail_only_their_request(sim, fake, caplog):
    """An error chunk fails its request with its errno (the server's message in the one
    log line per failed request); other requests in flight, and later ones, succeed."""
    def on_request(conn, cmd, cookie, off, n, data):
        if off == 4096:                   # READ: data, then an error for it
            conn.sendall(data_chunk(cookie, off, pattern(off, 512)) +
                         error_chunk(cookie, errno.ENOMEM, b"bad sector"))
        elif off == 8192:                 # WRITE: an error at an offset in it
            conn.sendall(error_chunk(cookie, errno.ENOSPC, b"", offset=off + 512, done=False) +
                         none_chunk(cookie))
        elif off == 12288:                # an error type the client does not know
            conn.sendall(error_chunk(cookie, errno.EOPNOTSUPP, b"new", rtype=0x8077))
        elif cmd == 0:
            conn.sendall(data_chunk(cookie, off, pattern(off, n), done=True))
        else:
            conn.sendall(none_chunk(cookie))
        return True
    f = fake(on_request=on_request, structured=True)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri), sim, depth=8) as dev, dev.open() as blk:
        bufs = [bytearray(4096) for _ in range(4)]
        got = blk.submit([(0, 0, 4096, bufs[0]), (0, 4096, 4096, bufs[1]),
                          (1, 8192, 4096, bytes(4096)), (0, 12288, 4096, bufs[2]),
                          (0, 16384, 4096, bufs[3])])
        assert got == [4096, -errno.ENOMEM, -errno.ENOSPC, -errno.EOPNOTSUPP, 4096]
        assert bufs[0] == pattern(0, 4096) and bufs[3] == pattern(16384, 4096)
        assert blk.pread(8192, 65536) == pattern(65536, 8192)
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd")
    assert len(lines) == 3, lines
    assert lines[0].endswith("the server failed READ of 4096 bytes at 12288: Operation not supported "
                             "(new)"), lines
    assert lines[1].endswith("the server failed READ of 4096 bytes at 4096: Cannot allocate memory "
                             "(bad sector)"), lines
    assert lines[2].endswith("the server failed WRITE of 4096 bytes at 8192: No space left on device"), lines



def test_server_errors_are_logged_ten_lines_a_second_at_most(sim, fake, caplog, monkeypatch):
    """A server failing every request does not flood the log: ten lines a second, then
    the next line says how many were left out (the clock is the test's)."""
    from pyublk_fast.backends import _native_nbd
    now = [1000.0]
    monkeypatch.setattr(_native_nbd, "time", type("Clock", (), {"monotonic": lambda: now[0]}))

    def on_request(conn, cmd, cookie, off, n, data):
        conn.sendall(error_chunk(cookie, errno.EIO, b"dead disk"))
        return True
    f = fake(on_request=on_request, structured=True)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")

    def server_lines():
        return [r.getMessage() for r in caplog.records
                if r.name == "pyublk_fast.nbd" and "the server failed" in r.getMessage()]
    with Device(NbdBackend(f.uri), sim, depth=8) as dev, dev.open() as blk:
        got = blk.submit([(0, i * 4096, 4096, bytearray(4096)) for i in range(25)])
        assert got == [-errno.EIO] * 25
        assert len(server_lines()) == 10
        now[0] += 1.5
        assert blk.submit([(0, 0, 4096, bytearray(4096))]) == [-errno.EIO]
    lines = server_lines()
    assert len(lines) == 11 and lines[-1].endswith("(dead disk) (15 more server errors not logged)"), lines


def test_no_structured_replies_keeps_to_simple_ones(sim, fake):
    """structured_replies=False: the option is never asked for, even of a server that
    offers it, and simple replies serve."""
    f = fake(on_request=good, structured=True)
    backend = NbdBackend(f.uri, structured_replies=False)
    assert backend.structured is False and f.options == [proto.NBD_OPT_GO]
    with Device(backend, sim, depth=4) as dev, dev.open() as blk:
        assert blk.pread(8192, 0) == bytes(8192)


def test_reply_kind_is_logged(fake, caplog):
    """Which reply kind each backend got, and why simple replies where they are."""
    caplog.set_level(logging.INFO, "pyublk_fast.nbd")
    f = fake(on_request=good)
    for offered, asked, want in [(True, True, "structured replies"),
                                 (False, True, "simple replies (the server refused structured replies)"),
                                 (True, False, "simple replies (structured replies turned off)")]:
        f.structured = offered              # for the next connection
        NbdBackend(f.uri, structured_replies=asked).close()
        assert caplog.records[-1].getMessage().endswith(f": 1048576 bytes, flags 0x5, {want}")


def test_bad_reply_to_the_structured_option_is_one_clear_line(fake):
    """A server answering NBD_OPT_STRUCTURED_REPLY with neither ACK nor an error."""
    f = fake(on_request=good)
    f.structured_reply = proto.NBD_REP_INFO
    with pytest.raises(NbdError, match="bad reply type 0x3 to NBD_OPT_STRUCTURED_REPLY"):
        NbdBackend(f.uri)


def test_structured_reply_missing_done_times_out(sim, fake, caplog):
    """A READ's data comes without DONE, and the server goes on answering new cookies:
    once that READ waited the timeout it fails (no hang), with the cookie named."""
    def on_request(conn, cmd, cookie, off, n, data):
        conn.sendall(data_chunk(cookie, off, pattern(off, n), done=off != 0))
        return True
    f = fake(on_request=on_request, structured=True)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri, timeout=0.5), sim, depth=4) as dev, dev.open() as blk, \
            dev.open() as blk2:
        out = []
        stuck = threading.Thread(target=lambda: out.append(blk.submit([(0, 0, 4096, bytearray(4096))],
                                                                      timeout=TIMEOUT)))
        stuck.start()
        wait_for(lambda: f.seen, "the READ at the server")
        others = []
        while stuck.is_alive():             # new cookies, answered, while it waits
            others += blk2.submit([(0, 4096, 4096, bytearray(4096))], timeout=TIMEOUT)
            assert len(others) < 100000
        stuck.join()
        assert out == [[-errno.EIO]]
        # the connection failed with it: later requests fail too
        assert blk2.submit([(0, 4096, 4096, bytearray(4096))], timeout=TIMEOUT) == [-errno.EIO]
    assert others[0] == 4096
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(lines) == 1 and re.search(r"no reply to cookie 0x1\d{8} for 0\.\d s, while the "
                                         r"server answered others; failing", lines[0]), lines


# -- the command line -----------------------------------------------------------------------

def test_cli_unreachable_server_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pyublk_fast", "add", "-t", "nbd", "--uri",
                          f"nbd+unix:///x?socket={tmp_path}/none.sock"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYUBLK_FAST_RUN_DIR=str(tmp_path)))
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("pyublk_fast: ") and res.stderr.count("\n") == 1, res.stderr
    assert "none.sock: No such file or directory" in res.stderr, res.stderr


@need_nbdkit
def test_cli_add_serves_the_export(sim, servers, monkeypatch):
    """`add -t nbd --uri URI --timeout S --reconnect --no-structured-replies`: the options
    build the backend (the record keeps them, which `list` prints), and the device reads
    what the server holds, through simple replies."""
    from pyublk_fast import cli
    from pyublk_fast.transport.sim import SimTransport
    monkeypatch.setattr(cli, "KernelTransport", lambda unprivileged=False: SimTransport())
    srv = servers(nbdkit_argv(), "tcp")
    with Device(NbdBackend(srv.uri), sim) as dev, dev.open() as blk:
        blk.pwrite(b"\x5a" * 8192, 8192)
    a, extra = cli.build_parser().parse_known_args(["add", "-t", "nbd", "--uri", srv.uri,
                                                    "--timeout", "5", "-q", "2", "--reconnect",
                                                    "--no-structured-replies"])
    opts = cli.add_options(a, extra)
    assert opts["backend_args"] == {"uri": srv.uri, "timeout": 5.0, "reconnect": True,
                                    "structured_replies": False}
    cli.check_options(opts)
    transport, dev = cli.start_server(opts)
    try:
        assert (dev.backend.timeout, dev.backend.reconnect, dev.backend.structured,
                dev.nr_queues) == (5.0, True, False, 2)
        with dev.open() as blk:
            assert blk.pread(16384, 4096) == bytes(4096) + b"\x5a" * 8192 + bytes(4096)
    finally:
        dev.stop()
        transport.close()


# -- --reconnect ----------------------------------------------------------------------------

def test_reconnect_sends_the_requests_again(sim, fake, caplog):
    """The first connection dies with a read in flight: the queue reconnects, sends it
    again, and it succeeds; the next request goes on the new connection."""
    def on_request(conn, cmd, cookie, off, n, data):
        if len(f.conns) == 1:
            return False                        # never answered: the server "crashes"
        simple_reply(conn, cookie, data=bytes([len(f.conns)]) * n if cmd == 0 else b"")
        return True
    f = fake(on_request=on_request)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri, timeout=5, reconnect=True), sim, depth=4) as dev, dev.open() as blk:
        pending = threading.Thread(target=lambda: out.append(blk.pread(8192, 0)))
        out: list[bytes] = []
        pending.start()
        wait_for(lambda: f.seen, "request at the server")
        f.conns[0].shutdown(socket.SHUT_RDWR)      # EOF for the client
        pending.join(TIMEOUT)
        assert out == [b"\x02" * 8192]
        assert blk.pread(4096, 0) == b"\x02" * 4096
    wait_for(lambda: len(f.seen) == 4, "NBD_CMD_DISC")
    assert [c for c, _ in f.seen] == [0, 0, 0, 2] and len(f.conns) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(lines) == 2 and "closed the connection; reconnecting" in lines[0], lines
    assert "reconnected; sending 1 requests again" in lines[1], lines


def test_reconnect_that_took_most_of_the_timeout_does_not_time_out(sim, fake, caplog):
    """The new connection greets only after most of the timeout and answers the request
    sent again within the timeout: the wait for the server counts from the reconnect,
    not from the queue's turn before it, and the read succeeds on that connection."""
    timeout, greet_after, reply_after = 1.0, 0.8, 0.5

    def on_request(conn, cmd, cookie, off, n, data):
        if len(f.conns) == 1:
            return False                        # never answered: the server "crashes"
        time.sleep(reply_after)                 # a slow server, within the timeout
        simple_reply(conn, cookie, data=bytes([len(f.conns)]) * n)
        return True

    def slow_greeting(conn, serve_one=FakeServer.serve_one):
        if len(f.conns) > 2:                    # a third connection: the second timed out
            f.lsock.close()                     # (no more: the read fails, the test ends)
            conn.close()
            return
        time.sleep(greet_after)                 # a server slow to come back
        serve_one(f, conn)
    f = fake(on_request=on_request)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri, timeout=timeout, reconnect=True), sim, depth=4) as dev, \
            dev.open() as blk:
        out: list[bytes] = []
        pending = threading.Thread(target=lambda: out.append(blk.pread(4096, 0)))
        pending.start()
        wait_for(lambda: f.seen, "request at the server")
        f.serve_one = slow_greeting
        f.conns[0].shutdown(socket.SHUT_RDWR)      # EOF for the client
        pending.join(TIMEOUT)
        assert out == [b"\x02" * 4096]
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(f.conns) == 2 and len(lines) == 2, lines
    assert "reconnected; sending 1 requests again" in lines[1], lines


def test_reconnect_gives_up_after_the_timeout(sim, fake, caplog):
    f = fake(on_request=lambda *a: False)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(f.uri, timeout=0.5, reconnect=True), sim, depth=4) as dev, dev.open() as blk:
        f.lsock.close()                         # nobody to reconnect to
        assert blk.submit([(0, 0, 4096, bytearray(4096))], timeout=TIMEOUT) == [-errno.EIO]
        assert blk.submit([(0, 0, 4096, bytearray(4096))]) == [-errno.EIO]
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert "no progress from the server" in lines[0] and "reconnecting" in lines[0], lines
    assert "reconnecting failed" in lines[1] and "cannot connect" in lines[1], lines


@need_qemu
def test_qemu_nbd_killed_and_restarted_under_load(sim, servers, tmp_path, caplog):
    """qemu-nbd (raw image: a write it acknowledged is in the file) is killed in the middle
    of a verified random load and started again on the same socket: with --reconnect the
    load sees no error and reads back what it wrote."""
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    argv = qemu_nbd_argv(image, fmt="raw")
    srv = servers(argv, "unix", export="disk")
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    with Device(NbdBackend(srv.uri, timeout=10, reconnect=True), sim, depth=32) as dev:
        out = []
        load = threading.Thread(target=lambda: out.append(sim.run_load(
            dev.dev_id, rw="randrw", bs=4096, qd=32, count=30000, verify=True, region=2 * MiB)))
        load.start()
        deadline = time.monotonic() + TIMEOUT
        while dev.requests_served < 2000:
            assert time.monotonic() < deadline and load.is_alive(), "the load did not start"
            time.sleep(0.01)
        srv.proc.kill()
        srv.stop()
        os.unlink(srv.addr)
        servers(argv, "unix", export="disk")
        load.join(120)
        assert not load.is_alive()
    r = out[0]
    assert (r["errors"], r["verify_errors"], r["completed"]) == (0, 0, 30000)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert len(lines) == 2 and "reconnected; sending" in lines[1], lines
