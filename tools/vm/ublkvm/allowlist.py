"""Known upstream kernel reports: the reviewed list the strict lane tolerates.

The list is plain data, ``tools/vm/known-kernel-reports.toml``.  A report is
matched by its signature: the kernel's header line without what changes from
one run to the next (timestamp, build directory, CPU, PID, task, code
offsets), compared whole.  An entry thus covers one check at one source line and
nothing else in the same file; on a kernel version it does not name, the report
passes with a note asking to re-read the source there.
"""
from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import LaneError
from .console import FATAL_KINDS, classify, kernel_message

KNOWN_REPORTS = Path(__file__).resolve().parents[1] / "known-kernel-reports.toml"
REQUIRED = ("report", "kernels", "code", "why")
OPTIONAL = ("seen",)
SOURCE_LINE_RE = re.compile(r"[\w.-]+(/[\w.-]+)*\.(c|h|S|rs):\d+")
KERNEL_VERSION_RE = re.compile(r"\d+\.\d+(\.\d+)?")
VOLATILE = [
    # Debian builds in /build/reproducible-path/linux-X.Y.Z/: keep the tree-relative path
    (re.compile(r"(/[^\s/]+)*/linux-[^\s/]+/"), ""),
    # WARN headers: "CPU: 1 PID: 130 at f.c:1 fn+0x1/0x2" (older kernels) and
    # "f.c:1 at fn+0x1/0x2, CPU#1: comm/130" (7.2)
    (re.compile(r"CPU: \d+ PID: \d+ "), ""),
    (re.compile(r", CPU#\d+: \S+$"), ""),
    (re.compile(r"\+0x[0-9a-f]+/0x[0-9a-f]+"), ""),
    (re.compile(r"\s+"), " "),
]


def signature(line: str) -> str:
    """A kernel report's header line without the parts that differ between runs."""
    text = kernel_message(line)
    text = line if text is None else text
    for rx, repl in VOLATILE:
        text = rx.sub(repl, text)
    return text.strip()


@dataclass(frozen=True)
class KnownReport:
    """One entry of the list."""

    report: str
    kernels: tuple[str, ...]
    code: str
    why: str
    seen: str = ""

    def covers(self, kver: str) -> bool:
        """True when ``kver`` (e.g. 7.2.13+deb14-amd64) is one of the entry's versions."""
        return any(kver == v or (kver.startswith(v) and kver[len(v)] in ".+-~")
                   for v in self.kernels)


def load(path: Path | None = None) -> list[KnownReport]:
    """Read and check the list; LaneError names the file, the entry and the problem."""
    path = path or KNOWN_REPORTS
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LaneError(f"{path}: cannot read the known kernel reports: {exc}") from exc
    unknown = set(data) - {"known"}
    if unknown or not isinstance(data.get("known", []), list):
        raise LaneError(f"{path}: only [[known]] entries belong here, not {sorted(unknown)}")
    entries: list[KnownReport] = []
    for n, raw in enumerate(data.get("known", []), 1):
        entry = _entry(raw, f"{path}: entry {n}")
        if any(e.report == entry.report for e in entries):
            raise LaneError(f"{path}: entry {n}: {entry.report!r} is listed twice "
                            "(add the kernel version to the first entry instead)")
        entries.append(entry)
    return entries


def _entry(raw: object, where: str) -> KnownReport:
    if not isinstance(raw, dict):
        raise LaneError(f"{where}: not a table")
    missing = [k for k in REQUIRED if k not in raw]
    extra = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if missing or extra:
        raise LaneError(f"{where}: missing {missing}, unknown {extra}; "
                        f"fields are {', '.join(REQUIRED + OPTIONAL)}")
    for key in ("report", "code", "why", *[k for k in OPTIONAL if k in raw]):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise LaneError(f"{where}: {key} must be a non-empty string")
    report = raw["report"]
    if signature(report) != report:
        raise LaneError(f"{where}: report {report!r} must be written without run-specific "
                        f"parts: {signature(report)!r}")
    kind = classify(report)
    if not kind or kind in FATAL_KINDS:
        raise LaneError(f"{where}: report {report!r} is not a kernel warning header "
                        "(WARNING, BUG, UBSAN, KASAN, lockdep...); crashes cannot be listed")
    if not SOURCE_LINE_RE.search(report):
        raise LaneError(f"{where}: report {report!r} names no source line (file.c:LINE): "
                        "an entry must not cover every report of its kind")
    kernels = raw["kernels"]
    if (not isinstance(kernels, list) or not kernels
            or not all(isinstance(v, str) and KERNEL_VERSION_RE.fullmatch(v) for v in kernels)):
        raise LaneError(f"{where}: kernels must be a non-empty list of upstream versions "
                        f"like \"7.2.13\", not {kernels!r}")
    return KnownReport(report, tuple(kernels), raw["code"].strip(), raw["why"].strip(),
                       raw.get("seen", "").strip())


def triage(trouble: list[tuple[str, str]], entries: list[KnownReport], kver: str
           ) -> tuple[list[tuple[str, str]], list[tuple[KnownReport, str]]]:
    """Split ``(kind, line)`` trouble into (new, known); a crash is never a known report."""
    by_report = {e.report: e for e in entries}
    new, known = [], []
    for kind, line in trouble:
        entry = None if kind in FATAL_KINDS else by_report.get(signature(line))
        # the report names its source line and column: on another kernel version the same
        # text still means the same code, so it passes (with a note to re-check), and CI
        # on a machine that fetched a newer kernel does not fail on a known report
        if entry is not None:
            known.append((entry, line))
        else:
            new.append((kind, line))
    return new, known


def unverified(known: list[tuple[KnownReport, str]], kver: str) -> list[str]:
    """Notes for the known reports seen on a kernel version their entry does not name."""
    seen = {entry.report: entry for entry, _ in known if not entry.covers(kver)}
    return [f"{report}: listed in {shown()} for kernels {', '.join(e.kernels)}, not {kver}: "
            "check the code at that line is unchanged and add this version" for report, e in seen.items()]


def known_summary(known: list[tuple[KnownReport, str]]) -> str:
    """'2x <report>; 1x <report>' for the allowed reports of a run."""
    counts = Counter(entry.report for entry, _ in known)
    return "; ".join(f"{n}x {report}" for report, n in counts.items())


def shown() -> str:
    """The list's path as a user in the checkout would type it."""
    try:
        return str(KNOWN_REPORTS.relative_to(Path.cwd()))
    except ValueError:
        return str(KNOWN_REPORTS)


def describe_new(new: list[tuple[str, str]], entries: list[KnownReport], kver: str
                 ) -> list[str]:
    """Lines quoting each new report once (with a count) and how it could be listed."""
    first: dict[str, str] = {}
    times: Counter[str] = Counter()
    for _, line in new:
        sig = signature(line)
        first.setdefault(sig, line)
        times[sig] += 1
    listed = {e.report: e for e in entries}
    out = []
    for sig, line in first.items():
        out.append(line + (f"   ({times[sig]}x)" if times[sig] > 1 else ""))
        if sig in listed:
            out.append(f"    listed in {shown()} for kernels "
                       f"{', '.join(listed[sig].kernels)}, not {kver}: if the code there is "
                       "unchanged, add this version")
        elif SOURCE_LINE_RE.search(sig):
            out.append(f"    only if it is upstream's: list it in {shown()} as "
                       f"report = \"{sig}\"")
    return out
