"""The CLI's state: one JSON record per device its servers serve, for ``list`` and ``recover``.

Records live in the state directory: $PYUBLK_FAST_RUN_DIR, else /run/pyublk_fast for
root, else $XDG_RUNTIME_DIR/pyublk_fast (or /tmp/pyublk_fast-UID/pyublk_fast). Each is
written whole and renamed into place, so a reader never sees half a record.
"""
from __future__ import annotations

import json
import os
from typing import Any


def state_dir() -> str:
    """Where per-device JSON records (and the daemons' logs) live."""
    env = os.environ.get("PYUBLK_FAST_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/pyublk_fast"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pyublk_fast-{os.geteuid()}"
    return os.path.join(base, "pyublk_fast")


def _path(dev_id: int) -> str:
    return os.path.join(state_dir(), f"{dev_id}.json")


def read_record(dev_id: int) -> dict[str, Any] | None:
    """The JSON record of device dev_id, or None."""
    try:
        with open(_path(dev_id)) as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(dev_id: int, rec: dict[str, Any]) -> None:
    os.makedirs(state_dir(), exist_ok=True)
    tmp = _path(dev_id) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1)
    os.replace(tmp, _path(dev_id))


def drop_record(dev_id: int, pid: int | None = None) -> None:
    """Remove the record (only if it still names ``pid``, when given)."""
    rec = read_record(dev_id)
    if rec is not None and pid is not None and rec.get("pid") != pid:
        return
    try:
        os.unlink(_path(dev_id))
    except FileNotFoundError:
        pass
