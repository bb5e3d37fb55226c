"""Shipped backends: null, loop, qcow2-lite and memory (importing registers them)."""
from . import loop, memory, null, qcow2_backend  # noqa: F401
