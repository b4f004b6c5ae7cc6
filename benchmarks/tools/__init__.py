"""One-off measurement tools beside the runner (`python -m benchmarks`): `python -m benchmarks.tools.NAME`."""
