"""One cold start in this fresh interpreter, for `python -m benchmarks --first-call`: import torch and seqfast, build
`LSTM(64, 64)` and `LSTMCell(64, 64)` of one provider, run each once forward and backward, and print the timings,
memory and loaded modules as one JSON line.

Run by `benchmarks.harness.first_call` as `python -m benchmarks.first_call --provider NAME`; it imports only the
standard library before the timed imports, so nothing of torch or seqfast is loaded before it measures.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

SEQUENCE_SHAPE = (16, 8, 64)
CELL_SHAPE = (8, 64)
HIDDEN = 64
WATCHED_MODULES = {"dynamo": "torch._dynamo", "inductor": "torch._inductor", "sympy": "sympy", "numba": "numba"}


def _rss_mb():
    """Resident set size now, from `/proc/self/status` `VmRSS` (None without procfs)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _flatten(out):
    """Every tensor of a module's output, nested tuples flattened in order."""
    return [t for item in out for t in _flatten(item)] if isinstance(out, tuple) else [out]


def _fwdbwd(module, x):
    """One forward and `.backward()` of the sum of every output, as a user's first training step does; waits for
    the device."""
    import torch

    outputs = _flatten(module(x))
    sum(o.sum() for o in outputs).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return [o.detach() for o in outputs]


def _rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def measure(provider, threads=None, device="cpu"):
    """The first-call measurements of one provider in this process; call it once, in a fresh interpreter.

    Args:
        provider: `torch` (torch.nn), `seqfast` (seqfast's modules, automatic selection) or `seqfast-<backend>`
            (with `backend=`).
        threads: torch intra-op threads (numba follows torch's count); None (default) leaves torch's default.
        device: `cpu` (default) or `cuda`.

    Returns:
        `dict`: `import_torch_ms`, `import_seqfast_ms`; `first_ms`, the first `LSTM` forward and backward on
        `[T, B, I] = [16, 8, 64]` (time to first result, backend loading and compiling included); `first_cell_ms`,
        then the first `LSTMCell` forward and backward on `[8, 64]`; `second_ms`, a second `LSTM` forward and
        backward (the steady call for comparison); `rss_mb` (`VmRSS` after those calls, None without procfs),
        `maxrss_mb` (peak, `getrusage`); `threads`; `modules`: for each key of `WATCHED_MODULES`, whether its module
        is in `sys.modules`;
        `err`: the worst relative RMS error of the outputs and input gradients against torch.nn in float64 on the
        CPU.
    """
    start = time.perf_counter()
    import torch

    imported_torch = time.perf_counter()
    import seqfast

    imported_seqfast = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    reference = torch.nn.LSTM(HIDDEN, HIDDEN), torch.nn.LSTMCell(HIDDEN, HIDDEN)
    if provider == "torch":
        sequence, cell = (type(m)(HIDDEN, HIDDEN, device=device) for m in reference)
    else:
        backend = None if provider == "seqfast" else provider.removeprefix("seqfast-")
        sequence = seqfast.LSTM(HIDDEN, HIDDEN, device=device, backend=backend)
        cell = seqfast.LSTMCell(HIDDEN, HIDDEN, device=device, backend=backend)
    sequence.load_state_dict(reference[0].state_dict())
    cell.load_state_dict(reference[1].state_dict())
    x = torch.randn(SEQUENCE_SHAPE).to(device).requires_grad_()
    x_cell = torch.randn(CELL_SHAPE).to(device).requires_grad_()

    before = time.perf_counter()
    outputs = _fwdbwd(sequence, x)
    first = time.perf_counter()
    outputs += _fwdbwd(cell, x_cell)
    first_cell = time.perf_counter()
    grads = [x.grad.clone(), x_cell.grad.clone()]
    x.grad = None
    _fwdbwd(sequence, x)
    second = time.perf_counter()
    rss_mb = _rss_mb()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    modules = {key: name in sys.modules for key, name in WATCHED_MODULES.items()}

    expected_x, expected_x_cell = (t.detach().cpu().double().requires_grad_() for t in (x, x_cell))
    expected = _fwdbwd(reference[0].double(), expected_x) + _fwdbwd(reference[1].double(), expected_x_cell)
    expected_grads = [expected_x.grad, expected_x_cell.grad]
    err = max(_rel_err(a.cpu(), e) for a, e in zip(outputs + grads, expected + expected_grads, strict=True))
    return dict(
        provider=provider,
        import_torch_ms=(imported_torch - start) * 1e3,
        import_seqfast_ms=(imported_seqfast - imported_torch) * 1e3,
        first_ms=(first - before) * 1e3,
        first_cell_ms=(first_cell - first) * 1e3,
        second_ms=(second - first_cell) * 1e3,
        rss_mb=rss_mb,
        maxrss_mb=maxrss_mb,
        threads=torch.get_num_threads(),
        modules=modules,
        err=err,
    )


def main(argv=None):
    """Parse `--provider`, `--threads` and `--device`, measure, print the JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_call", description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", required=True, help="torch or seqfast-<backend>")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.provider, args.threads, args.device)))


if __name__ == "__main__":
    main()
