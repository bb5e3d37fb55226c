"""A private apt for one Debian suite: own sources list, state and cache dirs.

Nothing here touches /etc/apt or dpkg's status: apt reads the config file named
by ``APT_CONFIG``, which points every Dir:: at ``<cache>/apt/<suite>``.  The
mirror is the one the host's own apt already uses (read at run time), unless
``UBLK_VM_MIRROR`` names another.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import LaneError

DEBIAN_CODENAMES = frozenset(
    "buster bullseye bookworm trixie forky duke sid unstable testing stable oldstable"
    " experimental".split()
)
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class SourceEntry:
    """One ``deb`` line (or deb822 stanza, one per URI) of the host's apt sources."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""


def parse_sources(text: str, deb822: bool) -> list[SourceEntry]:
    """Parse a ``sources.list`` (one-line) or ``*.sources`` (deb822) file's text."""
    if deb822:
        return _parse_deb822(text)
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        opts = {}
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if m:
            for opt in m.group(1).split():
                k, _, v = opt.partition("=")
                opts[k] = v
            rest = m.group(2)
        words = rest.split()
        if len(words) >= 2:
            out.append(SourceEntry(words[0], (words[1],), tuple(words[2:]),
                                   opts.get("signed-by", "")))
    return out


def _parse_deb822(text: str) -> list[SourceEntry]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(SourceEntry(uri, tuple(fields.get("suites", "").split()),
                                   tuple(fields.get("components", "").split()),
                                   fields.get("signed-by", "")))
    return out


def is_debian_archive(entry: SourceEntry) -> bool:
    """True for a main Debian archive (not security, not a third-party repo)."""
    if "main" not in entry.components:
        return False
    for suite in entry.suites:
        base = suite.split("-", 1)[0].split("/", 1)[0]
        if base in DEBIAN_CODENAMES and not suite.endswith("-security"):
            return True
    return False


def host_debian_source(etc_apt: Path = Path("/etc/apt")) -> SourceEntry:
    """The Debian archive the host's apt uses (first match), or LaneError."""
    files = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for entry in parse_sources(text, deb822=path.suffix == ".sources"):
            if is_debian_archive(entry):
                return entry
    raise LaneError(
        f"no Debian archive found in {etc_apt}/sources.list(.d) to fetch kernels from; "
        "set UBLK_VM_MIRROR to a Debian mirror URI")


def host_proxy_config() -> list[str]:
    """The host apt's Acquire::*::Proxy settings, as apt.conf lines."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return []
    return [line for line in dump.splitlines()
            if re.match(r"Acquire::(http|https|ftp)::Proxy", line)]


def apt_failure(output: str) -> str:
    """The one line of apt's output that says why it failed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Err:") and i + 1 < len(lines) and not lines[i + 1][:3] in (
                "Ign", "Get", "Hit", "Err"):
            return lines[i + 1]
    for prefix in ("E:", "W:", "Err:"):
        for line in lines:
            if line.startswith(prefix):
                return line
    return lines[-1] if lines else "no output"


class PrivateApt:
    """apt-get/apt-cache against ``suite`` with all state under ``root``."""

    def __init__(self, root: Path, suite: str, mirror: str, keyring: str = "") -> None:
        self.root = root
        self.suite = suite
        self.mirror = mirror
        self.keyring = keyring or DEFAULT_KEYRING
        self.conf = root / "apt.conf"
        self._updated = False

    def write_config(self) -> None:
        """Create the directory tree, sources list and apt.conf."""
        r = self.root
        for sub in ("lists/partial", "archives/partial", "etc/sources.list.d",
                    "etc/preferences.d", "etc/apt.conf.d"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "status").touch()
        (r / "etc/sources.list").write_text(
            f"deb [signed-by={self.keyring}] {self.mirror} {self.suite} main\n")
        lines = [
            f'Dir::State "{r}";', f'Dir::State::lists "{r}/lists";',
            f'Dir::State::status "{r}/status";', f'Dir::Cache "{r}";',
            f'Dir::Cache::archives "{r}/archives";', f'Dir::Cache::pkgcache "";',
            f'Dir::Cache::srcpkgcache "";',
            f'Dir::Etc::sourcelist "{r}/etc/sources.list";',
            f'Dir::Etc::sourceparts "{r}/etc/sources.list.d";',
            f'Dir::Etc::preferences "{r}/etc/preferences";',
            f'Dir::Etc::preferencesparts "{r}/etc/preferences.d";',
            f'Dir::Etc::parts "{r}/etc/apt.conf.d";',
            'APT::Architecture "amd64";', 'APT::Architectures { "amd64"; };',
            # The archive reached here may be a snapshot whose Release has "expired".
            'Acquire::Check-Valid-Until "false";',
            'Acquire::Languages "none";', 'APT::Sandbox::User "root";',
            *host_proxy_config(),
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, APT_CONFIG=str(self.conf), DEBIAN_FRONTEND="noninteractive",
                   LC_ALL="C")
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                              check=False)

    def update(self) -> None:
        """``apt-get update`` (once per object); LaneError when no list arrives."""
        if self._updated:
            return
        self.write_config()
        res = self._run(["apt-get", "update", "-q"])
        if not list((self.root / "lists").glob("*_Packages*")):
            raise LaneError(f"no package list for Debian '{self.suite}' from {self.mirror} "
                            f"(archive unreachable?): {apt_failure(res.stdout + res.stderr)}")
        self._updated = True

    def package_names(self, pattern: str) -> list[str]:
        """Names of packages matching the regex ``pattern`` (apt-cache search)."""
        self.update()
        res = self._run(["apt-cache", "search", "--names-only", pattern])
        return [line.split(" ", 1)[0] for line in res.stdout.splitlines() if line.strip()]

    def has(self, package: str) -> bool:
        """True when ``package`` is in the suite's package list."""
        self.update()
        res = self._run(["apt-cache", "show", "--no-all-versions", package])
        return res.returncode == 0 and bool(res.stdout.strip())

    def version_of(self, package: str) -> str:
        """Candidate version of ``package`` in the suite ('' when absent)."""
        self.update()
        res = self._run(["apt-cache", "show", "--no-all-versions", package])
        m = re.search(r"^Version: (\S+)", res.stdout, re.M)
        return m.group(1) if m else ""

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Download ``packages`` (.deb files) into ``dest``; LaneError on failure."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        res = self._run(["apt-get", "download", "-q", *packages], cwd=dest)
        got = sorted(set(dest.glob("*.deb")) - before)
        if res.returncode != 0 or len(got) < len(packages):
            raise LaneError(f"download of {' '.join(packages)} from Debian '{self.suite}' "
                            f"failed: {apt_failure(res.stdout + res.stderr)}")
        return got

    def run_raw(self, args: list[str]) -> int:
        """Run an apt command against this config with inherited stdio (CLI helper)."""
        self.write_config()
        env = dict(os.environ, APT_CONFIG=str(self.conf))
        return subprocess.run(args, env=env, check=False).returncode
