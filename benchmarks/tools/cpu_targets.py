"""The CPU backends' speed targets, checked against torch.nn in the same run.

Usage: `python -m benchmarks.tools.cpu_targets --backend cpp` (or `--backend numba`).

Every row goes through the benchmark harness (`benchmarks.harness`): the seqfast module forced onto the backend
under `SEQFAST_STRICT=1` against torch.nn from the same `state_dict`, one layer, `batch_first`, float32, each gated
against torch.nn before it is timed (a failing gate fails the row), timed at the process's thread count, in turns
with what it is compared with (`harness.time_in_turns`).
"""

import argparse
import sys

import torch

from benchmarks import harness
from benchmarks.shapes import Shape
from seqfast.kernels.common import GATES
from seqfast.linear import dense

NAMES = {"rnn_tanh": "RNN", "gru": "GRU", "lstm": "LSTM"}


def speedup(cell, mode, B, T, n_in, H, target):
    """A row passing when `t_torch / t_seqfast >= target`."""
    return dict(kind="speedup", shape=Shape(cell, H, B, T, n_in, batch_first=True), mode=mode, target=target)


# Rows per backend: the issues' targets.
TARGETS = {
    "cpp": [
        speedup("lstm", "fwdbwd", 64, 100, 256, 256, 1.1),
        speedup("lstm", "fwdbwd", 32, 50, 512, 1024, 1.1),
        speedup("gru", "fwdbwd", 1, 200, 256, 512, 2.0),
        speedup("rnn_tanh", "fwdbwd", 1, 200, 256, 512, 2.0),
        speedup("gru", "fwdbwd", 16, 100, 256, 512, 2.0),
        speedup("rnn_tanh", "fwdbwd", 16, 100, 256, 512, 2.0),
        speedup("gru", "fwdbwd", 64, 100, 256, 256, 1.3),
        speedup("rnn_tanh", "fwdbwd", 64, 100, 256, 256, 1.3),
        speedup("lstm", "infer", 1, 200, 256, 512, 3.0),
        speedup("gru", "infer", 1, 200, 256, 512, 3.0),
        speedup("rnn_tanh", "infer", 1, 200, 256, 512, 3.0),
        dict(
            kind="packed", shape=Shape("lstm", 256, 32, 100, packed=True, batch_first=True), mode="fwdbwd", target=1.2
        ),
        dict(kind="gemm", shape=Shape("lstm", 512, 256, 50, batch_first=True), mode="fwdbwd", target=0.85),
    ],
    "numba": [
        speedup("gru", "fwdbwd", 1, 200, 256, 512, 1.5),
        speedup("rnn_tanh", "fwdbwd", 1, 200, 256, 512, 1.5),
        speedup("gru", "fwdbwd", 16, 100, 256, 512, 1.5),
        speedup("rnn_tanh", "fwdbwd", 16, 100, 256, 512, 1.5),
        speedup("lstm", "infer", 1, 200, 256, 512, 2.0),
        speedup("gru", "infer", 1, 200, 256, 512, 2.0),
        speedup("rnn_tanh", "infer", 1, 200, 256, 512, 2.0),
        speedup("lstm", "fwdbwd", 64, 100, 256, 256, 0.8),
    ],
}


def _in_turns(shapes, providers, mode, min_run_time):
    """Seconds per call of each `(shape, provider)` pair, timed against each other (`harness.time_in_turns`)."""
    steps = [harness.setup(shape, provider, mode).step for shape, provider in zip(shapes, providers, strict=True)]
    return [t.median for t in harness.time_in_turns(steps, min_run_time=min_run_time)]


def _projection_gemm_rate(shape, min_run_time):
    """GFLOP/s of the layer's own input projection `[B*T, I] x [I, G*H]`: the faster of torch.mm and oneDNN."""
    M, K, N = shape.batch * shape.time, shape.input_size, GATES[shape.cell] * shape.hidden
    a, w = torch.randn(M, K), torch.randn(N, K)
    runs = (lambda: torch.mm(a, w.T), lambda: dense(a, w))
    return 2 * M * K * N / min(harness.time_fn(fn, min_run_time=min_run_time).median for fn in runs) / 1e9


def run(row, provider, min_run_time):
    """`(measured value or None, detail)` for one row."""
    shape, mode = row["shape"], row["mode"]
    result = harness.gate(shape, provider, mode)
    if not result.passed:
        return None, f"gate failed: {result.message}"
    gate = result.message
    if row["kind"] == "packed":
        padded = Shape(shape.cell, shape.hidden, shape.batch, shape.time, shape.input, batch_first=shape.batch_first)
        t_ours, t_padded = _in_turns([shape, padded], [provider, provider], mode, min_run_time)
        return t_ours / t_padded, f"packed {t_ours * 1e3:.2f} ms, padded T={shape.time} {t_padded * 1e3:.2f} ms"
    if row["kind"] == "gemm":
        (t_ours,) = _in_turns([shape], [provider], mode, min_run_time)
        rate, best = harness.flops(shape, mode) / t_ours / 1e9, _projection_gemm_rate(shape, min_run_time)
        return rate / best, f"{rate:.0f} GF/s vs the layer's input GEMM at {best:.0f} GF/s ({gate})"
    t_ref, t_ours = _in_turns([shape, shape], [harness.TORCH, provider], mode, min_run_time)
    return t_ref / t_ours, f"torch {t_ref * 1e3:.2f} ms, seqfast {t_ours * 1e3:.2f} ms ({gate})"


def describe(row):
    s = row["shape"]
    case = f"{NAMES[s.cell]} {row['mode']} B={s.batch} T={s.time} I={s.input_size} H={s.hidden}"
    if row["kind"] == "packed":
        return f"{case} packed, lengths U[T/4, T], vs padded"
    if row["kind"] == "gemm":
        return f"{case}: fraction of the best sgemm rate"
    return case


def target_text(row):
    return {"packed": "<= {:.1f}x padded", "gemm": ">= {:.0%} sgemm"}.get(row["kind"], ">= {:.1f}x torch").format(
        row["target"]
    )


def passed(row, value):
    if value is None:
        return False
    return value <= row["target"] if row["kind"] == "packed" else value >= row["target"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(TARGETS), default="cpp")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange (default 1)")
    parser.add_argument("--only", default="", help="run only rows whose description contains this text")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads first (default: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.configure()
    provider = harness.Provider(f"seqfast-{args.backend}", args.backend)
    env = harness.environment()
    print(
        f"backend {args.backend}; {env['device']}, {torch.get_num_threads()} threads, torch {env['torch']}, "
        f"python {env['python']}, git {env['git_sha']}"
    )
    rows = [r for r in TARGETS[args.backend] if args.only in describe(r)]
    print("\n| case | target | measured | pass | detail |\n|---|---|---|---|---|")
    failures = 0
    for row in rows:
        value, detail = run(row, provider, args.min_run_time)
        ok = passed(row, value)
        failures += not ok
        measured = "-" if value is None else f"{value:.0%}" if row["kind"] == "gemm" else f"{value:.2f}x"
        print(
            f"| {describe(row)} | {target_text(row)} | {measured} | {'pass' if ok else 'FAIL'} | {detail} |", flush=True
        )
    print(f"\n{len(rows) - failures}/{len(rows)} targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
