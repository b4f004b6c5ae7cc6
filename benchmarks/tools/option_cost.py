"""What each option costs on a backend: a call with it against the same call without it, timed in turns.

Usage: `python -m benchmarks.tools.option_cost --backend cpp` (`--shapes`, `--rounds`, `--calls`).

For each shape of the `extensions` set that has an option the backend runs, the module with and without the option
(same parameters, input and cotangents, through the harness's `setup`) runs fwd+bwd in alternating rounds of a few
calls, so that a busy machine slows both alike; the ratio is the median of the per-round ratios. The runner's rows
time them minutes apart, which on a loaded machine moves each by more than the options cost.
"""

import argparse
import dataclasses
import statistics

from benchmarks import harness
from benchmarks.shapes import SETS
from benchmarks.tools import per_call
from seqfast import dispatch


def option_cost(shape, provider, rounds, calls):
    """`(plain_ms, option_ms, ratio)`: medians over `rounds` turns of `calls` fwd+bwd calls each."""
    plain = harness.setup(dataclasses.replace(shape, option=None), provider, "fwdbwd").step
    option = harness.setup(shape, provider, "fwdbwd").step
    plain(), option()
    times = [(per_call(plain, calls), per_call(option, calls)) for _ in range(rounds)]
    return (
        statistics.median(p for p, _ in times) * 1e3,
        statistics.median(o for _, o in times) * 1e3,
        statistics.median(o / p for p, o in times),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--shapes", default="", help="only shapes whose id contains one of these (comma list)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)
    provider = harness.Provider(f"seqfast-{args.backend}", args.backend)
    runs = getattr(dispatch.load(args.backend), "EXTENSIONS", ())
    wanted = [s for s in args.shapes.split(",") if s]
    print(f"{'shape':32s} {'plain ms':>9s} {'option ms':>10s} {'ratio':>6s}")
    for shape in SETS["extensions"]:
        if shape.option not in runs or (wanted and not any(w in shape.id for w in wanted)):
            continue
        plain, option, ratio = option_cost(shape, provider, args.rounds, args.calls)
        print(f"{shape.id:32s} {plain:9.2f} {option:10.2f} {ratio:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
