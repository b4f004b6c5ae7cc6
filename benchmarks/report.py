"""Result rows: the CSV schemas, appending and reading `benchmarks/results/<device>.csv` (timed shapes) and
`<device>-first-call.csv` (cold starts), the end-of-run tables and a minimal progress bar."""

import csv
import math
import sys
import time
from pathlib import Path

from .first_call import WATCHED_MODULES

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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

# Column name -> its type when read back (`read_csv`); the order is the CSV's.
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
}


def csv_path(device, suffix=""):
    """Default results file of a device name, `benchmarks/results/<device><suffix>.csv`.

    Args:
        device: device name (`harness.device_name`).
        suffix: `""` (default) for the timed shapes, `"-first-call"` for the cold starts.

    Returns:
        `Path`.
    """
    return RESULTS_DIR / f"{device}{suffix}.csv"


def append_csv(path, rows, columns=COLUMNS):
    """Append result rows to a CSV file, writing the header when the file is new.

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
        if tuple(header) != tuple(columns):
            raise ValueError(f"{path} has other columns than this version writes; move it away or choose another file")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        if not exists:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    return path


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


def format_table(rows):
    """The human-readable table of a run.

    Args:
        rows: result `dict`s (see `COLUMNS`).

    Returns:
        `str`: one line per row with shape, dtype, threads, mode, provider, median ms (p20-p80), tokens/s,
        GFLOP/s, speedup vs torch, percent of the GEMM rate and status; failed gates carry their message.
    """
    header = (
        "shape",
        "dtype",
        "thr",
        "mode",
        "provider",
        "median ms",
        "p20-p80 ms",
        "tok/s",
        "GFLOP/s",
        "vs torch",
        "%gemm",
        "status",
    )
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        status = r["status"] if ok else f"{r['status']}: {r['message']}"[:120]
        lines.append(
            (
                r["shape"],
                r["dtype"],
                str(r["threads"]),
                r["mode"],
                r["provider"],
                _num(r.get("median_ms"), ".4g") if ok else "-",
                f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}" if ok else "-",
                _si(r.get("tokens_per_s")) if ok else "-",
                _num(r.get("gflops"), ".3g") if ok else "-",
                _num(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                _percent(r.get("gemm_frac")),
                status,
            )
        )
    return _columns(header, lines, right={5, 6, 7, 8, 9, 10})


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

    def fmt(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out[:-1]) + "  " + cells[-1]

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(line) for line in lines])


class Progress:
    """A progress bar on stderr: tqdm when it is installed, else one redrawn line on a terminal, or a plain line at
    most every `every` seconds when stderr is not a terminal (CI logs).

    Args:
        total: number of steps.
        every: seconds between plain lines (default 10).
    """

    def __init__(self, total, every=10.0):
        self.total, self.done, self.every = total, 0, every
        self._last = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
        self._tty = sys.stderr.isatty()

    def step(self, label):
        """Mark the start of the next step, labelled `label`."""
        if self._tqdm is not None:
            if self.done:
                self._tqdm.update(1)
            self._tqdm.set_description(label)
        elif self._tty:
            width = 30
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}")
            sys.stderr.flush()
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)
        self.done += 1

    def close(self):
        """Finish the bar."""
        if self._tqdm is not None:
            self._tqdm.update(1)
            self._tqdm.close()
        elif self._tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
