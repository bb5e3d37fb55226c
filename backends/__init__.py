"""Shipped backends: null, loop, qcow2-lite."""
