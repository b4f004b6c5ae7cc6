"""GPU benchmark: cuDNN (torch.nn) against seqfast's triton backend on DeepBench-style shapes.

    python benchmarks/gpu_bench.py OUTDIR [--budget-s 330] [--quick]

Training shapes run `fwd` and `fwdbwd`, inference shapes `infer`, each in float32 and bfloat16. Before a provider is
timed on a shape it must pass `benchmarks.harness.gate` against torch.nn; a failing or raising provider is recorded
with its reason and not timed. Times are `triton.testing.do_bench` medians (ms). Shapes are visited in order until
`--budget-s` is spent, so the table always prints. Writes `OUTDIR/gpu_bench.csv` (every row, with device and
versions) and prints a compact table last.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.shapes import Shape  # noqa: E402

TRAIN = [Shape("lstm", h, b, 25) for h in (512, 1024, 2048) for b in (16, 64)]
TRAIN += [Shape("lstm", 1536, 32, 50), Shape("gru", 1024, 32, 25), Shape("gru", 2048, 64, 25)]
TRAIN += [Shape("lstm", 1024, 32, 25, packed=True)]
INFER = [Shape("lstm", h, b, 25) for h in (512, 1024, 2048) for b in (1, 4)]
INFER += [Shape("gru", 1024, 2, 50), Shape("lstm", 256, 1, 150)]
QUICK_TRAIN = [Shape("lstm", 512, 16, 25), Shape("gru", 1024, 32, 25)]
QUICK_INFER = [Shape("lstm", 1024, 1, 25)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVIDERS = [harness.TORCH, harness.Provider("seqfast-triton", "triton")]


def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def bench_one(shape, provider, mode, dtype):
    """Gate, then time one provider. Returns `(status, ms or None, message)`."""
    reason = harness.unsupported(shape, provider, dtype, "cuda")
    if reason is not None:
        return "unsupported", None, reason
    result = harness.gate(shape, provider, mode, dtype, "cuda")
    if not result.passed:
        return "gate-failed", None, result.message
    step = harness.setup(shape, provider, mode, dtype, "cuda").step
    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    return "ok", ms, result.message


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--budget-s", type=float, default=330.0)
    parser.add_argument("--quick", action="store_true", help="three shapes, to check the script itself")
    args = parser.parse_args()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    harness.configure()
    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda}"
    print(f"{device}; {versions}; cudnn {torch.backends.cudnn.version()}", flush=True)
    train, infer = (QUICK_TRAIN, QUICK_INFER) if args.quick else (TRAIN, INFER)
    jobs = [(s, m) for s in train for m in ("fwd", "fwdbwd")] + [(s, "infer") for s in infer]
    start, rows = time.time(), []
    for shape, mode in jobs:
        for dtype_name, dtype in DTYPES.items():
            if time.time() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent; skipping {shape.id} {mode} {dtype_name}", flush=True)
                continue
            times = {}
            for provider in PROVIDERS:
                try:
                    status, ms, message = bench_one(shape, provider, mode, dtype)
                except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
                    status, ms, message = "error", None, f"{type(e).__name__}: {e}".splitlines()[0]
                    traceback.print_exc()
                times[provider.name] = ms
                tokens = shape.tokens()
                rows.append(
                    dict(
                        device=device,
                        versions=versions,
                        git=_git_sha(),
                        shape=shape.id,
                        mode=mode,
                        dtype=dtype_name,
                        provider=provider.name,
                        status=status,
                        ms=ms,
                        tokens_per_s=None if ms is None else tokens / ms * 1e3,
                        gflops=None if ms is None else harness.flops(shape, mode) / ms / 1e6,
                        message=message,
                    )
                )
                print(
                    f"{shape.id:24s} {mode:6s} {dtype_name:8s} {provider.name:15s} {status:11s} "
                    f"{'' if ms is None else f'{ms:9.3f} ms'}  {message}",
                    flush=True,
                )
            base = times.get("torch")
            for row in rows[-len(PROVIDERS) :]:
                row["speedup_vs_torch"] = None if base is None or row["ms"] is None else base / row["ms"]
    path = out / "gpu_bench.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["shape"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path} ({len(rows)} rows) in {time.time() - start:.0f} s\n")
    print(f"{'shape':24s} {'mode':6s} {'dtype':8s} {'cudnn ms':>9s} {'triton ms':>10s} {'speedup':>8s}")
    keyed = {}
    for row in rows:
        keyed.setdefault((row["shape"], row["mode"], row["dtype"]), {})[row["provider"]] = row
    for (shape, mode, dtype), by in keyed.items():
        t, s = by.get("torch", {}), by.get("seqfast-triton", {})
        tm = f"{t['ms']:9.3f}" if t.get("ms") else f"{t.get('status', '-'):>9s}"
        sm = f"{s['ms']:10.3f}" if s.get("ms") else f"{s.get('status', '-'):>10s}"
        sp = f"{s['speedup_vs_torch']:7.2f}x" if s.get("speedup_vs_torch") else f"{'-':>8s}"
        print(f"{shape:24s} {mode:6s} {dtype:8s} {tm} {sm} {sp}")
    failed = [r for r in rows if r["provider"] != "torch" and r["status"] in ("gate-failed", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("SEQFAST_STRICT", "1")
    sys.exit(main())
