"""pytest-benchmark suite over the shape registry: every provider, shape and mode, gated against torch.nn first.

`pytest benchmarks --benchmark-only` times them (add `--benchmark-autosave` / `--benchmark-compare` to track
regressions); `pytest benchmarks --benchmark-disable` is the smoke run: the gates plus one untimed call each, and one
first-call measurement each of torch.nn and of seqfast's automatic choice in a fresh process.
"""

import pytest
import torch

from . import first_call, harness


def test_bench(benchmark, shape, provider, mode, dtype, device):
    reason = harness.unfit(shape, provider, mode, device) or harness.unsupported(shape, provider, dtype, device)
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


@pytest.mark.parametrize("cold_start", [harness.TORCH, harness.AUTO], ids=lambda p: p.name)
def test_first_call(cold_start, tmp_path):
    # automatic selection calibrates into the cache folder it is given, here an empty one
    cache_dir = tmp_path if harness.kept_cache_variable(cold_start) else None
    result = harness.first_call(cold_start, threads=1, cache_dir=cache_dir)
    assert result["provider"] == cold_start.name and result["threads"] == 1
    for key in ("import_torch_ms", "first_ms", "first_cell_ms", "second_ms", "maxrss_mb"):
        assert 0 < result[key] < 600e3, (key, result[key])
    assert 0 <= result["import_seqfast_ms"] < result["import_torch_ms"] + 60e3
    assert result["rss_mb"] is None or 50 < result["rss_mb"] < 64e3
    assert set(result["modules"]) == set(first_call.WATCHED_MODULES)
    assert all(isinstance(loaded, bool) for loaded in result["modules"].values())
    assert result["err"] <= harness.TOLERANCES[torch.float32]
