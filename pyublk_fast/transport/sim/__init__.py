"""The simulated ublk driver as a transport, with a block-device front and a load generator."""
from .front import SimBlockDevice
from .transport import SimTransport

__all__ = ["SimTransport", "SimBlockDevice"]
