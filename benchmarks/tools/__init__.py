"""One-off measurement tools beside the runner (`python -m benchmarks`): `python -m benchmarks.tools.NAME`."""

import time


def per_call(step, calls):
    """Seconds per call of `step()` over `calls` calls back to back."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls
