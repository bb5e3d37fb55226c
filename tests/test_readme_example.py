"""The README's example backend runs as written (in a subprocess, like a user would)."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs_and_moves_data():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "class RamDisk(Backend)" in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    iops = float(out.stdout.strip().splitlines()[-1])
    assert iops > 0


def test_bench_quick_help():
    out = subprocess.run([sys.executable, "-m", "pyublk_fast.bench", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout
