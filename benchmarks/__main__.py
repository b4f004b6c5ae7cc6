"""Time every provider on a named shape set, each gated against torch.nn first; print each shape's rows as it
finishes, then warnings about the run's conditions; append the rows to `<device>.csv` in the user's results folder
(`--out`; the project's `benchmarks/results/` with `--update-project-results`).

Run as `python -m benchmarks`; exit status 1 when a provider failed its gate or its timing. With `--first-call`,
measure each provider's cold start in fresh processes instead (`<device>-first-call.csv`). `--budget-s` starts no new
shape once that many seconds have passed; the skipped shapes are listed and the rows kept. `--warm N` times
nothing: it runs each seqfast provider once per shape, mode and dtype of the run, two steps long, in N processes, so
that the kernels the run will use are compiled into the on-disk caches beforehand (triton compiles each variant in
5-15 s, one at a time within a process).

Examples: `python -m benchmarks --set quick --threads 1,2 --modes fwd,fwdbwd`, `python -m benchmarks --first-call`,
`python -m benchmarks --set decode --modes decode,decode-graph --device cuda --cudnn-fp32 ieee`.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import first_call, harness, report
from .shapes import DTYPES, SETS


def _csv_list(text):
    return [item for item in text.split(",") if item]


def parse_args(argv=None):
    """Command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="quick", choices=sorted(SETS), help="shape set (default quick)")
    parser.add_argument("--cells", type=_csv_list, help="only these cells, e.g. lstm,gru")
    parser.add_argument("--shapes", type=_csv_list, help="only shapes whose id contains one of these strings")
    parser.add_argument("--providers", type=_csv_list, help="only these providers (default: every usable one)")
    parser.add_argument(
        "--modes",
        type=_csv_list,
        default=list(harness.MODES),
        help="comma list from " + ", ".join(harness.ALL_MODES) + " (default fwd,fwdbwd,infer)",
    )
    parser.add_argument(
        "--dtype",
        type=_csv_list,
        default=["float32"],
        help="comma list from " + ", ".join(DTYPES) + " (default float32; a shape naming its own dtype runs in that)",
    )
    parser.add_argument("--threads", type=_csv_list, help="CPU thread counts, e.g. 1,2 (default: torch's current)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument("--compile", action="store_true", help="add the torch-compile provider (slow to compile)")
    parser.add_argument(
        "--cudnn-fp32",
        choices=("tf32", "ieee"),
        help="torch.backends.cudnn.rnn.fp32_precision for the run, which seqfast's triton backend follows too "
        "(default: torch's, tf32)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="start no new shape after this many seconds of the run; the skipped ones are listed (default: no limit)",
    )
    parser.add_argument(
        "--warm",
        type=int,
        metavar="N",
        help="time nothing: compile the seqfast kernels this run would use, in N processes (see above)",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.2,
        help=f"CPU seconds timed per measurement, at least {harness.MIN_SAMPLES} samples (default 0.2)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, help=f"folder the results CSV is appended to (default {report.user_results_dir()})"
    )
    where.add_argument(
        "--update-project-results",
        action="store_true",
        help=f"append to the project's committed figures in {report.RESULTS_DIR} instead",
    )
    where.add_argument("--no-csv", action="store_true", help="do not write results")
    parser.add_argument("--list", action="store_true", help="list shape sets and providers, then exit")
    parser.add_argument(
        "--first-call",
        action="store_true",
        help="instead of a shape set: each provider's import, first forward+backward and memory in fresh processes",
    )
    parser.add_argument(
        "--first-call-runs",
        type=int,
        default=3,
        help="fresh processes per provider and cache state for --first-call (default 3, medians reported)",
    )
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in harness.ALL_MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(harness.ALL_MODES)}")
    for dtype in args.dtype:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    args.threads = [int(t) for t in args.threads] if args.threads else [torch.get_num_threads()]
    return args


def _shapes(args):
    shapes = SETS[args.set]
    if args.cells:
        shapes = tuple(s for s in shapes if s.cell in args.cells)
    if args.shapes:
        shapes = tuple(s for s in shapes if any(part in s.id for part in args.shapes))
    return shapes


def _dtype_groups(shapes, dtype_names):
    """`[(dtype_name, shapes)]`: the shapes each dtype runs, in the order of `dtype_names` and then of the shapes'
    own dtypes; a shape naming its own dtype runs only in that one."""
    groups = {name: [] for name in dtype_names}
    for shape in shapes:
        for name in shape.dtypes(dtype_names):
            groups.setdefault(name, []).append(shape)
    return [(name, tuple(group)) for name, group in groups.items() if group]


def _usable_providers(args, device):
    """`(usable, unusable)` providers for `device`, `usable` narrowed to `--providers`."""
    usable, unusable = harness.providers(device.type, compile=args.compile)
    if args.providers:
        unknown = set(args.providers) - {p.name for p in usable}
        if unknown:
            raise SystemExit(f"unusable or unknown providers: {', '.join(sorted(unknown))}")
        usable = [p for p in usable if p.name in args.providers]
    return usable, unusable


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
    """Run the benchmark grid described by parsed `args`, printing the table a shape at a time.

    Per thread count and dtype, the GEMM rate is measured before the shapes (the `%gemm` reference) and after them,
    and the faster of the two is kept in the machine's record (`harness.record_gemm_rate`) once the rows carry the
    best one known before. Once `args.budget_s` seconds have passed since the start, no new shape starts.

    Args:
        args: `argparse.Namespace` from `parse_args`.

    Returns:
        `(rows, unusable, skipped)`: result `dict`s keyed by `report.COLUMNS`, `(provider, reason)` for backends
        that do not load here, and `(threads, dtype name, shape id)` of the shapes the budget left out.
    """
    start = time.perf_counter()
    harness.configure(args.cudnn_fp32)
    device = torch.device(args.device)
    usable, unusable = _usable_providers(args, device)
    groups = _dtype_groups(_shapes(args), args.dtype)
    env = harness.environment(device)
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    per_threads = sum(2 + len(shapes) * len(args.modes) for _, shapes in groups)
    progress = report.Progress(len(threads) * per_threads)
    table = report.Table([s.id for _, shapes in groups for s in shapes], [p.name for p in usable])
    progress.write(table.header())
    rows, skipped = [], []
    for n in threads:
        harness.set_threads(n)
        for dtype_name, shapes in groups:
            dtype = DTYPES[dtype_name]
            progress.step(f"{n} thr {dtype_name} gemm")
            gemm = harness.gemm_rate(dtype, device, n, args.min_run_time)
            group = []
            for shape in shapes:
                if args.budget_s is not None and time.perf_counter() - start >= args.budget_s:
                    skipped.append((n, dtype_name, shape.id))
                    continue
                shape_rows = []
                for mode in args.modes:
                    progress.step(f"{n} thr {dtype_name} {shape.id} {mode}")
                    results = harness.measure_in_turns(shape, usable, mode, dtype, device, n, args.min_run_time)
                    for provider, result in zip(usable, results, strict=True):
                        gflops = result.get("gflops")
                        shape_rows.append(
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
                _speedups(shape_rows)
                progress.write(table.lines(shape_rows))
                group += shape_rows
            progress.step(f"{n} thr {dtype_name} gemm again")
            gemm_end = harness.gemm_rate(dtype, device, n, args.min_run_time)
            best = harness.best_gemm_rate(env["device"], n, dtype_name)
            harness.record_gemm_rate(env["device"], n, dtype_name, max(gemm, gemm_end))
            for row in group:
                row |= dict(gemm_end_gflops=gemm_end, gemm_best_gflops=best)
                row["warning"] = "; ".join(report.row_warnings(row))
            rows += group
    progress.close()
    return rows, unusable, skipped


def _first_call_row(runs, failure):
    """One `report.FIRST_CALL_COLUMNS` row (without the run environment) from the `first_call` results of fresh
    processes: medians, the range of `first_ms`, a module counted as loaded when any process loaded it, the worst
    gate error; status `ERROR` when a process failed, `FAILED-GATE` when the worst error is over float32's
    tolerance."""
    tol = harness.TOLERANCES[torch.float32]
    row = dict(runs=len(runs), status="ok", message="", gate_tol=tol)
    if runs:
        for key in ("import_torch_ms", "import_seqfast_ms", "first_ms", "first_cell_ms", "second_ms", "maxrss_mb"):
            row[key] = statistics.median(run[key] for run in runs)
        rss = [run["rss_mb"] for run in runs if run["rss_mb"] is not None]
        row["rss_mb"] = statistics.median(rss) if rss else None
        row["first_min_ms"] = min(run["first_ms"] for run in runs)
        row["first_max_ms"] = max(run["first_ms"] for run in runs)
        row |= {key: any(run["modules"][key] for run in runs) for key in first_call.WATCHED_MODULES}
        row["gate_err"] = max(run["err"] for run in runs)
        row["threads"] = runs[0]["threads"]
        if row["gate_err"] > tol:
            row |= dict(status="FAILED-GATE", message=f"rel RMS {row['gate_err']:.2e} > {tol:.0e}")
    if failure is not None:
        row |= dict(status="ERROR", message=failure)
    return row


def run_first_call(args):
    """Measure every provider's cold start (`harness.first_call`) in `args.first_call_runs` fresh processes per
    thread count; a provider with an on-disk cache (numba's and triton's compiled kernels, the automatic choice's
    calibrations) is measured cold, each process with a new empty cache folder, then warm, on the folder the last
    cold process filled.

    Args:
        args: `argparse.Namespace` from `parse_args`.

    Returns:
        `(rows, unusable)`: `dict`s keyed by `report.FIRST_CALL_COLUMNS`, and `(provider, reason)` for backends
        that do not load here.
    """
    harness.configure()
    device = torch.device(args.device)
    usable, unusable = _usable_providers(args, device)
    usable = [p for p in usable if not p.compiled]
    env = harness.environment(device)
    threads = args.threads if device.type == "cpu" else [None]
    cases = [(p, cache) for p in usable for cache in (("cold", "warm") if harness.kept_cache_variable(p) else ("",))]
    progress = report.Progress(len(threads) * len(cases) * args.first_call_runs)
    rows = []
    filled_caches = {}
    with tempfile.TemporaryDirectory(prefix="seqfast-first-call-") as scratch:
        for n in threads:
            for provider, cache in cases:
                runs, failure = [], None
                for i in range(args.first_call_runs):
                    progress.step(f"{n} thr {provider.name} {cache or 'first call'} {i + 1}/{args.first_call_runs}")
                    if cache == "cold":
                        filled_caches[provider.name] = tempfile.mkdtemp(dir=scratch)
                    cache_dir = filled_caches[provider.name] if cache else None
                    try:
                        runs.append(harness.first_call(provider, device, n, cache_dir))
                    except (RuntimeError, OSError, ValueError) as e:
                        failure = str(e)
                        break
                loadavg = os.getloadavg()[0]
                row = env | dict(threads=n, provider=provider.name, cache=cache, loadavg=loadavg)
                row |= _first_call_row(runs, failure)
                row["warning"] = "; ".join(report.row_warnings(row))
                rows.append(row)
    progress.close()
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
    if args.first_call:
        return _main_first_call(args)
    if args.warm:
        return warm(args)
    start = time.perf_counter()
    rows, unusable, skipped = run(args)
    elapsed = time.perf_counter() - start
    env = harness.environment(args.device)
    gpu = ""
    if env["gpu"]:
        gpu = (
            f"{env['gpu']}, driver {env['driver']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}, "
            f"cuDNN RNN fp32 precision {env['fp32_precision']}; "
        )
    print(
        f"\n{env['device']}, {gpu}torch {env['torch']}, python {env['python']}, git {env['git_sha']}; "
        f"set {args.set}, {len(rows)} rows in {elapsed:.0f} s"
    )
    groups = {(r["threads"], r["dtype"]): r for r in rows}
    for (n, dtype), r in groups.items():
        best = "none yet" if r["gemm_best_gflops"] is None else f"{r['gemm_best_gflops']:.1f}"
        print(
            f"gemm rate ({harness.gemm_size(DTYPES[dtype], args.device)}^3, best of torch.mm and oneDNN, {dtype}, "
            f"{n} threads): "
            f"{r['gemm_gflops']:.1f} GFLOP/s at the start, {r['gemm_end_gflops']:.1f} at the end; best recorded "
            f"before in {harness.gemm_record_path()}: {best}"
        )
    for line in report.run_warnings(rows):
        print(line)
    for name, reason in unusable:
        print(f"not usable: {name}: {reason}")
    if skipped:
        print(
            f"budget spent ({args.budget_s:g} s): skipped "
            + ", ".join(f"{shape} {dtype} {n} thr" for n, dtype, shape in skipped)
        )
    _write_csv(args, env, rows, report.COLUMNS, "")
    return 1 if any(r["status"] in ("FAILED-GATE", "ERROR") for r in rows) else 0


def warm(args):
    """`main` for `--warm N`: every (shape, mode, dtype, seqfast provider) of the run once at `T <= 2` in N spawned
    processes, filling the compile caches the timed run then reads (the kernels' variants do not depend on `T`).
    Prints failures; returns 0."""
    device = torch.device(args.device)
    usable, _ = _usable_providers(args, device)
    jobs = [
        (shape, provider, mode, dtype_name)
        for dtype_name, shapes in _dtype_groups(_shapes(args), args.dtype)
        for shape in shapes
        for mode in args.modes
        for provider in usable
        if provider.backend is not None
    ]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.warm, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(harness.warm, *job, device, args.cudnn_fp32) for job in jobs]
        for (shape, provider, mode, dtype_name), future in zip(jobs, futures, strict=True):
            if future.result() is not None:
                print(f"warm: {shape.id} {mode} {dtype_name} {provider.name}: {future.result()}")
    print(f"warmed {len(jobs)} cases of set {args.set} in {time.perf_counter() - start:.0f} s")
    return 0


def _write_csv(args, env, rows, columns, suffix):
    """Append `rows` to `<device><suffix>.csv` in the folder `args` chooses, unless `--no-csv`; say where."""
    if args.no_csv:
        return
    folder = report.RESULTS_DIR if args.update_project_results else args.out or report.user_results_dir()
    path = report.append_csv(report.csv_path(folder, env["device"], suffix), rows, columns)
    print(f"appended {len(rows)} rows to {path}")


def _main_first_call(args):
    """`main` for `--first-call`: run, print the table, append the rows; returns the exit status."""
    start = time.perf_counter()
    rows, unusable = run_first_call(args)
    elapsed = time.perf_counter() - start
    print(report.format_first_call_table(rows))
    env = harness.environment(args.device)
    hidden, sequence, cell = first_call.HIDDEN, list(first_call.SEQUENCE_SHAPE), list(first_call.CELL_SHAPE)
    print(
        f"\n{env['device']}, torch {env['torch']}, python {env['python']}, git {env['git_sha']}; first call of "
        f"LSTM({hidden}, {hidden}) on [T, B, I] = {sequence}, then LSTMCell({hidden}, {hidden}) on [B, I] = {cell}, "
        f"forward and backward; medians of {args.first_call_runs} fresh processes each, {len(rows)} rows in "
        f"{elapsed:.0f} s"
    )
    for line in report.run_warnings(rows):
        print(line)
    for name, reason in unusable:
        print(f"not usable: {name}: {reason}")
    _write_csv(args, env, rows, report.FIRST_CALL_COLUMNS, "-first-call")
    return 1 if any(r["status"] in ("FAILED-GATE", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
