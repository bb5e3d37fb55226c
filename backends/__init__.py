"""Shipped backends: null, loop, qcow2-lite, memory and rbd (importing registers them)."""
from . import loop, memory, null, qcow2_backend, rbd  # noqa: F401
