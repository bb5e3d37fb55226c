"""The package as a user gets it: ``python -m build`` makes the sdist and, from the sdist,
the wheel; the wheel goes into a fresh virtual environment, and everything runs there
from a directory outside the source tree.

Built once per session (a minute or two: Cython and the C compiler over every module).
The venv gets no package from the network: a directory of links to the distributions
the wheel's metadata requires (and theirs), taken from the interpreter running the
tests, stands in for them, plus the tools the checks use (pip, setuptools, wheel,
Cython). Nothing else of that interpreter is visible (not the editable install of this
tree that dev.sh makes), so an undeclared dependency fails here as on a fresh machine.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 600


def source_version() -> str:
    """__version__ as pyublk_fast/__init__.py sets it (without importing the package)."""
    tree = ast.parse((ROOT / "pyublk_fast" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("pyublk_fast/__init__.py sets no __version__")


def extension_modules() -> list[str]:
    """Every Cython module of the tree, as the wheel must install it (backends/ is
    installed as pyublk_fast/backends/)."""
    mods = [p.relative_to(ROOT).with_suffix("") for p in sorted(ROOT.glob("pyublk_fast/**/*.pyx"))]
    mods += [Path("pyublk_fast/backends") / p.relative_to(ROOT / "backends").with_suffix("")
             for p in sorted(ROOT.glob("backends/**/*.pyx"))]
    assert len(mods) >= 10, mods
    return [str(m) for m in mods]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def run(cmd: list, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    # COLUMNS: argparse's help unwrapped enough to find a name in its lists
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(COLUMNS="200"),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict:
    """sdist and wheel from ``python -m build`` (the wheel is built from the unpacked
    sdist, so it also proves the sdist builds). No build isolation: the build
    requirements come from the running interpreter instead of the network."""
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=out)
    seconds = time.monotonic() - t0
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(out.iterdir())
    print(f"\npython -m build: {seconds:.0f} s")
    return dict(sdist=sdists[0], wheel=wheels[0])


class Venv:
    def __init__(self, path: Path, work: Path):
        self.path = path
        self.python = path / "bin" / "python"
        self.work = work                       # cwd of every command: outside the tree
        self.site = Path(run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             cwd=work).stdout.strip())

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run([self.python, *args], cwd=self.work, timeout=timeout)

    def pip_install(self, *args: str) -> None:
        self.run("-m", "pip", "install", "--no-index", "-q", *args)


#: What the checks themselves run in the venv: pip installs, the third-party packages'
#: builds (setuptools, wheel; Cython for the native target).
TOOLS = ("pip", "setuptools", "wheel", "cython")


def closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions these requirements name, and all they require in turn
    (markers evaluated, no extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(req.name) in found:
            continue
        dist = metadata.distribution(req.name)
        found[canonicalize_name(req.name)] = dist
        todo += [Requirement(r) for r in dist.requires or ()]
    return list(found.values())


def link_distributions(dists: list[metadata.Distribution], into: Path) -> None:
    """Links in `into` to each distribution's top-level files (packages, modules,
    .dist-info), so that a directory on sys.path holds exactly these."""
    into.mkdir()
    for dist in dists:
        files = dist.files
        assert files, f"{dist.metadata['Name']}: no RECORD of its files"
        for top in {f.parts[0] for f in files if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Venv:
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", root / "env"], cwd=root)
    work = root / "work"
    work.mkdir()
    v = Venv(root / "env", work)
    with zipfile.ZipFile(dist["wheel"]) as z:
        meta = z.read(f"pyublk_fast-{source_version()}.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    link_distributions(closure(requires + list(TOOLS)), root / "deps")
    (v.site / "_deps.pth").write_text(f"{root / 'deps'}\n")
    v.pip_install(dist["wheel"])           # its dependencies resolve from deps/ alone
    return v


# -- the distributions ------------------------------------------------------------------------

def test_version_is_set_once(dist):
    version = source_version()
    assert dist["wheel"].name.startswith(f"pyublk_fast-{version}-cp3")
    assert dist["sdist"].name == f"pyublk_fast-{version}.tar.gz"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_sdist_carries_sources_not_generated_c(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    pyx = {str(p.relative_to(ROOT)) for p in ROOT.glob("pyublk_fast/**/*.pyx")}
    pyx |= {str(p.relative_to(ROOT)) for p in ROOT.glob("backends/**/*.pyx")}
    pxd = {str(p.relative_to(ROOT)) for p in ROOT.glob("pyublk_fast/**/*.pxd")}
    assert pyx <= names and pxd <= names, sorted((pyx | pxd) - names)
    assert {"pyproject.toml", "setup.py", "README.md", "CHANGELOG.md", "pyublk_fast/py.typed",
            "pyublk_fast/_core/compat.h", "pyublk_fast/bench/nop_qd.c",
            "pyublk_fast/data/70-pyublk-fast.rules"} <= names
    generated = sorted(n for n in names if n.endswith((".c", ".so")) and n != "pyublk_fast/bench/nop_qd.c")
    assert generated == [], "Cython output in the sdist"


def test_wheel_carries_every_extension_and_the_package_data(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        meta = z.read(f"pyublk_fast-{source_version()}.dist-info/METADATA").decode()
    tag = sysconfig.get_config_var("EXT_SUFFIX")
    missing = [m for m in extension_modules() if m + tag not in names]
    assert missing == [], f"extensions missing from the wheel: {missing}"
    pxd = {str(p.relative_to(ROOT)) for p in ROOT.glob("pyublk_fast/**/*.pxd")}
    assert pxd and pxd <= names, sorted(pxd - names)
    assert {"pyublk_fast/py.typed", "pyublk_fast/_core/pytask.pyi", "pyublk_fast/_core/compat.h",
            "pyublk_fast/bench/nop_qd.c", "pyublk_fast/backends/__init__.py",
            "pyublk_fast/backends/qcow2/image.py", "pyublk_fast/data/70-pyublk-fast.rules"} <= names
    assert not [n for n in names if n.endswith((".pyx", ".c")) and n != "pyublk_fast/bench/nop_qd.c"]
    assert f"Version: {source_version()}" in meta
    assert "Requires-Python: >=3.11" in meta and "Operating System :: POSIX :: Linux" in meta
    assert "Requires-Dist: numpy" in meta and "Requires-Dist: rich" in meta


# -- installed, run from outside the tree ------------------------------------------------------

def test_imports_come_from_the_wheel(venv):
    out = venv.run("-c", textwrap.dedent("""
        import json
        from importlib import metadata
        import pyublk_fast, pyublk_fast.backends, pyublk_fast.backends._native_loop
        import pyublk_fast._core.pytask, pyublk_fast.transport.sim.driver
        mods = [pyublk_fast, pyublk_fast.backends, pyublk_fast.backends._native_loop,
                pyublk_fast._core.pytask, pyublk_fast.transport.sim.driver]
        print(json.dumps(dict(files=[m.__file__ for m in mods], version=pyublk_fast.__version__,
                              dist=metadata.version("pyublk_fast"))))
        """)).stdout
    got = json.loads(out)
    for f in got["files"]:
        assert f.startswith(str(venv.site) + "/pyublk_fast/"), f"{f} is not the wheel's copy"
    assert got["version"] == got["dist"] == source_version()


def readme_ramdisk_example() -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        if "class RamDisk(Backend)" in block and "SimTransport()" in block:
            return block
    raise AssertionError("README.md has no RAM-disk example using SimTransport")


def test_readme_example_runs_from_the_wheel(venv):
    out = venv.run("-c", readme_ramdisk_example()).stdout
    assert float(out.strip().splitlines()[-1]) > 0       # the IOPS it prints; its asserts passed


def test_cli_help(venv):
    out = venv.run("-m", "pyublk_fast", "--help").stdout
    for command in ("add", "list", "del", "recover", "features"):
        assert command in out
    assert "-t loop:" in venv.run("-m", "pyublk_fast", "add", "--help").stdout


def test_udev_rules_from_the_wheel(venv):
    """The shipped rules, with the helper started by the venv's interpreter, which imports
    the wheel's copy by itself (no PYTHONPATH)."""
    out = venv.run("-m", "pyublk_fast", "udev-rules").stdout
    shipped = (ROOT / "pyublk_fast/data/70-pyublk-fast.rules").read_text()
    helper = 'IMPORT{program}="%s -m pyublk_fast udev-owner %%n"'
    assert out == shipped.replace(helper % "/usr/bin/python3", helper % venv.python), out


def test_bench_quick_null(venv):
    """The bench from the wheel: the null scenarios against the C NOP reference, which it
    compiles from the nop_qd.c the wheel ships."""
    out = venv.work / "bench.json"
    venv.run("-m", "pyublk_fast.bench", "--quick", "--scenario", "sim/null/randread-4k-qd*/copy/q1",
             "--runtime", "0.2", "--json", str(out), timeout=180)
    rows = json.loads(out.read_text())["rows"]
    server = [r for r in rows if r["kind"] == "server"]
    refs = [r for r in rows if r["name"].startswith("ref/nop/")]
    assert len(server) == 3 and len(refs) == 3, [r["name"] for r in rows]
    for r in server + refs:
        assert r["status"] == "ok" and r["iops"] > 0 and not r["errors"], r


THIRD_PARTY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "tp-ramdisk"
version = "1.0"
dependencies = ["pyublk_fast"]

[project.entry-points."pyublk_fast.backends"]
tp-ramdisk = "tp_ramdisk:TpRamDisk"

[tool.setuptools]
py-modules = ["tp_ramdisk"]
"""

THIRD_PARTY_MODULE = '''\
from pyublk_fast.backends.memory import MemoryBackend


class TpRamDisk(MemoryBackend):
    """A third-party RAM disk, from a package of its own."""

    DEFAULT_SIZE = 8 << 20
'''

THIRD_PARTY_USE = """\
import argparse, os
from pyublk_fast.backend import backend_class
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport

cls = backend_class("tp-ramdisk")
parser = argparse.ArgumentParser()
cls.add_arguments(parser)
backend = cls.from_args(parser.parse_args(["-s", "1M"]))
data = os.urandom(8192)
with SimTransport() as t, Device(backend, t) as dev, dev.open() as blk:
    blk.pwrite(data, 4096)
    assert blk.pread(8192, 4096) == data
assert bytes(backend.data[4096:4096 + 8192]) == data and backend.size == 1 << 20
print(cls.__module__)
"""


def test_third_party_backend_package(venv, tmp_path):
    """A backend from its own installed package (an entry point in group
    pyublk_fast.backends) is a target of `add`, with its own options, and serves data."""
    pkg = tmp_path / "tp-ramdisk"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(THIRD_PARTY_PYPROJECT)
    (pkg / "tp_ramdisk.py").write_text(THIRD_PARTY_MODULE)
    help_before = venv.run("-m", "pyublk_fast", "add", "--help").stdout
    assert "tp-ramdisk" not in help_before
    venv.pip_install("--no-build-isolation", str(pkg))
    help_after = venv.run("-m", "pyublk_fast", "add", "--help").stdout
    listed = re.search(r"-t NAME, --type NAME\s+the backend: ([^\n]*)", help_after).group(1)
    assert "tp-ramdisk" in listed.split(", ")
    section = help_after.split("-t tp-ramdisk:", 1)[1]
    assert "A third-party RAM disk, from a package of its own." in section
    assert "-s SIZE, --size SIZE" in section and "default 8m" in section
    assert venv.run("-c", THIRD_PARTY_USE).stdout.strip() == "tp_ramdisk"


NATIVE_SETUP = """\
import os

import pyublk_fast
from Cython.Build import cythonize
from setuptools import Extension, setup

core = os.path.join(os.path.dirname(pyublk_fast.__file__), "_core")   # compat.h
setup(name="tp-native", version="1.0", py_modules=["tp_pattern"],
      ext_modules=cythonize([Extension("tp_native", ["tp_native.pyx"], include_dirs=[core],
                                       libraries=["uring"])]))
"""

NATIVE_PYX = """\
# cython: language_level=3
from libc.string cimport memset
from pyublk_fast._core.queue cimport NativeTarget, Queue
from pyublk_fast._core.uapi cimport ublksrv_io_desc, UBLK_IO_OP_READ, SECTOR_SHIFT


# reads return 0xA5 bytes (copy data path: the tag's buffer); the rest completes
cdef class PatternTarget(NativeTarget):
    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef int n = iod.nr_sectors << SECTOR_SHIFT
        if (iod.op_flags & 0xff) == UBLK_IO_OP_READ:
            memset(q.tag_buf(tag), 0xA5, n)
        q.commit(tag, n)
        return 0
"""

NATIVE_PY = """\
from pyublk_fast.backend import Backend
from tp_native import PatternTarget


class Pattern(Backend):
    size = 1 << 20

    def native_target(self):
        return PatternTarget()
"""

NATIVE_USE = """\
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport
from tp_pattern import Pattern

with SimTransport() as t, Device(Pattern(), t) as dev, dev.open() as blk:
    assert dev.native is not None
    assert blk.pread(8192, 4096) == bytes([0xA5]) * 8192
print("served")
"""


def test_native_target_package_builds_against_the_wheel(venv, tmp_path):
    """A native target of its own package cimports the wheel's .pxd files, compiles and
    serves requests in C."""
    pkg = tmp_path / "tp-native"
    pkg.mkdir()
    (pkg / "setup.py").write_text(NATIVE_SETUP)
    (pkg / "tp_native.pyx").write_text(NATIVE_PYX)
    (pkg / "tp_pattern.py").write_text(NATIVE_PY)
    venv.pip_install("--no-build-isolation", str(pkg))
    assert venv.run("-c", NATIVE_USE).stdout.strip() == "served"


USER_SCRIPT = '''\
from __future__ import annotations

import errno

from pyublk_fast import aio
from pyublk_fast.aio import FixedFile, Op
from pyublk_fast.backend import Backend, register
from pyublk_fast.device import Device
from pyublk_fast.errors import BackendError
from pyublk_fast.transport.sim import SimTransport


@register("typed")
class Typed(Backend):
    size = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.fixed: FixedFile | None = None

    async def read(self, offset: int, buf: memoryview) -> None:
        io = aio.current()
        if self.fixed is None:
            self.fixed = io.register_file(self.fd)
        n: int = await io.read(self.fixed, buf, offset)
        if n != len(buf):
            raise BackendError(errno.EIO)

    def write(self, offset: int, data: memoryview) -> Op[int]:
        return aio.current().pwrite_request(self.fd, offset)

    async def flush(self) -> None:
        await aio.current().fdatasync(self.fd)
        value: str = await aio.current().run_in_thread(str, 3)
        assert value


def serve() -> None:
    with SimTransport() as t, Device(Typed(0), t, queues=1, depth=32) as dev:
        print(dev.dev_id)
'''

USER_SCRIPT_WRONG = '''\
from pyublk_fast import aio


async def read(fd: int, buf: bytearray) -> None:
    n: str = await aio.current().read(fd, buf, 0)
    aio.current().sleep("soon")
'''


def test_mypy_sees_the_api_of_the_installed_wheel(venv, tmp_path):
    """py.typed and the stubs of the compiled module: mypy accepts a typed user script,
    and finds the mistakes in a wrong one (so the types are there, not Any)."""
    (tmp_path / "good.py").write_text(USER_SCRIPT)
    (tmp_path / "wrong.py").write_text(USER_SCRIPT_WRONG)
    mypy = [sys.executable, "-m", "mypy", "--python-executable", venv.python, "--strict",
            "--cache-dir", tmp_path / "cache", "--no-error-summary"]
    good = subprocess.run([*map(str, mypy), "good.py"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    wrong = subprocess.run([*map(str, mypy), "wrong.py"], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert 'wrong.py:5: error: Incompatible types in assignment (expression has type "int", ' \
           'variable has type "str")' in wrong.stdout, wrong.stdout
    assert 'wrong.py:6: error: Argument 1 to "sleep" of "RingIO" has incompatible type "str"' \
           in wrong.stdout, wrong.stdout
