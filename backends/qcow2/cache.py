"""TableCache: the bounded LRU cache of cluster-sized metadata tables.

One class serves the L2 tables and the refcount blocks. Metadata is write-through
(every change is written to the file at once, see ``fileio.store_entry``), so
evicting a table never needs I/O.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import fileio

__all__ = ["TableCache"]


class TableCache:
    """Tables of one cluster each, keyed by their offset in the file, least recently
    used evicted first once more than ``budget`` bytes (at least 8 tables) are held."""

    def __init__(self, fd: int, cluster_size: int, dtype: str, budget: int) -> None:
        self._fd = fd
        self._cs = cluster_size
        self._dtype = dtype
        self._max = max(8, budget // cluster_size)
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()

    def get(self, off: int) -> np.ndarray:
        """The table at file offset ``off``, read from the file if not cached."""
        t = self._tables.get(off)
        if t is None:
            t = np.frombuffer(fileio.pread_padded(self._fd, self._cs, off),
                              dtype=self._dtype).copy()
            self.put(off, t)
        else:
            self._tables.move_to_end(off)
        return t

    def put(self, off: int, table: np.ndarray) -> None:
        """Cache ``table``, just written to the file at ``off``."""
        self._tables[off] = table
        if len(self._tables) > self._max:
            self._tables.popitem(last=False)
