"""The simulated ublk driver as a transport, with a block-device front and a load generator."""
from .transport import SimTransport, SimBlockDevice

__all__ = ["SimTransport", "SimBlockDevice"]
