"""qcow2-lite: a pure-Python qcow2 (v3) image engine for the qcow2 backend.

Supported: version 3 read/write (version 2 read-only), 16-bit refcounts, cluster
sizes 512 B..2 MiB, zero clusters, discard, raw or qcow2 backing files (read-only,
copy-on-write). Refused with Qcow2Error(ENOTSUP): encryption, compressed clusters
(found at open), external data files, extended L2 entries, non-zlib compression types,
unknown incompatible features, refcount widths other than 16 bits; images with
internal snapshots or the dirty/corrupt bit open read-only only.
"""

from .format import Qcow2Error
from .image import Qcow2Image

__all__ = ["Qcow2Image", "Qcow2Error"]
