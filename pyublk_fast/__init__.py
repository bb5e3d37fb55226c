"""pyublk_fast: write Linux ublk block-device servers in Python, served at C speed.

    from pyublk_fast import Backend, Device, SimTransport
"""

__version__ = "0.1.0"

from .backend import Backend  # noqa: E402
from .device import Device  # noqa: E402
from .errors import BackendError  # noqa: E402
from .transport.sim import SimTransport  # noqa: E402

__all__ = ["Backend", "BackendError", "Device", "SimTransport", "__version__"]
