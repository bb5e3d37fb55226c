"""Shipped backends: null, loop, qcow2-lite, memory and nbd (importing registers them)."""
from . import loop, memory, nbd, null, qcow2_backend  # noqa: F401
