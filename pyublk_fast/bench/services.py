"""Servers the bench starts for backends that serve someone else's storage, each once per
run on first use and stopped at the end: an NBD export for ``nbd`` (nbdkit's memory
plugin, else qemu-nbd on a scratch raw file, on a Unix socket) and a throwaway Ceph
cluster with one image for ``rbd`` (tools/ceph/start-cluster; or a cluster of the
user's, --rbd-conf). The same export or image is the reference's target: fio's own
``nbd`` or ``rbd`` engine, in the same run.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable

from ..util import wait_until
from .refs import RefUnavailable

#: start-cluster and stop-cluster of a checkout (an installed wheel has no tools/).
CEPH_TOOLS = Path(__file__).resolve().parents[2] / "tools" / "ceph"
#: Seconds a server may take to start: nbdkit listens within milliseconds, a Ceph cluster
#: needs 10-30 s (more on a loaded machine).
NBD_START_TIMEOUT = 10.0
CEPH_START_TIMEOUT = 240.0
IMAGE = "pyublk-bench"


class ServiceUnavailable(RefUnavailable):
    """A backend's server cannot run here (so neither can its reference); str() says why
    and how to fix it."""


class NbdExport:
    """One NBD export of ``size`` bytes on a Unix socket in ``directory``."""

    def __init__(self, directory: str, size: int, raw_file: Callable[[str], str]):
        self.sock = os.path.join(directory, "nbd.sock")
        self.log = os.path.join(directory, "nbd-server.log")
        self.size = size
        self._raw_file = raw_file
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def missing() -> str | None:
        if shutil.which("nbdkit") is None and shutil.which("qemu-nbd") is None:
            return "neither nbdkit nor qemu-nbd is installed (apt-get install nbdkit)"
        return None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> str:
        """The export's URI, starting its server the first time."""
        if self._proc is not None:
            return self.uri
        if why := self.missing():
            raise ServiceUnavailable(why)
        if shutil.which("nbdkit"):
            argv = ["nbdkit", "-f", "--exit-with-parent", "-U", self.sock, "memory", str(self.size)]
        else:       # qemu-nbd: -t serves one client after another, -e 8 several at once
            argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=none", "-k", self.sock,
                    self._raw_file("raw")]
        # its messages go to a file: a pipe nobody reads during the run could fill and stall it
        try:
            with open(self.log, "w") as log:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        except OSError as e:
            raise ServiceUnavailable(f"{argv[0]} failed to start: {e}") from None
        if not wait_until(self._listening, NBD_START_TIMEOUT, interval=0.01) or self._proc.poll() is not None:
            why = self._stop() or f"it did not listen on {self.sock} within {NBD_START_TIMEOUT:g} s"
            raise ServiceUnavailable(f"{argv[0]} failed to start: {why}")
        return self.uri

    def _listening(self) -> bool:
        if self._proc.poll() is not None:
            return True             # it exited: no use waiting
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.sock)
            except OSError:
                return False
        return True

    def fio_target(self) -> list[str]:
        if self._proc is None or self._proc.poll() is not None:
            raise ServiceUnavailable("the NBD server is not running")
        return ["--ioengine=nbd", f"--uri={self.uri}"]

    def _stop(self) -> str:
        """Stop the server; its last words if it had exited on its own."""
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        died = proc.poll() is not None
        if not died:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not died:
            return ""
        with open(self.log, errors="replace") as log:
            lines = log.read().strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"

    def close(self) -> None:
        self._stop()


class RbdImage:
    """One RBD image holding the bench's raw file (imported, so reads hit data as they do
    in the file rows, not objects that do not exist): in a cluster started in ``directory``
    by tools/ceph/start-cluster (stopped by close()), or in the cluster of ``conf`` (pool
    ``pool``), where the image is removed again by close().

    Every measurement, the reference's and the server's, gets an image of its own, freshly
    imported: random writes leave the in-memory OSD's objects in many pieces, and each
    later request then costs it more (a 4 KiB random write's OSD CPU went from 200 to
    350 us within 10 s of writing), so whatever ran second would start on a slower
    image. Earlier images are removed once nobody has them open.

    timeout_scale multiplies every time limit (start-cluster's steps too): an emulated
    machine (the VM benchmark) is that much slower."""

    def __init__(self, directory: str, raw_file: Callable[[str], str], conf: str | None = None,
                 pool: str = "rbd", timeout_scale: int = 1):
        self.dir = os.path.join(directory, "ceph")
        self.timeout_scale = timeout_scale
        self._raw_file = raw_file
        self.conf = conf
        self.own_cluster = conf is None
        self.pool = pool
        self.spec: str | None = None
        self._made = 0
        self._old: list[str] = []       # earlier measurements' images, not yet removed

    def missing(self) -> str | None:
        for tool in ("rbd",) + (("ceph-mon", "ceph-osd", "ceph") if self.own_cluster else ()):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install ceph-mon ceph-osd)"
        if self.own_cluster and not (CEPH_TOOLS / "start-cluster").exists():
            return (f"{CEPH_TOOLS / 'start-cluster'} not found (a checkout has it): or name a "
                    "cluster of yours with --rbd-conf")
        return None

    def _env(self) -> dict:
        env = dict(os.environ, TIMEOUT_SCALE=str(self.timeout_scale))
        return dict(env, CEPH_CONF=self.conf) if self.conf else env

    def _run(self, argv: list, timeout: float) -> str:
        timeout *= self.timeout_scale
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"{Path(argv[0]).name} took more than {timeout:g} s") from None
        if run.returncode:
            lines = run.stderr.strip().splitlines()
            raise ServiceUnavailable(f"{Path(argv[0]).name} {' '.join(map(str, argv[1:3]))} failed: "
                                     f"{lines[-1] if lines else 'exit ' + str(run.returncode)}")
        return run.stdout

    def start(self) -> str:
        """POOL/IMAGE, a new image for a new measurement (the cluster started the first time)."""
        if why := self.missing():
            raise ServiceUnavailable(why)
        if self.own_cluster and self.conf is None:
            os.makedirs(self.dir, exist_ok=True)
            self.conf = self._run([CEPH_TOOLS / "start-cluster", self.dir, self.pool],
                                  CEPH_START_TIMEOUT).strip().splitlines()[-1]
        if self.spec is not None:
            self._old.append(self.spec)
            self.spec = None
        self._remove_old()              # first: the OSD keeps them in memory
        self._made += 1
        spec = f"{self.pool}/{IMAGE}-" + ("" if self.own_cluster else f"{os.getpid()}-") + str(self._made)
        try:
            self._run(["rbd", "import", "--no-progress", self._raw_file("raw"), spec], 600)
        except ServiceUnavailable:
            self.close()
            raise
        self.spec = spec
        return spec

    def _remove_old(self) -> None:
        """Remove the earlier images nobody has open any more (the one a server still
        serves stays for the next call)."""
        self._old = [spec for spec in self._old if subprocess.run(
            ["rbd", "rm", "--no-progress", spec], capture_output=True, timeout=120 * self.timeout_scale,
            env=self._env()).returncode]

    def backend_args(self) -> list[str]:
        return ["--image", self.start(), "--conf", self.conf]

    def fio_target(self) -> tuple[list[str], dict]:
        """fio's rbd engine on the image, with the librbd settings the backend's rows run
        with (Ceph's defaults would give fio librbd's cache, which acknowledges writes
        before the OSDs have them, while the backend serves without it)."""
        from ..backends.rbd import librbd_options
        pool, image = self.start().split("/")
        env = self._env()
        # fio's engine reads ceph.conf and, through librados, $CEPH_ARGS: not the options a
        # program sets, so they go there
        env["CEPH_ARGS"] = " ".join([env.get("CEPH_ARGS", "")] +
                                    [f"--{k}={v}" for k, v in librbd_options().items()]).strip()
        return ["--ioengine=rbd", "--clientname=admin", f"--pool={pool}", f"--rbdname={image}"], env

    def close(self) -> None:
        if self.own_cluster and self.conf is not None:
            subprocess.run([CEPH_TOOLS / "stop-cluster", self.dir], capture_output=True,
                           timeout=120 * self.timeout_scale)
            self.conf = None
            self._old = []
        elif not self.own_cluster:
            self._old += [self.spec] if self.spec is not None else []
            self._remove_old()
        self.spec = None


class Services:
    """The servers of one bench run, by backend name (a NAME-py variant uses NAME's)."""

    def __init__(self, directory: str, size: int, raw_file: Callable[[str], str],
                 rbd_conf: str | None = None, rbd_pool: str = "rbd"):
        self.nbd = NbdExport(directory, size, raw_file)
        self.rbd = RbdImage(directory, raw_file, rbd_conf, rbd_pool)

    def kind(self, backend: str) -> str | None:
        """'nbd' or 'rbd' for a backend served from the bench's server, else None."""
        name = backend.removesuffix("-py")
        return name if name in ("nbd", "rbd") else None

    def missing(self, backend: str) -> str | None:
        """Why the backend's server cannot run here (checked without starting it)."""
        kind = self.kind(backend)
        return None if kind is None else getattr(self, kind).missing()

    def backend_args(self, backend: str) -> list[str]:
        """The backend's own options that point it at its server (started now if need be)."""
        kind = self.kind(backend)
        if kind == "nbd":
            return ["--uri", self.nbd.start()]
        return self.rbd.backend_args() if kind == "rbd" else []

    def fio_target(self, backend: str) -> tuple[list[str], dict | None]:
        """fio's engine options for the same export or image, and its environment."""
        if self.kind(backend) == "nbd":
            return self.nbd.fio_target(), None
        return self.rbd.fio_target()

    def close(self) -> None:
        self.nbd.close()
        self.rbd.close()
