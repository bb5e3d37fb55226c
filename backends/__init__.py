"""Shipped backends: null, loop, qcow2-lite, memory, nbd and rbd (importing registers them)."""
from . import loop, memory, nbd, null, qcow2_backend, rbd  # noqa: F401
