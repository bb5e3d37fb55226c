"""What a process holds, read from /proc: open fds, threads, resident memory (soak tests)."""
from __future__ import annotations

import os
from typing import NamedTuple


class Usage(NamedTuple):
    fds: int
    threads: int
    rss_kib: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.rss_kib} KiB RSS"


def usage(pid: int | str = "self") -> Usage:
    """The fd count (/proc/PID/fd), thread count (/proc/PID/task: io_uring's io-wq workers
    count too, as they are the process's threads) and VmRSS of a process."""
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss)
