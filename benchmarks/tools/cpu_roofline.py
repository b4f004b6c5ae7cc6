"""Ceilings for the CPU LSTM targets that `cpu_targets.py` reports missed, measured on this machine.

Usage: `python -m benchmarks.tools.cpu_roofline`.

fwd+bwd rows: a layer's work is GEMM work (input projection, recurrent products forward and backward, the three
weight and input gradients), so no implementation beats `flops / peak`, with `peak` the best sgemm rate measured here
(`seqfast.linear.dense` on oneDNN or `torch.mm`, 2048^3). The row prints the rate torch.nn reaches and the rate a
target ratio demands. Inference at B = 1: every step reads all of `w_hh`, so no implementation beats `T` times the
time to stream `w_hh` once across the threads, each reading its share in alternating directions (as the cpp loop
does), plus the input projection at the sgemm rate.

torch.nn's fwd+bwd times here include page faults: glibc hands large freed blocks back to the system, so each call
faults its workspace in again. `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736` in the
environment keeps them mapped and shows the fault-free ceilings.
"""

import argparse
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from benchmarks import harness
from benchmarks.shapes import Shape


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _stream(w, sweeps, threads, block):
    # every thread sums its contiguous share of `w` `sweeps` times, its blocks in alternating order
    share = w.shape[0] // threads
    blocks = share // block
    total = np.zeros(threads, np.float32)
    for t in prange(threads):
        acc = np.float32(0)
        for s in range(sweeps):
            for i in range(blocks):
                b = t * share + (i if s % 2 == 0 else blocks - 1 - i) * block
                part = w[b : b + block]
                for k in range(block):
                    acc += part[k]
        total[t] = acc
    return total.sum()


def stream_seconds(nbytes, threads, sweeps=2000):
    """Seconds to read `nbytes` once, split over `threads`, after the data has been read once (best of 5)."""
    block = 4096
    w = np.ones(nbytes // 4 // (threads * block) * threads * block, np.float32)
    numba.set_num_threads(threads)
    _stream(w, 2, threads, block)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        _stream(w, sweeps, threads, block)
        best = min(best, time.perf_counter() - t)
    return best / sweeps


def fwdbwd_row(B, T, I, H, target, peak, min_run_time):
    shape = Shape("lstm", H, B, T, I, batch_first=True)
    flops = harness.flops(shape, "fwdbwd")
    t_torch = harness.time_provider(shape, harness.TORCH, "fwdbwd", min_run_time=min_run_time).median
    need = flops * target / t_torch
    print(
        f"| LSTM fwdbwd B={B} T={T} I={I} H={H} | {flops / 1e9:.1f} GFLOP | torch {t_torch * 1e3:.1f} ms = "
        f"{flops / t_torch / 1e9:.0f} GF/s ({flops / t_torch / peak:.0%} of peak) | {target}x needs "
        f"{need / 1e9:.0f} GF/s ({need / peak:.0%} of peak) | best possible {peak * t_torch / flops:.2f}x |"
    )


def infer_row(B, T, I, H, targets, peak, threads, min_run_time):
    shape = Shape("lstm", H, B, T, I, batch_first=True)
    w_bytes = 4 * H * H * 4
    step = stream_seconds(w_bytes, threads)
    floor = T * step + 2 * B * T * I * 4 * H / peak
    t_torch = harness.time_provider(shape, harness.TORCH, "infer", min_run_time=min_run_time).median
    print(
        f"| LSTM infer B={B} T={T} I={I} H={H} | w_hh {w_bytes / 2**20:.0f} MB per step, streamed in "
        f"{step * 1e6:.1f} us ({w_bytes / step / 1e9:.0f} GB/s) | torch {t_torch * 1e3:.2f} ms | floor "
        f"{floor * 1e3:.2f} ms | best possible {t_torch / floor:.2f}x (targets {targets}) |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange (default 1)")
    args = parser.parse_args(argv)
    harness.configure()
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    env = harness.environment()
    peak = harness.gemm_rate(min_run_time=args.min_run_time) * 1e9
    print(
        f"{env['device']}, {threads} threads, torch {env['torch']}, numba {numba.__version__}, git {env['git_sha']}; "
        f"peak sgemm {peak / 1e9:.0f} GF/s\n\n| case | work | torch.nn | needed | ceiling |\n|---|---|---|---|---|"
    )
    fwdbwd_row(64, 100, 256, 256, 1.1, peak, args.min_run_time)
    fwdbwd_row(32, 50, 512, 1024, 1.1, peak, args.min_run_time)
    infer_row(1, 200, 256, 512, "3x cpp, 2x numba", peak, threads, args.min_run_time)


if __name__ == "__main__":
    main()
