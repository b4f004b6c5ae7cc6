"""Result rows: the CSV schemas, appending and reading `<device>.csv` (timed shapes) and `<device>-first-call.csv`
(cold starts), the warnings a run's conditions call for, the tables and a progress bar with an ETA.

`python -m benchmarks.report CSV` prints the summary of a results file (`format_summary`): one line per shape, mode,
dtype and cuDNN float32 precision, torch.nn against every other provider.
"""

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

from . import harness
from .first_call import WATCHED_MODULES

# The project's committed figures, written only on request (`python -m benchmarks --update-project-results`).
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# A run whose GEMM rate falls under this share of the best one known on the machine is flagged.
GEMM_FAR_BELOW = 0.7

# The run environment every results row starts with: column name -> its type when read back.
_ENVIRONMENT = {
    "timestamp": str,
    "device": str,
    "threads": float,
    "torch": str,
    "python": str,
    "seqfast": str,
    "git_sha": str,
    "loadavg": float,
}

# The CPU every row was measured on (`harness.cpu_facts`), the last columns of both files.
_CPU = {"cpu_vendor": str, "cpu_model": str, "cpu_isa": str, "cpu_l2_kb": float}

# The GPU every row was measured on (`harness.gpu_facts`), empty on the CPU.
_GPU = {"gpu": str, "driver": str, "cuda": str, "cudnn": str, "triton": str, "fp32_precision": str}

# Column name -> its type when read back (`read_csv`); the order is the CSV's, newer columns appended at the end.
COLUMNS = {
    **_ENVIRONMENT,
    "set": str,
    "shape": str,
    "cell": str,
    "hidden": float,
    "input": float,
    "batch": float,
    "time": float,
    "layers": float,
    "bidirectional": str,
    "packed": str,
    "tokens": float,
    "dtype": str,
    "mode": str,
    "provider": str,
    "status": str,
    "median_ms": float,
    "p20_ms": float,
    "p80_ms": float,
    "samples": float,
    "tokens_per_s": float,
    "gflops": float,
    "speedup": float,
    "gemm_gflops": float,
    "gemm_frac": float,
    "gate_err": float,
    "gate_tol": float,
    "message": str,
    "gemm_end_gflops": float,
    "gemm_best_gflops": float,
    "warning": str,
    **_CPU,
    "step_us": float,
    **_GPU,
}

# The first-call file's columns (`python -m benchmarks --first-call`): one row per provider, thread count and compile
# cache state, summarising `runs` fresh processes by their medians (`first_min_ms` / `first_max_ms`: the range); one
# True/False column per key of `first_call.WATCHED_MODULES`: loaded in any of those processes.
FIRST_CALL_COLUMNS = {
    **_ENVIRONMENT,
    "provider": str,
    "cache": str,
    "runs": float,
    "status": str,
    "import_torch_ms": float,
    "import_seqfast_ms": float,
    "first_ms": float,
    "first_min_ms": float,
    "first_max_ms": float,
    "first_cell_ms": float,
    "second_ms": float,
    "rss_mb": float,
    "maxrss_mb": float,
    **dict.fromkeys(WATCHED_MODULES, str),
    "gate_err": float,
    "gate_tol": float,
    "message": str,
    "warning": str,
    **_CPU,
}


def user_results_dir():
    """Where a run writes by default: `$XDG_DATA_HOME/seqfast/benchmarks`, or `~/.local/share/seqfast/benchmarks`
    when that is unset."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "seqfast" / "benchmarks"


def csv_path(folder, device, suffix=""):
    """The results file of a device name, `<folder>/<device><suffix>.csv`.

    Args:
        folder: `user_results_dir()`, `RESULTS_DIR` or the runner's `--out`.
        device: device name (`harness.device_name`).
        suffix: `""` (default) for the timed shapes, `"-first-call"` for the cold starts.

    Returns:
        `Path`.
    """
    return Path(folder) / f"{device}{suffix}.csv"


def append_csv(path, rows, columns=COLUMNS):
    """Append result rows to a CSV file, writing the header when the file is new.

    A file written before columns were appended to the schema (its header a prefix of `columns`) is rewritten first
    with the full header, its rows left empty in the new columns.

    Args:
        path: file path; its folder is created if missing.
        rows: `list[dict]` keyed by `columns` (missing keys are written empty).
        columns: the schema, `COLUMNS` (default) or `FIRST_CALL_COLUMNS`.

    Returns:
        The `Path` written.

    Raises:
        ValueError: the file exists with another header (move it away or pass another path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(columns)[: len(header)]:
            raise ValueError(f"{path} has other columns than this version writes; move it away or choose another file")
        if len(header) < len(columns):
            _extend_header(path, list(columns))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        if not exists:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    return path


def _extend_header(path, columns):
    """Rewrite the CSV at `path` with the header `columns`, its rows padded with empty cells."""
    with path.open(newline="") as f:
        old = list(csv.reader(f))
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with scratch.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(row + [""] * (len(columns) - len(row)) for row in old[1:])
    scratch.replace(path)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


_NUMERIC = {name for name, kind in COLUMNS.items() if kind is float}


def read_csv(path):
    """Rows of a results CSV with the numeric columns as floats (None where empty).

    Args:
        path: file path.

    Returns:
        `list[dict]`.
    """
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v else None) if k in _NUMERIC else v for k, v in row.items()} for row in rows]


def _si(value):
    if value is None or math.isnan(value):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _ms(value):
    """Milliseconds to 4 significant digits, whole milliseconds from 1000 on (no exponent)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 1000 else f"{value:.4g}"


def _percent(fraction):
    if fraction is None:
        return "-"
    return f"{100 * fraction:.0f}" if fraction >= 0.1 else f"{100 * fraction:.1f}"


def _overloaded(row):
    """The row's load average when it exceeds its thread count (its own threads count in the load, so anything
    above them is another process), else None."""
    load, threads = row.get("loadavg"), row.get("threads")
    return load if load is not None and threads and load > threads else None


def _gemm_shortfall(row):
    """`(rate, best)` when the lower of the GEMM rates measured before and after the row's group is under
    `GEMM_FAR_BELOW` of the best known (recorded on this machine, or measured in this run), else None."""
    rates = [rate for rate in (row.get("gemm_gflops"), row.get("gemm_end_gflops")) if rate is not None]
    if not rates:
        return None
    best = max(rates + [row.get("gemm_best_gflops") or 0.0])
    return (min(rates), best) if min(rates) < GEMM_FAR_BELOW * best else None


def row_warnings(row):
    """Why a row's times may not be what this machine does: the load average above its thread count (other
    processes shared the CPU), or a GEMM rate of its run far below the best known here (busy or throttled).

    Args:
        row: a results or first-call `dict` (`loadavg`, `threads`; `gemm_gflops`, `gemm_end_gflops`,
            `gemm_best_gflops` where present; missing or None values raise nothing).

    Returns:
        `list[str]`, empty for a clean row.
    """
    warnings = []
    load = _overloaded(row)
    if load is not None:
        warnings.append(f"load average {load:.2f} > {row['threads']:g} threads")
    shortfall = _gemm_shortfall(row)
    if shortfall is not None:
        warnings.append(
            f"GEMM {shortfall[0]:.0f} GFLOP/s, {shortfall[0] / shortfall[1]:.0%} of the best {shortfall[1]:.0f}"
        )
    return warnings


def run_warnings(rows):
    """The warnings of a run's footer, from its rows: how many ran with the load average above their thread count,
    and each thread count and dtype whose GEMM rate fell far below the best known on this machine.

    Args:
        rows: results or first-call `dict`s (see `row_warnings`).

    Returns:
        `list[str]`, one line per warning, empty for a clean run.
    """
    lines = []
    loaded = [row for row in rows if _overloaded(row) is not None]
    if loaded:
        worst = max(loaded, key=lambda row: row["loadavg"])
        lines.append(
            f"WARNING: the load average exceeded the thread count in {len(loaded)} of {len(rows)} rows (up to "
            f"{worst['loadavg']:.2f} with {worst['threads']:g} threads): other processes shared the CPU, so these "
            "times and ratios are not this machine's"
        )
    groups = {(row["threads"], row["dtype"]): row for row in rows if _gemm_shortfall(row) is not None}
    for (threads, dtype), row in groups.items():
        rate, best = _gemm_shortfall(row)
        lines.append(
            f"WARNING: {dtype}, {threads:g} threads: GEMM rate {rate:.0f} GFLOP/s (start {row['gemm_gflops']:.0f}, "
            f"end {_num(row.get('gemm_end_gflops'), '.0f')}), {rate / best:.0%} of the best known here ({best:.0f}): "
            "the machine was busy or throttled: times are inflated, %gemm is measured against a slowed GEMM"
        )
    return lines


class Table:
    """The table of a run, printed a shape at a time: the text columns are sized up front from the shapes and
    providers the run covers, the numeric ones fixed.

    Columns: shape, dtype, threads, mode, provider, median ms, p20-p80 ms, `n` (timed samples), tokens/s, µs per
    step (`kernel` and decode rows: per time step, per decoded token), GFLOP/s, speedup vs torch, percent of the GEMM
    rate and status; failed gates carry their message.

    Args:
        shapes: the shape ids of the run.
        providers: the provider names of the run.
    """

    _HEADER = (
        "shape",
        "dtype",
        "thr",
        "mode",
        "provider",
        "median ms",
        "p20-p80 ms",
        "n",
        "tok/s",
        "µs/step",
        "GFLOP/s",
        "vs torch",
        "%gemm",
        "status",
    )
    _RIGHT = set(range(5, 13))

    def __init__(self, shapes, providers):
        content = (max(map(len, shapes), default=0), 8, 3, 14, max(map(len, providers), default=0))
        content += (9, 17, 4, 6, 7, 7, 8, 5, 0)
        self.widths = [max(len(name), width) for name, width in zip(self._HEADER, content, strict=True)]

    def header(self):
        """`str`: the column names, underlined."""
        return "\n".join(
            _line(cells, self.widths, self._RIGHT) for cells in (self._HEADER, ["-" * w for w in self.widths])
        )

    def lines(self, rows):
        """`str`: one line per result `dict` (see `COLUMNS`)."""
        return "\n".join(_line(_table_cells(row), self.widths, self._RIGHT) for row in rows)


def _per_step(row):
    """The row's µs per step for a `kernel` or decode row that is `ok`, else None."""
    per_step = row["mode"] == harness.KERNEL or row["mode"] in harness.DECODE_MODES
    return row.get("step_us") if per_step and row["status"] == "ok" else None


def _table_cells(r):
    ok = r["status"] == "ok"
    return (
        r["shape"],
        r["dtype"],
        f"{r['threads']:g}",
        r["mode"],
        r["provider"],
        _num(r.get("median_ms"), ".4g") if ok else "-",
        f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}" if ok else "-",
        _num(r.get("samples"), ".0f") if ok else "-",
        _si(r.get("tokens_per_s")) if ok else "-",
        _num(_per_step(r), ".3g"),
        _num(r.get("gflops"), ".3g") if ok else "-",
        _num(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
        _percent(r.get("gemm_frac")),
        r["status"] if ok else f"{r['status']}: {r['message']}"[:120],
    )


def format_summary(rows):
    """A results file's summary: one line per shape, mode, dtype and cuDNN float32 precision (the latest row of each
    provider), torch.nn's median against every other provider's.

    Args:
        rows: `dict`s keyed by `COLUMNS` (`read_csv`).

    Returns:
        `str`: shape, mode, dtype, fp32 precision (`-` on the CPU), torch ms, then per other provider its ms (or its
        status) and speedup over torch, then µs per step and tokens/s (`kernel` and decode rows; torch's first where
        it has them, `/`-separated).
    """
    latest = {}
    for r in rows:
        key = (r["shape"], r["mode"], r["dtype"], r.get("fp32_precision") or "-")
        latest.setdefault(key, {})[r["provider"]] = r
    others = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != harness.TORCH.name))
    header = ("shape", "mode", "dtype", "fp32", "torch ms")
    header += tuple(cell for name in others for cell in (f"{name} ms", "vs torch")) + ("µs/step", "tok/s")
    lines = []
    for (shape, mode, dtype, precision), by_provider in latest.items():
        measured = [by_provider[name] for name in [harness.TORCH.name, *others] if name in by_provider]
        cells = [shape, mode, dtype, precision, _median_or_status(by_provider.get(harness.TORCH.name))]
        for name in others:
            row = by_provider.get(name)
            speedup = None if row is None else row.get("speedup")
            cells += [_median_or_status(row), _num(speedup, ".2f") + ("x" if speedup is not None else "")]
        per_step = [_num(_per_step(r), ".3g") for r in measured if _per_step(r) is not None]
        decoded = [
            _si(r.get("tokens_per_s")) for r in measured if r["mode"] in harness.DECODE_MODES and r["status"] == "ok"
        ]
        lines.append(tuple(cells) + (" / ".join(per_step) or "-", " / ".join(decoded) or "-"))
    return _columns(header, lines, right=set(range(4, len(header))))


def _median_or_status(row):
    """A row's median ms when `ok`, else its status; `-` without a row."""
    if row is None:
        return "-"
    return _ms(row.get("median_ms")) if row["status"] == "ok" else row["status"]


def main(argv=None):
    """Entry point of `python -m benchmarks.report CSV`: print the file's summary (`format_summary`)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=format_summary.__doc__.split("\n")[0]
    )
    parser.add_argument("csv", type=Path, help="a results file of the runner (`<device>.csv`)")
    args = parser.parse_args(argv)
    print(format_summary(read_csv(args.csv)))


def format_first_call_table(rows):
    """The human-readable table of a `--first-call` run.

    Args:
        rows: `dict`s keyed by `FIRST_CALL_COLUMNS`.

    Returns:
        `str`: one line per row with provider, threads, compile cache, runs, the median import times of torch and
        seqfast, the first `LSTM` forward and backward (median, min-max), the first `LSTMCell` one after it, the
        second `LSTM` call, RSS and peak RSS in MB, which of torch._dynamo, torch._inductor, sympy and numba were
        loaded, and the status; failures carry their message.
    """
    header = (
        "provider",
        "thr",
        "cache",
        "runs",
        "import torch ms",
        "import seqfast ms",
        "first fwd+bwd ms",
        "min-max ms",
        "first cell ms",
        "2nd call ms",
        "RSS MB",
        "peak MB",
        "loaded",
        "status",
    )
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        loaded = [key for key in WATCHED_MODULES if r.get(key) is True]
        lines.append(
            (
                r["provider"],
                str(r["threads"]),
                r["cache"] or "-",
                str(r["runs"]),
                _num(r.get("import_torch_ms"), ".0f"),
                _num(r.get("import_seqfast_ms"), ".1f"),
                _ms(r.get("first_ms")),
                f"{_ms(r['first_min_ms'])}-{_ms(r['first_max_ms'])}" if r.get("first_ms") is not None else "-",
                _ms(r.get("first_cell_ms")),
                _ms(r.get("second_ms")),
                _num(r.get("rss_mb"), ".0f"),
                _num(r.get("maxrss_mb"), ".0f"),
                ",".join(loaded) or "-",
                r["status"] if ok else f"{r['status']}: {r['message']}"[:120],
            )
        )
    return _columns(header, lines, right=set(range(3, 12)))


def _columns(header, lines, right):
    """Lines of space-separated columns padded to their widest cell, the header underlined; columns in `right`
    right-aligned, the last one never padded."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    return "\n".join(_line(cells, widths, right) for cells in [header, tuple("-" * w for w in widths), *lines])


def _line(cells, widths, right):
    """One line of `cells` padded to `widths`, those in `right` right-aligned, the last one never padded."""
    out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
    return "  ".join(out[:-1]) + "  " + cells[-1]


def _clock(seconds):
    """`m:ss`, or `h:mm:ss` from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A progress bar: steps done, an ETA (the mean time of the finished steps times the steps left) and the current
    step's label; one line redrawn in place on a terminal, else a plain line at most every `every` seconds (CI logs).

    Args:
        total: number of steps.
        every: seconds between plain lines (default 10).
        stream: where the bar goes (default `sys.stderr`); `write` prints to `sys.stdout`.
    """

    def __init__(self, total, every=10.0, stream=None):
        self.total, self.done, self.every = total, 0, every
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty()
        self._start = self._last = time.monotonic()
        self._label = None

    def eta(self):
        """Seconds left, None before the first step has finished."""
        if self.done == 0:
            return None
        return (time.monotonic() - self._start) / self.done * (self.total - self.done)

    def _status(self):
        eta = self.eta()
        return f"{self.done}/{self.total}, ETA {'?' if eta is None else _clock(eta)}"

    def _draw(self):
        width = 30
        filled = width * self.done // max(self.total, 1)
        self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self._status()} {self._label}")
        self.stream.flush()

    def step(self, label):
        """Mark the end of the current step, if any, and the start of the next one, labelled `label`."""
        if self._label is not None:
            self.done += 1
        self._label = label
        if self._tty:
            self._draw()
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(f"[{self._status()}] {label}", file=self.stream, flush=True)

    def write(self, text):
        """Print `text` to stdout, above the bar on a terminal."""
        if self._tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        print(text, flush=True)
        if self._tty and self._label is not None:
            self._draw()

    def close(self):
        """Finish the last step and clear the bar."""
        if self._label is not None:
            self.done += 1
            self._label = None
        if self._tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


if __name__ == "__main__":
    main()
