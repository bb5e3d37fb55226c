"""qcow2-lite: a pure-Python qcow2 (v3) image engine for the qcow2 backend."""

from .format import Qcow2Error
from .image import Qcow2Image

__all__ = ["Qcow2Image", "Qcow2Error"]
