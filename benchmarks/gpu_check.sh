#!/usr/bin/env bash
# One-shot GPU check for the triton backend (no network needed): editable install, CUDA parity tests, benchmark.
#   benchmarks/gpu_check.sh OUTDIR        (BENCH_BUDGET_S, default 240: seconds of shapes the benchmark visits)
# Writes OUTDIR/{versions.txt,install.log,pytest_gpu.log,bench.log,gpu_bench.csv}; about 4 minutes on an H200.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export SEQFAST_STRICT=1
unset TRITON_INTERPRET || true
status=0

{
  nvidia-smi || true
  python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('triton', triton.__version__); print(torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/versions.txt"

# `python -m pip`: a bare `pip` on the PATH may belong to another interpreter than the one holding torch.
python -m pip -V
timeout 300 python -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || { tail -n 30 "$OUT/install.log"; exit 1; }
python -c "import seqfast, seqfast.kernels.triton as t; print('triton backend devices', t.DEVICES, 'interpret', t.INTERPRET)" \
  || { python -c "import setuptools, sys; print('setuptools', setuptools.__version__, sys.path, sys.meta_path)"; exit 1; }

echo "== CUDA parity tests"
# Most of the time is kernel compilation, which is CPU-bound: spread the tests over processes when xdist is there.
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n 8)
timeout 210 python -m pytest -m gpu tests/test_triton_cuda.py -q -p no:cacheprovider "${workers[@]}" \
  >"$OUT/pytest_gpu.log" 2>&1 || status=1
tail -n 25 "$OUT/pytest_gpu.log"

echo "== benchmark"
timeout 330 python benchmarks/gpu_bench.py "$OUT" --budget-s "${BENCH_BUDGET_S:-240}" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
