"""The API reference builds without a warning, and the stubs of the compiled module say
what the module has."""
from __future__ import annotations

import ast
import html
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyublk_fast._core.pytask as pytask
from pyublk_fast import aio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          "-d", str(out / "doctrees"), str(ROOT / "docs" / "api"), str(out / "html")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"sphinx-build failed or warned:\n{res.stdout}\n{res.stderr}"
    return out / "html"


def page_text(html_dir: Path, page: str) -> str:
    text = html.unescape(re.sub(r"<[^>]+>", "", (html_dir / f"{page}.html").read_text()))
    return re.sub(r"\s+", " ", text.replace("\N{PILCROW SIGN}", ""))


@pytest.mark.parametrize("page, wanted", [
    ("backend", ["class pyublk_fast.backend.Backend", "can_discard", "Fill buf (len(buf) bytes)",
                 "class pyublk_fast.backend.Request", "class pyublk_fast.backend.SizedBackend",
                 "class pyublk_fast.backend.FileBackend", "pyublk_fast.backend.register(name: str)"]),
    ("device", ["class pyublk_fast.device.Device(backend, transport, *, queues: int = 1",
                "start() → Device", "Add, serve and start the device", "info() → DevInfo"]),
    # the compiled module's docstrings and signatures (embedded by Cython)
    ("aio", ["pyublk_fast.aio.current() → RingIO", "class pyublk_fast.aio.RingIO",
             "read(self, fd, buf, offset: int)", "Read into buf (any writable buffer)",
             "pwrite_request(self, fd, offset: int, at=0, length=None, *, dsync: bool = False)",
             "run_in_thread(self, fn, *args)", "class pyublk_fast.aio.Op", "class pyublk_fast.aio.FixedFile",
             "pyublk_fast.aio.PUNCH_HOLE = 2 fallocate(): free the range"]),
    ("transport", ["class pyublk_fast.transport.base.Transport", "class pyublk_fast.transport.base.DevInfo",
                   "class pyublk_fast.transport.base.QueueEndpoint",
                   "class pyublk_fast.transport.kernel.KernelTransport",
                   "class pyublk_fast.transport.sim.SimTransport", "abstractmethod add_dev("]),
    ("errors", ["exception pyublk_fast.errors.BackendError(errno: int", "pyublk_fast.errors.os_error("]),
])
def test_api_reference_documents_the_public_api(html_dir, page, wanted):
    text = page_text(html_dir, page)
    missing = [w for w in wanted if w not in text]
    assert missing == [], f"{page}.html lacks {missing}"


def test_aio_reference_has_every_exported_name(html_dir):
    text = page_text(html_dir, "aio")
    assert [n for n in aio.__all__ if f"pyublk_fast.aio.{n}" not in text] == []


# -- the stubs ------------------------------------------------------------------------------------

STUB = ROOT / "pyublk_fast" / "_core" / "pytask.pyi"
#: dunder methods that are part of the API (awaiting an Op)
API_DUNDERS = {"__await__", "__iter__", "__next__", "__init__", "__len__"}


def stub_tree() -> dict[str, dict[str, ast.AST]]:
    """Top-level public names of the stub -> {member name: its node} (empty for functions)."""
    out: dict[str, dict[str, ast.AST]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            out[node.name] = {"": node}
    return {k: v for k, v in out.items() if not k.startswith("_")}


def module_tree() -> dict[str, dict[str, object]]:
    """The same for the compiled module: the classes and functions it defines."""
    out: dict[str, dict[str, object]] = {}
    for name, obj in vars(pytask).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != pytask.__name__:
            continue
        if isinstance(obj, type):
            out[name] = {k: v for k, v in vars(obj).items()
                         if (not k.startswith("_") or k in API_DUNDERS) and k != "__pyx_vtable__"}
        else:
            out[name] = {"": obj}
    return out


def test_stub_names_match_the_compiled_module():
    stub, mod = stub_tree(), module_tree()
    assert sorted(stub) == sorted(mod)
    for name in mod:
        wanted = set(mod[name]) - ({"__init__"} if "__init__" not in stub[name] else set())
        assert set(stub[name]) == wanted, f"{name}: stub {sorted(stub[name])}, module {sorted(wanted)}"


def _kinds_of_stub(fn: ast.FunctionDef) -> list[tuple[str, str]]:
    a = fn.args
    out = [(p.arg, "POSITIONAL_OR_KEYWORD") for p in a.posonlyargs + a.args]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL"))
    out += [(p.arg, "KEYWORD_ONLY") for p in a.kwonlyargs]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD"))
    return out


def test_stub_signatures_match_the_compiled_module():
    """Parameter names and kinds of every method of RingIO (and of current()) as compiled."""
    stub = stub_tree()
    checked = 0
    for cls_name, fn_name, obj in [("RingIO", n, getattr(pytask.RingIO, n)) for n in stub["RingIO"]] + \
                                  [("current", "", pytask.current)]:
        sig = inspect.signature(obj)
        compiled = [(p.name, p.kind.name) for p in sig.parameters.values()]
        assert _kinds_of_stub(stub[cls_name][fn_name]) == compiled, f"{cls_name}.{fn_name}"
        checked += 1
    assert checked == len(stub["RingIO"]) + 1 >= 13
