"""The CPU backends' speed targets, checked against torch.nn in the same run.

Usage: `python benchmarks/cpu_targets.py --backend cpp` (or `--backend numba`).

Every case times the real modules (`seqfast.LSTM(..., backend=...)` under `SEQFAST_STRICT=1` vs `torch.nn.LSTM`
from the same `state_dict`): one layer, `batch_first=True`, float32, the median of `torch.utils.benchmark`'s
`blocked_autorange`. `fwd+bwd` is the forward plus the gradients of the input and every parameter for a fixed
random cotangent of the output; `infer` is the forward under `torch.no_grad()`. A seqfast module whose output or
gradients differ from torch.nn's on the case's shape (relative RMS above 1e-4) is not timed and fails its row.
"""

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import benchmark

os.environ["SEQFAST_STRICT"] = "1"

import seqfast  # noqa: E402
from seqfast import dispatch  # noqa: E402
from seqfast.linear import dense  # noqa: E402

TORCH_MODULES = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
SEQFAST_MODULES = {"rnn": seqfast.RNN, "gru": seqfast.GRU, "lstm": seqfast.LSTM}
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
NAMES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
GATE_TOL = 1e-4


def speedup(cell, mode, B, T, n_in, H, target, label=None):
    """A row passing when `t_torch / t_seqfast >= target` on `(B, T, n_in, H)`."""
    return {"kind": "speedup", "cell": cell, "mode": mode, "shape": (B, T, n_in, H), "target": target, "label": label}


# Rows per backend: the targets.
TARGETS = {
    "cpp": [
        speedup("lstm", "fwd+bwd", 64, 100, 256, 256, 1.1, "torch here = oneDNN"),
        speedup("lstm", "fwd+bwd", 32, 50, 512, 1024, 1.1, "torch here = oneDNN"),
        speedup("gru", "fwd+bwd", 1, 200, 256, 512, 2.0),
        speedup("rnn", "fwd+bwd", 1, 200, 256, 512, 2.0),
        speedup("gru", "fwd+bwd", 16, 100, 256, 512, 2.0),
        speedup("rnn", "fwd+bwd", 16, 100, 256, 512, 2.0),
        speedup("gru", "fwd+bwd", 64, 100, 256, 256, 1.3),
        speedup("rnn", "fwd+bwd", 64, 100, 256, 256, 1.3),
        speedup("lstm", "infer", 1, 200, 256, 512, 3.0),
        speedup("gru", "infer", 1, 200, 256, 512, 3.0),
        speedup("rnn", "infer", 1, 200, 256, 512, 3.0),
        {"kind": "packed", "cell": "lstm", "shape": (32, 100, 256, 256), "target": 1.2},
        {"kind": "gemm", "cell": "lstm", "shape": (256, 50, 512, 512), "target": 0.85},
    ],
    "numba": [
        speedup("gru", "fwd+bwd", 1, 200, 256, 512, 1.5),
        speedup("rnn", "fwd+bwd", 1, 200, 256, 512, 1.5),
        speedup("gru", "fwd+bwd", 16, 100, 256, 512, 1.5),
        speedup("rnn", "fwd+bwd", 16, 100, 256, 512, 1.5),
        speedup("lstm", "infer", 1, 200, 256, 512, 2.0),
        speedup("gru", "infer", 1, 200, 256, 512, 2.0),
        speedup("rnn", "infer", 1, 200, 256, 512, 2.0),
        speedup("lstm", "fwd+bwd", 64, 100, 256, 256, 0.8),
    ],
}


def environment(backend):
    """One line each: torch version, threads, CPU model, git sha, and whether `_C` calls BLAS directly."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        sha = sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        sha = "unknown"
    return [
        f"backend: {backend}",
        f"torch: {torch.__version__} (threads: {torch.get_num_threads()},"
        f" MKL={torch.backends.mkl.is_available()}, oneDNN={torch.backends.mkldnn.is_available()})",
        f"python: {platform.python_version()}",
        f"cpu: {cpu} ({os.cpu_count()} logical cores)",
        f"git: {sha}",
    ]


def ensure_registered(backend):
    """Add `backend` to this process's dispatch table when the table does not list it yet."""
    if backend in dispatch._BY_NAME:
        return
    b = dispatch.Backend(backend, f"seqfast.kernels.{backend}", ("cpu",))
    dispatch._TABLE = dispatch._TABLE + (b,)
    dispatch._BY_NAME[backend] = b
    dispatch._PRIORITY["cpu"] = (backend, *dispatch._PRIORITY["cpu"])
    print(f"note: {backend!r} is not in seqfast.dispatch's table yet; registered it for this run")


def modules(cell, n_in, H, backend):
    """`(torch_module, seqfast_module)` in float32 with the same `state_dict`."""
    ref = TORCH_MODULES[cell](n_in, H, batch_first=True)
    ours = SEQFAST_MODULES[cell](n_in, H, batch_first=True, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def step(module, x, mode, dy=None, lengths=None):
    """Zero-argument callable running one call of `module` in `mode`."""

    def arg():
        if lengths is None:
            return x
        return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)

    if mode == "infer":

        def run():
            with torch.no_grad():
                return module(arg())

        return run

    def run():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(arg())[0]
        if lengths is not None:
            out = out.data
        out.backward(dy if lengths is None else dy[: out.shape[0]])
        return out

    return run


def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gate(ref, ours, x, mode):
    """Worst relative RMS error of `ours` vs `ref` over the output (and, for fwd+bwd, every gradient)."""
    errs = []
    dy = torch.randn(x.shape[0], x.shape[1], ours.hidden_size)
    with torch.no_grad():
        errs.append(rel_rms(ours(x)[0], ref(x)[0]))
    if mode != "infer":
        grads = []
        for m in (ref, ours):
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x)[0].backward(dy)
            grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        errs += [rel_rms(a, b) for a, b in zip(grads[1], grads[0], strict=True)]
    return max(errs)


def median(fn, min_run_time):
    fn()
    # Timer runs on one thread unless told otherwise; time at the process's thread count, as the header reports.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def inputs(B, T, n_in, requires_grad=True):
    return torch.randn(B, T, n_in, requires_grad=requires_grad)


def run_speedup(row, backend, min_run_time):
    B, T, n_in, H = row["shape"]
    ref, ours = modules(row["cell"], n_in, H, backend)
    x = inputs(B, T, n_in, row["mode"] != "infer")
    err = gate(ref, ours, x, row["mode"])
    if not err <= GATE_TOL:
        return None, f"gate failed: rel RMS {err:.1e}"
    dy = torch.randn(B, T, H)
    t_ref = median(step(ref, x, row["mode"], dy), min_run_time)
    t_ours = median(step(ours, x, row["mode"], dy), min_run_time)
    return t_ref / t_ours, f"torch {t_ref * 1e3:.2f} ms, seqfast {t_ours * 1e3:.2f} ms (gate {err:.0e})"


def run_packed(row, backend, min_run_time):
    B, T, n_in, H = row["shape"]
    _, ours = modules(row["cell"], n_in, H, backend)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    x = inputs(B, T, n_in)
    dy = torch.randn(B, T, H)
    t_padded = median(step(ours, x, "fwd+bwd", dy), min_run_time)
    flat = torch.randn(int(lengths.sum()), H)
    t_packed = median(step(ours, x, "fwd+bwd", flat, lengths), min_run_time)
    return t_packed / t_padded, f"packed {t_packed * 1e3:.2f} ms, padded T={T} {t_padded * 1e3:.2f} ms"


def run_gemm(row, backend, min_run_time):
    B, T, n_in, H = row["shape"]
    G = GATES[row["cell"]] * H
    ref, ours = modules(row["cell"], n_in, H, backend)
    x = inputs(B, T, n_in)
    err = gate(ref, ours, x, "fwd+bwd")
    if not err <= GATE_TOL:
        return None, f"gate failed: rel RMS {err:.1e}"
    dy = torch.randn(B, T, H)
    t_ours = median(step(ours, x, "fwd+bwd", dy), min_run_time)
    # fwd: x W_ih^T, h W_hh^T per step; bwd: dgh W_hh per step, dW_hh, dW_ih, dx: six [B*T, K] x [K, G*H] products.
    flops = 2 * B * T * G * (3 * n_in + 3 * H)
    # The reference is the best fp32 GEMM of this run: torch.mm (MKL) or oneDNN's (`seqfast.linear.dense`).
    a, b = torch.randn(B * T, n_in), torch.randn(n_in, G)
    w = b.T.contiguous()
    t_mkl = median(lambda: torch.mm(a, b), min_run_time)
    t_onednn = median(lambda: dense(a, w), min_run_time)
    rate_mm = 2 * B * T * n_in * G / min(t_mkl, t_onednn)
    rate = flops / t_ours
    detail = (
        f"{rate / 1e9:.0f} GF/s vs best sgemm [{B * T}x{n_in}]x[{n_in}x{G}] {rate_mm / 1e9:.0f} GF/s"
        f" (torch.mm {2 * B * T * n_in * G / t_mkl / 1e9:.0f}, oneDNN {2 * B * T * n_in * G / t_onednn / 1e9:.0f})"
    )
    return rate / rate_mm, detail


def describe(row):
    if row["kind"] == "packed":
        B, T, n_in, H = row["shape"]
        return f"{NAMES[row['cell']]} packed fwd+bwd B={B} T={T} I={n_in} H={H}, lengths U[T/4, T] vs padded"
    if row["kind"] == "gemm":
        B, T, n_in, H = row["shape"]
        return f"{NAMES[row['cell']]} fwd+bwd B={B} T={T} I={n_in} H={H}: fraction of the best sgemm rate"
    B, T, n_in, H = row["shape"]
    label = f" ({row['label']})" if row["label"] else ""
    return f"{NAMES[row['cell']]} {row['mode']} B={B} T={T} I={n_in} H={H}{label}"


def target_text(row):
    if row["kind"] == "packed":
        return f"<= {row['target']:.1f}x padded"
    if row["kind"] == "gemm":
        return f">= {row['target']:.0%} sgemm"
    return f">= {row['target']:.1f}x torch"


def measured_text(row, value):
    if value is None:
        return "-"
    if row["kind"] == "packed":
        return f"{value:.2f}x"
    if row["kind"] == "gemm":
        return f"{value:.0%}"
    return f"{value:.2f}x"


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
    torch.manual_seed(0)
    ensure_registered(args.backend)
    dispatch.load(args.backend)
    for line in environment(args.backend):
        print(line)
    runners = {"speedup": run_speedup, "packed": run_packed, "gemm": run_gemm}
    rows = [r for r in TARGETS[args.backend] if args.only in describe(r)]
    print()
    print("| case | target | measured | pass | detail |")
    print("|---|---|---|---|---|")
    failures = 0
    for row in rows:
        value, detail = runners[row["kind"]](row, args.backend, args.min_run_time)
        ok = passed(row, value)
        failures += not ok
        print(
            f"| {describe(row)} | {target_text(row)} | {measured_text(row, value)} | {'pass' if ok else 'FAIL'} "
            f"| {detail} |",
            flush=True,
        )
    print(f"\n{len(rows) - failures}/{len(rows)} targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
