"""qcow2: a qcow2 (v3) image served through the qcow2-lite engine."""
from pyublk_fast.backend import FileBackend, register

from .qcow2 import Qcow2Image
from .qcow2.ringio import RingData


@register("qcow2")
class Qcow2Backend(FileBackend):
    """A qcow2 (v3) image: metadata by the qcow2-lite engine, data on the queue's ring."""

    can_discard = True
    can_write_zeroes = True
    # data moves only by request-directed ring I/O: the request's pages need no mapping
    data_paths = ("user_copy", "zero_copy", "splice_zc")
    file_format = "qcow2"
    CREATE_HINT = "qemu-img create -f qcow2 {file} 1G"

    def __init__(self, path: str, *, read_only: bool = False):
        self.image = Qcow2Image.open(path, readonly=read_only)
        try:
            self.data = RingData(self.image, path, read_only)
        except BaseException:
            self.image.close()
            raise
        self.read_only = read_only
        # reads and writes within one published cluster are served by the queues in C
        self.extent_map = self.data.map
        self.size = self.image.size
        # O_DIRECT's block: every piece of a request is then aligned for it
        self.block_size = self.data.block_size

    def read(self, offset, buf):
        return self.data.read(offset, buf)

    def write(self, offset, data):
        return self.data.write(offset, data)

    def flush(self):
        return self.data.flush()

    def discard(self, offset, length):
        return self.data.discard(offset, length)

    def write_zeroes(self, offset, length):
        return self.data.write_zeroes(offset, length)

    def resize(self, new_size):
        self.image.resize(new_size)
        self.size = new_size

    def close(self):
        self.data.close()
        self.image.close()
