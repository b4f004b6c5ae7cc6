"""Sweep the triton backend's launch configuration on CUDA: hidden block, k block, warps and pipeline stages.

    python -m benchmarks.tools.triton_sweep OUTDIR [--budget-s 150] [--workers 16]

Times the recurrence kernels alone (`fwd`, or `bwd` from one saved forward) with `triton.testing.do_bench` for each
configuration of each case, and checks every configuration's outputs against those of the backend's own choice
(`_config`), which is timed too. Kernels are compiled first in parallel processes (Triton's disk cache carries them
to the timing process). Writes `OUTDIR/triton_sweep.csv`; prints, per case, the backend's choice and the fastest.
"""

import argparse
import csv
import itertools
import multiprocessing
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

import seqfast.kernels.triton as tb
from seqfast.kernels import common

# (name, cell, B, H, T, dtype, kernel)
CASES = [
    ("lstm-B16-H1024-T25", "lstm", 16, 1024, 25, torch.float32, "fwd"),
    ("lstm-B16-H1024-T25", "lstm", 16, 1024, 25, torch.bfloat16, "fwd"),
    ("lstm-B64-H1024-T25", "lstm", 64, 1024, 25, torch.float32, "fwd"),
    ("lstm-B64-H1024-T25", "lstm", 64, 1024, 25, torch.bfloat16, "fwd"),
    ("gru-B32-H1024-T25", "gru", 32, 1024, 25, torch.float32, "fwd"),
    ("lstm-B1-H256-T150", "lstm", 1, 256, 150, torch.float32, "fwd"),
    ("lstm-B1-H256-T150", "lstm", 1, 256, 150, torch.bfloat16, "fwd"),
    ("lstm-B16-H768-T1024", "lstm", 16, 768, 1024, torch.bfloat16, "fwd"),
    ("lstm-B16-H1024-T25", "lstm", 16, 1024, 25, torch.float32, "bwd"),
    ("lstm-B16-H1024-T25", "lstm", 16, 1024, 25, torch.bfloat16, "bwd"),
    ("lstm-B64-H1024-T25", "lstm", 64, 1024, 25, torch.bfloat16, "bwd"),
]


def configs(B, H, dtype):
    """The backend's own choice first, then the swept ones (as `_config` dicts)."""
    device = torch.device("cuda")
    base = tb._config(B, H, device, dtype)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    out = [dict(base, label="default")]
    swept = [(bh, bk, 4, st) for bh, bk, st in itertools.product((16, 32), (32, 64, 128), (1, 3))]
    swept += [(32, bk, 8, 3) for bk in (64, 128)]
    for bh, bk, warps, stages in swept:
        nh = triton.cdiv(H, bh)
        if nh > n_sm or bk > max(H, 16):
            continue
        cfg = dict(base, BH=bh, BK=bk, NH=nh, SPLIT=nh > 1, per_launch=max(1, n_sm // nh))
        cfg.update(num_warps=warps, num_stages=stages, label=f"BH{bh}-BK{bk}-w{warps}-s{stages}")
        out.append(cfg)
    return out


def make_args(cell, B, H, T, dtype):
    G = common.GATES[cell]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device="cuda", dtype=dtype)

    return dict(
        gx=rand(T, B, G * H),
        w_hh=rand(G * H, H, scale=H**-0.5),
        b_hh=rand(G * H),
        h0=rand(B, H),
        c0=rand(B, H) if cell == "lstm" else None,
    )


def runner(case, cfg):
    """A callable that runs the case's kernel under `cfg`, returning its outputs."""
    _, cell, B, H, T, dtype, kernel = case
    a = make_args(cell, B, H, T, dtype)
    gen = torch.Generator().manual_seed(1)
    choice = {k: v for k, v in cfg.items() if k != "label"}

    def fwd(need_saved):
        return tb.fwd(cell, a["gx"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], None, None, False, need_saved)

    if kernel == "fwd":
        return lambda: _with(choice, lambda: fwd(False)[:3])
    y, hT, cT, saved = fwd(True)
    dy, dhT = (torch.randn(t.shape, generator=gen).to(t) for t in (y, hT))
    dcT = None if cT is None else torch.randn(cT.shape, generator=gen).to(cT)
    return lambda: _with(
        choice,
        lambda: tb.bwd(cell, dy, dhT, dcT, a["w_hh"], a["b_hh"], None, a["h0"], a["c0"], None, y, saved, False)[:4],
    )


def _with(choice, fn):
    saved, tb._config = tb._config, lambda B, H, device, dtype: choice
    try:
        return fn()
    finally:
        tb._config = saved


def compile_one(job):
    case, cfg = job
    short = (*case[:4], 2, *case[5:])
    try:
        runner(short, cfg)()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - a configuration that cannot compile is a result
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__} triton {triton.__version__}", flush=True)
    jobs = [(case, cfg) for case in CASES for cfg in configs(case[2], case[3], case[5])]
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(compile_one, jobs, chunksize=1)
    print(f"compiled {len(jobs)} kernels in {time.time() - start:.0f} s", flush=True)
    rows, start = [], time.time()
    for case in CASES:
        name, cell, B, H, T, dtype, kernel = case
        baseline = None
        for cfg in configs(B, H, dtype):
            error = errors[jobs.index((case, cfg))]
            row = dict(device=device, case=name, dtype=str(dtype).split(".")[1], kernel=kernel, config=cfg["label"])
            row.update(ms=None, us_per_step=None, rel_err=None, error=error)
            if error is None and time.time() - start > args.budget_s:
                row["error"] = "budget spent"
            elif error is None:
                try:
                    fn = runner(case, cfg)
                    outputs = [t for t in fn() if t is not None]
                    if baseline is None:
                        baseline = outputs
                    row["rel_err"] = max(rel_err(o, b) for o, b in zip(outputs, baseline, strict=True))
                    row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                    row["us_per_step"] = row["ms"] * 1e3 / T
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            rows.append(row)
            ms = "" if row["ms"] is None else f"{row['ms']:8.3f} ms {row['us_per_step']:7.2f} us/step"
            err = "" if row["rel_err"] is None else f"err {row['rel_err']:.1e}"
            print(
                f"{name:22s} {row['dtype']:9s} {kernel} {cfg['label']:20s} {ms} {err} {row['error'] or ''}", flush=True
            )
    with open(out / "triton_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\ncase                   dtype     kernel default ms  best ms  best config")
    for key, group in itertools.groupby(rows, key=lambda r: (r["case"], r["dtype"], r["kernel"])):
        group = [r for r in group if r["ms"] is not None]
        if not group:
            continue
        default = next((r for r in group if r["config"] == "default"), None)
        best = min(group, key=lambda r: r["ms"])
        dms = f"{default['ms']:10.3f}" if default else f"{'-':>10s}"
        print(
            f"{key[0]:22s} {key[1]:9s} {key[2]:6s} {dms} {best['ms']:8.3f}  {best['config']} "
            f"({best['us_per_step']:.2f} us/step, err {best['rel_err']:.1e})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
