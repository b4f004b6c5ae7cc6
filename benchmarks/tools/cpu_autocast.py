"""Calls under `torch.autocast("cpu")`: torch.nn against seqfast (automatic selection), timed in turns.

Usage: `python -m benchmarks.tools.cpu_autocast` (`--rounds`, `--threads`).

Each call of `CALLS` runs on torch.nn's module and on seqfast's twin (same `state_dict` and input) in alternating
blocks of about 0.1 s, without grad and as a forward under autocast with its backward outside; a row gives each side's
median per call and the ratio torch.nn / seqfast. The runner's shape sets time no autocast.
"""

import argparse
import statistics

import torch

import seqfast
from benchmarks.tools import per_call
from seqfast.native import cpu_facts

# (module, constructor args, batch, steps: 0 for a cell's step)
CALLS = [
    ("LSTM", (128, 256), 16, 32),
    ("LSTM", (28, 64), 64, 28),
    ("GRU", (256, 256, 2), 64, 50),
    ("LSTMCell", (256, 256), 32, 0),
    ("GRUCell", (256, 256), 32, 0),
]


def compare(name, args, batch, steps, grad, rounds):
    """`(torch_ms, seqfast_ms)`: each side's median per call over `rounds` alternating blocks."""
    ref = getattr(torch.nn, name)(*args)
    ours = getattr(seqfast, name)(*args)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((steps,) if steps else ()), batch, args[0], requires_grad=grad)

    def run(module):
        with torch.set_grad_enabled(grad):
            with torch.autocast("cpu"):
                out = module(x)
            if grad:
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    sides = [lambda: run(ref), lambda: run(ours)]
    for side in sides:
        side(), side()
    calls = max(1, int(0.1 / per_call(sides[0], 1)))
    times = ([], [])
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            times[k].append(per_call(sides[k], calls))
    return tuple(statistics.median(t) * 1e3 for t in times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    facts = cpu_facts()
    print(f"{facts['cpu_vendor']} {facts['cpu_model']}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'call':34s} {'mode':6s} {'torch.nn ms':>11s} {'seqfast ms':>10s} {'ratio':>6s}")
    for name, sizes, batch, steps in CALLS:
        call = f"{name}{sizes} B{batch}" + (f" T{steps}" if steps else "")
        for grad in (False, True):
            theirs, ours = compare(name, sizes, batch, steps, grad, args.rounds)
            print(f"{call:34s} {'fwdbwd' if grad else 'infer':6s} {theirs:11.3f} {ours:10.3f} {theirs / ours:5.2f}x")


if __name__ == "__main__":
    main()
