"""`python -m benchmarks.plot [CSV] [-o PNG]`: speedup over torch.nn per shape, one panel per cell and mode, one bar
per provider (and thread count / dtype when the rows hold several), from a results CSV. Bars grow up from 1x for a
speedup and down for a slowdown, on a log axis.

Needs matplotlib (the `[bench]` extra). For each (shape, provider, mode, dtype, threads) the newest row is drawn.
"""

import argparse
import sys
from pathlib import Path

import torch

from . import harness, report

_TICKS = [k * 10.0**e for e in range(-3, 4) for k in (1, 2, 5)]


def _latest(rows):
    """The newest `ok` row with a speedup per (shape, provider, mode, dtype, threads), torch itself left out."""
    latest = {}
    for r in rows:
        if r["status"] != "ok" or r["speedup"] is None or r["provider"] == harness.TORCH.name:
            continue
        key = (r["shape"], r["provider"], r["mode"], r["dtype"], r["threads"])
        if key not in latest or r["timestamp"] >= latest[key]["timestamp"]:
            latest[key] = r
    return list(latest.values())


def plot(rows, out, title=""):
    """Draw speedup-vs-shape panels and save them.

    Args:
        rows: result `dict`s as `report.read_csv` returns them.
        out: PNG path.
        title: figure title (default none).

    Returns:
        The number of bars drawn.

    Raises:
        SystemExit: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as e:
        raise SystemExit(f"the plot needs matplotlib: pip install 'seqfast[bench]' ({e})") from e
    rows = _latest(rows)
    cells = sorted({r["cell"] for r in rows})
    modes = [m for m in harness.MODES if any(r["mode"] == m for r in rows)]
    several_threads = len({r["threads"] for r in rows}) > 1
    several_dtypes = len({r["dtype"] for r in rows}) > 1

    def series(r):
        label = r["provider"]
        if several_threads:
            label += f" {r['threads']:.0f} thr"
        if several_dtypes:
            label += f" {r['dtype']}"
        return label

    labels = sorted({series(r) for r in rows})
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(
        max(len(cells), 1),
        max(len(modes), 1),
        figsize=(5 * max(len(modes), 1), 3.6 * max(len(cells), 1)),
        squeeze=False,
    )
    for i, cell in enumerate(cells):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            panel = [r for r in rows if r["cell"] == cell and r["mode"] == mode]
            shapes = sorted(
                {r["shape"] for r in panel},
                key=lambda s: next((r["hidden"], r["batch"], r["time"], s) for r in panel if r["shape"] == s),
            )
            width = 0.8 / max(len(labels), 1)
            for k, label in enumerate(labels):
                points = {r["shape"]: r["speedup"] for r in panel if series(r) == label}
                xs = [n + (k - (len(labels) - 1) / 2) * width for n, s in enumerate(shapes) if s in points]
                heights = [points[s] - 1 for s in shapes if s in points]
                ax.bar(xs, heights, width, bottom=1.0, color=colors[label], label=label)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            speedups = [r["speedup"] for r in panel] or [1.0]
            ax.set_ylim(min(0.5, 0.8 * min(speedups)), max(2.0, 1.25 * max(speedups)))
            ax.yaxis.set_major_locator(ticker.FixedLocator(_TICKS))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([s.removeprefix(cell + "-") for s in shapes], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{cell} {mode}", fontsize=9)
            ax.set_ylabel("speedup vs torch.nn")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85 if labels else 1, 0.95 if title else 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return len(rows)


def main(argv=None):
    """Entry point of `python -m benchmarks.plot`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    default_csv = report.csv_path(
        report.user_results_dir(), harness.device_name("cuda" if torch.cuda.is_available() else "cpu")
    )
    parser.add_argument("csv", nargs="?", default=str(default_csv), help=f"results CSV (default {default_csv})")
    parser.add_argument("-o", "--output", help="PNG path (default: the CSV's path with .png)")
    parser.add_argument("--set", help="only rows of this shape set")
    parser.add_argument("--dtype", help="only rows of this dtype")
    parser.add_argument("--threads", type=int, help="only rows with this thread count")
    args = parser.parse_args(argv)
    if not Path(args.csv).exists():
        raise SystemExit(f"{args.csv} does not exist; run python -m benchmarks first")
    rows = report.read_csv(args.csv)
    if args.set:
        rows = [r for r in rows if r["set"] == args.set]
    if args.dtype:
        rows = [r for r in rows if r["dtype"] == args.dtype]
    if args.threads:
        rows = [r for r in rows if r["threads"] == args.threads]
    out = args.output or str(Path(args.csv).with_suffix(".png"))
    devices = sorted({r["device"] for r in rows})
    count = plot(rows, out, title=", ".join(devices))
    print(f"wrote {out} ({count} bars)")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
