"""qcow2: a qcow2 (v3) image served through the qcow2-lite engine."""
from pyublk_fast.backend import FileBackend, register

from .qcow2 import Qcow2Image


@register("qcow2")
class Qcow2Backend(FileBackend):
    """A qcow2 (v3) image, served by the qcow2-lite engine's Python handlers."""

    can_discard = True
    can_write_zeroes = True
    file_format = "qcow2"
    CREATE_HINT = "qemu-img create -f qcow2 {file} 1G"

    def __init__(self, path: str, *, read_only: bool = False):
        self.image = Qcow2Image.open(path, readonly=read_only)
        self.read_only = read_only
        self.size = self.image.size

    def read(self, offset, buf):
        self.image.readinto(offset, buf)

    def write(self, offset, data):
        self.image.write(offset, data)

    def flush(self):
        self.image.flush()

    def discard(self, offset, length):
        self.image.discard(offset, length)

    def write_zeroes(self, offset, length):
        self.image.write_zeroes(offset, length)

    def resize(self, new_size):
        self.image.resize(new_size)
        self.size = new_size

    def close(self):
        self.image.close()
