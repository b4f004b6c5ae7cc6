"""pytest-benchmark suite over the shape registry: every provider, shape and mode, gated against torch.nn first.

`pytest benchmarks --benchmark-only` times them (add `--benchmark-autosave` / `--benchmark-compare` to track
regressions); `pytest benchmarks --benchmark-disable` is the smoke run: the gates plus one untimed call each.
"""

import pytest

from . import harness


def test_bench(benchmark, shape, provider, mode, dtype, device):
    reason = harness.unsupported(shape, provider, dtype, device)
    if reason is not None:
        pytest.skip(reason)
    result = harness.gate(shape, provider, mode, dtype, device)
    assert result.passed, f"FAILED-GATE {provider.name} {shape.id} {mode}: {result.message}"
    step = harness.setup(shape, provider, mode, dtype, device).step
    if not benchmark.disabled:
        step()
    benchmark.group = f"{shape.id} {mode} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(
        tokens=shape.tokens(), flops=harness.flops(shape, mode), gate_err=result.error, gate_tol=result.tol
    )
    benchmark(step)
