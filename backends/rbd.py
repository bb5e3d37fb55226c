"""rbd: a Ceph RBD image (or a snapshot of one, read-only) served natively through
librbd's C API: no Python per request (see docs/rbd.md)."""
from __future__ import annotations

import errno
import logging
import math

from pyublk_fast.backend import Backend, register

try:
    from . import _native_rbd
except ImportError as exc:        # built without librbd-dev: the backend says so when used
    _native_rbd = None
    _MISSING = str(exc)

log = logging.getLogger("pyublk_fast.backends.rbd")

#: Seconds `add` may take to reach the monitors before it gives up.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a request waits for its OSDs before it fails with EIO (0: wait for ever).
DEFAULT_OP_TIMEOUT = 30.0


def librbd_options(*, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                   op_timeout: float = DEFAULT_OP_TIMEOUT, cache: bool = False) -> dict:
    """The Ceph settings (name -> text) the backend gives librbd on top of ceph.conf (the
    bench's fio reference runs with the same ones, so both sides have the same cache)."""
    return {
        # reaching the monitors, and every monitor command after that
        "client_mount_timeout": str(math.ceil(connect_timeout)),     # whole seconds
        "rados_mon_op_timeout": f"{connect_timeout:g}",
        "rados_osd_op_timeout": f"{op_timeout:g}",
        # librbd skips the parts of a discard that do not cover whole 64 KiB units
        # by default: they would read back as the old data, not zeros
        "rbd_skip_partial_discard": "false",
        "rbd_cache": "true" if cache else "false",
        # breaking a dead owner's lock blocklists it first: should it be only half
        # dead, it can no longer write once the lock is someone else's
        "rbd_blocklist_on_break_lock": "true",
    }


def parse_image(spec: str) -> tuple[str, str, str | None]:
    """POOL/IMAGE[@SNAP] -> (pool, image, snap or None); ValueError naming the mistake."""
    where, at, snap = spec.partition("@")
    pool, slash, name = where.partition("/")
    if not slash or not pool or not name or "/" in name or (at and not snap):
        raise ValueError(f"--image {spec!r}: expected POOL/IMAGE or POOL/IMAGE@SNAP")
    return pool, name, snap or None


@register("rbd")
class RbdBackend(Backend):
    """A Ceph RBD image, POOL/IMAGE[@SNAP] (a snapshot is read-only), through librbd."""

    can_discard = True
    can_write_zeroes = True
    # completions come from librbd's threads (through an eventfd): a polling queue thread
    # would only take CPU from them and from the OSDs they wait for
    poll_us = 0

    def __init__(self, image: str, *, conf: str | None = None, client_id: str | None = None,
                 keyring: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 op_timeout: float = DEFAULT_OP_TIMEOUT, cache: bool = False,
                 exclusive: bool = False, options: dict | None = None):
        """Connect to the cluster (ceph.conf at conf, else Ceph's default places and
        $CEPH_CONF) as client.client_id (default admin) and open the image.

        connect_timeout bounds reaching the monitors; op_timeout how long a request waits
        for an OSD before it fails with EIO (0: for ever). cache turns librbd's writeback
        cache on (faster small writes; the device then takes FLUSH and FUA): off by
        default, as with it a write whose OSD times out was seen to be lost while its
        FLUSH still succeeded. exclusive takes the image's exclusive lock for as long as
        the backend is open: a live holder is refused with an error naming it; a holder
        that does not answer within connect_timeout (a killed server) is blocklisted, then
        its lock broken.
        options are more Ceph settings (e.g. {"rbd_cache_size": 1 << 26})."""
        if _native_rbd is None:
            raise OSError(errno.ENOSYS, "the rbd backend was built without librbd "
                          f"(apt-get install librbd-dev librados-dev, then rebuild): {_MISSING}")
        if connect_timeout <= 0 or op_timeout < 0:
            raise ValueError(f"connect_timeout={connect_timeout}, op_timeout={op_timeout}: "
                             "the connect timeout must be > 0, the op timeout >= 0")
        self.image = image
        pool, name, snap = parse_image(image)
        if exclusive and snap:
            raise ValueError(f"--image {image}: a snapshot is read-only, it has no exclusive "
                             "lock to take (--exclusive)")
        conf_opts = librbd_options(connect_timeout=connect_timeout, op_timeout=op_timeout,
                                   cache=cache)
        if keyring is not None:
            conf_opts["keyring"] = keyring
        conf_opts.update(options or {})
        self._img = _native_rbd.RbdImage(pool, name, snap, conf=conf, client_id=client_id,
                                         options=conf_opts)
        if exclusive:
            try:
                broken = self._img.acquire_exclusive(image, connect_timeout)
            except BaseException:
                self._img.close()
                raise
            if broken:
                log.warning("rbd: %s: took the exclusive lock over from %s, which did not "
                            "answer (blocklisted first)", image, broken)
        self.size = self._img.size
        self.read_only = self._img.read_only
        # without librbd's writeback cache a completed write is on the OSDs: no cache to
        # flush, and FUA says nothing more (the kernel drops it); with the cache a FUA
        # write goes through it to the OSDs before it completes (librbd's FUA flag)
        self.can_flush = self.can_fua = self._img.cache

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--image", required=True, metavar="POOL/IMAGE[@SNAP]",
                            help="the RBD image; a snapshot is served read-only (required)")
        parser.add_argument("--conf", metavar="PATH", help="ceph.conf (default: $CEPH_CONF, "
                            "/etc/ceph/ceph.conf)")
        parser.add_argument("--id", dest="client_id", metavar="NAME",
                            help="Ceph client name without 'client.' (default admin)")
        parser.add_argument("--keyring", metavar="PATH", help="the client's keyring")
        parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                            metavar="S", help="give up reaching the cluster after S seconds "
                            f"(default {DEFAULT_CONNECT_TIMEOUT:g})")
        parser.add_argument("--op-timeout", type=float, default=DEFAULT_OP_TIMEOUT, metavar="S",
                            help="fail a request with EIO when its OSD has not answered in S "
                            f"seconds; 0 waits for ever (default {DEFAULT_OP_TIMEOUT:g})")
        parser.add_argument("--cache", action="store_true",
                            help="librbd's writeback cache on (see docs/rbd.md for its risk)")
        parser.add_argument("--exclusive", action="store_true",
                            help="hold the image's exclusive lock; a dead holder's lock is "
                            "broken (after blocklisting it), a live one's is not")

    @classmethod
    def from_args(cls, ns):
        parse_image(ns.image)      # a malformed spec is an argument error, before connecting
        return cls(ns.image, conf=ns.conf, client_id=ns.client_id, keyring=ns.keyring,
                   connect_timeout=ns.connect_timeout, op_timeout=ns.op_timeout, cache=ns.cache,
                   exclusive=getattr(ns, "exclusive", False))   # records from before it

    def resize(self, new_size):
        self._img.resize(new_size)
        self.size = new_size

    # The Python path (`--python`): the same operations as blocking librbd calls, one at a
    # time per queue (a reference, far slower than the native target's aio).

    def read(self, offset, buf):
        self._img.pread_into(offset, buf)

    def write(self, offset, data):
        self._img.pwrite(offset, data)

    def flush(self):
        self._img.flush()

    def discard(self, offset, length):
        self._img.discard(offset, length)

    def write_zeroes(self, offset, length):
        self._img.write_zeroes(offset, length)

    def native_target(self):
        return self._img

    def close(self):
        self._img.close()
