"""seqfast's benchmark suite.

`python -m benchmarks` runs the gated timing grid (see `benchmarks.__main__`), `python -m benchmarks.plot` draws
speedups from the results CSV, and `pytest benchmarks` runs the same shapes under pytest-benchmark. The shape sets
live in `benchmarks.shapes.SETS`; gate, timing and FLOP counts in `benchmarks.harness`.
"""
