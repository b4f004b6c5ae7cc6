"""Time every provider on a named shape set, each gated against torch.nn first; print a table, append the rows to
`benchmarks/results/<device>.csv`.

Run as `python -m benchmarks`; exit status 1 when a provider failed its gate or its timing.

Example: `python -m benchmarks --set quick --threads 1,2 --modes fwd,fwdbwd`.
"""

import argparse
import os
import sys
import time

import torch

from . import harness, report
from .shapes import SETS


def _csv_list(text):
    return [item for item in text.split(",") if item]


def parse_args(argv=None):
    """Command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="quick", choices=sorted(SETS), help="shape set (default quick)")
    parser.add_argument("--cells", type=_csv_list, help="only these cells, e.g. lstm,gru")
    parser.add_argument("--shapes", type=_csv_list, help="only shapes whose id contains one of these strings")
    parser.add_argument("--providers", type=_csv_list, help="only these providers (default: every usable one)")
    parser.add_argument("--modes", type=_csv_list, default=list(harness.MODES), help="default fwd,fwdbwd,infer")
    parser.add_argument(
        "--dtype",
        type=_csv_list,
        default=["float32"],
        help="comma list from " + ", ".join(harness.DTYPES) + " (default float32)",
    )
    parser.add_argument("--threads", type=_csv_list, help="CPU thread counts, e.g. 1,2 (default: torch's current)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument("--compile", action="store_true", help="add the torch-compile provider (slow to compile)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="CPU seconds timed per measurement")
    parser.add_argument("--csv", help="results file (default benchmarks/results/<device>.csv)")
    parser.add_argument("--no-csv", action="store_true", help="do not write results")
    parser.add_argument("--list", action="store_true", help="list shape sets and providers, then exit")
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in harness.MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(harness.MODES)}")
    for dtype in args.dtype:
        if dtype not in harness.DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(harness.DTYPES)}")
    args.threads = [int(t) for t in args.threads] if args.threads else [torch.get_num_threads()]
    return args


def _shapes(args):
    shapes = SETS[args.set]
    if args.cells:
        shapes = tuple(s for s in shapes if s.cell in args.cells)
    if args.shapes:
        shapes = tuple(s for s in shapes if any(part in s.id for part in args.shapes))
    return shapes


def _speedups(rows):
    """Fill `speedup` (torch's median / the provider's, same shape, dtype, mode and threads) in place."""
    baseline = {
        (r["shape"], r["dtype"], r["mode"], r["threads"]): r["median_ms"]
        for r in rows
        if r["provider"] == harness.TORCH.name and r["status"] == "ok"
    }
    for r in rows:
        base = baseline.get((r["shape"], r["dtype"], r["mode"], r["threads"]))
        if base is not None and r["status"] == "ok":
            r["speedup"] = base / r["median_ms"]


def run(args):
    """Run the benchmark grid described by parsed `args`.

    Args:
        args: `argparse.Namespace` from `parse_args`.

    Returns:
        `(rows, unusable)`: result `dict`s keyed by `report.COLUMNS`, and `(provider, reason)` for backends that
        do not load here.
    """
    harness.configure()
    device = torch.device(args.device)
    usable, unusable = harness.providers(device.type, compile=args.compile)
    if args.providers:
        unknown = set(args.providers) - {p.name for p in usable}
        if unknown:
            raise SystemExit(f"unusable or unknown providers: {', '.join(sorted(unknown))}")
        usable = [p for p in usable if p.name in args.providers]
    shapes = _shapes(args)
    env = harness.environment(device)
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    per_threads = len(args.dtype) * (1 + len(shapes) * len(args.modes) * len(usable))
    progress = report.Progress(len(threads) * per_threads)
    rows = []
    for n in threads:
        harness.set_threads(n)
        for dtype_name in args.dtype:
            dtype = harness.DTYPES[dtype_name]
            progress.step(f"{n} thr {dtype_name} gemm")
            gemm = harness.gemm_rate(dtype, device, n, args.min_run_time)
            for shape in shapes:
                for mode in args.modes:
                    for provider in usable:
                        progress.step(f"{n} thr {dtype_name} {shape.id} {mode} {provider.name}")
                        result = harness.measure(shape, provider, mode, dtype, device, n, args.min_run_time)
                        gflops = result.get("gflops")
                        rows.append(
                            env
                            | result
                            | dict(
                                threads=n,
                                set=args.set,
                                shape=shape.id,
                                cell=shape.cell,
                                hidden=shape.hidden,
                                input=shape.input_size,
                                batch=shape.batch,
                                time=shape.time,
                                layers=shape.layers,
                                bidirectional=shape.bidirectional,
                                packed=shape.packed,
                                tokens=shape.tokens(),
                                dtype=dtype_name,
                                mode=mode,
                                provider=provider.name,
                                loadavg=os.getloadavg()[0],
                                gemm_gflops=gemm,
                                gemm_frac=None if gflops is None else gflops / gemm,
                            )
                        )
    progress.close()
    _speedups(rows)
    return rows, unusable


def main(argv=None):
    """Entry point of `python -m benchmarks`; returns the exit status (1 when a gate failed)."""
    args = parse_args(argv)
    if args.list:
        usable, unusable = harness.providers(torch.device(args.device).type, compile=True)
        for name, shapes in SETS.items():
            print(
                f"{name:16} {len(shapes):3} shapes: {', '.join(s.id for s in shapes[:4])}"
                + (", ..." if len(shapes) > 4 else "")
            )
        print("providers:", ", ".join(p.name for p in usable))
        for name, reason in unusable:
            print(f"not usable: {name}: {reason}")
        return 0
    start = time.perf_counter()
    rows, unusable = run(args)
    elapsed = time.perf_counter() - start
    print(report.format_table(rows))
    env = harness.environment(args.device)
    gemm = {(r["threads"], r["dtype"]): r["gemm_gflops"] for r in rows}
    print(
        f"\n{env['device']}, torch {env['torch']}, python {env['python']}, git {env['git_sha']}; "
        f"set {args.set}, {len(rows)} rows in {elapsed:.0f} s"
    )
    for (n, dtype), rate in gemm.items():
        size = f"{harness.GEMM_SIZE}^3"
        print(f"gemm rate ({size}, best of torch.mm and oneDNN, {dtype}, {n} threads): {rate:.1f} GFLOP/s")
    for name, reason in unusable:
        print(f"not usable: {name}: {reason}")
    if not args.no_csv:
        path = report.append_csv(args.csv or report.csv_path(env["device"]), rows)
        print(f"appended {len(rows)} rows to {path}")
    return 1 if any(r["status"] in ("FAILED-GATE", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
