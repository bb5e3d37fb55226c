"""PNG charts from a bench JSON document (matplotlib, imported lazily).

iops.png       IOPS of every measured row (log scale), references in grey, ratio labels
latency.png    latency distribution from the simulated driver's histograms (density and tail)
datapaths.png  copy vs user copy vs zero copy vs splice by workload and block size (relative to copy)
"""
from __future__ import annotations

import os

COLORS = {"null": "#1f77b4", "null-py": "#aec7e8", "null-aio": "#c5b0d5", "loop": "#2ca02c", "loop-py": "#98df8a", "qcow2": "#d62728",
          "nop": "#7f7f7f", "fio": "#9e9e9e", "kublk-null": "#bdbdbd", "qemu-img": "#d9d9d9"}
PATH_COLORS = {"copy": "#4c72b0", "user_copy": "#8172b2", "zero_copy": "#55a868", "splice_zc": "#c44e52"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _subtitle(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    return (f"{m['node']}, Linux {m['kernel']}, {m['cpus']} cpus, python {v['python']}, "
            f"{doc['settings']['runtime']:g} s per scenario")


def plot_iops(doc: dict, path: str) -> str:
    plt = _plt()
    rows = [r for r in doc["rows"] if r["status"] == "ok" and r["iops"]]
    fig, ax = plt.subplots(figsize=(11, 0.26 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["iops"] for r in rows], color=[COLORS.get(r["backend"], "#333333") for r in rows],
            height=0.75)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=7, family="monospace")
    ax.set_xscale("log")
    ax.set_xlabel("IOPS (log scale)")
    for yi, r in zip(y, rows):
        label = f"{r['iops']:,.0f}" + "".join(f"  ({r[k]:.2f}x {tag})" for k, tag in (("ratio", "ref"), ("ratio2", "ref2"))
                                              if r[k] is not None)
        ax.text(r["iops"] * 1.05, yi, label, va="center", fontsize=6.5)
    lo = min(r["iops"] for r in rows)
    hi = max(r["iops"] for r in rows)
    ax.set_xlim(lo / 2, hi * 12)
    ax.grid(axis="x", which="major", alpha=0.3)
    from matplotlib.patches import Patch
    seen = list(dict.fromkeys(r["backend"] for r in rows))
    ax.legend(handles=[Patch(color=COLORS.get(b, "#333333"), label=b) for b in seen], fontsize=7,
              loc="lower right", title="backend / reference", title_fontsize=7)
    ax.set_title(f"IOPS by scenario (grey: references measured in the same run)\n{_subtitle(doc)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_rows(rows: list[dict], limit: int = 8) -> list[dict]:
    """Rows with histograms: 4 KiB random reads, copy path, one queue; QD32 of every backend first."""
    with_hist = [r for r in rows if r["status"] == "ok" and r.get("hist")]
    pref = [r for r in with_hist if r["rw"] == "randread" and r["bs"] == 4096 and r["data_path"] == "copy"
            and r["queues"] == 1]
    pref.sort(key=lambda r: (r["qd"] != 32, r["qd"]))       # stable: backends keep run order
    rest = [r for r in with_hist if r not in pref]
    return (pref + rest)[:limit]


def plot_latency(doc: dict, path: str) -> str | None:
    plt = _plt()
    rows = _latency_rows(doc["rows"])
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        lo = [x / 1000.0 for x in r["hist"]["lower_ns"]]
        counts = r["hist"]["counts"]
        total = float(sum(counts))
        label = r["name"].removeprefix("sim/")
        ax1.step(lo, [c / total for c in counts], where="post", color=cmap(i), label=label, lw=1.2)
        tail, cum = [], total
        for c in counts:
            tail.append(cum / total)
            cum -= c
        ax2.step(lo, tail, where="post", color=cmap(i), label=label, lw=1.2)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (us, log)")
    ax1.set_ylabel("fraction of I/Os per histogram bucket")
    ax1.set_title("latency distribution", fontsize=9)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_ylim(1e-5, 1.1)
    ax2.set_xlabel("latency (us, log)")
    ax2.set_ylabel("fraction of I/Os at least this slow")
    ax2.set_title("tail (complementary CDF)", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Latency seen by the simulated driver's load generator\n{_subtitle(doc)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_datapaths(doc: dict, path: str) -> str | None:
    plt = _plt()
    # rows with a mode (batch, shared buffers) would take the place of their path's bar
    ok = [r for r in doc["rows"] if r["kind"] == "server" and r["status"] == "ok" and r["queues"] == 1
          and not r.get("mode")]
    groups: dict[str, dict[str, dict[str, float]]] = {}   # backend -> workload -> path -> MB/s
    for r in ok:
        wl = f"{r['rw']} {r['bs'] // 1024}k qd{r['qd']}"
        groups.setdefault(f"{r['transport']}/{r['backend']}", {}).setdefault(wl, {})[r["data_path"]] = r["mbps"]
    # keep workloads measured on more than one path, and backends that have any
    panels = {be: {wl: p for wl, p in wls.items() if len(p) > 1} for be, wls in groups.items()}
    panels = {be: wls for be, wls in panels.items() if wls}
    if not panels:
        return None
    widths = [len(wls) + 0.6 for wls in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 1.5 * sum(widths) + 1.0), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (be, wls) in zip(axes[0], panels.items()):
        order = sorted(wls, key=lambda w: (int(w.split()[1][:-1]), w))
        paths = [p for p in PATH_COLORS if any(p in wls[w] for w in order)]
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(order))]
            mbps = [wls[w].get(p) for w in order]
            rel = [m / wls[w]["copy"] if m and wls[w].get("copy") else 0.0 for m, w in zip(mbps, order)]
            bars = ax.bar(xs, rel, width, label=p, color=PATH_COLORS[p])
            for b, v, m in zip(bars, rel, mbps):
                if m:
                    ax.text(b.get_x() + b.get_width() / 2, v, f" {m:,.0f}", ha="center", va="bottom",
                            fontsize=6.5, rotation=90)
        ax.axhline(1.0, color="#444444", lw=0.8, ls="--")
        ax.set_xticks(range(len(order)), order, fontsize=8)
        ax.set_ylabel("relative to the copy path (labels: MB/s)", fontsize=8)
        ax.set_title(be, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.2)
        ax.legend(fontsize=7)
    fig.suptitle(f"Data paths: copy vs user copy vs zero copy vs splice, by block size\n{_subtitle(doc)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(doc: dict, outdir: str) -> list[str]:
    """Write every chart that has data; returns the paths written."""
    os.makedirs(outdir, exist_ok=True)
    out = [plot_iops(doc, os.path.join(outdir, "iops.png")),
           plot_latency(doc, os.path.join(outdir, "latency.png")),
           plot_datapaths(doc, os.path.join(outdir, "datapaths.png"))]
    return [p for p in out if p]
