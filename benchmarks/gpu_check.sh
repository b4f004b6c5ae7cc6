#!/usr/bin/env bash
# One-shot GPU check for the triton backend (no network needed): editable install, CUDA parity tests, then the
# benchmark runner (`python -m benchmarks`) on the GPU shape sets, most valuable first, and a summary of its CSV.
#   benchmarks/gpu_check.sh OUTDIR
# The runs' kernels are compiled beforehand in parallel (`--warm`) while the parity tests run, so their time goes to
# measuring. BENCH_BUDGET_S (default 180): seconds of shapes the runner starts, split over its runs below; each run
# ends its current shape past its share. About 6 minutes on an H200.
# Writes OUTDIR/{versions.txt,install.log,warm.log,pytest_gpu.log,bench.log,cuda-<gpu>.csv}.
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

budget=${BENCH_BUDGET_S:-180}
# PERCENT of the budget, then the runner's arguments: most valuable first.
runs=(
  # FlashRNN's published shape, float32 under torch's default TF32 for cuDNN RNNs (the triton backend follows it).
  "25 --set flashrnn --modes fwd,fwdbwd --dtype bfloat16,float16,float32"
  # The persistent kernel's cost per step.
  "10 --set flashrnn --modes kernel --dtype bfloat16,float32"
  # Greedy decoding, eager and replaying a CUDA graph of one step; torch.compile compiles per shape, so only the
  # small-batch LSTMs under it.
  "15 --set decode --modes decode,decode-graph --dtype float32"
  "10 --set decode --modes decode-compile --dtype float32 --cells lstm --shapes B1-,B8-"
  "15 --set gpu-train --modes fwdbwd --dtype bfloat16,float16,float32 --shapes lstm-H1024-B32-T100,lstm-H2560-B64-T100,gru-H2560-B32-T187"
  "10 --set gpu-infer --modes infer --dtype bfloat16,float32 --shapes B1-,B4- --cells lstm"
  # IEEE float32 on both sides.
  "15 --set flashrnn --modes fwdbwd --dtype float32 --cudnn-fp32 ieee"
)
runner=(python -m benchmarks --device cuda --providers torch,seqfast-triton)

echo "== compiling the runs' kernels in the background (warm.log)"
warmers=()
for run in "${runs[@]}"; do
  read -r -a args <<<"$run"
  timeout 240 "${runner[@]}" "${args[@]:1}" --warm 2 >>"$OUT/warm.log" 2>&1 &
  warmers+=($!)
done

echo "== CUDA parity tests"
# Most of the time is kernel compilation, which is CPU-bound: spread the tests over processes when xdist is there.
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n 8)
timeout 240 python -m pytest -m gpu tests/test_contract.py tests/test_triton_cuda.py -q -p no:cacheprovider "${workers[@]}" \
  >"$OUT/pytest_gpu.log" 2>&1 || status=1
tail -n 25 "$OUT/pytest_gpu.log"
wait "${warmers[@]}" || true
grep -E "^(warm|warmed)" "$OUT/warm.log" || true

echo "== benchmark (BENCH_BUDGET_S=$budget)"
log=$(mktemp)
for run in "${runs[@]}"; do
  read -r -a args <<<"$run"
  share=$((budget * args[0] / 100))
  echo "== python -m benchmarks ${args[*]:1} --budget-s $share" | tee -a "$OUT/bench.log"
  PYTHONUNBUFFERED=1 timeout $((share + 90)) "${runner[@]}" "${args[@]:1}" --out "$OUT" --budget-s "$share" \
    >"$log" 2>&1 || status=1
  cat "$log" >>"$OUT/bench.log"
  grep -E "^(budget spent|appended)" "$log" || echo "no rows written: see bench.log"
done

echo "== summary"
for csv in "$OUT"/cuda-*.csv; do
  [ -e "$csv" ] && { python -m benchmarks.report "$csv" 2>&1 | tee -a "$OUT/bench.log" || status=1; }
done
exit $status
