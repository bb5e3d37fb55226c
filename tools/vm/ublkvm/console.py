"""Reading the guest's serial console: line splitting, tail, kernel trouble.

Kernel lines carry a ``[  12.345678] `` timestamp; only those are checked for
trouble, so CMD's own output (e.g. a test named test_BUG) never counts.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Collection

KERNEL_LINE_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?(.*)$")
TROUBLE_RES = [
    # older kernels: "CPU: 1 PID: 2 at f.c:3 fn"; 7.2: "f.c:3 at fn, CPU#1: comm/2" ("at fn, ...")
    ("warning", re.compile(r"WARNING: (CPU: \d+ PID: \d+|at |\S+:\d+ at )")),
    ("bug", re.compile(r"\bBUG: |kernel BUG at ")),
    ("ubsan", re.compile(r"\bUBSAN: ")),
    ("kasan", re.compile(r"\bKASAN: |\bKFENCE: ")),
    ("oops", re.compile(r"\bOops\b|general protection fault|Unable to handle kernel")),
    ("panic", re.compile(r"Kernel panic - not syncing")),
    # 7.2 says "blocked in I/O wait for more than" for a task in D state on I/O
    ("hung task", re.compile(r"INFO: task .* blocked( in I/O wait)? for more than|"
                             r"rcu: INFO: .*detected stall")),
    ("lockdep", re.compile(r"WARNING: (possible (circular|recursive|irq lock inversion)|"
                           r"inconsistent lock state|suspicious RCU usage|bad unlock balance|"
                           r"bad contention|held lock freed|lock held when returning|"
                           r"Nested lock was not taken|chain_key collision|"
                           r"\S+-safe -> \S+-unsafe lock order|\S+/\d+ still has locks held)")),
]
"""(kind, pattern) pairs that mark kernel trouble in a kernel log message."""
FATAL_KINDS = frozenset({"oops", "panic"})


def classify(message: str) -> str:
    """The trouble kind of one kernel log message, or '' when it is harmless."""
    for kind, rx in TROUBLE_RES:
        if rx.search(message):
            return kind
    return ""


def kernel_message(line: str) -> str | None:
    """The message of a timestamped kernel console line, None for other lines."""
    m = KERNEL_LINE_RE.match(line)
    return m.group(1) if m else None


@dataclass
class ConsoleWatch:
    """Splits console bytes into lines, keeps a tail and collects kernel trouble."""

    tail_lines: int = 60
    tail: deque[str] = field(default_factory=deque)
    trouble: list[tuple[str, str]] = field(default_factory=list)   # (kind, line)
    _partial: bytes = b""

    def feed(self, data: bytes) -> list[str]:
        """Add raw console bytes; returns the complete lines they finished."""
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        lines = [self._add(raw) for raw in complete]
        return lines

    def flush(self) -> list[str]:
        """Return the last, unterminated line (if any) as a complete one."""
        if not self._partial:
            return []
        raw, self._partial = self._partial, b""
        return [self._add(raw)]

    def _add(self, raw: bytes) -> str:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(line)
        while len(self.tail) > self.tail_lines:
            self.tail.popleft()
        msg = kernel_message(line)
        if msg is not None:
            kind = classify(msg)
            if kind:
                self.trouble.append((kind, line))
        return line


def scan_log(text: str) -> list[tuple[str, str]]:
    """(kind, line) trouble in a whole kernel log (``dmesg`` output)."""
    out = []
    for line in text.splitlines():
        msg = kernel_message(line)
        kind = classify(msg if msg is not None else line)
        if kind:
            out.append((kind, line))
    return out


def trouble_context(text: str, trouble_lines: Collection[str], before: int = 2, after: int = 30,
                    limit: int = 3) -> list[str]:
    """Excerpts of a kernel log around the first ``limit`` of its ``trouble_lines``."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line in trouble_lines]
    out: list[str] = []
    last_end = -1
    for i in hits[:limit]:
        start = max(i - before, last_end + 1)
        end = min(len(lines), i + after + 1)
        if start >= end:
            continue
        if out:
            out.append("...")
        out.extend(lines[start:end])
        last_end = end - 1
    return out


def summarize(trouble: list[tuple[str, str]]) -> str:
    """'2 warning, 1 ubsan' style count of trouble kinds."""
    counts: dict[str, int] = {}
    for kind, _ in trouble:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def hang_report(hang_dmesg: str, limit: int = 120) -> list[str]:
    """The sysrq part of a kernel log saved before a timeout (blocked tasks, CPUs)."""
    lines = hang_dmesg.splitlines()
    start = next((i for i in range(len(lines) - 1, -1, -1)
                  if "sysrq: Show Blocked State" in lines[i]), None)
    if start is None:
        return lines[-limit:]
    return lines[start:start + limit]
