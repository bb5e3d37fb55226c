"""`stats` on a real CLI server: what fio did shows in the published counters."""
from __future__ import annotations

import json

from kernel_fixtures import cli_add, cli_env, cli_in_fork, fio  # noqa: F401


def test_stats_count_what_fio_did(cli_env, tmp_path):
    img = tmp_path / "stats.img"
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    dev_id, path = cli_add(cli_env, "-t", "loop", "-f", str(img))
    out = fio("--name=st", f"--filename={path}", "--rw=randrw", "--bs=4k", "--iodepth=8",
              "--ioengine=io_uring", "--direct=1", "--size=8M", "--io_size=16M")
    reads, writes = (out["jobs"][0][d]["total_ios"] for d in ("read", "write"))
    res = cli_in_fork(cli_env, "stats", "-n", str(dev_id), "--json", "--interval", "0.5")
    assert res.returncode == 0, res.stdout + res.stderr
    total, interval = (json.loads(line) for line in res.stdout.splitlines())
    # the block layer may merge neighbouring requests, so bytes count exactly, requests
    # at most; the kernel's own reads (partition scan) come on top of fio's
    assert total["bytes"]["write"] == writes * 4096 and 0 < total["requests"]["write"] <= writes
    assert total["bytes"]["read"] >= reads * 4096 and total["failed"] == 0
    assert total["in_flight"] == 0 and total["latency_us"]["p99"] > 0
    assert interval["iops"] == 0 and interval["seconds"] >= 0.4    # idle since fio ended
