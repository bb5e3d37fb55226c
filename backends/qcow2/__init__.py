"""qcow2-lite: a pure-Python qcow2 (v3) image engine for the qcow2 backend.

Supported: version 3 read/write (version 2 read-only), 16-bit refcounts, cluster
sizes 512 B..2 MiB, zero clusters, discard, raw or qcow2 backing files (read-only,
copy-on-write), compressed clusters (deflate, or zstd with the zstandard package: read
through a cache, copied on write into normal clusters). Refused with
Qcow2Error(ENOTSUP): encryption, external data files, extended L2 entries, other
compression types, unknown incompatible features, refcount widths other than 16 bits;
images with internal snapshots or the dirty/corrupt bit, and images with an L2 entry
whose host cluster is not its own (past the end of the file, holding metadata, mapped
twice, or compressed data counted too few times), open read-only only.

Modules, each importing only those below it:

- ``ringio``: RingData, the backend's data I/O on a queue's io_uring ring, around the
  engine's metadata steps;
- ``image``: Qcow2Image, the engine (open and validate, read, write, discard, write
  zeroes, flush, backing files);
- ``layout``: the header, L1 table and refcount structures of a new image;
- ``l2``: virtual -> host cluster mapping through the L1 and L2 tables;
- ``refcount``: refcounts and cluster allocation;
- ``compress``: compressed cluster descriptors, decompression, the cache of
  decompressed clusters;
- ``cache``: the LRU cache of L2 tables and refcount blocks;
- ``fileio``, ``format``: file I/O; on-disk constants, the header, Qcow2Error.
"""

from .format import Qcow2Error
from .image import Qcow2Image

__all__ = ["Qcow2Image", "Qcow2Error"]
