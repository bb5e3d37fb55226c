"""nbd: a Network Block Device export served as a ublk device; the NBD client's data path
runs in C on each queue's ring (no Python per request), one connection per queue.

The handshake (fixed newstyle, NBD_OPT_GO) is done here, in Python, with blocking
sockets; the native target (_native_nbd.pyx) then takes over the connected socket.
Structured replies are asked for (NBD_OPT_STRUCTURED_REPLY) unless turned off; a server
that refuses them gets simple replies."""
from __future__ import annotations

import logging
import socket
import struct
import time
import urllib.parse

from pyublk_fast.backend import Backend, register

from ._native_nbd import DISCONNECT, NbdTarget

NBD_MAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_ERR = 1 << 31
REP_ERRORS = {
    NBD_REP_ERR | 1: "the server does not support NBD_OPT_GO",
    NBD_REP_ERR | 2: "refused by the server's policy",
    NBD_REP_ERR | 3: "the server calls the request invalid",
    NBD_REP_ERR | 4: "the server's platform does not support it",
    NBD_REP_ERR | 5: "the server requires TLS (not supported here)",
    NBD_REP_ERR | 6: "no such export",
    NBD_REP_ERR | 7: "the server is shutting down",
    NBD_REP_ERR | 8: "the server requires block size negotiation",
    NBD_REP_ERR | 9: "the request is too big",
}

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8

log = logging.getLogger("pyublk_fast.nbd")

DEFAULT_PORT = 10809
#: Seconds a queue waits for the server to make progress while requests are in flight
#: before it fails them with EIO (0: wait for ever).
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds between attempts to reach a server that went away (--reconnect).
RECONNECT_INTERVAL = 0.1
#: Longest option reply we read during the handshake: a server sending more is broken.
MAX_OPTION_REPLY = 1 << 16


class NbdError(ValueError):
    """A one-line reason the export cannot be served (the CLI prints it as is)."""


def parse_uri(uri: str) -> tuple[str, object, str]:
    """``nbd://host[:port][/export]`` or ``nbd+unix:///export?socket=PATH`` (libnbd's and
    qemu's forms) -> ("tcp", (host, port), export) or ("unix", path, export)."""
    u = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query)
    if u.scheme == "nbd":
        if not u.hostname:
            raise NbdError(f"{uri}: no host (use nbd://HOST[:PORT]/EXPORT)")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise NbdError(f"{uri}: bad port") from None
        return "tcp", (u.hostname, port), export
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise NbdError(f"{uri}: a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)")
        path = query.get("socket", [""])[0]
        if not path:
            raise NbdError(f"{uri}: no socket (nbd+unix:///EXPORT?socket=PATH)")
        return "unix", path, export
    if u.scheme in ("nbds", "nbds+unix"):
        raise NbdError(f"{uri}: TLS ({u.scheme}://) is not supported")
    raise NbdError(f"{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                   "nbd+unix:///EXPORT?socket=PATH)")


class Export:
    """What NBD_OPT_GO told about an export, and whether structured replies were agreed."""
    structured = False
    size = 0
    flags = 0
    min_block = 1
    pref_block = 4096
    max_block = 32 << 20


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NbdError(f"the server closed the connection during the handshake ({what})")
        buf += chunk
    return bytes(buf)


def _option(sock: socket.socket, opt: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def _option_reply(sock: socket.socket, opt: int) -> tuple[int, bytes]:
    """One reply to option ``opt``: (reply type, body)."""
    rmagic, ropt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20, "option reply"))
    if rmagic != NBD_REP_MAGIC or ropt != opt:
        raise NbdError(f"bad option reply from the server (magic {rmagic:#x}, option {ropt})")
    if length > MAX_OPTION_REPLY:
        raise NbdError(f"option reply of {length} bytes from the server (too long)")
    return rtype, _recv_exact(sock, length, "option reply")


def handshake(sock: socket.socket, export: str, structured: bool = True) -> Export:
    """Fixed newstyle negotiation ending with NBD_OPT_GO for ``export``; with
    ``structured``, NBD_OPT_STRUCTURED_REPLY first (a server that refuses it, with any
    error, gets simple replies)."""
    magic, opt_magic, gflags = struct.unpack(">QQH", _recv_exact(sock, 18, "greeting"))
    if magic != NBD_MAGIC:
        raise NbdError(f"not an NBD server (bad greeting magic {magic:#x})")
    if opt_magic != IHAVEOPT:
        raise NbdError("the server speaks the old-style NBD handshake (not supported: "
                       "newstyle servers only)")
    if not gflags & NBD_FLAG_FIXED_NEWSTYLE:
        raise NbdError("the server does not speak fixed newstyle NBD (not supported)")
    no_zeroes = gflags & NBD_FLAG_NO_ZEROES
    sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | no_zeroes))
    ex = Export()
    if structured:
        _option(sock, NBD_OPT_STRUCTURED_REPLY)
        rtype, _ = _option_reply(sock, NBD_OPT_STRUCTURED_REPLY)
        if rtype != NBD_REP_ACK and not rtype & NBD_REP_ERR:
            raise NbdError(f"bad reply type {rtype:#x} to NBD_OPT_STRUCTURED_REPLY from the server")
        ex.structured = rtype == NBD_REP_ACK
    name = export.encode()
    _option(sock, NBD_OPT_GO, struct.pack(">I", len(name)) + name +
            struct.pack(">HHH", 2, NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE))
    have_export = False
    while True:
        rtype, body = _option_reply(sock, NBD_OPT_GO)
        if rtype & NBD_REP_ERR:
            why = REP_ERRORS.get(rtype, f"error {rtype & ~NBD_REP_ERR}")
            msg = body.decode(errors="replace").strip()
            if rtype == NBD_REP_ERR | 6:
                why = f"no export named {export!r}"
            raise NbdError(f"the server refused NBD_OPT_GO: {why}" + (f" ({msg})" if msg else ""))
        if rtype == NBD_REP_ACK:
            break
        if rtype != NBD_REP_INFO or len(body) < 2:
            continue    # replies we did not ask for carry nothing we use
        info = struct.unpack(">H", body[:2])[0]
        if info == NBD_INFO_EXPORT and len(body) >= 12:
            ex.size, ex.flags = struct.unpack(">QH", body[2:12])
            have_export = True
        elif info == NBD_INFO_BLOCK_SIZE and len(body) >= 14:
            ex.min_block, ex.pref_block, ex.max_block = struct.unpack(">III", body[2:14])
    if not have_export:
        raise NbdError("the server acknowledged NBD_OPT_GO without describing the export")
    return ex


@register("nbd")
class NbdBackend(Backend):
    """An NBD export (nbd:// or nbd+unix:// URI), served from C on the queues' rings."""

    data_paths = ()
    # the replies come from a server process, often on the same machine, that needs the
    # CPUs itself: a polling queue thread spends them without getting its replies sooner
    # (docs/nbd.md has the figures); --poll-us still turns polling on
    poll_us = 0
    # the most socket send buffer a queue's connection asks for (bytes): room for every
    # byte a queue may have in flight up to this, so its thread sends a whole batch of
    # WRITEs itself (docs/nbd.md)
    send_buffer = 16 << 20

    def __init__(self, uri: str, *, timeout: float = DEFAULT_TIMEOUT, reconnect: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, structured_replies: bool = True):
        """Connect to ``uri`` and negotiate its export now (the first queue's connection;
        each further queue opens its own). ``timeout``: seconds without progress from the
        server while requests wait, or one request unanswered, after which they fail with
        EIO (0: never).
        ``reconnect``: when a connection is lost (EOF, a socket error, the timeout), open
        a new one, retrying for ``timeout`` seconds (30 if 0), and send the requests in
        flight again instead of failing them. ``structured_replies``: ask the server for
        structured replies (it may refuse: then simple replies); False keeps to simple
        replies (a workaround for a server whose structured replies are broken).
        ``structured`` says which the connections use."""
        if timeout < 0 or connect_timeout <= 0:
            raise NbdError(f"timeout={timeout}, connect_timeout={connect_timeout}: must be >= 0 "
                           "and > 0")
        self.uri = uri
        self.timeout = timeout
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.structured_replies = structured_replies
        self.kind, self.addr, self.export = parse_uri(uri)
        self._socks: dict[int, socket.socket] = {}       # by queue
        sock, ex = self._connect()
        self._spare: socket.socket | None = sock
        self.structured = ex.structured
        self.flags = ex.flags
        self.read_only = bool(ex.flags & FLAG_READ_ONLY)
        self.can_flush = bool(ex.flags & FLAG_SEND_FLUSH)
        self.can_fua = bool(ex.flags & FLAG_SEND_FUA)
        self.can_discard = bool(ex.flags & FLAG_SEND_TRIM)
        self.can_write_zeroes = bool(ex.flags & FLAG_SEND_WRITE_ZEROES)
        self.multi_conn = bool(ex.flags & FLAG_CAN_MULTI_CONN)
        # ublk's logical block: at least the server's minimum, and 512 at the least
        self.block_size = max(512, ex.min_block)
        if self.block_size > 4096 or self.block_size & (self.block_size - 1):
            self.close()
            raise NbdError(f"{uri}: the server's minimum block size {ex.min_block} is not "
                           "a power of two up to 4096")
        self.max_block = ex.max_block
        self.size = ex.size - ex.size % self.block_size
        if self.size <= 0:
            self.close()
            raise NbdError(f"{uri}: the export's size {ex.size} is less than one "
                           f"{self.block_size}-byte block")
        log.info("nbd %s: %d bytes, flags %#x, %s", uri, self.size, self.flags,
                 "structured replies" if self.structured else
                 "simple replies (" + ("the server refused structured replies)" if structured_replies
                                       else "structured replies turned off)"))

    def _connect(self) -> tuple[socket.socket, Export]:
        where = self.addr if self.kind == "unix" else f"{self.addr[0]}:{self.addr[1]}"
        try:
            if self.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                try:
                    sock.connect(self.addr)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.addr, timeout=self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise NbdError(f"{self.uri}: cannot connect to {where}: no answer within "
                           f"{self.connect_timeout:g} s") from None
        except OSError as exc:
            raise NbdError(f"{self.uri}: cannot connect to {where}: "
                           f"{exc.strerror or exc}") from None
        try:
            ex = handshake(sock, self.export, self.structured_replies)
        except NbdError as exc:
            sock.close()
            raise NbdError(f"{self.uri}: {exc}") from None
        except TimeoutError:
            sock.close()
            raise NbdError(f"{self.uri}: the server did not finish the handshake within "
                           f"{self.connect_timeout:g} s") from None
        except OSError as exc:
            sock.close()
            raise NbdError(f"{self.uri}: handshake failed: {exc.strerror or exc}") from None
        sock.setblocking(True)
        return sock, ex

    def queue_socket(self, q_id: int) -> int:
        """The connected socket's fd for queue q_id (called by the native target as each
        queue is set up): the first queue takes the connection __init__ opened; a queue
        set up again (recovery) gets a new one in place of its old one."""
        self._drop(q_id)
        if self._spare is not None:
            sock, self._spare = self._spare, None
        else:
            if self._socks and not self.multi_conn:
                raise NbdError(f"{self.uri}: the server does not allow several connections "
                               "(no multi-conn): serve it with one queue (-q 1)")
            sock = self._connect_same()
        self._socks[q_id] = sock
        return sock.fileno()

    def _drop(self, q_id: int) -> None:
        """Close queue q_id's connection, if it has one (its ring no longer uses it)."""
        old = self._socks.pop(q_id, None)
        if old is not None:
            old.close()

    def _connect_same(self) -> socket.socket:
        """A new connection to the export, which must not have changed."""
        sock, ex = self._connect()
        if (ex.flags != self.flags or ex.size - ex.size % self.block_size != self.size
                or ex.structured != self.structured):
            sock.close()
            raise NbdError(f"{self.uri}: the export changed between connections (size "
                           f"{ex.size}, flags {ex.flags:#x}, "
                           f"{'structured' if ex.structured else 'simple'} replies)")
        return sock

    def reconnect_socket(self, q_id: int) -> int:
        """Queue q_id's connection died: a new one (its fd), trying until ``timeout``
        passes (called by the native target, in the queue thread). The last failure
        is raised."""
        self._drop(q_id)
        deadline = time.monotonic() + (self.timeout or DEFAULT_TIMEOUT)
        while True:
            try:
                sock = self._connect_same()
                break
            except NbdError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RECONNECT_INTERVAL)     # the server is not back yet
        self._socks[q_id] = sock
        return sock.fileno()

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--uri", required=True, metavar="URI",
                            help="the export: nbd://HOST[:PORT]/EXPORT or "
                                 "nbd+unix:///EXPORT?socket=PATH (required)")
        parser.add_argument("--reconnect", action="store_true",
                            help="on a lost connection, reconnect (for up to --timeout seconds) "
                                 "and send the requests in flight again instead of failing them")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                            help="fail in-flight requests with EIO after the server made no "
                                 "progress this long, or left one request unanswered this long "
                                 f"(0: never; default {DEFAULT_TIMEOUT:g})")
        parser.add_argument("--no-structured-replies", dest="structured_replies",
                            action="store_false",
                            help="do not ask the server for structured replies: simple replies "
                                 "only (for a server whose structured replies are broken)")

    @classmethod
    def from_args(cls, ns):
        return cls(ns.uri, timeout=ns.timeout, reconnect=ns.reconnect,
                   structured_replies=ns.structured_replies)

    def native_target(self):
        return NbdTarget(self)

    def close(self):
        """Say goodbye (NBD_CMD_DISC) where the connection is still up, and close it."""
        for sock in list(self._socks.values()) + ([self._spare] if self._spare is not None else []):
            try:
                sock.settimeout(1.0)       # a server that stopped reading must not hold us
                sock.sendall(DISCONNECT)
            except OSError:
                pass                       # it is gone already
            sock.close()
        self._socks = {}
        self._spare = None
