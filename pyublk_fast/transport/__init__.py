"""Transports: how a server reaches a ublk driver (a real kernel, or the simulation)."""
